"""DVC stage `train@<run>`: train one run of params.yaml, track it in MLflow.

Outputs: models/<run>/best.pt (lowest validation loss), results/<run>/train.json (numbers
only), run.json (the MLflow run id, device, data), config.json, curves.csv and train_loss.csv
(the evaluate stage draws them). A killed run resumes from models/<run>/resume.pt, which is not a DVC output.
"""
import sys
from pathlib import Path

from cifarcnn.config import load_params, resolve_run
from cifarcnn.data import Dataset
from cifarcnn.errors import cli
from cifarcnn.pipeline import train_and_track

DATA = Path("data/cifar10.npz")


@cli
def main(run_name: str) -> None:
    cfg = resolve_run(load_params(), run_name)  # validated before any work
    metrics = train_and_track(cfg, Dataset.load(DATA), Path("models") / run_name, Path("results") / run_name)
    print(f"{run_name}: best validation loss {metrics['best_val_loss']:.4f}, accuracy {metrics['best_val_acc']:.2%} "
          f"at step {metrics['best_step']} ({metrics['train_seconds']:.0f} s of training); "
          f"MLflow run {metrics['mlflow_run_id']}; `evaluate@{run_name}` scores it on every split")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python stages/train.py <run name from params.yaml>")
    main(sys.argv[1])
