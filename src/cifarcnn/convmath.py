"""Task 1: convolution arithmetic as pure functions (numbers the report derives by hand)."""
from __future__ import annotations

from fractions import Fraction

import numpy as np


# Task 1a: the report's image and Sobel kernel (Figure 1).
IMAGE_1A = np.array([[1, 0, 2, 3, 1], [3, 2, 0, 7, 0], [0, 6, 1, 1, 4]])
SOBEL_X = np.array([[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]])


def _positive_int(value: int, name: str, allow_zero: bool = False) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{name} must be {'>= 0' if allow_zero else '> 0'}, got {value}")
    return int(value)


def convolve2d(image: np.ndarray, kernel: np.ndarray, padding: int = 1) -> np.ndarray:
    """True 2-D convolution, stride 1, zero padding: flip the kernel, slide, multiply-add."""
    image, kernel = np.asarray(image), np.asarray(kernel)
    kh, kw = kernel.shape
    flipped = kernel[::-1, ::-1]
    padded = np.pad(image, padding)
    out_h = output_size(image.shape[0], kh, padding, 1)
    out_w = output_size(image.shape[1], kw, padding, 1)
    out = np.zeros((out_h, out_w), dtype=np.result_type(image, kernel))
    for i in range(out_h):
        for j in range(out_w):
            out[i, j] = np.sum(padded[i:i + kh, j:j + kw] * flipped)
    return out


def output_size(size_in: int, kernel: int, padding: int, stride: int) -> int:
    """W2 = (W1 - F + 2P) / S + 1, refusing sizes no layer can have."""
    size_in = _positive_int(size_in, "input size")
    kernel = _positive_int(kernel, "kernel size")
    padding = _positive_int(padding, "padding", allow_zero=True)
    stride = _positive_int(stride, "stride")
    span = size_in - kernel + 2 * padding
    if span < 0:
        raise ValueError(f"kernel size {kernel} is larger than the padded input {size_in + 2 * padding}")
    if span % stride:
        raise ValueError(f"output size ({size_in} - {kernel} + 2*{padding}) / {stride} + 1 "
                         f"= {Fraction(span, stride) + 1} is not an integer")
    return span // stride + 1


def same_padding(kernel: int, stride: int = 1, size: int = 32) -> int:
    """Padding P that keeps W2 == W1: P = (S(W - 1) - W + F) / 2."""
    kernel, stride, size = (_positive_int(kernel, "kernel size"), _positive_int(stride, "stride"),
                            _positive_int(size, "input size"))
    twice = stride * (size - 1) - size + kernel
    if twice < 0 or twice % 2:
        raise ValueError(f"no integer padding keeps size {size} with kernel {kernel}, stride {stride} "
                         f"(2P = {twice})")
    return twice // 2


def kernel_for(size_in: int, size_out: int, padding: int = 0, stride: int = 1) -> int:
    """Kernel size F that maps W1 to W2: F = W1 + 2P - S(W2 - 1)."""
    size_in, size_out = _positive_int(size_in, "input size"), _positive_int(size_out, "output size")
    padding, stride = _positive_int(padding, "padding", allow_zero=True), _positive_int(stride, "stride")
    kernel = size_in + 2 * padding - stride * (size_out - 1)
    if kernel <= 0:
        raise ValueError(f"output size {size_out} is impossible from input {size_in} "
                         f"(kernel would be {kernel})")
    return kernel


def parameter_table(model) -> list[dict]:
    """One row per layer with parameters: weight shape as F_H x F_W x C1 x C2, biases, total.

    Conv weights [C2, C1, F_H, F_W] and linear weights [C2, C1] are written the report's
    way (F_H x F_W x C1 x C2, or C1 x C2). Frozen parameters are counted separately.
    """
    import torch.nn as nn

    rows = []
    for name, module in model.named_modules():
        own = dict(module.named_parameters(recurse=False))
        if not own:
            continue
        weight, bias = own.get("weight"), own.get("bias")
        if isinstance(module, nn.Conv2d):
            c2, c1, fh, fw = weight.shape
            shape = f"{fh}x{fw}x{c1}x{c2}"
        elif weight is not None and weight.dim() == 2:
            shape = f"{weight.shape[1]}x{weight.shape[0]}"
        else:
            shape = "x".join(str(s) for s in weight.shape) if weight is not None else "-"
        n_weights = sum(p.numel() for k, p in own.items() if k != "bias")
        n_bias = bias.numel() if bias is not None else 0
        rows.append({
            "n": len(rows) + 1, "module": f"[{name}]", "type": type(module).__name__, "weight_shape": shape,
            "weights": n_weights, "biases": n_bias, "parameters": n_weights + n_bias,
            "trainable": all(p.requires_grad for p in own.values()),
        })
    return rows


def torch_output_size(size_in: int, kernel: int, padding: int, stride: int, pool: bool = False) -> int:
    """The same size measured on a real torch layer (the cross-check of the formula)."""
    import torch
    import torch.nn as nn

    layer = (nn.MaxPool2d(kernel, stride, padding) if pool
             else nn.Conv2d(1, 1, kernel, stride=stride, padding=padding, bias=False))
    with torch.no_grad():
        return int(layer(torch.zeros(1, 1, size_in, size_in)).shape[-1])


def conv2d_torch(image: np.ndarray, kernel: np.ndarray, padding: int = 1) -> np.ndarray:
    """Convolution through torch: conv2d is cross-correlation, so it gets the flipped kernel."""
    import torch
    import torch.nn.functional as F

    x = torch.as_tensor(np.asarray(image), dtype=torch.float64)[None, None]
    w = torch.as_tensor(np.ascontiguousarray(np.asarray(kernel)[::-1, ::-1]), dtype=torch.float64)[None, None]
    return F.conv2d(x, w, padding=padding)[0, 0].numpy()


def task1_answers() -> dict:
    """Every Task 1 number, computed (1a-1f; 1g needs a model, see parameter_table)."""
    answers = {
        "1a": {"image": IMAGE_1A.tolist(), "kernel": SOBEL_X.tolist(),
               "flipped_kernel": SOBEL_X[::-1, ::-1].tolist(),
               "result": convolve2d(IMAGE_1A, SOBEL_X, padding=1).tolist()},
        "1c": {"kernel": 5, "stride": 1, "padding": same_padding(5, 1, size=32)},
        "1d": {"input": 512, "output": 504, "padding": 0, "stride": 1, "kernel": kernel_for(512, 504, 0, 1)},
        "1e": {"input": 504, "window": 2, "stride": 2, "padding": 0, "output": output_size(504, 2, 0, 2)},
        "1f": {"input": 252, "kernel": 3, "stride": 1, "padding": 0, "output": output_size(252, 3, 0, 1)},
    }
    # Every answer cross-checked against torch; a disagreement is a bug, not a result.
    a = answers
    checks = {
        "1a": np.array_equal(conv2d_torch(IMAGE_1A, SOBEL_X, 1), np.array(a["1a"]["result"])),
        "1c": torch_output_size(32, 5, a["1c"]["padding"], 1) == 32,
        "1d": torch_output_size(512, a["1d"]["kernel"], 0, 1) == 504,
        "1e": torch_output_size(504, 2, 0, 2, pool=True) == a["1e"]["output"],
        "1f": torch_output_size(252, 3, 0, 1) == a["1f"]["output"],
    }
    failed = [k for k, ok in checks.items() if not ok]
    if failed:
        raise AssertionError(f"Task 1 answers disagree with torch: {failed}")
    for key in answers:
        answers[key]["checked_with_torch"] = True
    return answers


