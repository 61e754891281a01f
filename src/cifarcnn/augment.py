"""Batched per-image augmentation with torchvision's semantics (Task 3e).

torchvision's transforms, given a batch, draw ONE set of random parameters for the whole
batch. Here every image draws its own, as torchvision does when it is called per image:

- horizontal flip with probability ``p``;
- rotation by an angle uniform in [-deg, deg] (counter-clockwise), nearest-neighbour
  sampling, corners filled with 0, no expansion (``RandomRotation(deg)``);
- ColorJitter(brightness, contrast, saturation, hue): factors uniform in
  [max(0, 1 - v), 1 + v] (hue: shift uniform in [-h, h]), the four applied in a random order
  drawn per image, each result clamped to [0, 1].

Images are float tensors in [0, 1], shape [B, 3, H, W], on any device.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .config import AugmentSpec


def _uniform(n: int, low: float, high: float, gen: torch.Generator, device) -> torch.Tensor:
    return torch.rand(n, generator=gen, device=device) * (high - low) + low


def grayscale(img: torch.Tensor) -> torch.Tensor:
    """ITU-R 601-2 luma, as torchvision's rgb_to_grayscale: [B, 1, H, W]."""
    r, g, b = img.unbind(dim=-3)
    return (0.2989 * r + 0.587 * g + 0.114 * b).unsqueeze(-3)


def _blend(img: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    factor = factor.view(-1, 1, 1, 1)
    return (factor * img + (1.0 - factor) * other).clamp_(0.0, 1.0)


def rgb_to_hsv(img: torch.Tensor) -> torch.Tensor:
    r, g, b = img.unbind(dim=-3)
    maxc, _ = img.max(dim=-3)
    minc, _ = img.min(dim=-3)
    eqc = maxc == minc
    cr = maxc - minc
    ones = torch.ones_like(maxc)
    s = cr / torch.where(eqc, ones, maxc)
    cr_divisor = torch.where(eqc, ones, cr)
    rc, gc, bc = (maxc - r) / cr_divisor, (maxc - g) / cr_divisor, (maxc - b) / cr_divisor
    hr = (maxc == r) * (bc - gc)
    hg = ((maxc == g) & (maxc != r)) * (2.0 + rc - bc)
    hb = ((maxc != g) & (maxc != r)) * (4.0 + gc - rc)
    h = torch.fmod((hr + hg + hb) / 6.0 + 1.0, 1.0)
    return torch.stack((h, s, maxc), dim=-3)


def hsv_to_rgb(img: torch.Tensor) -> torch.Tensor:
    """The closed form f(n) = v - v s max(0, min(k, 4 - k, 1)), k = (n + 6h) mod 6, for
    n = 5, 3, 1 (R, G, B): equal to torchvision's six-sector version, in a few ops."""
    h, s, v = img.unbind(dim=-3)
    n = torch.arange(5.0, 0.0, -2.0, device=img.device, dtype=img.dtype).view(3, 1, 1)  # 5, 3, 1; no host copy
    k = torch.remainder(n + 6.0 * h.unsqueeze(-3), 6.0)
    weight = torch.minimum(k, 4.0 - k).clamp_(0.0, 1.0)
    v, s = v.unsqueeze(-3), s.unsqueeze(-3)
    return v - v * s * weight


def adjust_hue(img: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    hsv = rgb_to_hsv(img)
    h = torch.remainder(hsv[:, 0] + shift.view(-1, 1, 1), 1.0)
    return hsv_to_rgb(torch.stack((h, hsv[:, 1], hsv[:, 2]), dim=1))


def hflip(img: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    return torch.where(flip.view(-1, 1, 1, 1), img.flip(-1), img)


def rotate(img: torch.Tensor, degrees: torch.Tensor) -> torch.Tensor:
    """Rotate each image counter-clockwise by its angle about the centre; nearest; fill 0."""
    theta = degrees * (math.pi / 180.0)
    cos, sin = torch.cos(theta), torch.sin(theta)
    h, w = img.shape[-2:]
    zeros = torch.zeros_like(cos)
    # Output pixel -> input pixel (the inverse rotation) in normalised coordinates; the
    # aspect terms keep the rotation rigid on non-square images.
    matrix = torch.stack([torch.stack([cos, -sin * h / w, zeros], -1),
                          torch.stack([sin * w / h, cos, zeros], -1)], -2)
    grid = F.affine_grid(matrix.to(img.dtype), list(img.shape), align_corners=False)
    return F.grid_sample(img, grid, mode="nearest", padding_mode="zeros", align_corners=False)


@dataclass
class AugmentDraws:
    """Every random number one batch's augmentation uses, drawn before any is applied.

    Drawing apart from applying lets a CUDA graph hold the (fixed-shape) application while the
    draws come from a generator seeded per step outside it. The draw order is the one
    ``augment_batch`` always had, so the same generator gives the same augmented batch.
    """

    flip: torch.Tensor | None  # [n] bool: flip this image
    angle: torch.Tensor | None  # [n] degrees, counter-clockwise
    factors: torch.Tensor | None  # [4, n]: brightness, contrast, saturation factors and hue shift
    order: torch.Tensor | None  # [n, 4]: the colour ops' order per image (a permutation of 0..3)

    def tensors(self) -> list[torch.Tensor | None]:
        return [self.flip, self.angle, self.factors, self.order]


def _jitter_enabled(spec: AugmentSpec) -> tuple[bool, bool, bool, bool]:
    return spec.brightness > 0, spec.contrast > 0, spec.saturation > 0, spec.hue > 0


def draw_augment(spec: AugmentSpec, n: int, gen: torch.Generator, device) -> AugmentDraws:
    """The random parameters for ``n`` images, from ``gen`` (on ``device``)."""
    flip = torch.rand(n, generator=gen, device=device) < spec.hflip_p if spec.hflip_p > 0 else None
    angle = _uniform(n, -spec.rotate_deg, spec.rotate_deg, gen, device) if spec.rotate_deg > 0 else None
    factors = order = None
    if any(_jitter_enabled(spec)):
        factors = torch.stack([
            _uniform(n, max(0.0, 1 - spec.brightness), 1 + spec.brightness, gen, device),
            _uniform(n, max(0.0, 1 - spec.contrast), 1 + spec.contrast, gen, device),
            _uniform(n, max(0.0, 1 - spec.saturation), 1 + spec.saturation, gen, device),
            _uniform(n, -spec.hue, spec.hue, gen, device),
        ])  # [4, n]: op x image
        order = torch.argsort(torch.rand(n, 4, generator=gen, device=device), dim=1)  # a permutation per image
    return AugmentDraws(flip, angle, factors, order)


def color_jitter(img: torch.Tensor, spec: AugmentSpec, factors: torch.Tensor, order: torch.Tensor,
                 select_rows: bool | None = None) -> torch.Tensor:
    """ColorJitter with per-image factors and a per-image random order of the four ops.

    Brightness, contrast and saturation are each a blend ``f * img + (1 - f) * other`` (other:
    black, the mean grey, the grey image), so at every position of the order one batched blend
    serves all images whose op there is one of them. Hue: on the CPU it is computed for its
    images alone (a quarter of the work); elsewhere for all and kept by ``where``, because
    selecting rows needs the host to learn their number (a synchronisation, and impossible
    inside a CUDA graph). Both give the same values; ``select_rows`` picks one (default: by device).
    """
    n, device = img.shape[0], img.device
    images = torch.arange(n, device=device)
    if select_rows is None:
        select_rows = device.type == "cpu"
    out = img
    for slot in range(4):
        op = order[:, slot]
        active = torch.zeros_like(op, dtype=torch.bool)
        for k, on in enumerate(_jitter_enabled(spec)):
            if on:
                active |= op == k
        gray = grayscale(out)
        other = torch.where((op == 0).view(-1, 1, 1, 1), torch.zeros_like(gray),
                            torch.where((op == 1).view(-1, 1, 1, 1), gray.mean(dim=(-3, -2, -1), keepdim=True), gray))
        blend = (active & (op < 3)).view(-1, 1, 1, 1)
        out = torch.where(blend, _blend(out, other, factors[op, images]), out)
        hue = active & (op == 3)
        if select_rows:
            rows = hue.nonzero().squeeze(1)
            if rows.numel():
                out = out.index_put((rows,), adjust_hue(out[rows], factors[3, rows]))
        elif spec.hue > 0:
            out = torch.where(hue.view(-1, 1, 1, 1), adjust_hue(out, factors[3]), out)
    return out


def apply_augment(img: torch.Tensor, spec: AugmentSpec, draws: AugmentDraws) -> torch.Tensor:
    """The Task 3e pipeline on a float batch in [0, 1] with given draws: flip, rotate, colour jitter."""
    if draws.flip is not None:
        img = hflip(img, draws.flip)
    if draws.angle is not None:
        img = rotate(img, draws.angle)
    if draws.factors is not None:
        img = color_jitter(img, spec, draws.factors, draws.order)
    return img


def augment_batch(img: torch.Tensor, spec: AugmentSpec, gen: torch.Generator) -> torch.Tensor:
    """Draw, then apply: the Task 3e augmentation of one batch from ``gen``."""
    return apply_augment(img, spec, draw_augment(spec, img.shape[0], gen, img.device))
