"""MLflow: where runs are stored, and logging one training run into it.

Store: ``MLFLOW_TRACKING_URI`` if set, else ``sqlite:///<repo root>/mlflow.db`` with
artifacts under ``<repo root>/mlartifacts``. Paths are absolute, from DVC's ``DVC_ROOT``, and
a stage running inside ``dvc exp run --temp/--queue``'s temporary copy logs into the real
repository's store, not into the copy that is deleted afterwards.
"""
from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

# Bounded waits for an unreachable tracking server (set before mlflow reads them).
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")  # seconds per request
os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")

import mlflow  # noqa: E402
from mlflow.entities import Metric  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

from .errors import UserError  # noqa: E402

_TEMP_EXP_MARKER = os.sep + os.path.join(".dvc", "tmp", "exps") + os.sep
BATCH_LIMIT = 1000  # MLflow accepts at most 1000 metrics per log_batch call


def repo_root() -> Path:
    root = Path(os.environ.get("DVC_ROOT") or Path.cwd()).resolve()
    text = str(root) + os.sep
    if _TEMP_EXP_MARKER in text:  # a `dvc exp run --temp/--queue` workspace copy
        root = Path(text.split(_TEMP_EXP_MARKER)[0])
    return root


def tracking_uri(root: Path | None = None) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(root or repo_root()) / 'mlflow.db'}"


def artifact_location(root: Path | None = None) -> str:
    return ((root or repo_root()) / "mlartifacts").as_uri()


def connect(experiment: str) -> tuple[MlflowClient, str]:
    """A client on the store and the experiment's id (created once, with absolute artifacts)."""
    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri)
    try:
        found = client.get_experiment_by_name(experiment)
        if found is None:
            try:
                exp_id = client.create_experiment(experiment, artifact_location=artifact_location())
            except Exception:  # noqa: BLE001 - a parallel stage (dvc exp run -j 2) created it first
                found = client.get_experiment_by_name(experiment)
                if found is None:
                    raise
                exp_id = found.experiment_id
        else:
            exp_id = found.experiment_id
    except Exception as err:  # noqa: BLE001 - any failure here means "no usable store"
        raise UserError(
            f"MLflow tracking store {uri} is not usable ({type(err).__name__}: {str(err)[:200]}); "
            "start the server, or unset MLFLOW_TRACKING_URI to log into the local sqlite store"
        ) from err
    return client, exp_id


def git_commit(root: Path) -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


class MlflowRun:
    """One MLflow run per training run; implements the training loop's RunLogger."""

    def __init__(self, client: MlflowClient, run_id: str) -> None:
        self.client = client
        self.run_id = run_id
        self.seconds = 0.0  # time spent logging, to keep it a small share of training

    @classmethod
    def start(cls, experiment: str, run_name: str, tags: dict[str, str], resume_id: str | None = None) -> "MlflowRun":
        client, exp_id = connect(experiment)
        if resume_id:
            try:
                run = client.get_run(resume_id)
                if run.info.experiment_id == exp_id:
                    return cls(client, resume_id)
            except Exception:  # noqa: BLE001 - missing from this store: start a new run
                pass
        run = client.create_run(exp_id, run_name=run_name, tags=tags)
        return cls(client, run.info.run_id)

    def _guard(self, what: str, fn, *args, **kwargs):
        started = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        except Exception as err:  # noqa: BLE001
            raise UserError(f"MLflow {what} failed ({type(err).__name__}: {str(err)[:200]}); the checkpoints "
                            "are kept, so re-running the stage resumes where it stopped") from err
        finally:
            self.seconds += time.perf_counter() - started

    def log_params(self, params: dict) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self._guard("log params", self.client.log_batch, self.run_id, params=items[i:i + 100])

    def log_metrics(self, metrics: list[Metric]) -> None:
        for i in range(0, len(metrics), BATCH_LIMIT):
            self._guard("log metrics", self.client.log_batch, self.run_id, metrics=metrics[i:i + BATCH_LIMIT])

    def log_train_losses(self, steps: list[int], losses: list[float]) -> None:
        now = int(time.time() * 1000)
        self.log_metrics([Metric("train_loss", v, now, s) for s, v in zip(steps, losses)])

    def log_validation(self, step: int, epoch: float, val_loss: float, val_acc: float) -> None:
        now = int(time.time() * 1000)
        self.log_metrics([Metric("val_loss", val_loss, now, step), Metric("val_acc", val_acc, now, step),
                          Metric("epoch", epoch, now, step)])

    def log_summary(self, metrics: dict, prefix: str = "final_") -> None:
        now = int(time.time() * 1000)
        self.log_metrics([Metric(f"{prefix}{k}", float(v), now, 0) for k, v in metrics.items()
                          if isinstance(v, (int, float)) and not isinstance(v, bool)])

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self._guard("log artifact", self.client.log_artifact, self.run_id, str(path), artifact_path)

    def log_model(self, model, input_example) -> None:
        import torch

        def _log():
            with mlflow.start_run(run_id=self.run_id):
                mlflow.pytorch.log_model(
                    model, name="model", input_example=input_example,
                    # explicit requirements: inferring them imports the whole environment (slow)
                    pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],
                )
        self._guard("log model", _log)

    def finish(self, status: str = "FINISHED") -> None:
        self._guard("end run", self.client.set_terminated, self.run_id, status)


def run_tags(run_name: str, device: str) -> dict[str, str]:
    import torch

    root = repo_root()
    return {
        "git_commit": git_commit(root),
        "dvc_exp_name": os.environ.get("DVC_EXP_NAME", ""),
        "dvc_stage": os.environ.get("DVC_STAGE", ""),
        "device": device,
        "torch_version": torch.__version__,
        "run": run_name,
    }


def log_evaluation(experiment: str, run_name: str, run_id: str | None, metrics: dict,
                   artifacts: list[Path]) -> str:
    """Log evaluation numbers into the training run; a new run if that one is not in this store."""
    run = MlflowRun.start(experiment, run_name, {**run_tags(run_name, metrics.get("device", "")),
                                                 "evaluation_only": "true"},
                          resume_id=run_id)
    if run.run_id != run_id:
        print(f"MLflow run {run_id} of {run_name} is not in {tracking_uri()}; logging the evaluation "
              f"into a new run {run.run_id}")
    flat = {k: v for k, v in metrics.items() if k.endswith(("_acc", "_loss"))}
    flat.update({f"test_acc_{c}": v for c, v in metrics.get("test_class_acc", {}).items() if v is not None})
    run.log_summary(flat, prefix="eval_")
    for path in artifacts:
        run.log_artifact(path)
    if run.run_id != run_id:
        run.finish()
    return run.run_id
