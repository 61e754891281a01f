"""What a training stage does, end to end: train, write results, track in MLflow.

Failure-safe by construction:
- the resume state lives beside the checkpoint in the real repository (also for `dvc exp run
  --temp/--queue`, whose workspace copy is thrown away) and is not a DVC output, so DVC's
  removal of outputs before a re-run cannot take it; a killed run continues where it stopped;
- its file is named by what it continues (config, seed, data, training code: resume_key) and
  locked while in use, so copies with other params never pick it up and two copies with the
  same params never share it; this is settled before any MLflow run is opened or re-opened;
- SIGTERM/SIGINT, or DVC or the reader of its output gone (errors.stopped_from_outside), mark
  the MLflow run KILLED, an error FAILED;
- the results are staged and appear together only once MLflow holds the run;
- the resume state is removed only then: if the store is down at the end, the next
  `dvc repro` finds the finished state and logs it without training again.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from .batches import validation_indices
from .checkpoint import load_checkpoint
from .config import RunConfig, config_digest
from .data import Dataset
from .device import resolve_device
from .errors import stopped_from_outside, work
from .fsutil import csv_text, file_digest, is_locked, release_lock, split_metrics, staged_outputs, try_lock, write_json, write_text
from .runfiles import BEST, CURVES_CSV, RESUME_GLOB, TRAIN_LOSS_CSV, resume_file
from .tracking import PARENT_TAG, TIMING, MlflowRun, close_parent, open_parent, parent_run, repo_root, run_tags
from .training import data_fingerprint, resume_key, train

CURVE_FIELDS = ["step", "epoch", "train_loss", "val_loss", "val_acc"]
# train.json, a DVC metrics file, holds these numbers; everything else goes to run.json.
# Time and speed belong to the machine, not the model: they go to run.json.
TRAIN_METRICS = ("best_val_loss", "best_val_acc", "epochs_run")
LOSS_BLOCK_FIELDS = ["step", "mean", "std"]


def resume_dir(model_dir: Path) -> Path:
    """Where the resume state lives: a relative ``model_dir`` (the stage's models/<run>) is taken
    in the real repository, not in a `dvc exp run --temp/--queue` copy that is deleted."""
    return model_dir if model_dir.is_absolute() else repo_root() / model_dir


def _lock_of(resume: Path) -> Path:
    return resume.with_suffix(".lock")


def _config_changes(saved: dict, current: dict, prefix: str = "") -> list[str]:
    """``lr 0.001 -> 0.002``-style differences between two resolved configs."""
    changes = []
    for key in sorted(set(saved) | set(current)):
        old, new = saved.get(key), current.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            changes += _config_changes(old, new, f"{prefix}{key}.")
        elif old != new:
            changes.append(f"{prefix}{key} {old} -> {new}")
    return changes


def left_states(cfg: RunConfig, folder: Path, mine: Path) -> list[tuple[Path, str, str | None]]:
    """Resume states of this run's folder that this run does not continue and no live process
    holds: (file, why it is left, the MLflow run id it was logging to)."""
    left = []
    for other in sorted(folder.glob(RESUME_GLOB)):
        if other == mine or is_locked(_lock_of(other)):
            continue
        try:
            state = load_checkpoint(other, mmap=True)  # config, step and run id only
        except Exception:  # noqa: BLE001 - unreadable: say so, never fail this run over it
            left.append((other, "it is not a readable checkpoint", None))
            continue
        changes = _config_changes(state.get("config", {}), cfg.to_dict())
        why = (f"it was saved at step {state.get('step')} with " + ", ".join(changes[:4]) if changes
               else f"it was saved at step {state.get('step')} with other data or training code")
        left.append((other, why, state.get("run_state", {}).get("mlflow_run_id")))
    return left


def train_and_track(cfg: RunConfig, ds: Dataset, model_dir: Path, results_dir: Path,
                    resume_in: Path | None = None) -> dict:
    device = resolve_device(cfg.device)
    resume_in = resume_in or resume_dir(model_dir)
    # Which resume state this run may use is decided here, before MLflow is touched.
    resume_path = resume_file(resume_in, resume_key(cfg, ds))
    left = left_states(cfg, resume_in, resume_path)
    for other, why, _ in left:
        print(f"left {other} as it is: {why}; it resumes if those come back, or delete it", flush=True)
    lock, private = try_lock(_lock_of(resume_path)), None
    if lock is None:
        private = Path(tempfile.mkdtemp(prefix="cifarcnn-resume-"))
        print(f"{resume_path} is in use by another process training the same config and seed; this one "
              f"trains without it (a kill loses its progress)", flush=True)
        resume_path = resume_file(private, resume_path.stem.removeprefix("resume-"))
    try:
        return _train_and_track(cfg, ds, device, model_dir, results_dir, resume_path, left)
    finally:
        if lock is not None:  # the lock file goes with the state it guards
            release_lock(lock, _lock_of(resume_path), remove=not resume_path.exists())
        if private is not None:
            shutil.rmtree(private, ignore_errors=True)


def _train_and_track(cfg: RunConfig, ds: Dataset, device, model_dir: Path, results_dir: Path, resume_path: Path,
                     left: list) -> dict:
    state = load_checkpoint(resume_path) if resume_path.exists() else None  # read once, here
    parent = parent_run(cfg.experiment, cfg.name, config_digest(cfg.seedless_dict()), cfg.describes,
                        {k: v for k, v in cfg.flat_params().items() if k != "train.seed"})
    description = f"{cfg.describes}, seed {cfg.seed}" if cfg.describes else f"{cfg.name}, seed {cfg.seed}"
    experiment_name = os.environ.get("DVC_EXP_NAME")  # `dvc exp run`: names repeat across experiments without it
    run = MlflowRun.start(cfg.experiment, f"{cfg.name}-{cfg.seed}" + (f" ({experiment_name})" if experiment_name else ""),
                          {**run_tags(cfg.name, str(device), "stages/train.py", description), "seed": str(cfg.seed),
                           PARENT_TAG: parent},
                          resume_id=state.get("run_state", {}).get("mlflow_run_id") if state else None, reopen=True)
    for _, _, run_id in left:  # their processes are gone (no lock held): a RUNNING status would be a lie
        if run_id:
            run.mark_killed(run_id)
    try:
        open_parent(run.client, parent)  # RUNNING while this seed trains; close_parent ends it (if no other seed trains)
        n_val = len(validation_indices(len(ds.train_y), cfg.val_fraction, cfg.split_seed)[1])
        dataset = (str(cfg.data_params.get("source")), data_fingerprint(ds), {
            "subset": str(cfg.data_params.get("subset")), "train_images": str(len(ds.train_y) - n_val),
            "val_images": str(n_val), "test_images": str(len(ds.test_y)), "order": ds.train_order})
        run.log_dataset(*dataset)
        MlflowRun(run.client, parent).log_dataset(*dataset)  # the parent shows what its seeds trained on
        run.log_params(cfg.flat_params())  # the last call before training that waits for the store
        monitor = run.monitor_system()
        with work():
            try:
                result = train(cfg, ds, model_dir, logger=run, run_state={"mlflow_run_id": run.run_id},
                               resume_dir=resume_path.parent, keep_resume=True, score=False,
                               resume_state=state)  # evaluate scores it
            finally:
                monitor.finish()
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
        resume_path.unlink(missing_ok=True)  # the run is recorded: nothing left to resume
        close_parent(cfg.experiment, parent)
        return metrics
    except BaseException as err:
        killed = stopped_from_outside(err)
        run.abandon()
        try:
            run.finish("KILLED" if killed else "FAILED")
            close_parent(cfg.experiment, parent)  # not left RUNNING by a seed that ended this way
        except Exception:  # noqa: BLE001 - the original error matters more (and a store that is down, no wait)
            pass
        if killed and resume_path.exists():
            print(f"{cfg.name} seed {cfg.seed}: MLflow run {run.run_id} marked KILLED; `dvc repro` continues it "
                  f"from {resume_path}", flush=True)
        raise
