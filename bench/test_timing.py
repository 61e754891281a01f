"""Where `make test`'s time goes: sums the lines tests/conftest.py writes with CIFARCNN_TEST_TIMING.

    CIFARCNN_TEST_TIMING=/tmp/timing.jsonl python -m pytest
    python bench/test_timing.py /tmp/timing.jsonl            # per file, then the slowest phases

Per file: its worker, when it started and ended (seconds after the first test), its wall time, and
the CPU seconds of the worker and the children it reaped. A CPU column far below the wall column
means waiting (on a server, on a queue) or work done by processes the worker never reaps: a
warm-stage server's forks, Ray's and DVC's queue workers. For the machine's whole load meanwhile,
sample /proc/stat beside it (docs/tests.md: Time).
"""
from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("timing", type=Path, help="the JSON-lines file CIFARCNN_TEST_TIMING named")
    parser.add_argument("--top", type=int, default=20, help="how many of the slowest phases to list")
    args = parser.parse_args()
    rows = [json.loads(line) for line in args.timing.read_text().splitlines() if line.strip()]
    if not rows:
        raise SystemExit(f"error: {args.timing} holds no timing lines; run pytest with CIFARCNN_TEST_TIMING={args.timing}")
    t0 = min(r["start"] for r in rows)
    files: dict[str, dict] = defaultdict(lambda: {"wall": 0.0, "cpu": 0.0, "start": float("inf"), "end": 0.0})
    for r in rows:
        f = files[r["test"].split("::")[0]]
        f["wall"] += r["end"] - r["start"]
        f["cpu"] += r["cpu"]
        f["start"], f["end"], f["worker"] = min(f["start"], r["start"]), max(f["end"], r["end"]), r["worker"]
    print(f"{'file':34} {'worker':6} {'from':>6} {'to':>6} {'wall s':>8} {'cpu s':>8}")
    for name, f in sorted(files.items(), key=lambda item: item[1]["start"]):
        print(f"{name:34} {f['worker']:6} {f['start'] - t0:6.0f} {f['end'] - t0:6.0f} {f['wall']:8.1f} {f['cpu']:8.1f}")
    print(f"\nall: {max(r['end'] for r in rows) - t0:.0f} s from the first test's start to the last one's end")
    print(f"\nthe {args.top} slowest phases:")
    for r in sorted(rows, key=lambda r: r["start"] - r["end"])[:args.top]:
        print(f"{r['end'] - r['start']:7.1f} s wall {r['cpu']:7.1f} s cpu  {r['worker']:5} {r['phase']:8} {r['test']}")


if __name__ == "__main__":
    main()
