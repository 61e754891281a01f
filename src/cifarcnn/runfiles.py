"""Where a run's files live and what they are called: ``models/<run>/seed<n>/`` and
``results/<run>/seed<n>/``, in one place for the stages that write and read them."""
from __future__ import annotations

import csv
from pathlib import Path

BEST = "best.pt"  # the checkpoint with the lowest validation loss (a DVC output)
RESUME_GLOB = "resume-*.pt"  # the latest state of a killed run, one file per key; removed when the run ends
CURVES_CSV = "curves.csv"  # one row per validation: step, epoch, train_loss, val_loss, val_acc
TRAIN_LOSS_CSV = "train_loss.csv"  # training loss, mean and std over 50-step blocks (fewer for a short run)


def run_dirs(run_name: str, seed: int) -> tuple[Path, Path]:
    """(models/<run>/seed<seed>, results/<run>/seed<seed>): one folder per trained seed."""
    return Path("models") / run_name / f"seed{seed}", Path("results") / run_name / f"seed{seed}"


def resume_file(folder: Path, key: str) -> Path:
    """The resume state of the run whose config, seed, data and training code give ``key``
    (training.resume_key): a copy with other params never finds it, and two never share it."""
    return Path(folder) / f"resume-{key}.pt"


def _number(field: str, text: str) -> int | float:
    return int(text) if field == "step" else float(text)


def read_rows(path: Path) -> list[dict]:
    """A CSV file the train stage wrote, numbers as numbers (``step`` an int)."""
    with open(path, newline="") as fh:
        return [{k: _number(k, v) for k, v in row.items()} for row in csv.DictReader(fh)]


def load_curves(results_dir: Path) -> dict:
    """A seed's 50-step training-loss blocks and validation records, from its CSV files."""
    blocks = read_rows(results_dir / TRAIN_LOSS_CSV)
    return {"blocks": {c: [row[c] for row in blocks] for c in ("step", "mean", "std")},
            "validations": read_rows(results_dir / CURVES_CSV)}
