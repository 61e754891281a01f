"""In-memory batches: uint8 images live on the training device, batches are cut by index.

The airbench way: no DataLoader, no PIL per image. A batch is gathered by index from one
uint8 tensor, turned into floats, augmented per image, resized (ResNet) and normalised on
the device in a handful of batched ops.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .augment import augment_batch
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
    """(train, validation) indices: a fixed random ``fraction`` held out, chosen before training."""
    n_val = int(round(n * fraction))
    order = np.random.default_rng(seed).permutation(n)
    return np.sort(order[n_val:]), np.sort(order[:n_val])


def make_splits(ds: Dataset, val_fraction: float, split_seed: int, device: torch.device) -> dict[str, Split]:
    train_idx, val_idx = validation_indices(len(ds.train_y), val_fraction, split_seed)
    return {
        "train": to_device_split(ds.train_x[train_idx], ds.train_y[train_idx], device),
        "val": to_device_split(ds.train_x[val_idx], ds.train_y[val_idx], device),
        "test": to_device_split(ds.test_x, ds.test_y, device),
    }


class Preprocess:
    """uint8 batch -> model input: [0, 1] floats, (augment), resize, normalise, memory format."""

    def __init__(self, spec: InputSpec, device: torch.device, channels_last: bool) -> None:
        self.size = spec.size
        self.mean = torch.tensor(spec.mean, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(spec.std, device=device).view(1, 3, 1, 1)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def __call__(self, images: torch.Tensor, augment: AugmentSpec | None = None,
                 gen: torch.Generator | None = None) -> torch.Tensor:
        x = images.float().div_(255.0)
        if augment is not None:
            x = augment_batch(x, augment, gen)
        if x.shape[-1] != self.size:  # ResNet input: resized per batch on the device
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False, antialias=False)
        x = (x - self.mean) / self.std
        return x.contiguous(memory_format=self.memory_format)


def epoch_batches(n: int, batch_size: int, gen: torch.Generator) -> list[torch.Tensor]:
    """Shuffled index batches for one epoch; the last incomplete batch is dropped."""
    order = torch.randperm(n, generator=gen)
    return list(order[: n - n % batch_size].split(batch_size))


def eval_batches(n: int, batch_size: int) -> list[torch.Tensor]:
    return list(torch.arange(n).split(batch_size))
