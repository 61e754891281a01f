"""In-memory batches: uint8 images live on the training device, batches are cut by index.

The airbench way: no DataLoader, no PIL per image. A batch is gathered by index from one
uint8 tensor, turned into floats, augmented per image, resized (ResNet) and normalised on
the device in a handful of batched ops.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from .augment import AugmentDraws, apply_augment
from .config import AugmentSpec, InputSpec
from .data import Dataset


@dataclass
class Split:
    """One split's images [N, 3, 32, 32] uint8 and labels [N] int64, on the device."""

    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return len(self.y)


def to_device_split(x: np.ndarray, y: np.ndarray, device: torch.device) -> Split:
    images = torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2).contiguous()
    return Split(images.to(device), torch.from_numpy(np.asarray(y, dtype=np.int64)).to(device))


def validation_indices(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, validation) indices, sorted: the original's split, exactly.

    The original drew ``np.random.seed(seed); np.random.choice(n, n_val, replace=False)`` over
    the training images in the official archive's order (data_batch_1 ... data_batch_5), with no
    other numpy draw in between; a fresh legacy ``RandomState(seed)`` draws the same indices
    without touching numpy's global state.
    """
    n_val = int(round(n * fraction))
    val = np.random.RandomState(seed).choice(n, n_val, replace=False)
    train = np.setdiff1d(np.arange(n), val, assume_unique=True)
    return train, np.sort(val)


SPLIT_METHOD = "np.random.seed({seed}); np.random.choice({n}, {n_val}, replace=False)"


def split_record(ds: Dataset, fraction: float, seed: int) -> dict:
    """The validation split with its provenance: what the indices mean and how they were drawn."""
    train_idx, val_idx = validation_indices(len(ds.train_y), fraction, seed)
    return {"method": SPLIT_METHOD.format(seed=seed, n=len(ds.train_y), n_val=len(val_idx)),
            "order": ds.train_order, "train_images": int(len(train_idx)), "val_images": int(len(val_idx)),
            "val_class_counts": {c: int((ds.train_y[val_idx] == i).sum()) for i, c in enumerate(ds.classes)},
            "val_indices": val_idx.tolist()}


def make_splits(ds: Dataset, val_fraction: float, split_seed: int, device: torch.device) -> dict[str, Split]:
    train_idx, val_idx = validation_indices(len(ds.train_y), val_fraction, split_seed)
    return {
        "train": to_device_split(ds.train_x[train_idx], ds.train_y[train_idx], device),
        "val": to_device_split(ds.train_x[val_idx], ds.train_y[val_idx], device),
        "test": to_device_split(ds.test_x, ds.test_y, device),
    }


class Preprocess:
    """uint8 batch -> model input in two halves: ``unit`` ([0, 1] floats, where augmentation
    applies) and ``finish`` (resize, normalise, memory format)."""

    def __init__(self, spec: InputSpec, device: torch.device, channels_last: bool) -> None:
        self.size = spec.size
        self.mean = torch.tensor(spec.mean, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(spec.std, device=device).view(1, 3, 1, 1)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format

    @staticmethod
    def unit(images: torch.Tensor) -> torch.Tensor:
        return images.float().div_(255.0)

    def finish(self, x: torch.Tensor) -> torch.Tensor:
        """Fixed shapes and no host synchronisation: a CUDA graph can hold this call."""
        if x.shape[-1] != self.size:  # ResNet input: resized per batch on the device
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False, antialias=False)
        x = (x - self.mean) / self.std
        return x.contiguous(memory_format=self.memory_format)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return self.finish(self.unit(images))


def concat_draws(draws: list[AugmentDraws]) -> AugmentDraws:
    if len(draws) == 1:  # one step at a time (the CPU): nothing to join
        return draws[0]

    def cat(field: str, dim: int) -> torch.Tensor | None:
        parts = [getattr(d, field) for d in draws]
        return None if parts[0] is None else torch.cat(parts, dim)

    return AugmentDraws(cat("flip", 0), cat("angle", 0), cat("factors", 1), cat("order", 0))


def training_inputs(split: Split, batches: list[torch.Tensor], first_step: int, augment: AugmentSpec | None,
                    draws_for: Callable[[int], AugmentDraws], ahead: int = 1) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(images in [0, 1], augmented; labels) for each batch in ``batches``, the first being step
    ``first_step``.

    Augmentation is per image, with each step's own draws, so it can be done ``ahead`` steps at
    a time with the same result: on a GPU one pass over 128 batches costs what one batch costs
    (a few hundred small kernels), which keeps it out of the per-step graph. The CPU does one
    step at a time (``ahead=1``), exactly as it always has.
    """
    for start in range(0, len(batches), ahead):
        chunk = batches[start:start + ahead]
        idx = torch.cat(chunk) if len(chunk) > 1 else chunk[0]
        x = Preprocess.unit(split.x[idx])
        if augment is not None:
            x = apply_augment(x, augment, concat_draws([draws_for(first_step + start + j) for j in range(len(chunk))]))
        y = split.y[idx]
        offset = 0
        for b in chunk:
            yield x[offset:offset + len(b)], y[offset:offset + len(b)]
            offset += len(b)


def epoch_batches(n: int, batch_size: int, gen: torch.Generator, device: torch.device | str = "cpu") -> list[torch.Tensor]:
    """Shuffled index batches for one epoch (drawn on the CPU, so every device trains on the
    same order; moved to ``device`` in one copy); the last incomplete batch is dropped."""
    order = torch.randperm(n, generator=gen)
    return list(order[: n - n % batch_size].to(device).split(batch_size))


def eval_batches(n: int, batch_size: int) -> list[torch.Tensor]:
    return list(torch.arange(n).split(batch_size))
