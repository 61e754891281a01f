"""Errors a user can cause, and the one-line way stage scripts report them."""
from __future__ import annotations

import contextlib
import functools
import sys
from typing import Callable, Iterator


class UserError(Exception):
    """A problem the user can fix (bad params, a bad file, a missing download).

    Stage scripts print its message as one line and exit with status 2; no traceback,
    because the message already says what is wrong and what to do.
    """

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))  # always one line


# Marks of a stage's time, as audit events: free unless a hook listens (bench/stage_overhead.py
# installs one), and no module of their own, so timing code never enters a stage's deps.
STAGE_EVENT = "cifarcnn.stage"


@contextlib.contextmanager
def work() -> Iterator[None]:
    """A stretch of a stage's useful work (training, scoring, drawing): the rest is fixed cost."""
    sys.audit(STAGE_EVENT, "work_start")
    try:
        yield
    finally:
        sys.audit(STAGE_EVENT, "work_end")


def cli(main: Callable[..., object]) -> Callable[..., None]:
    """Decorate a stage's ``main`` so a :class:`UserError` ends in one clear line."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs) -> None:
        sys.audit(STAGE_EVENT, "main")  # bench/stage_overhead.py: what came before is start-up and imports
        try:
            main(*args, **kwargs)
            sys.audit(STAGE_EVENT, "main_end")
        except UserError as err:
            print(f"error: {err}", file=sys.stderr)
            sys.exit(2)
        except KeyboardInterrupt:
            print("error: interrupted", file=sys.stderr)
            sys.exit(130)

    return wrapper
