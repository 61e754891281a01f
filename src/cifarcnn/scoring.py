"""Scoring a model over a split: mean loss, per-image accuracy, predictions (eval mode, no grad).

The training loop's validations and the evaluate stage both score through here.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .augment import apply_augment, draw_augment
from .batches import Preprocess, Split, eval_batches
from .config import AugmentSpec

EVAL_BATCH = 512  # images per evaluation batch (32x32 input); scaled down for bigger inputs


@torch.no_grad()
def predict(model: torch.nn.Module, split: Split, prep: Preprocess,
            augment: AugmentSpec | None = None, seed: int = 0) -> tuple[float, torch.Tensor]:
    """Mean cross-entropy over every image of ``split`` and the predicted classes (eval mode).

    ``augment``: each image augmented first, with draws from ``seed`` (the original measured
    Task 3e's train and validation accuracy so, its loaders sharing the augmented dataset).
    """
    was_training = model.training
    model.eval()
    device = split.y.device
    scale = 8 if device.type == "cuda" else 1  # a GPU wants bigger batches
    batch = max(16, scale * EVAL_BATCH * 32 * 32 // (prep.size * prep.size))
    gen = torch.Generator(device=device).manual_seed(seed) if augment is not None else None
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    preds = []
    for idx in eval_batches(len(split), batch):
        idx = idx.to(device)
        x = prep.unit(split.x[idx])
        if augment is not None:
            x = apply_augment(x, augment, draw_augment(augment, len(idx), gen, device))
        logits = model(prep.finish(x))
        loss_sum += F.cross_entropy(logits.float(), split.y[idx], reduction="sum").double()
        preds.append(logits.argmax(1))
    model.train(was_training)
    predictions = torch.cat(preds) if preds else torch.zeros(0, dtype=torch.int64, device=device)
    return float(loss_sum) / max(len(split), 1), predictions


def evaluate(model: torch.nn.Module, split: Split, prep: Preprocess,
             augment: AugmentSpec | None = None, seed: int = 0) -> tuple[float, float]:
    """Mean cross-entropy and accuracy, counted per image (not averaged over batches); ``augment``
    and ``seed`` as in ``predict``."""
    loss, preds = predict(model, split, prep, augment, seed)
    return loss, int((preds == split.y).sum()) / max(len(split), 1)
