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

def _marker(points: int) -> str | None:
    """Dots for series of one or two points (a tiny run), which a bare line would not show."""
    return "o" if points < 3 else None


def _loss_band(ax, blocks: dict, label: str, color=None, window: int = 50) -> None:
    x, mean, std = np.asarray(blocks["step"]), np.asarray(blocks["mean"]), np.asarray(blocks["std"])
    ax.plot(x, mean, color=color, marker=_marker(len(x)), label=f"{label} (mean over {window} steps)")
    ax.fill_between(x, mean - std, mean + std, color=color, alpha=0.2, label=f"{label} (± std over {window} steps)")


def final_accuracy_box(ax, metrics: dict, heading: str = "Final Accuracy Results:", corner: str = "right") -> None:
    text = (f"{heading}\n"
            f"    Training:   {metrics['train_acc']:.2%}\n"
            f"    Validation: {metrics['val_acc']:.2%}\n"
            f"    Test:       {metrics['test_acc']:.2%}")
    x = 0.97 if corner == "right" else 0.03
    ax.text(x, 0.03, text, transform=ax.transAxes, ha=corner, va="bottom", multialignment="left",
            family="monospace", fontsize=12, bbox={"facecolor": "white", "edgecolor": "0.6"})


def training_curves(blocks: dict, validations: list[dict], metrics: dict, title: str, path: str | Path) -> Path:
    """Figures 2-4, 6, 7. Left: training loss (mean ± std over 50 steps) and validation loss;
    right: validation accuracy and the final accuracies of the best checkpoint."""
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(16, 9))
    _loss_band(ax_loss, blocks, "Training loss")
    v_steps = [v["step"] for v in validations]
    ax_loss.plot(v_steps, [v["val_loss"] for v in validations], marker=_marker(len(v_steps)), label="Validation loss")
    ax_loss.set_title("Cross Entropy Loss")
    ax_loss.set_xlabel("training step")
    ax_loss.legend(loc="upper right")
    ax_acc.plot(v_steps, [v["val_acc"] for v in validations], marker=_marker(len(v_steps)),
                label="Validation Accuracy")
    ax_acc.set_title("Accuracy")
    ax_acc.set_xlabel("training step")
    ax_acc.legend(loc="upper left")
    final_accuracy_box(ax_acc, metrics)
    fig.suptitle(title)
    return save(fig, path)


def dropout_comparison(with_dropout: dict, without: dict, path: str | Path) -> Path:
    """Figure 5 (Task 3d): each dict holds ``blocks``, ``validations`` and ``metrics`` of a run."""
    fig, (ax_train, ax_val) = plt.subplots(1, 2, figsize=(16, 9))
    for run, label, color in ((with_dropout, "With Dropout", "C0"), (without, "Without Dropout", "C1")):
        _loss_band(ax_train, run["blocks"], label, color)
        ax_val.plot([v["step"] for v in run["validations"]], [v["val_loss"] for v in run["validations"]],
                    color=color, marker=_marker(len(run["validations"])), label=label)
    ax_train.set_title("Training Loss")
    ax_val.set_title("Validation Loss")
    for ax in (ax_train, ax_val):
        ax.set_xlabel("training step")
        ax.legend(loc="upper right")
    final_accuracy_box(ax_train, without["metrics"], "Accuracy Results Without Dropout:", corner="left")
    final_accuracy_box(ax_val, with_dropout["metrics"], "Accuracy Results With Dropout:")
    return save(fig, path)


def confusion(matrix: list[list[int]], classes: list[str], title: str, path: str | Path) -> Path:
    """Test-set confusion matrix: colour by row share (recall), counts written in the cells."""
    cm = np.asarray(matrix, dtype=float)
    share = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(9, 8))
    im = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    for i in range(len(classes)):
        for j in range(len(classes)):
            ax.text(j, i, f"{int(cm[i, j])}", ha="center", va="center", fontsize=8,
                    color="white" if share[i, j] > 0.5 else "black")
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, fraction=0.046, label="share of the true class")
    return save(fig, path)


def first_layer_figure(filters: list[np.ndarray], activations: list[np.ndarray], indices: list[int],
                       path: str | Path, title: str | None = None) -> Path:
    """Figure 9 (Task 4b): each column a 7x7 filter (top) and its grayscale activation (bottom)."""
    k = len(indices)
    fig, axes = plt.subplots(2, k, figsize=(5 * k, 10), squeeze=False)
    for col, (f, a, i) in enumerate(zip(filters, activations, indices)):
        axes[0, col].imshow(f, interpolation="nearest")
        axes[0, col].set_title(str(i), fontsize=20, fontweight="bold")
        axes[1, col].imshow(a, cmap="gray")
        for ax in axes[:, col]:
            ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=16)
    fig.tight_layout()
    return save(fig, path)


def last_layer_figure(activations: list[np.ndarray], indices: list[int], path: str | Path,
                      title: str | None = None) -> Path:
    """Figure 10 (Task 4c): layer4 activation maps (7x7), viridis like the report."""
    k = len(indices)
    fig, axes = plt.subplots(1, k, figsize=(3 * k, 3.4), squeeze=False)
    for ax, a, i in zip(axes[0], activations, indices):
        ax.imshow(a, cmap="viridis", interpolation="nearest")
        ax.set_title(str(i), fontsize=14, fontweight="bold")
        ax.axis("off")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return save(fig, path)


def seed_curves(run: str, per_seed: dict[int, list[dict]], mean: list[dict], path: str | Path) -> Path:
    """A run's seeds together: each seed's validation loss and accuracy as a thin line, their
    mean as a thick one with a ± 1 sd band (where at least two seeds reached that step)."""
    fig, axes = plt.subplots(1, 2, figsize=(16, 7))
    steps = np.array([m["step"] for m in mean])
    for ax, field, title in ((axes[0], "val_loss", "Validation loss"), (axes[1], "val_acc", "Validation accuracy")):
        for seed, rows in per_seed.items():
            ax.plot([r["step"] for r in rows], [r[field] for r in rows], lw=0.8, alpha=0.5, label=f"seed {seed}")
        mu = np.array([m[field] for m in mean])
        sd = np.array([m[f"{field}_sd"] for m in mean])
        ax.plot(steps, mu, color="black", lw=2.2, label=f"mean of {len(per_seed)} seeds")
        ax.fill_between(steps, mu - sd, mu + sd, color="black", alpha=0.15, label="± 1 sd")
        ax.set_title(title)
        ax.set_xlabel("training step")
        ax.legend(loc="upper right" if field == "val_loss" else "lower right", fontsize=8)
    fig.suptitle(f"{run}: {len(per_seed)} seeds")
    return save(fig, path)
