"""Training throughput: our in-memory data path vs pre-made tensors vs a PIL DataLoader.

For task2 (batch 64) and task3e (batch 32, with the per-image augmentation), images per
second of full optimisation steps (forward, backward, step) fed three ways:

- tensors:    one pre-made normalised batch, reused (the model's own ceiling);
- ours:       cifarcnn's path: uint8 on the device, index batches, batched augmentation;
- dataloader: torchvision DataLoader over PIL images with the report's transforms (the
              original's way; 2 worker processes as in the original).

Goals: ours / tensors >= 0.95 for task2 and >= 0.9 for task3e on CPU; ours > dataloader.
"tensors" and "ours" are timed in alternating rounds on the same model and the median round
counts, so drift (turbo, other load) hits both alike.
Usage: python bench/throughput.py [steps per round] [rounds]   (synthetic images)
"""
from __future__ import annotations

import statistics
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms as T
from PIL import Image

from cifarcnn.augment import apply_augment, draw_augment
from cifarcnn.batches import Preprocess, epoch_batches, to_device_split
from cifarcnn.config import load_params, resolve_run
from cifarcnn.models import create_model
from cifarcnn.device import resolve_device, use_channels_last
from cifarcnn.training import make_optimizer


class PilDataset(torch.utils.data.Dataset):
    def __init__(self, images: np.ndarray, labels: np.ndarray, transform) -> None:
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        return self.transform(Image.fromarray(self.images[i])), int(self.labels[i])


def timed_steps(model, optimizer, batches, steps: int, warmup: int = 0) -> float:
    """Images per second over ``steps`` optimisation steps drawn from ``batches`` (after ``warmup``)."""
    n_images, started = 0, time.perf_counter()
    for i in range(warmup + steps):
        if i == warmup:
            started = time.perf_counter()
        x, y = next(batches)
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if i >= warmup:
            n_images += len(y)
    return n_images / max(time.perf_counter() - started, 1e-9)


def bench_run(name: str, steps: int, rounds: int) -> dict:
    cfg = resolve_run(load_params(), name)
    device = resolve_device("auto")
    torch.manual_seed(0)
    n = cfg.batch_size * (steps * rounds + 3)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, size=n)
    channels_last = use_channels_last(device, cfg.input.size)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def fresh():
        model = create_model(cfg.model, **cfg.model_params)
        model = model.to(device, memory_format=memory_format).train()
        return model, make_optimizer(cfg, model)

    prep = Preprocess(cfg.input, device, channels_last)
    split = to_device_split(images, labels, device)
    gen = torch.Generator(device=device).manual_seed(0)
    x0 = prep(split.x[: cfg.batch_size])
    y0 = split.y[: cfg.batch_size]
    result = {"run": name, "batch": cfg.batch_size, "device": str(device)}
    model, opt = fresh()
    order = epoch_batches(n, cfg.batch_size, torch.Generator().manual_seed(0))
    tensors = iter(lambda: (x0, y0), None)
    ours = ((prep.finish(apply_augment(prep.unit(split.x[idx.to(device)]), cfg.augment,
                                       draw_augment(cfg.augment, len(idx), gen, device))
                         if cfg.augment else prep.unit(split.x[idx.to(device)])), split.y[idx.to(device)])
            for idx in order)
    timed_steps(model, opt, tensors, 0, warmup=3)
    timed_steps(model, opt, ours, 0, warmup=3)
    per_round = {"tensors": [], "ours": []}
    for _ in range(rounds):
        per_round["tensors"].append(timed_steps(model, opt, tensors, steps))
        per_round["ours"].append(timed_steps(model, opt, ours, steps))
    result["tensors"] = statistics.median(per_round["tensors"])
    result["ours"] = statistics.median(per_round["ours"])
    transforms = []
    if cfg.augment is not None:
        a = cfg.augment
        transforms = [T.RandomHorizontalFlip(a.hflip_p), T.RandomRotation(a.rotate_deg),
                      T.ColorJitter(a.brightness, a.contrast, a.saturation, a.hue)]
    if cfg.input.size != 32:
        transforms.append(T.Resize(cfg.input.size))
    transforms += [T.ToTensor(), T.Normalize(cfg.input.mean, cfg.input.std)]
    loader = torch.utils.data.DataLoader(PilDataset(images, labels, T.Compose(transforms)), batch_size=cfg.batch_size,
                                         shuffle=True, drop_last=True, num_workers=2, persistent_workers=False)
    model, opt = fresh()
    loaded = ((x.to(device, memory_format=memory_format), y.to(device)) for x, y in loader)
    result["dataloader"] = timed_steps(model, opt, loaded, steps * 2, warmup=3)
    result["ours_over_tensors"] = result["ours"] / result["tensors"]
    result["ours_over_dataloader"] = result["ours"] / result["dataloader"]
    return result


def main(steps: int = 20, rounds: int = 5) -> None:
    for name in ("task2", "task3e"):
        r = bench_run(name, steps, rounds)
        print(f"{r['run']:7s} batch {r['batch']:3d} on {r['device']}: tensors {r['tensors']:7.1f} img/s, "
              f"ours {r['ours']:7.1f} img/s, PIL DataLoader {r['dataloader']:7.1f} img/s | "
              f"ours/tensors {r['ours_over_tensors']:.3f}, ours/DataLoader {r['ours_over_dataloader']:.2f}",
              flush=True)


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:3]))
