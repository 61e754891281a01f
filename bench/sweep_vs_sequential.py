"""A Ray sweep against the same number of points run one after another, by wall time.

Builds the tiny project the tests use with two runs, task2 (whose entry holds the input settings
the others share) and the final model task3e (300 generated images served on 127.0.0.1, one epoch,
CPU), runs `dvc repro evaluate@task3e-0` (what every point needs first) and commits it, then times, on the same project:

- sequential: 2 lr x 2 seeds as `dvc exp run -S lr=.. -S 'train.seeds=[s]' evaluate@task3e-<s>`,
  one after another in the workspace (what a user does by hand);
- sweep: `python -m cifarcnn.sweep -S lr=..,.. --seeds 0,1` on the embedded local Ray (each trial
  in its own clone, as many at once as the machine has CPUs, or GPUs where there are some).

The two use different learning rates (the same amount of training): with the same ones, DVC's run
cache would answer the second without training. Writes bench/results/sweep_vs_sequential_<label>.json.

    python bench/sweep_vs_sequential.py --label 2core    # about 10 minutes on 2 cores
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from fixtures import tiny_project  # noqa: E402

SEEDS = (0, 1)


def run(args: list[str], repo: Path, env: dict) -> float:
    started = time.monotonic()
    proc = subprocess.run(args, cwd=repo, env=env, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"{' '.join(args)} failed:\n{(proc.stdout + proc.stderr)[-3000:]}")
    return round(time.monotonic() - started, 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--label", default="cpu", help="names the JSON: bench/results/sweep_vs_sequential_<label>.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, tiny_project(Path(tmp), runs=["task2", "task3e"]) as (repo, env):
        env = {**env, "PYTHONPATH": str(repo / "src")}  # the copy's own package: the code timed is the code copied
        for step in (["dvc", "repro", "evaluate@task3e-0"], ["git", "add", "-A"], ["git", "commit", "-qm", "task3e as run"]):
            run(step, repo, env)
        # The sweep first: it clones the commit and needs a clean tree, which `dvc exp run` in the
        # workspace does not leave behind.
        sweep = run([sys.executable, "-m", "cifarcnn.sweep", "-S", "lr=0.0011,0.0013",
                     "--seeds", ",".join(map(str, SEEDS))], repo, env)
        sequential = {}
        for lr in ("0.0012", "0.0014"):
            for seed in SEEDS:
                sequential[f"lr{lr}-seed{seed}"] = run(
                    ["dvc", "exp", "run", "--name", f"seq-lr{lr}-seed{seed}", "-S", f"lr={lr}",
                     "-S", f"train.seeds=[{seed}]", f"evaluate@task3e-{seed}"], repo, env)
    total = round(sum(sequential.values()), 2)
    summary = {"label": args.label, "machine": f"{platform.machine()}, {os.cpu_count()} cores",
               "points": len(sequential), "sequential_seconds": total, "sequential_per_point": sequential,
               "sweep_seconds": sweep, "sequential_over_sweep": round(total / sweep, 3),
               "load_average_after": [round(x, 2) for x in os.getloadavg()]}
    out = ROOT / "bench" / "results" / f"sweep_vs_sequential_{args.label}.json"
    out.write_text(json.dumps(summary, indent=1) + "\n")
    print(f"{len(sequential)} points: one after another {total:.1f} s, Ray sweep {sweep:.1f} s "
          f"({total / sweep:.2f}x) -> {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
