"""Where a command's CPU went, every process included: a summary of Linux process accounting.

bench/test_timing.py sees only the CPU of pytest's workers and the children they reap. The
warm-stage servers and their forks, Ray's workers, DVC's queue workers and the servers the tests
start are never reaped by pytest, and they did most of the work. Process accounting records every
process that ends, whoever its parent: its name, CPU seconds, start and life.

    apt-get install acct                         # as root: accton, dump-acct
    touch /tmp/pacct && accton /tmp/pacct        # record every process that ends from now on
    date +%s > /tmp/t0; python -m pytest; date +%s > /tmp/t1
    accton off
    python bench/process_cpu.py /tmp/pacct --start /tmp/t0 --end /tmp/t1

Prints the CPU seconds per process name (a warm fork carries its stage script's name, e.g.
train.py; an interpreter whose last thread to end was a library's carries that thread's name, e.g.
jemalloc_bg_thd for a pytest worker or a warm server), then the processes that used the most.
"""
from __future__ import annotations

import argparse
import subprocess
import time
from collections import defaultdict
from pathlib import Path

TICKS = 100  # dump-acct's times are in clock ticks (AHZ)


def records(pacct: Path) -> list[dict]:
    out = subprocess.run(["dump-acct", str(pacct)], capture_output=True, text=True, check=True).stdout
    rows = []
    for line in out.splitlines():
        f = [x.strip() for x in line.split("|")]
        rows.append({"name": f[0], "cpu": (float(f[2]) + float(f[3])) / TICKS, "life": float(f[4]) / TICKS,
                     "pid": int(f[9]), "ppid": int(f[10]),
                     "start": time.mktime(time.strptime(f[14], "%a %b %d %H:%M:%S %Y"))})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pacct", type=Path, help="the file accton wrote")
    parser.add_argument("--start", type=Path, help="a file holding the epoch second the command started")
    parser.add_argument("--end", type=Path, help="a file holding the epoch second it ended")
    parser.add_argument("--top", type=int, default=25, help="how many names and processes to list")
    args = parser.parse_args()
    rows = records(args.pacct)
    if not rows:
        raise SystemExit(f"error: {args.pacct} holds no records; start accounting with `accton {args.pacct}` first")
    total = sum(r["cpu"] for r in rows)
    t0 = float(args.start.read_text()) if args.start else min(r["start"] for r in rows)
    line = f"{len(rows)} processes, {total:.0f} CPU-s"
    if args.end:
        wall = float(args.end.read_text()) - t0
        line += f" in {wall:.0f} s: {total / wall:.2f} cores busy on average"
    print(line)
    by_name: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for r in rows:
        by_name[r["name"]][0] += r["cpu"]
        by_name[r["name"]][1] += 1
    print(f"\n{'name':18} {'CPU-s':>8} {'procs':>6} {'each':>6}")
    for name, (cpu, n) in sorted(by_name.items(), key=lambda kv: -kv[1][0])[:args.top]:
        print(f"{name:18} {cpu:8.1f} {n:6d} {cpu / n:6.2f}")
    print(f"\nthe {args.top} processes that used the most (start: seconds after --start; ppid 1: detached)")
    for r in sorted(rows, key=lambda r: -r["cpu"])[:args.top]:
        print(f"{r['name']:18} {r['cpu']:7.1f} CPU-s  life {r['life']:7.1f} s  pid {r['pid']:7d}  ppid {r['ppid']:7d}  "
              f"start {r['start'] - t0:6.0f}")


if __name__ == "__main__":
    main()
