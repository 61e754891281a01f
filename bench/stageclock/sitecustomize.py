"""Records where a stage process spends its time (bench/stage_overhead.py puts this folder on
PYTHONPATH; Python imports it at start-up). Listens to the stages' audit events
(cifarcnn.errors.STAGE_EVENT: main, work_start, work_end, main_end) and, at exit, appends one
JSON line to $CIFARCNN_STAGE_CLOCK with epoch seconds for:

- start: the process started (from /proc, 10 ms resolution), before Python ran anything; under
  cifarcnn.warm, the process DVC started, which handed the stage to a fork (``forked``: when);
- main / main_end: the stage's main entered / returned;
- work: [start, end] of each stretch of useful work;
- end: the interpreter began to exit.

Processes that emit no stage event (DVC itself, git helpers) write nothing.
"""
import atexit
import json
import os
import sys
import time

EVENT = "cifarcnn.stage"


def _process_start(pid: str = "self") -> float:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            ticks = int(fh.read().rsplit(")", 1)[1].split()[19])  # field 22: starttime, clock ticks after boot
        return time.time() - (time.clock_gettime(time.CLOCK_BOOTTIME) - ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError, AttributeError):
        return time.time()


if os.environ.get("CIFARCNN_STAGE_CLOCK"):
    _marks: dict = {"start": _process_start()}
    _open: list = []

    def _hook(event: str, args: tuple) -> None:
        if event != EVENT:
            return
        now = time.time()
        if args[0] == "work_start":
            _open.append(now)
        elif args[0] == "work_end" and _open:
            _marks.setdefault("work", []).append([_open.pop(), now])
        elif args[0] == "forked":  # cifarcnn.warm: this fork runs the stage that process args[1] began
            _marks.clear()
            _open.clear()
            _marks.update(start=_process_start(str(args[1])), forked=now)
        else:
            _marks[args[0]] = now

    def _write() -> None:
        if "main" not in _marks:
            return
        _marks["end"] = time.time()
        record = {"stage": os.environ.get("DVC_STAGE", ""), "argv": sys.argv, "pid": os.getpid(), **_marks}
        with open(os.environ["CIFARCNN_STAGE_CLOCK"], "a") as fh:  # one short line: appends do not interleave
            fh.write(json.dumps(record) + "\n")

    sys.addaudithook(_hook)
    atexit.register(_write)
