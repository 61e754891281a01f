"""The dataset file every stage reads: ``data/cifar10.npz``, loaded whole into memory.

Writing it from a source (``data.source``) is the download stage's job (cifarcnn.ingest), so
the stages that only read it do not depend on the downloader's code.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import UserError
from .fsutil import atomic_path

IMAGE_SHAPE = (32, 32, 3)  # H, W, C of every CIFAR image


@dataclass
class Dataset:
    """The whole dataset as uint8 HWC arrays in memory."""

    train_x: np.ndarray  # [N, 32, 32, 3] uint8
    train_y: np.ndarray  # [N] int64
    test_x: np.ndarray
    test_y: np.ndarray
    classes: list[str]
    # What a training index means: the validation split's indices (batches.validation_indices)
    # are positions in this order, the original's only for the official archive's order.
    train_order: str = "unknown (a dataset file written before the order was recorded)"

    def save(self, path: str | Path) -> None:
        """Write atomically: an interrupted or failed write leaves no partial file."""
        with atomic_path(path, suffix=".npz") as tmp:
            np.savez(  # uncompressed: loads in a fraction of a second
                tmp, train_x=self.train_x, train_y=self.train_y, test_x=self.test_x,
                test_y=self.test_y, classes=np.array(self.classes), train_order=np.array(self.train_order),
            )

    @classmethod
    def load(cls, path: str | Path) -> "Dataset":
        path = Path(path)
        if not path.exists():
            raise UserError(f"{path} does not exist; run `dvc repro download` first")
        try:
            with np.load(path, allow_pickle=False) as npz:
                ds = cls(npz["train_x"], npz["train_y"].astype(np.int64), npz["test_x"],
                         npz["test_y"].astype(np.int64), [str(c) for c in npz["classes"]],
                         *([str(npz["train_order"])] if "train_order" in npz.files else []))
        except (OSError, ValueError, KeyError) as err:
            raise UserError(f"{path} is not a valid dataset file ({err}); run `dvc repro download`") from err
        ds.validate(str(path))
        return ds

    def validate(self, origin: str) -> None:
        for split in ("train", "test"):
            x, y = getattr(self, f"{split}_x"), getattr(self, f"{split}_y")
            if x.ndim != 4 or x.shape[1:] != IMAGE_SHAPE or x.dtype != np.uint8:
                raise UserError(f"{origin}: {split} images have shape {x.shape} {x.dtype}, "
                                f"expected [N, 32, 32, 3] uint8")
            if y.shape != (len(x),):
                raise UserError(f"{origin}: {split} has {len(x)} images but labels of shape {y.shape}")
            if len(y) and (y.min() < 0 or y.max() >= len(self.classes)):
                raise UserError(f"{origin}: {split} labels outside 0..{len(self.classes) - 1}")
