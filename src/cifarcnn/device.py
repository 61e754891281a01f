"""Which device a run uses, and in which memory format (training, scoring and serving agree)."""
from __future__ import annotations

import torch

from .errors import UserError


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("train.device: cuda requested but no CUDA device is available; use auto or cpu")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def use_channels_last(device: torch.device, input_size: int) -> bool:
    """Memory format by measurement (bench/throughput.py), not by habit.

    On the 2-core AVX2 CPU: the 32x32 CNNs train no faster in channels_last (task2 533 vs 541
    img/s, task3e 144 vs 153), ResNet18 at 224x224 does (16.8 vs 13.9-15.4 img/s). On a GPU
    channels_last is cuDNN's preferred layout. bf16 autocast is not used: ~11x slower on that
    CPU, and fp32 keeps the report's numerics on a GPU.
    """
    return device.type == "cuda" or input_size >= 128
