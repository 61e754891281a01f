"""The evaluate stage's work: a best checkpoint on every split, per-class accuracy, confusion matrix."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .batches import Preprocess, make_splits
from .checkpoint import load_best_model
from .data import Dataset
from .device import resolve_device, use_channels_last
from .errors import UserError
from .scoring import evaluate, predict


# eval.json holds these numbers (only numbers: `dvc metrics show <file>` reads it); the rest of
# the evaluation, task3e's accuracies on augmented images included, goes to eval_detail.json.
EVAL_METRICS = ("train_acc", "val_acc", "test_acc", "train_loss", "val_loss", "test_loss")
AUGMENTED_EVAL_SEED = 0  # the augmentation draws of the like-for-like pass (fixed: a measurement, not training)


def confusion_matrix(labels: np.ndarray, preds: np.ndarray, n_classes: int) -> np.ndarray:
    """Counts; rows are true classes, columns predicted classes."""
    return np.bincount(labels * n_classes + preds, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def predictions_csv(actual: list[int], predicted: list[int], classes: list[str]) -> str:
    """One row per test image (class names), for DVC's confusion-matrix plot."""
    rows = ["actual,predicted"] + [f"{classes[a]},{classes[p]}" for a, p in zip(actual, predicted)]
    return "\n".join(rows) + "\n"


def evaluate_checkpoint(best_path: str | Path, ds: Dataset, device_name: str = "auto") -> dict:
    best_path = Path(best_path)
    if not best_path.exists():
        raise UserError(f"{best_path} does not exist; run its train stage first (dvc repro)")
    model, cfg, ckpt = load_best_model(best_path)
    if list(ckpt.get("classes", ds.classes)) != list(ds.classes):
        raise UserError(f"{best_path} was trained on classes {ckpt['classes']}, the data has {ds.classes}; "
                        "re-run its train stage")
    device = resolve_device(device_name)
    channels_last = use_channels_last(device, cfg.input.size)
    model = model.to(device, memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    prep = Preprocess(cfg.input, device, channels_last)
    splits = make_splits(ds, cfg.val_fraction, cfg.split_seed, device)
    out: dict = {"run": cfg.name, "best_step": ckpt.get("step"), "device": str(device)}
    for name, split in splits.items():
        loss, preds = predict(model, split, prep)
        labels, preds = split.y.cpu().numpy(), preds.cpu().numpy()
        out[f"{name}_loss"] = loss
        out[f"{name}_acc"] = float((labels == preds).mean()) if len(labels) else float("nan")
        out[f"{name}_images"] = int(len(labels))
        if name == "test":
            cm = confusion_matrix(labels, preds, len(ds.classes))
            totals = cm.sum(1)
            out["test_class_acc"] = {c: float(cm[i, i] / totals[i]) if totals[i] else None
                                     for i, c in enumerate(ds.classes)}
            out["test_confusion"] = cm.tolist()
            out["test_actual"], out["test_predicted"] = labels.tolist(), preds.tolist()  # -> predictions.csv
    if cfg.augment is not None:  # like for like with the original, which augmented train and val alike
        for name in ("train", "val"):
            out[f"{name}_loss_aug"], out[f"{name}_acc_aug"] = evaluate(model, splits[name], prep, cfg.augment,
                                                                        AUGMENTED_EVAL_SEED)
    out["classes"] = list(ds.classes)
    return out
