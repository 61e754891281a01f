"""MLflow logging cost as a share of training time (goal: < 2%).

1. From real runs: each results/<run>/seed<k>/train/train.json records the seconds spent logging params
   and per-step/validation metrics during training, and the training seconds.
2. A microbenchmark into a throw-away sqlite store: one validation interval of task2
   (351 per-step losses + 3 validation metrics, one log_batch) against the time the same
   351 steps take to train at the measured task2 throughput.
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path


def from_runs() -> None:
    files = sorted(Path("results").glob("*/seed*/train/train.json"))
    if not files:
        print("no results/*/seed*/train/train.json yet (run `dvc repro`); skipping the per-run shares")
    for f in files:
        m = json.loads(f.read_text())
        print(f"{f.parent.name:18s} logging {m['mlflow_logging_seconds']:7.2f} s of {m['train_seconds']:8.1f} s "
              f"training = {m['mlflow_logging_share']:.2%}")


def microbenchmark(steps_per_interval: int = 351, repeats: int = 20, train_img_per_s: float = 450.0) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp}/bench.db"
        os.environ["DVC_ROOT"] = tmp
        from cifarcnn.tracking import MlflowRun

        run = MlflowRun.start("bench", "bench", {})
        times = []
        for r in range(repeats):
            steps = list(range(r * steps_per_interval + 1, (r + 1) * steps_per_interval + 1))
            started = time.perf_counter()
            run.log_train_losses(steps, [1.0] * len(steps))
            run.log_validation(steps[-1], r + 1.0, 1.0, 0.5)
            times.append(time.perf_counter() - started)
        run.finish()
    per_interval = statistics.median(times)
    train_seconds = steps_per_interval * 64 / train_img_per_s
    print(f"one validation interval ({steps_per_interval} step losses + 3 metrics): {per_interval * 1000:.0f} ms "
          f"median; training it takes ~{train_seconds:.0f} s at {train_img_per_s:.0f} img/s "
          f"-> {per_interval / train_seconds:.2%} of training time")


if __name__ == "__main__":
    from_runs()
    microbenchmark(*(float(a) if i == 2 else int(a) for i, a in enumerate(sys.argv[1:4])))
