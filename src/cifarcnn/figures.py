"""Every plot of the pipeline (matplotlib, headless), in the report's style."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: stages and CI have no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .fsutil import atomic_path  # noqa: E402


def save(fig, path: str | Path, dpi: int = 100) -> Path:
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=dpi, bbox_inches="tight", format="png")
    plt.close(fig)
    return Path(path)


# --- Task 1a ----------------------------------------------------------------------------

def _grid(ax, values: np.ndarray, title: str, color: str, shade: np.ndarray | None = None,
          highlight: tuple[int, int] | None = None) -> None:
    """An annotated integer grid: one cell per value, like a spreadsheet."""
    values = np.asarray(values)
    h, w = values.shape
    ax.set_xlim(0, w)
    ax.set_ylim(h, 0)
    ax.set_aspect("equal")
    ax.axis("off")
    ax.set_title(title, fontsize=10, fontweight="bold")
    if shade is not None:  # grey level by value, darker = larger
        norm = (shade - shade.min()) / max(np.ptp(shade), 1)
    for i in range(h):
        for j in range(w):
            face = plt.cm.Greys(0.15 + 0.6 * norm[i, j]) if shade is not None else color
            if highlight == (i, j):
                face = "#9fc98a"
            ax.add_patch(plt.Rectangle((j, i), 1, 1, facecolor=face, edgecolor="black", linewidth=0.8))
            ax.text(j + 0.5, i + 0.5, f"{values[i, j]:g}", ha="center", va="center", fontsize=9)


def task1a_convolution(image: np.ndarray, kernel: np.ndarray, result: np.ndarray, path: str | Path) -> Path:
    """Figure 1: kernel, flipped kernel, image, result; then each output cell's products and sum."""
    image, kernel, result = np.asarray(image), np.asarray(kernel), np.asarray(result)
    flipped = kernel[::-1, ::-1]
    pad = kernel.shape[0] // 2
    padded = np.pad(image, pad)
    h, w = result.shape
    fig = plt.figure(figsize=(2.3 * w, 2.0 * (h + 1)))
    top = fig.add_gridspec(1, 4, top=0.97, bottom=0.78, width_ratios=[3, 3, 5, 5])
    _grid(fig.add_subplot(top[0]), kernel, "Kernel", "#7b9fd6")
    _grid(fig.add_subplot(top[1]), flipped, "Flipped kernel", "#cdd9f0")
    _grid(fig.add_subplot(top[2]), image, "Original image", "", shade=image)
    _grid(fig.add_subplot(top[3]), result, "New image", "", shade=result)
    cells = fig.add_gridspec(h, w, top=0.72, bottom=0.02, hspace=0.45)
    for i in range(h):
        for j in range(w):
            products = padded[i:i + kernel.shape[0], j:j + kernel.shape[1]] * flipped
            _grid(fig.add_subplot(cells[i, j]), products,
                  f"out[{i},{j}] = {int(products.sum())}", "#f7d3bd", highlight=(pad, pad))
    fig.suptitle("Convolution with the Sobel kernel: flip, zero-pad (outside = 0), multiply, sum",
                 fontsize=11, y=1.01)
    return save(fig, path)


# --- training curves (Figures 2-4, 6, 7) ---------------------------------------------------

def rolling(values: np.ndarray, window: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean and std over consecutive blocks of ``window`` steps; returns (block end, mean, std)."""
    n = len(values) // window * window
    if n == 0:
        return np.array([len(values)]), np.array([np.mean(values)]), np.array([0.0])
    blocks = np.asarray(values[:n], dtype=float).reshape(-1, window)
    return np.arange(1, len(blocks) + 1) * window, blocks.mean(1), blocks.std(1)


def final_accuracy_box(ax, metrics: dict) -> None:
    text = ("Final Accuracy Results:\n"
            f"    Training:   {metrics['train_acc']:.2%}\n"
            f"    Validation: {metrics['val_acc']:.2%}\n"
            f"    Test:       {metrics['test_acc']:.2%}")
    ax.text(0.97, 0.03, text, transform=ax.transAxes, ha="right", va="bottom", family="monospace",
            fontsize=12, bbox={"facecolor": "white", "edgecolor": "0.6"})


def training_curves(steps: list[int], losses: list[float], validations: list[dict], metrics: dict,
                    title: str, path: str | Path, window: int = 50) -> Path:
    """Left: training loss (mean ± std over ``window`` steps) and validation loss; right:
    validation accuracy and the final accuracies of the best checkpoint."""
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(16, 9))
    steps_arr = np.asarray(steps)
    x, mean, std = rolling(np.asarray(losses), window)
    x = steps_arr[np.clip(x - 1, 0, len(steps_arr) - 1)] if len(steps_arr) else x
    ax_loss.plot(x, mean, label=f"Training loss (mean over {window} steps)")
    ax_loss.fill_between(x, mean - std, mean + std, alpha=0.2, label=f"Training loss (± std over {window} steps)")
    v_steps = [v["step"] for v in validations]
    ax_loss.plot(v_steps, [v["val_loss"] for v in validations], label="Validation loss")
    ax_loss.set_title("Cross Entropy Loss")
    ax_loss.set_xlabel("training step")
    ax_loss.legend(loc="upper right")
    ax_acc.plot(v_steps, [v["val_acc"] for v in validations], label="Validation Accuracy")
    ax_acc.set_title("Accuracy")
    ax_acc.set_xlabel("training step")
    ax_acc.legend(loc="upper right")
    final_accuracy_box(ax_acc, metrics)
    fig.suptitle(title)
    return save(fig, path)
