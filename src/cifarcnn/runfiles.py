"""Where a run's files live and what they are called, in one place for the stages that write and
read them:

    models/<run>/seed<n>/best.pt          train@<run>-<n>'s checkpoint (resume states beside it)
    results/<run>/seed<n>/train/          train@<run>-<n>: config.json, run.json, train.json, curves.csv, train_loss.csv
    results/<run>/seed<n>/eval/           evaluate@<run>-<n>: eval.json, eval_detail.json, predictions.csv, curves.png, confusion.png

Each of the two results folders is one DVC output, so dvc.lock holds one entry for it, not one
per file. DVC parses and rewrites the whole dvc.lock after every stage (and `dvc exp run` reads it
once more), so its length is paid per stage: a file per output made a seed's two stages 100 lock
lines, the folders 55 (docs/speed.md: Cache boundaries).
"""
from __future__ import annotations

import csv
from pathlib import Path
from typing import NamedTuple

BEST = "best.pt"  # the checkpoint with the lowest validation loss (a DVC output)
RESUME_GLOB = "resume-*.pt"  # the latest state of a killed run, one file per key; removed when the run ends
CURVES_CSV = "curves.csv"  # one row per validation: step, epoch, train_loss, val_loss, val_acc
TRAIN_LOSS_CSV = "train_loss.csv"  # training loss, mean and std over 50-step blocks (fewer for a short run)


TRAINED, SCORED = "train", "eval"  # the two results folders of a seed (dvc.yaml names them too)


class RunDirs(NamedTuple):
    models: Path  # best.pt (a DVC output) and the resume states (not outputs: they must survive a kill)
    trained: Path  # results/<run>/seed<n>/train/: what the train stage writes, one DVC output
    scored: Path  # results/<run>/seed<n>/eval/: what the evaluate stage writes, one DVC output


def run_dirs(run_name: str, seed: int, results: Path | str = "results") -> RunDirs:
    """One trained seed's folders (relative to the repository, as the stages use them)."""
    seed_dir = Path(results) / run_name / f"seed{seed}"
    return RunDirs(Path("models") / run_name / f"seed{seed}", seed_dir / TRAINED, seed_dir / SCORED)


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


# --- from the layout before session 18 -------------------------------------------------------
# A workspace trained before then has each seed's files side by side in results/<run>/seed<n>/.
# Moving them into the folders and `dvc commit -f` records them as they are: the files, their
# numbers and their MLflow runs are the same, so nothing needs to re-train (2.5 h on a CPU).
TRAIN_FILES = ("config.json", "run.json", "train.json", CURVES_CSV, TRAIN_LOSS_CSV)
EVAL_FILES = ("eval.json", "eval_detail.json", "predictions.csv", "curves.png", "confusion.png")


def into_folders(results: Path | str = "results") -> list[Path]:
    """Move every seed's files of the old layout into its train/ and eval/ folders; the files
    moved (none when there is nothing to move: running it twice is harmless)."""
    moved = []
    for seed_dir in sorted(Path(results).glob("*/seed*")):
        for names, folder in ((TRAIN_FILES, TRAINED), (EVAL_FILES, SCORED)):
            for name in names:
                old = seed_dir / name
                if old.is_file():
                    (seed_dir / folder).mkdir(exist_ok=True)
                    old.replace(seed_dir / folder / name)
                    moved.append(seed_dir / folder / name)
    return moved


if __name__ == "__main__":  # python -m cifarcnn.runfiles: the upgrade step (README, "Upgrading")
    files = into_folders()
    print(f"moved {len(files)} file(s) into results/<run>/seed<n>/{{{TRAINED},{SCORED}}}/"
          + ("; now run `dvc commit -f` to record them, and nothing re-trains" if files else ""))
