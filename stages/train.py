"""DVC stage `train@<run>-<seed>`: train one seed of one run, track it in MLflow.

Reads configs/<run>.json (written by `configure`). Outputs: models/<run>/seed<seed>/best.pt
(lowest validation loss) and results/<run>/seed<seed>/train/ with train.json (numbers only),
run.json (the MLflow run id, device, data), config.json, curves.csv and train_loss.csv (the
evaluate stage draws them). A killed run resumes from models/<run>/seed<seed>/resume-<key>.pt
(key: config, seed, data, training code), which is not a DVC output.
"""
from pathlib import Path

from cifarcnn.config import CONFIGS, RunConfig
from cifarcnn.data import Dataset
from cifarcnn.errors import UserError, cli, stage_args
from cifarcnn.fsutil import read_json
from cifarcnn.pipeline import train_and_track
from cifarcnn.runfiles import run_dirs

DATA = Path("data/cifar10.npz")


@cli
def main(run_name: str, seed: str) -> None:
    config = CONFIGS / f"{run_name}.json"
    if not config.exists():
        raise UserError(f"{config} does not exist; run `dvc repro configure` (or dvc repro) first")
    cfg = RunConfig.from_dict(read_json(config), seed=int(seed))
    dirs = run_dirs(run_name, cfg.seed)
    metrics = train_and_track(cfg, Dataset.load(DATA), dirs.models, dirs.trained)
    print(f"{run_name} seed {seed}: best validation loss {metrics['best_val_loss']:.4f}, accuracy "
          f"{metrics['best_val_acc']:.2%} at step {metrics['best_step']} ({metrics['train_seconds']:.0f} s of "
          f"training); MLflow run {metrics['mlflow_run_id']}; `evaluate@{run_name}-{seed}` scores it on every split")


if __name__ == "__main__":
    main(*stage_args("python stages/train.py <run name from params.yaml> <seed>", 2, __doc__))
