"""Batched per-image augmentation matches torchvision's per-image transforms.

Exactness for fixed parameters (each op against torchvision.transforms.functional), and
distributions by statistics: two-sample Kolmogorov-Smirnov distances between our batched
outputs and torchvision's per-image RandomHorizontalFlip / RandomRotation / ColorJitter.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as TF

from cifarcnn import augment as A
from cifarcnn.config import AugmentSpec

N = 2000  # samples per distribution
KS_CRITICAL = 1.95 * np.sqrt(2 / N)  # two-sample KS at alpha = 0.001


def ks_distance(a, b) -> float:
    a, b = np.sort(np.asarray(a, float)), np.sort(np.asarray(b, float))
    grid = np.concatenate([a, b])
    return float(np.max(np.abs(np.searchsorted(a, grid, "right") / len(a) - np.searchsorted(b, grid, "right") / len(b))))


def image(seed: int = 0) -> torch.Tensor:
    """A colourful 32x32 test image with structure (so rotation and flips change it)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(3, 32, 32, generator=g) * 0.3
    base[0, :, :16] += 0.6
    base[1, :16, :] += 0.4
    base[2, 8:24, 20:] += 0.5
    return base.clamp(0, 1)


def stats(batch: torch.Tensor) -> dict[str, np.ndarray]:
    """Per-image statistics sensitive to each transform."""
    hsv = A.rgb_to_hsv(batch)
    return {
        "mean": batch.mean((1, 2, 3)).numpy(),
        "std": batch.std((1, 2, 3)).numpy(),
        "saturation": hsv[:, 1].mean((1, 2)).numpy(),
        "hue_red_half": hsv[:, 0, :, :16].mean((1, 2)).numpy(),
        "left_minus_right": (batch[..., :16].mean((1, 2, 3)) - batch[..., 16:].mean((1, 2, 3))).numpy(),
        "zero_pixels": (batch.sum(1) == 0).float().mean((1, 2)).numpy(),
    }


def ours(spec: AugmentSpec, img: torch.Tensor, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return A.augment_batch(img.expand(N, -1, -1, -1).clone(), spec, gen)


def torchvision_per_image(transform, img: torch.Tensor) -> torch.Tensor:
    torch.manual_seed(2)
    return torch.stack([transform(img) for _ in range(N)])


SPEC_NONE = dict(hflip_p=0.0, rotate_deg=0.0, brightness=0.0, contrast=0.0, saturation=0.0, hue=0.0)


# --- exactness for fixed parameters ---------------------------------------------------------

def test_each_op_equals_torchvision_functional():
    x = torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    angles = torch.tensor([-10.0, -3.3, 0.0, 5.0, 9.9, 45.0])
    ref = torch.stack([TF.rotate(x[i], float(a), interpolation=TF.InterpolationMode.NEAREST) for i, a in enumerate(angles)])
    torch.testing.assert_close(A.rotate(x, angles), ref, atol=1e-6, rtol=0)
    shifts = torch.tensor([-0.5, -0.2, 0.0, 0.1, 0.3, 0.5])
    ref = torch.stack([TF.adjust_hue(x[i], float(shifts[i])) for i in range(6)])
    torch.testing.assert_close(A.adjust_hue(x, shifts), ref, atol=1e-5, rtol=0)
    flips = torch.tensor([True, False, True, False, False, True])
    ref = torch.stack([TF.hflip(x[i]) if flips[i] else x[i] for i in range(6)])
    assert torch.equal(A.hflip(x, flips), ref)


@pytest.mark.parametrize("spec_kwargs", [
    {"brightness": 0.5, "contrast": 0.5, "saturation": 0.5, "hue": 0.5},
    {"brightness": 0.0, "contrast": 0.8, "saturation": 0.0, "hue": 0.2},  # disabled ops are skipped
])
def test_color_jitter_equals_torchvision_per_image_with_the_same_draws(spec_kwargs):
    """Same factors and order as ColorJitter would draw for each image -> the same pixels."""
    spec = AugmentSpec(**{**SPEC_NONE, **spec_kwargs})
    n = 24
    x = torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    draws = A.draw_augment(spec, n, torch.Generator().manual_seed(9), "cpu")
    out = A.color_jitter(x, spec, draws.factors, draws.order)
    g = torch.Generator().manual_seed(9)  # replay the draws in draw_augment's order
    ranges = [(max(0, 1 - spec.brightness), 1 + spec.brightness), (max(0, 1 - spec.contrast), 1 + spec.contrast),
              (max(0, 1 - spec.saturation), 1 + spec.saturation), (-spec.hue, spec.hue)]
    factors = [torch.rand(n, generator=g) * (hi - lo) + lo for lo, hi in ranges]
    order = torch.argsort(torch.rand(n, 4, generator=g), dim=1)
    enabled = [spec.brightness > 0, spec.contrast > 0, spec.saturation > 0, spec.hue > 0]
    ops = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
    for i in range(n):
        ref = x[i]
        for op in order[i].tolist():
            if enabled[op]:
                ref = ops[op](ref, float(factors[op][i]))
        torch.testing.assert_close(out[i], ref, atol=2e-5, rtol=0)


def test_hue_for_all_rows_equals_hue_for_selected_rows():
    """The sync-free jitter (GPU, CUDA graphs) gives exactly the CPU's row-selecting result."""
    spec = AugmentSpec(**{**SPEC_NONE, "brightness": 0.5, "contrast": 0.5, "saturation": 0.5, "hue": 0.5})
    x = torch.rand(64, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    draws = A.draw_augment(spec, 64, torch.Generator().manual_seed(6), "cpu")
    selected = A.color_jitter(x, spec, draws.factors, draws.order, select_rows=True)
    everywhere = A.color_jitter(x, spec, draws.factors, draws.order, select_rows=False)
    assert torch.equal(selected, everywhere)
    assert not torch.equal(selected, A.color_jitter(x, spec, draws.factors, draws.order.roll(1, dims=1)))


def test_drawing_apart_from_applying_keeps_the_random_stream():
    """augment_batch = apply_augment(draw_augment(...)): a generator seeded per step gives the
    same batch whichever way it is called (what resume and the CUDA-graph step rely on)."""
    spec = AugmentSpec(hflip_p=0.5, rotate_deg=10.0, brightness=0.5, contrast=0.5, saturation=0.5, hue=0.5)
    x = torch.rand(32, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    whole = A.augment_batch(x, spec, torch.Generator().manual_seed(8))
    draws = A.draw_augment(spec, 32, torch.Generator().manual_seed(8), "cpu")
    assert torch.equal(whole, A.apply_augment(x, spec, draws))
    assert draws.flip.dtype == torch.bool and draws.order.shape == (32, 4) and draws.factors.shape == (4, 32)


def test_parameters_differ_per_image():
    """torchvision's v2 transforms on a batch would give every image the same parameters."""
    spec = AugmentSpec(**{**SPEC_NONE, "rotate_deg": 10.0, "brightness": 0.5, "hue": 0.5})
    out = ours(spec, image())
    assert len(torch.unique(out.mean((1, 2, 3)))) > N * 0.95


# --- distributions ----------------------------------------------------------------------------

@pytest.mark.parametrize("name, spec_kwargs, transform, keys", [
    ("flip", {"hflip_p": 0.5}, T.RandomHorizontalFlip(0.5), ["left_minus_right"]),
    ("rotation", {"rotate_deg": 10.0}, T.RandomRotation(10), ["zero_pixels", "left_minus_right"]),
    ("color_jitter", {"brightness": 0.5, "contrast": 0.5, "saturation": 0.5, "hue": 0.5},
     T.ColorJitter(0.5, 0.5, 0.5, 0.5), ["mean", "std", "saturation", "hue_red_half"]),
    ("task3e_pipeline", {"hflip_p": 0.5, "rotate_deg": 10.0, "brightness": 0.5, "contrast": 0.5,
                         "saturation": 0.5, "hue": 0.5},
     T.Compose([T.RandomHorizontalFlip(0.5), T.RandomRotation(10), T.ColorJitter(0.5, 0.5, 0.5, 0.5)]),
     ["mean", "std", "saturation", "hue_red_half", "left_minus_right", "zero_pixels"]),
])
def test_distribution_matches_torchvision(name, spec_kwargs, transform, keys):
    img = image()
    a = stats(ours(AugmentSpec(**{**SPEC_NONE, **spec_kwargs}), img))
    b = stats(torchvision_per_image(transform, img))
    for key in keys:
        d = ks_distance(a[key], b[key])
        assert d < KS_CRITICAL, f"{name}: {key} distributions differ (KS {d:.3f} >= {KS_CRITICAL:.3f})"


def test_ks_check_has_power():
    """The same check rejects a near miss: rotation applied with p = 0.5 (kornia's default)."""
    img = image()
    rotated = ours(AugmentSpec(**{**SPEC_NONE, "rotate_deg": 10.0}), img)
    half = torch.where((torch.arange(N) % 2 == 0).view(-1, 1, 1, 1), rotated, img.expand(N, -1, -1, -1))
    b = stats(torchvision_per_image(T.RandomRotation(10), img))
    assert ks_distance(stats(half)["zero_pixels"], b["zero_pixels"]) > KS_CRITICAL
    narrower = ours(AugmentSpec(**{**SPEC_NONE, "brightness": 0.3}), img)
    b = stats(torchvision_per_image(T.ColorJitter(brightness=0.5), img))
    assert ks_distance(stats(narrower)["mean"], b["mean"]) > KS_CRITICAL


def test_flip_rate_and_rotation_range():
    spec = AugmentSpec(**{**SPEC_NONE, "hflip_p": 0.5})
    img = image()
    out = ours(spec, img)
    flipped = (out == img.flip(-1)).flatten(1).all(1).float().mean().item()
    assert abs(flipped - 0.5) < 4 * np.sqrt(0.25 / N)
