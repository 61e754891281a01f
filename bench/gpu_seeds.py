"""Every run of the report over seeds 0-4 on one GPU, with the original's validation split.

For issue 11's measurement on a borrowed GPU machine (torch, no DVC/MLflow): the pipeline's own
training loop (CUDA graphs, as on by default) and its evaluate work, per (run, seed): train /
validation / test accuracy of the best checkpoint, for augmented runs also train and validation
accuracy on augmented images (like for like with the original), the stopping epoch. Seeds go
round-robin over the six small runs, then task4a (224 px, 5 epochs, ``resnet_weights: none``:
no machine here can fetch ImageNet weights), so a call cut short keeps balanced seeds. The JSON
is rewritten after every unit; no unit starts past the deadline.

Usage: PYTHONPATH=src python bench/gpu_seeds.py SOURCE OUT_JSON [--quick] [--deadline SECONDS]
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

from cifarcnn.batches import split_record
from cifarcnn.config import load_params
from cifarcnn.data import Dataset
from cifarcnn.ingest import prepare
from cifarcnn.evaluation import evaluate_checkpoint
from gpu_report import SMALL_SIX, Report, run_config, sync, timed_train

SEEDS = range(5)
KEEP = ("train_acc", "val_acc", "test_acc", "train_acc_aug", "val_acc_aug", "val_loss", "test_loss")


def main(source: str, out_json: str, *flags: str) -> None:
    quick = "--quick" in flags
    deadline = float(flags[flags.index("--deadline") + 1]) if "--deadline" in flags else 400.0
    report = Report(Path(out_json))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    work = Path("/tmp/gpu_seeds")
    started = time.perf_counter()
    cache = Path("bench-cache") / ("cifar10-quick.npz" if quick else "cifar10.npz")
    ds = Dataset.load(cache) if cache.exists() else prepare(source, None, 2000 if quick else None, cache, work / "dl")
    params = load_params()
    params["resnet_weights"] = "none"
    first = run_config(params, "task2", device, quick)
    split = split_record(ds, first.val_fraction, first.split_seed)
    report.put("env", {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                       "torch": torch.__version__, "quick": quick, "source": source,
                       "split": {k: v for k, v in split.items() if k != "val_indices"},
                       "val_indices_first_10": split["val_indices"][:10]})
    units = [(run, seed) for seed in SEEDS for run in SMALL_SIX] + [("task4a", seed) for seed in SEEDS]
    results: dict = {}
    for run, seed in units:
        if time.perf_counter() - started > deadline:
            report.put("cut_off_before", f"{run} seed {seed}")
            break
        cfg = run_config(params, run, device, quick, seed=seed)
        out = work / f"{run}_{seed}"
        m = timed_train(cfg, ds, out, score=False)
        sync(device)
        t0 = time.perf_counter()
        e = evaluate_checkpoint(out / "best.pt", ds, device.type)
        m.update({k: e[k] for k in KEEP if k in e}, evaluate_seconds=round(time.perf_counter() - t0, 2))
        results.setdefault(run, {})[str(seed)] = m
        print(f"    evaluate: train/val/test {e['train_acc']:.4f}/{e['val_acc']:.4f}/{e['test_acc']:.4f}"
              + (f", augmented train/val {e['train_acc_aug']:.4f}/{e['val_acc_aug']:.4f}"
                 if "train_acc_aug" in e else ""), flush=True)
        report.put("runs", results)
    report.put("total_seconds", round(time.perf_counter() - started, 1))
    print(json.dumps({"total_seconds": report.data["total_seconds"], "units": sum(map(len, results.values()))}))


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    main(*sys.argv[1:])
