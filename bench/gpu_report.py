"""The whole report on one GPU: every measurement in one call, one JSON.

For a borrowed GPU machine that has torch but not DVC/MLflow: the pipeline's own training loop
(`cifarcnn.training.train`, CUDA graphs on) and its evaluate pass, on the full data. Graphs are asked for
explicitly (`cuda_graphs=True`): the pipeline's default stays eager until this has run. The JSON is
rewritten after every part, so a cut-off call keeps what finished.

1. check     on this GPU: 128 steps augmented in one pass vs one step at a time (max
             |difference|), and the first 100 steps of task2 and task3e with the graph-captured
             step vs the eager step from the same initial weights (losses).
2. runs      every run of params.yaml at its own settings, seed 0 (task4a at 224 px for 5
             epochs with resnet_weights none: no machine here can fetch ImageNet weights), as
             the train stage does it: wall seconds (model build, capture, training,
             validations), images/s; then the evaluate stage's work per run (the only scoring
             of the best checkpoint on train/val/test, the curves and confusion figures),
             timed on its own, with the accuracies.
3. original  the original's data path on the same GPU: torchvision DataLoader over PIL images
             with the report's transforms, 2 workers, the same model and batch size, eager
             steps with a per-batch loss.item() as the original's running loss; one epoch of
             task2 and of task3e, against one epoch of ours (validations included in ours).
4. seeds     seeds 1-4 of the six small runs; with seed 0 from part 2, five seeds' total.
5. eager     ours with CUDA graphs off, one epoch of task2 and task3e (what the graphs bring).

Usage: PYTHONPATH=src python bench/gpu_report.py SOURCE OUT_JSON [--quick]
(Past 420 s the remaining seeds and part 5 are skipped, so one call fits a 10-minute limit.)
SOURCE: any data.source kind (a folder is fastest). --quick: 2,000 images, one epoch, no
task4a at 224 px, for checking this script on a CPU.
"""
from __future__ import annotations

import json
import platform
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from cifarcnn import figures
from cifarcnn.augment import draw_augment
from cifarcnn.batches import epoch_batches, make_splits, training_inputs, validation_indices
from cifarcnn.config import load_params, resolve_run
from cifarcnn.data import Dataset
from cifarcnn.ingest import prepare, take_subset
from cifarcnn.evaluation import evaluate_checkpoint
from cifarcnn.models import create_model
from cifarcnn.training import AUGMENT_AHEAD_STEPS, make_optimizer, train
from throughput import PilDataset  # bench/throughput.py: what torchvision's CIFAR10 does per item

SMALL_RUNS = ["task2", "task3a_model1", "task3a_model2", "task3d_dropout", "task3d_no_dropout"]
ALL_RUNS = SMALL_RUNS + ["task3e", "task4a"]
SMALL_SIX = SMALL_RUNS + ["task3e"]  # "the six small runs": every run but ResNet18


class Report:
    def __init__(self, path: Path) -> None:
        self.path, self.data = path, {}

    def put(self, key: str, value) -> None:
        self.data[key] = value
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(self.data, indent=1))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def run_config(params: dict, name: str, device: torch.device, quick: bool, **changes):
    cfg = resolve_run(params, name).replace(device=device.type, **changes)
    if quick:
        cfg = cfg.replace(epochs=1, input=cfg.input.model_copy(update={"size": min(cfg.input.size, 64)}))
    return cfg


def timed_train(cfg, ds: Dataset, out: Path, score: bool = True, **kwargs) -> dict:
    """One run; ``score=False`` is the pipeline's train stage (the evaluate stage scores)."""
    sync(torch.device(cfg.device))
    t0 = time.perf_counter()
    result = train(cfg, ds, out, score=score, **{"cuda_graphs": True, **kwargs})
    sync(torch.device(cfg.device))
    keep = ("train_acc", "val_acc", "test_acc", "best_val_loss", "best_val_acc", "best_epoch", "epochs_run",
            "stopped_early", "train_seconds", "train_images_per_s", "cuda_graph")
    m = {k: result.metrics[k] for k in keep if k in result.metrics}
    m["wall_seconds"] = round(time.perf_counter() - t0, 2)
    scores = (f"acc train/val/test {m['train_acc']:.4f}/{m['val_acc']:.4f}/{m['test_acc']:.4f}" if score
              else f"best val acc {m['best_val_acc']:.4f}")
    print(f"  {cfg.name} seed {cfg.seed}: {m['wall_seconds']:.1f} s wall, {m['train_seconds']:.1f} s training, "
          f"{m['train_images_per_s']:.0f} img/s, graph {m['cuda_graph']}, epochs {m['epochs_run']}, {scores}", flush=True)
    return m


# --- 1. the graph computes what the eager step computes ----------------------------------------

def check_graph(params: dict, ds: Dataset, device: torch.device, quick: bool) -> dict:
    out: dict = {}
    cfg = run_config(params, "task3e", device, quick)
    train_split = make_splits(ds, cfg.val_fraction, cfg.split_seed, device)["train"]
    batches = epoch_batches(len(train_split), cfg.batch_size, torch.Generator().manual_seed(0), device)[:300]
    gen = torch.Generator(device=device)

    def draws_for(step):
        return draw_augment(cfg.augment, cfg.batch_size, gen.manual_seed(step), device)

    one = training_inputs(train_split, batches, 0, cfg.augment, draws_for, ahead=1)
    many = training_inputs(train_split, batches, 0, cfg.augment, draws_for, ahead=AUGMENT_AHEAD_STEPS)
    out["augment_ahead_max_abs_diff"] = max(float((a[0] - b[0]).abs().max()) for a, b in zip(one, many))

    for name in ("task2", "task3e"):  # task3e: dropout masks differ between the two, so only roughly equal
        cfg = run_config(params, name, device, quick, epochs=1, evals_per_epoch=1)
        n = 100 * cfg.batch_size * 10 // 9 + 200  # 100 training steps after the validation split
        sub = take_subset(ds, n) if len(ds.train_y) > n else ds
        losses = {}
        for graphs in (False, True):
            r = train(cfg, sub, Path("/tmp/gpu_report_check") / f"{name}_{graphs}", cuda_graphs=graphs)
            losses[graphs] = np.asarray(r.history.losses[:100])
            out[f"{name}_{'graph' if graphs else 'eager'}_used_graph"] = r.metrics["cuda_graph"]
        diff = np.abs(losses[True] - losses[False])
        out[name] = {"first_loss": [float(losses[False][0]), float(losses[True][0])],
                     "loss_max_abs_diff": float(diff.max()), "loss_mean_abs_diff": float(diff.mean()),
                     "mean_loss_last_20": [float(losses[False][-20:].mean()), float(losses[True][-20:].mean())]}
    print(f"check: {out}", flush=True)
    return out


# --- 2. the report's runs, and the evaluate stage's work -------------------------------------

def evaluate_stage_work(name: str, best: Path, ds: Dataset, device: torch.device, out_dir: Path) -> tuple[float, dict]:
    """The evaluate stage's work on one run (without MLflow): seconds, and the accuracies."""
    sync(device)
    t0 = time.perf_counter()
    m = evaluate_checkpoint(best, ds, device.type)
    blocks = {"step": [1, 2], "mean": [1.0, 0.9], "std": [0.1, 0.1]}
    figures.training_curves(blocks, [{"step": 1, "epoch": 0.5, "val_loss": m["val_loss"], "val_acc": m["val_acc"]}],
                            m, name, out_dir / f"{name}_curves.png")
    figures.confusion(m["test_confusion"], m["classes"], name, out_dir / f"{name}_confusion.png")
    return round(time.perf_counter() - t0, 2), {k: m[k] for k in ("train_acc", "val_acc", "test_acc")}


# --- 3. the original's data path -------------------------------------------------------------

def original_epoch(cfg, ds: Dataset, device: torch.device) -> dict:
    import torchvision.transforms as T

    torch.manual_seed(cfg.seed)
    train_idx, _ = validation_indices(len(ds.train_y), cfg.val_fraction, cfg.split_seed)
    transforms = []
    if cfg.augment is not None:
        a = cfg.augment
        transforms = [T.RandomHorizontalFlip(a.hflip_p), T.RandomRotation(a.rotate_deg),
                      T.ColorJitter(a.brightness, a.contrast, a.saturation, a.hue)]
    transforms += [T.ToTensor(), T.Normalize(cfg.input.mean, cfg.input.std)]
    loader = torch.utils.data.DataLoader(
        PilDataset(ds.train_x[train_idx], ds.train_y[train_idx], T.Compose(transforms)),
        batch_size=cfg.batch_size, shuffle=True, drop_last=True, num_workers=2)
    model = create_model(cfg.model, **cfg.model_params).to(device).train()
    optimizer = make_optimizer(cfg, model)
    sync(device)
    t0 = time.perf_counter()
    images, running_loss, running_acc, steps = 0, 0.0, 0.0, 0
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        running_loss += loss.item()  # the original's running loss and per-batch accuracy
        running_acc += (logits.argmax(1) == y).float().mean().item()
        images += len(y)
        steps += 1
    sync(device)
    seconds = time.perf_counter() - t0
    return {"seconds": round(seconds, 2), "images_per_s": round(images / seconds, 1), "steps": steps,
            "mean_loss": running_loss / max(steps, 1)}


def main(source: str, out_json: str, *flags: str) -> None:
    quick = "--quick" in flags
    deadline = 420.0  # seconds: later seeds and the eager baseline are skipped past this
    report = Report(Path(out_json))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    work = Path("/tmp/gpu_report")
    report.put("env", {"device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
                       "torch": torch.__version__, "cudnn": torch.backends.cudnn.version(), "quick": quick,
                       "python": platform.python_version()})
    started = time.perf_counter()
    cache = Path("bench-cache") / ("cifar10-quick.npz" if quick else "cifar10.npz")
    if cache.exists():
        ds = Dataset.load(cache)
    else:
        ds = prepare(source, None, 2000 if quick else None, cache, work / "downloads")
    report.put("data", {"train": len(ds.train_y), "test": len(ds.test_y), "seconds": round(time.perf_counter() - started, 1)})
    print(f"data: {len(ds.train_y)} train / {len(ds.test_y)} test in {time.perf_counter() - started:.0f} s", flush=True)
    params = load_params()
    params["resnet_weights"] = "none"

    def part(name: str, fn) -> None:
        print(f"== {name}", flush=True)
        try:
            report.put(name, fn())
        except Exception:  # noqa: BLE001 - keep the other parts' numbers
            traceback.print_exc()
            report.put(name, {"error": traceback.format_exc(limit=3)})

    part("check", lambda: check_graph(params, ds, device, quick))

    def runs() -> dict:
        out: dict = {"runs": {}, "evaluate_seconds": {}}
        for name in ALL_RUNS:
            cfg = run_config(params, name, device, quick)
            out["runs"][name] = timed_train(cfg, ds, work / "models" / name, score=False)  # as train@<run>
            report.put("runs", out)
        for name in ALL_RUNS:  # as evaluate@<run>: the only scoring
            seconds, accuracy = evaluate_stage_work(name, work / "models" / name / "best.pt", ds, device, work / "figures")
            out["evaluate_seconds"][name] = seconds
            out["runs"][name].update(accuracy)
            print(f"  evaluate {name}: {seconds:.1f} s, acc train/val/test {accuracy['train_acc']:.4f}/"
                  f"{accuracy['val_acc']:.4f}/{accuracy['test_acc']:.4f}", flush=True)
        out["train_wall_total"] = round(sum(r["wall_seconds"] for r in out["runs"].values()), 1)
        out["evaluate_total"] = round(sum(out["evaluate_seconds"].values()), 1)
        print(f"runs: train {out['train_wall_total']} s, evaluate {out['evaluate_total']} s", flush=True)
        return out

    part("runs", runs)

    def original() -> dict:
        out = {}
        for name in ("task2", "task3e"):
            cfg = run_config(params, name, device, quick, epochs=1)
            theirs = original_epoch(cfg, ds, device)
            ours = timed_train(cfg, ds, work / "one_epoch" / name)
            out[name] = {"original": theirs, "ours": ours,
                         "ours_over_original": round(ours["train_images_per_s"] / theirs["images_per_s"], 2)}
            print(f"  {name}: original {theirs['images_per_s']:.0f} img/s, ours {ours['train_images_per_s']:.0f} "
                  f"img/s: {out[name]['ours_over_original']}x", flush=True)
            report.put("original", out)
        return out

    part("original", original)

    def seeds() -> dict:
        out: dict = {"runs": {}}
        for seed in range(1, 5):
            if time.perf_counter() - started > deadline:
                out["cut_off_at_seed"] = seed  # the call's time limit: what finished is kept
                break
            for name in SMALL_SIX:
                cfg = run_config(params, name, device, quick, seed=seed)
                out["runs"][f"{name}/seed{seed}"] = timed_train(cfg, ds, work / "seeds" / f"{name}_{seed}")
                report.put("seeds", out)
        seed0 = report.data.get("runs", {}).get("runs", {})
        out["seeds_1_4_wall_total"] = round(sum(r["wall_seconds"] for r in out["runs"].values()), 1)
        out["five_seeds_wall_total"] = round(out["seeds_1_4_wall_total"]
                                             + sum(seed0[n]["wall_seconds"] for n in SMALL_SIX if n in seed0), 1)
        print(f"seeds: five seeds of the six small runs {out['five_seeds_wall_total']} s", flush=True)
        return out

    part("seeds", seeds)

    def eager() -> dict:
        return {name: timed_train(run_config(params, name, device, quick, epochs=1), ds, work / "eager" / name,
                                  cuda_graphs=False) for name in ("task2", "task3e")}

    if time.perf_counter() - started < deadline:
        part("eager", eager)
    report.put("total_seconds", round(time.perf_counter() - started, 1))
    print(json.dumps({k: v for k, v in report.data.items() if k in ("env", "data", "total_seconds")}), flush=True)


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    main(*sys.argv[1:])
