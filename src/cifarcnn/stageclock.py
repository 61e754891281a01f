"""Where a stage process spends its time, for bench/stage_overhead.py (off unless asked).

With ``CIFARCNN_STAGE_CLOCK=<file>`` set, every stage process appends one JSON line to that file
when it exits: its DVC stage, and epoch seconds for each mark:

- ``start``: the process started (from /proc, 10 ms resolution), before Python ran anything;
- ``main``: the stage's ``main`` was entered, so ``main - start`` is interpreter start + imports;
- ``work``: [start, end] of each stretch of useful work (training, scoring, drawing), from ``work()``;
- ``main_end``: ``main`` returned; ``end``: the interpreter began to exit.

Without the variable every call here is a no-op, so stages pay nothing for it.
"""
from __future__ import annotations

import atexit
import contextlib
import json
import os
import sys
import time
from typing import Iterator

ENV = "CIFARCNN_STAGE_CLOCK"
_marks: dict = {}


def process_start() -> float:
    """Epoch seconds at which this process started (now, where /proc cannot tell)."""
    try:
        with open("/proc/self/stat") as fh:
            ticks = int(fh.read().rsplit(")", 1)[1].split()[19])  # field 22: starttime, clock ticks after boot
        age = time.clock_gettime(time.CLOCK_BOOTTIME) - ticks / os.sysconf("SC_CLK_TCK")
        return time.time() - age
    except (OSError, ValueError, IndexError, AttributeError):
        return time.time()


def _write() -> None:
    _marks["end"] = time.time()
    record = {"stage": os.environ.get("DVC_STAGE", ""), "argv": sys.argv, "pid": os.getpid(), **_marks}
    with open(os.environ[ENV], "a") as fh:  # one short line per process: appends do not interleave
        fh.write(json.dumps(record) + "\n")


def mark(name: str) -> None:
    if not os.environ.get(ENV):
        return
    if not _marks:
        _marks["start"] = process_start()
        atexit.register(_write)
    _marks[name] = time.time()


@contextlib.contextmanager
def work() -> Iterator[None]:
    """The stage's useful work: what is left of its time is fixed cost."""
    if not os.environ.get(ENV):
        yield
        return
    mark("work")  # the first call also starts the record
    started = _marks.pop("work")
    try:
        yield
    finally:
        _marks.setdefault("work", []).append([started, time.time()])
