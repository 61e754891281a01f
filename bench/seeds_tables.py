"""The report's verdict tables from bench/gpu_seeds.py's JSON (seeds measured on a GPU).

Turns every (run, seed) of the JSON into the shape the report stage reads and prints the same
tables reports/report.md has: the report's number, ours as mean ± sd (n), min–max and the
verdict per number; the paired claims (Welch's t-test); the stopping epochs.

Usage: PYTHONPATH=src python bench/seeds_tables.py bench/results/gpu_seeds_h200.json
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pandas as pd

from cifarcnn.report import REPORT_ORDER, accuracy_table, claims_section, text_table

STEPS_PER_EPOCH = {"task2": 703, "task3a_model1": 703, "task3a_model2": 703, "task3d_dropout": 703,
                   "task3d_no_dropout": 703, "task3e": 1406, "task4a": 1406}  # 45,000 images / batch, last dropped


def as_results(data: dict) -> dict[str, list[dict]]:
    out = {}
    for run in REPORT_ORDER:
        seeds = data["runs"].get(run, {})
        out[run] = [{"seed": int(seed), "config": None,
                     "train": {k: m[k] for k in ("epochs_run", "best_epoch", "stopped_early", "train_seconds")},
                     # the JSON predates the short names: train_acc_augmented -> train_acc_aug
                     "eval": {k.replace("_augmented", "_aug"): v for k, v in m.items()
                              if k.endswith(("_acc", "_augmented", "_aug"))}}
                    for seed, m in sorted(seeds.items(), key=lambda kv: int(kv[0]))]
    return {run: seeds for run, seeds in out.items() if seeds}


def main(path: str) -> None:
    data = json.loads(Path(path).read_text())
    results = as_results(data)
    env = data["env"]
    print(f"{env['device']}, torch {env['torch']}; split: {env['split']['method']} over {env['split']['order']}\n")
    for run in results:
        print(f"### {run}\n\n{accuracy_table(results, run)}\n")
    print("### The report's claims\n\n" + "\n".join(claims_section(results)))
    rows = [{"run": run, "epochs run per seed": ", ".join(f"{s['train']['epochs_run']:.2f}" for s in seeds),
             "best checkpoint at epoch": ", ".join(f"{s['train']['best_epoch']:.2f}" for s in seeds),
             "stopped early": f"{sum(s['train']['stopped_early'] for s in seeds)} of {len(seeds)}"}
            for run, seeds in results.items()]
    print("### Stopping (the report states one: Task 2's best model at ≈ 5,000 steps = 7.1 epochs)\n\n"
          + text_table(pd.DataFrame(rows)))


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(sys.argv[1])
