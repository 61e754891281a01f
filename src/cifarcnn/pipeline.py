"""What a training stage does, end to end: train, write results, track in MLflow.

Failure-safe by construction:
- the resume state lives beside the checkpoint in the real repository (also for `dvc exp run
  --temp/--queue`, whose workspace copy is thrown away) and is not a DVC output, so DVC's
  removal of outputs before a re-run cannot take it; a killed run continues where it stopped;
- the results are staged and appear together only once MLflow holds the run;
- the resume state is removed only then: if the store is down at the end, the next
  `dvc repro` finds the finished state and logs it without training again.
"""
from __future__ import annotations

import os
from pathlib import Path

from .batches import validation_indices
from .checkpoint import load_checkpoint
from .config import RunConfig, config_digest
from .data import Dataset
from .device import resolve_device
from .errors import work
from .fsutil import csv_text, file_digest, split_metrics, staged_outputs, write_json, write_text
from .runfiles import BEST, CURVES_CSV, RESUME, TRAIN_LOSS_CSV
from .tracking import PARENT_TAG, TIMING, MlflowRun, parent_run, repo_root, run_tags
from .training import data_fingerprint, train

CURVE_FIELDS = ["step", "epoch", "train_loss", "val_loss", "val_acc"]
# train.json, a DVC metrics file, holds these numbers; everything else goes to run.json.
# Time and speed belong to the machine, not the model: they go to run.json.
TRAIN_METRICS = ("best_val_loss", "best_val_acc", "epochs_run")
LOSS_BLOCK_FIELDS = ["step", "mean", "std"]


def resume_dir(model_dir: Path) -> Path:
    """Where the resume state lives: a relative ``model_dir`` (the stage's models/<run>) is taken
    in the real repository, not in a `dvc exp run --temp/--queue` copy that is deleted."""
    return model_dir if model_dir.is_absolute() else repo_root() / model_dir


def train_and_track(cfg: RunConfig, ds: Dataset, model_dir: Path, results_dir: Path,
                    resume_in: Path | None = None) -> dict:
    device = resolve_device(cfg.device)
    resume_in = resume_in or resume_dir(model_dir)
    state = load_checkpoint(resume_in / RESUME) if (resume_in / RESUME).exists() else None  # read once, here
    parent = parent_run(cfg.experiment, cfg.name, config_digest(cfg.seedless_dict()), cfg.describes)
    description = f"{cfg.describes}, seed {cfg.seed}" if cfg.describes else f"{cfg.name}, seed {cfg.seed}"
    experiment_name = os.environ.get("DVC_EXP_NAME")  # `dvc exp run`: names repeat across experiments without it
    run = MlflowRun.start(cfg.experiment, f"{cfg.name}-{cfg.seed}" + (f" ({experiment_name})" if experiment_name else ""),
                          {**run_tags(cfg.name, str(device), "stages/train.py", description), "seed": str(cfg.seed),
                           PARENT_TAG: parent},
                          resume_id=state.get("run_state", {}).get("mlflow_run_id") if state else None, reopen=True)
    try:
        n_val = len(validation_indices(len(ds.train_y), cfg.val_fraction, cfg.split_seed)[1])
        run.log_dataset(str(cfg.data_params.get("source")), data_fingerprint(ds), {
            "subset": str(cfg.data_params.get("subset")), "train_images": str(len(ds.train_y) - n_val),
            "val_images": str(n_val), "test_images": str(len(ds.test_y)), "order": ds.train_order})
        run.log_params(cfg.flat_params())  # the last call before training that waits for the store
        with work():
            result = train(cfg, ds, model_dir, logger=run, run_state={"mlflow_run_id": run.run_id},
                           resume_dir=resume_in, keep_resume=True, score=False, resume_state=state)  # evaluate scores it
        logging_seconds = run.seconds  # params + per-step/validation metrics, during training
        metrics = {**result.metrics, "mlflow_run_id": run.run_id, "mlflow_parent_run_id": parent,
                   "resumed_from_step": result.resumed_from_step,
                   "data_source": str(cfg.data_params.get("source")), "data_subset": cfg.data_params.get("subset"),
                   "checkpoint_sha256": file_digest(model_dir / BEST, "sha256"),  # evaluate checks it before scoring
                   "registered_model": cfg.registered_model,
                   "title": f"{cfg.name}: {cfg.model}, {cfg.optimizer} lr {cfg.lr:g}, batch {cfg.batch_size}"}
        h = result.history
        blocks = h.loss_blocks()
        block_rows = [{"step": s, "mean": float(f"{m:.6g}"), "std": float(f"{d:.6g}")}
                      for s, m, d in zip(blocks["step"], blocks["mean"], blocks["std"])]
        with staged_outputs(results_dir) as staged:
            write_json(staged / "config.json", cfg.to_dict())  # the resolved config, as in the checkpoint
            write_text(staged / TRAIN_LOSS_CSV, csv_text(block_rows, LOSS_BLOCK_FIELDS))
            write_text(staged / CURVES_CSV, csv_text(h.validations, CURVE_FIELDS))
            run.flush()  # the evaluate stage logs the model it scored (and registers it)
            metrics["mlflow_logging_seconds"] = round(logging_seconds, 3)
            metrics["mlflow_logging_share"] = round(logging_seconds / max(metrics["train_seconds"], 1e-9), 4)
            run.log_summary({k: metrics[k] for k in ("mlflow_logging_seconds", "mlflow_logging_share")}, prefix=TIMING)
            numbers, info = split_metrics(metrics, TRAIN_METRICS)
            write_json(staged / "train.json", numbers)  # what `dvc exp show` compares: numbers only
            write_json(staged / "run.json", info)  # ids, device, data, flags
            run.finish()
        (resume_in / RESUME).unlink(missing_ok=True)  # the run is recorded: nothing left to resume
        return metrics
    except BaseException:
        run.abandon()
        try:
            run.finish("FAILED")
        except Exception:  # noqa: BLE001 - the original error matters more
            pass
        raise
