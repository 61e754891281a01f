"""Fixed cost per DVC stage: what `dvc repro` spends around each stage's useful work.

Builds the tiny project the tests use (the tracked files, 300 generated images served on
127.0.0.1, one epoch, resnet_weights: none), runs `dvc repro` from scratch with
CIFARCNN_STAGE_CLOCK set and bench/stageclock/ on PYTHONPATH (its sitecustomize records each
stage process's marks: the audit events of cifarcnn.errors) and
splits every stage's time into:

- imports: process start -> the stage's main (interpreter start and imports);
- setup: main -> first useful work (loading data, MLflow connect, parent run, ...);
- work: the useful work (training, scoring, drawing; a stage that marks none: all of its main);
- finish: last useful work -> main returned (model logging, writing outputs, MLflow);
- exit: main returned -> the interpreter exits (atexit handlers);
- dvc: the time before the stage's process started, since the previous one ended (DVC's
  hashing, lock and cache bookkeeping), and after the last one.

fixed = everything but work. Writes bench/results/stage_overhead_<label>.json and prints a table.

    python bench/stage_overhead.py --label after   # about 5-10 minutes on 2 cores
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from fixtures import tiny_project  # noqa: E402


def phases(records: list[dict], repro_start: float, repro_end: float) -> dict[str, dict]:
    out: dict[str, dict] = {}
    previous_end = repro_start
    for r in sorted(records, key=lambda r: r["start"]):
        main, main_end = r.get("main", r["start"]), r.get("main_end", r["end"])
        intervals = r.get("work") or [[main, main_end]]
        work = sum(e - s for s, e in intervals)
        first, last = intervals[0][0], intervals[-1][1]
        name = r["stage"] or " ".join(Path(a).name for a in r["argv"])
        out[name] = {k: round(v, 3) for k, v in {
            "dvc_before": max(0.0, r["start"] - previous_end), "imports": main - r["start"],
            "setup": first - main, "work": work, "finish": main_end - last, "exit": r["end"] - main_end}.items()}
        out[name]["fixed"] = round(sum(v for k, v in out[name].items() if k != "work"), 3)
        previous_end = r["end"]
    out["(dvc after the last stage)"] = {"dvc_before": round(max(0.0, repro_end - previous_end), 3), "work": 0.0,
                                         "fixed": round(max(0.0, repro_end - previous_end), 3)}
    return out


def run_clocked(args: list[str], repo: Path, env: dict, clock: Path) -> tuple[float, dict]:
    """Run one command in ``repo`` with every stage process's clock on (bench/stageclock records
    into ``clock``); its wall time and its stages' phases. The stages import the copy's own
    package, not the editable install's checkout: the code measured is the code copied."""
    env = {**env, "CIFARCNN_STAGE_CLOCK": str(clock),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(repo / "src"), str(ROOT / "bench" / "stageclock"),
                                                       env.get("PYTHONPATH")]))}
    clock.unlink(missing_ok=True)
    started = time.time()
    proc = subprocess.run(args, cwd=repo, env=env, capture_output=True, text=True)
    ended = time.time()
    if proc.returncode:
        sys.exit(f"{' '.join(args)} failed ({proc.returncode}):\n{(proc.stdout + proc.stderr)[-3000:]}")
    records = [json.loads(line) for line in clock.read_text().splitlines()] if clock.exists() else []
    return ended - started, phases(records, started, ended)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--label", default="cpu", help="names the JSON: bench/results/stage_overhead_<label>.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, tiny_project(Path(tmp)) as (repo, env):
        load_before = os.getloadavg()
        wall, stages = run_clocked(["dvc", "repro"], repo, env, Path(tmp) / "clock.jsonl")
    real = {k: v for k, v in stages.items() if not k.startswith("(")}
    work = sum(v["work"] for v in stages.values())
    totals = {k: round(sum(v.get(k, 0.0) for v in stages.values()), 2)
              for k in ("dvc_before", "imports", "setup", "work", "finish", "exit", "fixed")}
    summary = {
        "label": args.label, "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "python": platform.python_version(), "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "stages": len(real), "repro_wall_seconds": round(wall, 2), "work_seconds": round(work, 2),
        "repro_over_work": round(wall / work, 3) if work else None,
        "fixed_seconds_per_stage": {"mean": round(statistics.mean(v["fixed"] for v in real.values()), 3),
                                    "median": round(statistics.median(v["fixed"] for v in real.values()), 3),
                                    "max": round(max(v["fixed"] for v in real.values()), 3)},
        "totals": totals, "per_stage": stages,
    }
    out = ROOT / "bench" / "results" / f"stage_overhead_{args.label}.json"
    out.write_text(json.dumps(summary, indent=1) + "\n")
    print(f"{'stage':34s} {'dvc':>6s} {'imports':>8s} {'setup':>6s} {'work':>7s} {'finish':>7s} {'exit':>5s} {'fixed':>6s}")
    for name, v in stages.items():
        print(f"{name:34s} {v['dvc_before']:6.2f} {v.get('imports', 0):8.2f} {v.get('setup', 0):6.2f} {v['work']:7.2f} "
              f"{v.get('finish', 0):7.2f} {v.get('exit', 0):5.2f} {v['fixed']:6.2f}")
    print(f"{len(real)} stages: dvc repro {wall:.1f} s for {work:.1f} s of work ({wall / work:.2f}x); fixed cost per "
          f"stage mean {summary['fixed_seconds_per_stage']['mean']:.2f} s; totals {totals} -> {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
