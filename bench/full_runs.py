"""Full-size runs of the report's models with the pipeline's own training loop, no DVC/MLflow.

For a machine that has torch but not the rest (a borrowed GPU box): prepares the data from any
`data.source` kind, trains the named runs with params.yaml's settings, and writes one JSON of
metrics per run (written as each run ends, so a cut-off session keeps what finished).

Usage: PYTHONPATH=src python bench/full_runs.py SOURCE OUT_DIR [RUN[:MAX_EPOCHS] ...]
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

from cifarcnn.config import load_params, resolve_run
from cifarcnn.ingest import prepare
from cifarcnn.training import train

DEFAULT_RUNS = ["task2", "task3a_model1", "task3a_model2", "task3d_dropout", "task3d_no_dropout", "task3e"]


def main(source: str, out_dir: str, *runs: str) -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    ds = prepare(source, None, None, out / "cifar10.npz", out / "downloads")
    print(f"data: {len(ds.train_y)} train / {len(ds.test_y)} test in {time.perf_counter() - started:.0f} s", flush=True)
    params = load_params()
    params["resnet_weights"] = "none"  # no network here: task4a numbers are for timing only
    device = "cuda" if torch.cuda.is_available() else "cpu"
    summary = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__}
    for spec in runs or DEFAULT_RUNS:
        name, _, cap = spec.partition(":")
        cfg = resolve_run(params, name).replace(device=device)
        if cap:
            cfg = cfg.replace(epochs=min(cfg.epochs, int(cap)))
        t0 = time.perf_counter()
        result = train(cfg, ds, out / "models" / name)
        m = {**result.metrics, "wall_seconds": round(time.perf_counter() - t0, 1), "epochs_cap": cap or None}
        summary[name] = m
        (out / "full_runs.json").write_text(json.dumps(summary, indent=2))
        print(f"{name}: train {m['train_acc']:.4f} val {m['val_acc']:.4f} test {m['test_acc']:.4f} | "
              f"epochs {m['epochs_run']} best step {m['best_step']} | {m['train_seconds']:.0f} s training, "
              f"{m['wall_seconds']:.0f} s wall, {m['train_images_per_s']:.0f} img/s", flush=True)


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    main(*sys.argv[1:])
