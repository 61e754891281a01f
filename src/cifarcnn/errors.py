"""Errors a user can cause, and the one-line way stage scripts report them."""
from __future__ import annotations

import atexit
import contextlib
import functools
import os
import select
import signal
import sys
import threading
import time
from typing import Callable, Iterator, NoReturn


class UserError(Exception):
    """A problem the user can fix (bad params, a bad file, a missing download).

    Stage scripts print its message as one line and exit with status 2; no traceback,
    because the message already says what is wrong and what to do.
    """

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))  # always one line


class Interrupted(BaseException):
    """SIGTERM or SIGHUP (``kill``, a CI timeout, a closed terminal, DVC gone): unwinds like
    KeyboardInterrupt, so a run is marked KILLED and its resume state kept on the way out."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise_interrupted(signum: int, _frame) -> None:
    raise Interrupted(signum)


SHELLS = {"sh", "bash", "dash", "zsh", "fish"}  # what DVC runs a stage's cmd with ($SHELL -c)


def _stat(pid: int) -> tuple[str, int] | None:
    """(command name, parent pid) of ``pid`` from /proc, or None when it is gone."""
    try:
        text = open(f"/proc/{pid}/stat").read()
    except OSError:
        return None
    name, rest = text[text.index("(") + 1:text.rindex(")")], text[text.rindex(")") + 2:].split()
    return name, int(rest[1])


# Set by cifarcnn.warm in the fork it runs a stage in: the pid of the process DVC started for the
# stage (watch_parent takes it out, so that nothing this stage starts inherits it).
LAUNCHER_ENV = "CIFARCNN_WARM_LAUNCHER"

_ORPHANED = threading.Event()  # set once whoever started this process, or reads its output, is gone


def _reader_gone(fd: int) -> bool:
    """Whether ``fd`` is a pipe whose reading end is closed (Linux reports POLLERR on its
    writing end): the next write to it raises BrokenPipeError. False for files and terminals."""
    try:
        poller = select.poll()
        poller.register(fd, select.POLLOUT)
        return any(events & select.POLLERR for _, events in poller.poll(0))
    except (OSError, ValueError, AttributeError):  # closed fd; no poll() on this platform
        return False


def output_unread() -> bool:
    """Whether nobody reads this process's stdout or stderr any more (both were pipes to a
    process that died: a cancelled sweep trial's Ray worker, a killed `dvc exp run`)."""
    return _reader_gone(1) or _reader_gone(2)


def stopped_from_outside(err: BaseException) -> bool:
    """Whether ``err`` ended this process because it was stopped from outside (its MLflow run
    then reads KILLED, not FAILED): Ctrl-C, SIGTERM/SIGHUP, or whoever started it or reads its
    output gone. The last often shows first as a BrokenPipeError from a print, before
    ``watch_parent``'s next look; it is told apart from a failure by the state of the pipes."""
    return isinstance(err, (KeyboardInterrupt, Interrupted)) or _ORPHANED.is_set() or output_unread()


def watch_parent(interval_s: float = 1.0) -> None:
    """SIGTERM to this process once whoever started it is gone, or nobody reads its output.

    DVC does not pass SIGTERM on to the stage it runs: without this, `kill <dvc>` leaves the
    training running as an orphan that writes outputs no dvc.lock records. The parent is DVC, or
    a shell DVC started (then DVC is watched too); under cifarcnn.warm, the parent of the process
    DVC started (``LAUNCHER_ENV``), not of this fork. Polled (Linux /proc; elsewhere the parent pid
    alone): PR_SET_PDEATHSIG would fire when the *thread* that started us ends, not the process.
    """
    me = int(os.environ.pop(LAUNCHER_ENV, 0)) or os.getpid()

    def parent_of_me() -> int | None:
        if me == os.getpid():
            return os.getppid()
        return launcher[1] if (launcher := _stat(me)) else None

    parent = parent_of_me()
    stat = _stat(parent) if parent else None
    grandparent = stat[1] if stat and stat[0] in SHELLS else None

    def gone() -> str | None:
        if parent_of_me() != parent:  # re-parented: the parent died
            return f"the process that started this stage (pid {parent}) is gone"
        if grandparent is not None and ((shell := _stat(parent)) is None or shell[1] != grandparent):
            return f"the process that started this stage (pid {grandparent}) is gone"
        return "nobody reads this stage's output any more" if output_unread() else None

    def loop() -> None:
        while not (why := gone()):
            time.sleep(interval_s)
        _ORPHANED.set()
        try:  # stderr may be a pipe nobody reads: the SIGTERM below must still come
            print(f"error: {why}; stopping", file=sys.stderr, flush=True)
        except (OSError, ValueError):
            pass
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=loop, name="watch-parent", daemon=True).start()


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
        try:
            stream.flush()
        except (OSError, ValueError):  # a pipe nobody reads any more: nothing to keep
            pass
    os._exit(code)


def stage_args(usage: str, count: int, doc: str | None = "") -> list[str]:
    """A stage script's ``count`` positional arguments. ``-h``/``--help`` prints the usage and the
    script's docstring (exit 0); a wrong count prints the usage (exit 2, as argparse does)."""
    args = sys.argv[1:]
    if any(a in ("-h", "--help") for a in args):
        print(f"usage: {usage}\n\n{(doc or '').strip()}")
        sys.exit(0)
    if len(args) != count:
        print(f"usage: {usage}", file=sys.stderr)
        sys.exit(2)
    return args


def cli(main: Callable[..., object]) -> Callable[..., None]:
    """Decorate a stage's ``main`` so a :class:`UserError` ends in one clear line.

    Run as a script (``main`` defined in ``__main__``), SIGTERM and SIGHUP unwind the stage as
    :class:`Interrupted` (a run is marked KILLED, its resume state kept), the stage stops when
    its parent (DVC) is gone, and the process ends through ``exit_now``; imported (tests),
    ``main`` returns or raises SystemExit as usual.
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
        if as_script:
            for signum in (signal.SIGTERM, signal.SIGHUP):
                signal.signal(signum, _raise_interrupted)
            watch_parent()
        try:
            main(*args, **kwargs)
            sys.audit(STAGE_EVENT, "main_end")
        except UserError as err:
            print(f"error: {err}", file=sys.stderr)
            finish(2)
        except KeyboardInterrupt:
            print("error: interrupted (SIGINT)", file=sys.stderr)
            finish(130)
        except Interrupted as err:
            print(f"error: stopped by {err}", file=sys.stderr)
            finish(128 + err.signum)
        else:
            finish(0)

    return wrapper
