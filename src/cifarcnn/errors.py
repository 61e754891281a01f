"""Errors a user can cause, and the one-line way stage scripts report them."""
from __future__ import annotations

import functools
import sys
from typing import Callable

from . import stageclock


class UserError(Exception):
    """A problem the user can fix (bad params, a bad file, a missing download).

    Stage scripts print its message as one line and exit with status 2; no traceback,
    because the message already says what is wrong and what to do.
    """

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))  # always one line


def cli(main: Callable[..., object]) -> Callable[..., None]:
    """Decorate a stage's ``main`` so a :class:`UserError` ends in one clear line."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs) -> None:
        stageclock.mark("main")  # bench/stage_overhead.py: what came before this is start-up and imports
        try:
            main(*args, **kwargs)
            stageclock.mark("main_end")
        except UserError as err:
            print(f"error: {err}", file=sys.stderr)
            sys.exit(2)
        except KeyboardInterrupt:
            print("error: interrupted", file=sys.stderr)
            sys.exit(130)

    return wrapper
