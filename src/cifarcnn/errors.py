"""Errors a user can cause, and the one-line way stage scripts report them."""
from __future__ import annotations

import atexit
import contextlib
import functools
import os
import sys
import threading
from typing import Callable, Iterator, NoReturn


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


def exit_now(code: int) -> NoReturn:
    """End a stage process at once, without Python's finalization.

    Tearing down torch and mlflow's modules takes 1-3 s per stage process on a 2-core CPU
    (bench/stage_overhead.py: `python -c "import torch, mlflow"` exits 1.8 s sooner this way), and
    nothing is left for it to do: every output is written atomically and closed, MLflow's writes
    are flushed, non-daemon threads are joined and atexit handlers run, as a normal exit does.
    """
    for thread in threading.enumerate():
        if thread is not threading.main_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(code)


def cli(main: Callable[..., object]) -> Callable[..., None]:
    """Decorate a stage's ``main`` so a :class:`UserError` ends in one clear line.

    Run as a script (``main`` defined in ``__main__``), the process then ends through ``exit_now``;
    imported (tests), ``main`` returns or raises SystemExit as usual.
    """
    as_script = main.__module__ == "__main__"

    def finish(code: int) -> None:
        if as_script:
            exit_now(code)
        if code:
            sys.exit(code)

    @functools.wraps(main)
    def wrapper(*args, **kwargs) -> None:
        sys.audit(STAGE_EVENT, "main")  # bench/stage_overhead.py: what came before is start-up and imports
        try:
            main(*args, **kwargs)
            sys.audit(STAGE_EVENT, "main_end")
        except UserError as err:
            print(f"error: {err}", file=sys.stderr)
            finish(2)
        except KeyboardInterrupt:
            print("error: interrupted", file=sys.stderr)
            finish(130)
        else:
            finish(0)

    return wrapper
