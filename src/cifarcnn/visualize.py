"""Task 4b and 4c: what ResNet18's first and last conv layers see in a photo.

4b: ``conv1``'s filters (64 x 3 x 7 x 7) at the chosen indices, above their activation on
the photo (resized to 224x224, ImageNet-normalised); each min-max scaled to [0, 1].
4c: the output of ``layer4`` (everything but avgpool and fc), 512 x 7 x 7; maps 0-9 shown, with
the model in eval mode, and as the original drew Figure 10, in train mode (BatchNorm on the
photo's own statistics).
"""
from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from .errors import UserError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PHOTO_SIZE = 224  # pixels, square, as the report


def load_photo(path: str | Path, size: int = PHOTO_SIZE) -> tuple[np.ndarray, torch.Tensor]:
    """(uint8 RGB image size x size, its normalised tensor [1, 3, size, size])."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            rgb = img.convert("RGB").resize((size, size), Image.BILINEAR)
    except FileNotFoundError:
        raise UserError(f"viz.image: {path} does not exist; run `dvc repro download` or set viz.image") from None
    except (UnidentifiedImageError, OSError) as err:
        raise UserError(f"viz.image: {path} is not an image PIL can read ({err})") from err
    pixels = np.array(rgb, dtype=np.uint8)  # a writable copy
    x = torch.from_numpy(pixels).permute(2, 0, 1).float().div(255.0)
    x = (x - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return pixels, x.unsqueeze(0)


def minmax(t: torch.Tensor) -> torch.Tensor:
    """Scale to [0, 1] (a constant map becomes 0)."""
    lo, hi = t.min(), t.max()
    return (t - lo) / (hi - lo) if hi > lo else torch.zeros_like(t)


def check_indices(indices: list[int], available: int, key: str) -> list[int]:
    if not indices:
        raise UserError(f"{key}: give at least one index")
    for i in indices:
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < available:
            raise UserError(f"{key}: index {i!r} is out of range; the layer has {available} (0..{available - 1})")
    return list(indices)


@torch.no_grad()
def first_layer(model: nn.Module, x: torch.Tensor, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Filters [k, 3, 7, 7] and their activations [k, H, W] (conv1 output, before BN and ReLU)."""
    conv1 = model.conv1
    indices = check_indices(indices, conv1.out_channels, "viz.filter_indices")
    activation = conv1(x)[0]
    return conv1.weight[indices].detach().clone(), activation[indices]


@torch.no_grad()
def last_conv_layer(model: nn.Module, x: torch.Tensor, train_mode: bool = False) -> torch.Tensor:
    """All activations [512, 7, 7] of the ResNet without its last two children (avgpool, fc).

    ``train_mode``: as the original computed Figure 10, with the model left in train mode, so
    each BatchNorm normalises by the single photo's own statistics instead of its running ones.
    Done on a copy: a train-mode pass would update the running statistics of ``model``."""
    body = nn.Sequential(*list(copy.deepcopy(model).children())[:-2]) if train_mode else \
        nn.Sequential(*list(model.children())[:-2])
    return body.train(train_mode)(x)[0]


def visualize(model: nn.Module, photo: str | Path, filter_indices: list[int], activation_indices: list[int]) -> dict:
    model = model.eval()
    pixels, x = load_photo(photo)
    filters, first = first_layer(model, x, filter_indices)
    last = last_conv_layer(model, x)
    last_train = last_conv_layer(model, x, train_mode=True)  # Figure 10 as the original drew it
    check_indices(activation_indices, last.shape[0], "viz.activation_indices")
    return {
        "photo": pixels,
        "filters": [minmax(f).permute(1, 2, 0).numpy() for f in filters],  # HWC in [0, 1]
        "first_activations": [minmax(a).numpy() for a in first],
        "last_activations": [minmax(last[i]).numpy() for i in activation_indices],
        "last_activations_train_mode": [minmax(last_train[i]).numpy() for i in activation_indices],
        "filter_indices": list(filter_indices), "activation_indices": list(activation_indices),
        "last_shape": list(last.shape),
    }
