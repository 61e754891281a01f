"""MLflow: where runs are stored, and logging one training run into it.

Store: ``MLFLOW_TRACKING_URI`` if set, else ``sqlite:///<repo root>/mlflow.db`` with
artifacts under ``<repo root>/mlartifacts``. Paths are absolute, from DVC's ``DVC_ROOT``, and
a stage running inside ``dvc exp run --temp/--queue``'s temporary copy logs into the real
repository's store, not into the copy that is deleted afterwards.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

# Bounded waits for an unreachable tracking server (set before mlflow reads them).
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")  # seconds per request
os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")

import mlflow  # noqa: E402
from mlflow.entities import DatasetInput, InputTag, Metric, Param  # noqa: E402
from mlflow.exceptions import MlflowException  # noqa: E402
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

from .errors import UserError  # noqa: E402
from .fsutil import atomic_path  # noqa: E402
from .runfiles import TRAINED  # noqa: E402

# MLflow metric names, grouped by what comes before the last "/". The charts view shows one
# section per group, in alphabetical order (the ungrouped last), so the training curves come
# first, then the best checkpoint's scores (the evaluate stage owns them), its per-class test
# accuracy (scores/test_acc/<class>), a parent run's aggregates over its seeds, and the time spent logging.
CURVES = "curves/"  # per training step: train_loss; per validation: val_loss, val_acc, epoch
SCORES = "scores/"  # the best checkpoint on every split: train_acc, val_loss, test_acc, ...
SEEDS = "seeds/"  # on a run's parent: n, mean_test_acc, sd_test_acc, ...
TIMING = "timing/"  # mlflow_logging_seconds, mlflow_logging_share
MODEL_TAG = "classifier_checkpoint_sha256"  # the checkpoint the run's logged model holds

_TEMP_EXP_MARKER = os.sep + os.path.join(".dvc", "tmp", "exps") + os.sep
BATCH_LIMIT = 1000  # MLflow accepts at most 1000 metrics per log_batch call
FINAL_WAIT_S = float(os.environ.get("CIFARCNN_MLFLOW_WAIT_S", 120))  # how long the end of a run waits for the store
MAX_BACKOFF_S = 30.0  # longest pause between two tries
SYSTEM_METRICS_S = float(os.environ.get("CIFARCNN_SYSTEM_METRICS_S", 10))  # seconds between system metric samples
CONNECT_WAIT_S = float(os.environ.get("CIFARCNN_MLFLOW_CONNECT_WAIT_S", 20))  # a stage's first contact: how long it waits
# The store's answers that are not a busy or restarting store (mlflow.protos.databricks_pb2's codes).
REFUSALS = {"INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST", "PERMISSION_DENIED", "UNAUTHENTICATED"}
BEFORE_TRAINING = "nothing was trained by this process yet; re-run it once the store answers"  # the dataset and params, logged first


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


_CONNECTED: dict[tuple[str, str], tuple[MlflowClient, str]] = {}  # (store, experiment) -> client, id


def connect(experiment: str) -> tuple[MlflowClient, str]:
    """A client on the store and the experiment's id (created once; a local store's artifacts
    at an absolute path). A store that does not answer (a server or its database restarting) is
    asked again for up to CONNECT_WAIT_S, then the stage ends in one line. Once per process and
    store: each new client of a sqlite store checks its schema again (a second or so)."""
    local = None if os.environ.get("MLFLOW_TRACKING_URI") else repo_root() / "mlflow.db"  # before mlflow sets it
    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    if (uri, experiment) in _CONNECTED:
        return _CONNECTED[uri, experiment]
    if local is not None and not local.exists():
        _refuse_a_lost_store(local)
        _new_local_store(local)
    deadline = time.monotonic() + CONNECT_WAIT_S
    while True:
        try:
            client = MlflowClient(uri)  # inside: a corrupt store fails here, and gets the one line too
            _CONNECTED[uri, experiment] = client, _experiment_id(client, experiment, uri, local)
            return _CONNECTED[uri, experiment]
        except _Moved as err:
            raise UserError(str(err)) from None
        except Exception as err:  # noqa: BLE001 - any failure here means "no usable store"
            busy = "locked" in str(err) or "busy" in str(err)
            if (local is None or busy) and time.monotonic() + 2 < deadline:  # a server restarting, a writer
                time.sleep(2)
                continue
            if local is not None and not busy:
                raise UserError(
                    f"MLflow store {local} is not a usable database ({type(err).__name__}: {_first_line(err)}); "
                    f"move it aside (mv {local} {local}.broken), then put back a backup, or set "
                    f"{NEW_STORE_ENV}=1 to start a new store") from err
            raise UserError(
                f"MLflow tracking store {uri} is not usable ({type(err).__name__}: {_first_line(err)}); "
                "start the server, or unset MLFLOW_TRACKING_URI to log into the local sqlite store"
            ) from err


class _Moved(Exception):
    """The local store's artifacts live in another checkout (not a store failure: no retry)."""


NEW_STORE_ENV = "CIFARCNN_NEW_STORE"  # 1: a missing or damaged local store may be started afresh


def _refuse_a_lost_store(db: Path) -> None:
    """The local store is gone while results/ name runs in it: MLflow would make an empty one
    without a word (the registry back at version 1, the report naming runs that are nowhere)."""
    if os.environ.get(NEW_STORE_ENV) == "1":
        return
    named = sorted(p for p in (db.parent / "results").glob(f"*/seed*/{TRAINED}/run.json"))
    if named:
        raise UserError(
            f"{db} is missing, but {len(named)} results name MLflow runs in it (e.g. {named[0].relative_to(db.parent)}); "
            f"put it back from a backup, or set {NEW_STORE_ENV}=1 to start a new store (those runs will not be "
            f"in it; `dvc repro --force` logs them again)")


CACHE_ENV = "CIFARCNN_CACHE_DIR"  # where the empty-store template is kept; default ~/.cache/cifarcnn


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "cifarcnn")


def _new_local_store(db: Path) -> None:
    """Start a missing local store as a copy of an empty one that has MLflow's tables: MLflow would
    run its 60-odd schema migrations on every new store (about a second of a `dvc repro`'s first
    train stage). The template is made once per MLflow version, by those same migrations, in
    cache_dir(). Anything that fails here leaves the store missing, and MLflow makes it itself."""
    tmp = db.with_name(f".{db.name}.{os.getpid()}.new")
    try:
        shutil.copyfile(_store_template(), tmp)
        os.link(tmp, db)  # never over a store that another stage has just started
    except Exception:  # noqa: BLE001 - a shortcut only (FileExistsError: another stage made it first)
        pass
    finally:
        tmp.unlink(missing_ok=True)


def _store_template() -> Path:
    """An empty sqlite store with MLflow's tables at the schema this MLflow expects, and no
    experiment (MLflow adds its Default experiment, with the store's own artifact root, on opening it)."""
    import sqlalchemy  # MLflow's; what a store on a tracking server does not need
    from mlflow.store.db import utils as db_utils

    template = cache_dir() / f"mlflow-{mlflow.__version__}-empty-store.db"
    if template.exists():
        return template
    with atomic_path(template) as tmp:
        engine = sqlalchemy.create_engine(f"sqlite:///{tmp}")
        try:
            db_utils._initialize_tables(engine)  # what SqlAlchemyStore runs on an empty database
            db_utils._verify_schema(engine)
        finally:
            engine.dispose()
    return template


def _experiment_id(client: MlflowClient, experiment: str, uri: str, local: Path | None = None) -> str:
    found = client.get_experiment_by_name(experiment)
    if found is not None:
        home = artifact_location(local.parent) if local is not None else None
        if home is not None and found.artifact_location != home and found.artifact_location.startswith("file://"):
            # MLflow would write new artifacts into the old path (recreating it) and list none for old runs
            raise _Moved(f"experiment {experiment!r} in {local} keeps its artifacts in {found.artifact_location}, not in "
                         f"this checkout's {home}: the checkout was moved (or mlflow.db copied). Run `python -m "
                         f"cifarcnn.rebind` here to point the store at {home}, or move the checkout back")
        return found.experiment_id
    server = uri.startswith(("http://", "https://", "databricks"))
    try:  # a local store keeps artifacts beside it; a server chooses (and serves) their place
        return client.create_experiment(experiment, artifact_location=None if server else artifact_location())
    except Exception:  # noqa: BLE001 - a parallel stage (dvc exp run -j 2) created it first
        found = client.get_experiment_by_name(experiment)
        if found is None:
            raise
        return found.experiment_id


def git_commit(root: Path) -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


class SystemMonitor:
    """MLflow's SystemMetricsMonitor, with the samples of its last window logged when it finishes.
    MLflow's loop takes a sample, waits out the interval, and logs; on finish() it drops the window
    it was in. So a run shorter than one interval (SYSTEM_METRICS_S: a warm tiny-data stage trains
    in under a second) had no system metrics at all, and every run lost its last interval."""

    def __init__(self, monitor) -> None:
        self.monitor = monitor

    def finish(self) -> None:
        self.monitor.finish()  # stops its thread (it samples nothing more) and flushes what it logged
        last = self.monitor.aggregate_metrics()  # means over the window's samples; {} if it logged them
        if not last:
            return
        try:
            self.monitor.publish_metrics(last)
            self.monitor.mlflow_logger.flush()
        except Exception as err:  # noqa: BLE001 - best effort, as MLflow's own loop: training is what matters
            print(f"cifarcnn: the last system-metrics sample was not logged ({type(err).__name__}: "
                  f"{_first_line(err)})", file=sys.stderr, flush=True)


class MlflowRun:
    """One MLflow run per training run; implements the training loop's RunLogger.

    Metrics logged during training are queued and written by a background thread, so a slow or
    absent store (a locked sqlite file, a restarting server) never holds training up: failed
    writes are kept and tried again with a growing wait. ``flush`` at the end waits for the
    queue for up to ``FINAL_WAIT_S``; the calls after it retry for as long. A resumed run skips
    the steps the store already holds, so no metric history has a step twice.
    """

    def __init__(self, client: MlflowClient, run_id: str, logged_up_to: dict[str, int] | None = None) -> None:
        self.client = client
        self.run_id = run_id
        self.seconds = 0.0  # time the training loop spent handing metrics over
        self.logged_up_to = dict(logged_up_to or {})  # metric -> the last step the store holds (or is queued)
        self.last_error = ""
        self._pending: list[Metric] = []
        self._busy = False  # the writer holds a batch it has not written yet
        self._cond = threading.Condition()
        self._writer: threading.Thread | None = None
        self._abandoned = False  # the run failed: the writer drops what it holds and stops

    @classmethod
    def start(cls, experiment: str, run_name: str, tags: dict[str, str], resume_id: str | None = None,
              reopen: bool = False) -> "MlflowRun":
        """A new run, or ``resume_id`` when this store has it (``reopen``: set it RUNNING again,
        for a training run that continues after a kill or a failure)."""
        client, exp_id = connect(experiment)
        if resume_id:
            try:
                run = client.get_run(resume_id)
            except Exception:  # noqa: BLE001 - missing from this store: start a new run
                run = None
            if run is not None and run.info.experiment_id == exp_id:
                if not reopen:
                    return cls(client, resume_id)
                logged = {key: max((m.step for m in client.get_metric_history(resume_id, key)), default=-1)
                          for key in run.data.metrics}
                if run.info.status != "RUNNING":  # ended FAILED: it goes on
                    client.update_run(resume_id, status="RUNNING")
                return cls(client, resume_id, logged)
        run = client.create_run(exp_id, run_name=run_name, tags=tags)
        return cls(client, run.info.run_id)

    def _guard(self, what: str, fn, *args, **kwargs):
        started = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        except Exception as err:  # noqa: BLE001
            raise UserError(f"MLflow {what} failed ({type(err).__name__}: {_first_line(err)}); the trained "
                            "checkpoint is kept, and re-running the stage (dvc repro) logs it without "
                            "training again") from err
        finally:
            self.seconds += time.perf_counter() - started

    def _retrying(self, what: str, fn, *args, then: str = "the trained checkpoint is kept, so once the store "
                  "answers `dvc repro` logs this run without training again", **kwargs):
        """Try ``fn`` until it succeeds or FINAL_WAIT_S have passed, or the store refuses it (an
        answer: asking again changes nothing); then a one-line error that ends with ``then``."""
        deadline = time.monotonic() + FINAL_WAIT_S
        wait = 1.0
        while True:
            try:
                started = time.perf_counter()
                try:
                    return fn(*args, **kwargs)
                finally:
                    self.seconds += time.perf_counter() - started
            except Exception as err:  # noqa: BLE001 - a busy or restarting store: wait and retry
                self.last_error = f"{type(err).__name__}: {_first_line(err)}"
                if isinstance(err, MlflowException) and err.error_code in REFUSALS:  # an answer: asking again changes nothing
                    raise UserError(f"MLflow {what}: the store {tracking_uri()} refused it ({self.last_error})") from err
                if time.monotonic() + wait > deadline:
                    raise UserError(
                        f"MLflow {what}: the store {tracking_uri()} did not answer for {FINAL_WAIT_S} s "
                        f"({self.last_error}); {then}") from err
                time.sleep(wait)
                wait = min(wait * 2, MAX_BACKOFF_S)

    def log_params(self, params: dict) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self._retrying("log params", self.client.log_batch, self.run_id, params=items[i:i + 100],
                           then=BEFORE_TRAINING)  # a restart: wait

    def _write(self, metrics: list[Metric]) -> None:
        for i in range(0, len(metrics), BATCH_LIMIT):
            self.client.log_batch(self.run_id, metrics=metrics[i:i + BATCH_LIMIT])

    def _write_forever(self) -> None:
        """The writer thread: the store's slowness or absence costs training nothing."""
        failures = 0
        while True:
            with self._cond:
                while not self._pending and not self._abandoned:
                    self._cond.wait()
                if self._abandoned:
                    return
                batch, self._pending, self._busy = self._pending, [], True
            try:
                self._write(batch)
            except Exception as err:  # noqa: BLE001 - keep the batch, wait, try again
                failures += 1
                self.last_error = f"{type(err).__name__}: {_first_line(err)}"
                wait = min(2.0 ** failures, MAX_BACKOFF_S)
                if failures == 1:
                    print(f"MLflow store not answering ({self.last_error}); training goes on and its metrics "
                          f"are kept to write later", flush=True)
                with self._cond:
                    self._pending[:0] = batch
                    self._busy = False
                    self._cond.notify_all()
                time.sleep(wait)
                continue
            if failures:
                print(f"MLflow store answers again after {failures} failed tries: buffered metrics written", flush=True)
            failures = 0
            with self._cond:
                self._busy = False
                self._cond.notify_all()

    def log_metrics(self, metrics: list[Metric]) -> None:
        """Queue ``metrics`` (minus steps the store already holds) for the writer thread."""
        started = time.perf_counter()
        fresh = []
        for m in metrics:
            if m.step > self.logged_up_to.get(m.key, -1):
                fresh.append(m)
                self.logged_up_to[m.key] = m.step
        if fresh:
            with self._cond:
                if self._writer is None:
                    self._writer = threading.Thread(target=self._write_forever, name="mlflow-writer", daemon=True)
                    self._writer.start()
                self._pending.extend(fresh)
                self._cond.notify_all()
        self.seconds += time.perf_counter() - started

    def flush(self) -> None:
        """Wait until every queued metric is written, up to FINAL_WAIT_S (then a one-line error)."""
        deadline = time.monotonic() + FINAL_WAIT_S
        with self._cond:
            while self._pending or self._busy:
                left = deadline - time.monotonic()
                if left <= 0:
                    self._abandoned = True  # what was not written is logged by the next run
                    self._pending.clear()
                    self._cond.notify_all()
                    raise UserError(
                        f"MLflow: the store {tracking_uri()} did not take the run's metrics for {FINAL_WAIT_S:g} s "
                        f"({self.last_error or 'no answer'}); the trained checkpoint is kept, so once the store "
                        f"answers `dvc repro` logs this run without training again")
                self._cond.wait(timeout=min(left, 1.0))

    def log_train_losses(self, steps: list[int], losses: list[float]) -> None:
        now = int(time.time() * 1000)
        self.log_metrics([Metric(CURVES + "train_loss", v, now, s) for s, v in zip(steps, losses)])

    def log_validation(self, step: int, epoch: float, val_loss: float, val_acc: float) -> None:
        now = int(time.time() * 1000)
        self.log_metrics([Metric(CURVES + "val_loss", val_loss, now, step), Metric(CURVES + "val_acc", val_acc, now, step),
                          Metric(CURVES + "epoch", epoch, now, step)])

    def log_summary(self, metrics: dict, prefix: str) -> None:
        """Single numbers (step 0) named ``prefix + key``, after everything queued is written."""
        now = int(time.time() * 1000)
        self.flush()
        values = [Metric(f"{prefix}{k}", float(v), now, 0) for k, v in metrics.items()
                  if isinstance(v, (int, float)) and not isinstance(v, bool)
                  and f"{prefix}{k}" not in self.logged_up_to]  # a rerun after a failure: written already
        self._retrying("log metrics", self._write, values)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self._retrying("log artifact", self.client.log_artifact, self.run_id, str(path), artifact_path)

    def log_dataset(self, source: str, digest: str, tags: dict[str, str]) -> None:
        """The data as the run's input (MLflow's Dataset panel): where it came from, its digest,
        and the split sizes as tags; a reference only, nothing is uploaded."""
        from mlflow.data.dataset_source_registry import resolve_dataset_source
        from mlflow.data.meta_dataset import MetaDataset

        def _log():
            with warnings.catch_warnings():  # a local path matches MLflow's local source twice; it warns, and picks it
                warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted")
                dataset = MetaDataset(resolve_dataset_source(source), name="cifar10", digest=digest)
            entity = DatasetInput(dataset._to_mlflow_entity(), [InputTag(MLFLOW_DATASET_CONTEXT, "training"),
                                                                 *(InputTag(k, v) for k, v in tags.items())])
            self.client.log_inputs(self.run_id, datasets=[entity])  # not start_run: that would end the run
        self._retrying("log dataset", _log, then=BEFORE_TRAINING)

    def log_model(self, log: Callable[[], object], checkpoint_digest: str):
        """Log a model into this run once per checkpoint: ``log`` is a flavour's ``log_model``
        call (cifarcnn.serving's, from the evaluate stage), run inside this run; its ModelInfo.
        A stage re-run on the same checkpoint (a figure changed) logs and registers nothing
        again; None then."""
        if self.client.get_run(self.run_id).data.tags.get(MODEL_TAG) == checkpoint_digest:
            return None
        logged = []

        def _log():
            with mlflow.start_run(run_id=self.run_id):  # ends it on exit: the run's training is over
                logged.append(log())
        self._retrying("log model", _log)
        self._retrying("tag the logged model", self.client.set_tag, self.run_id, MODEL_TAG, checkpoint_digest)
        return logged[-1]

    def monitor_system(self):
        """MLflow's own system metrics on this run (system/cpu_utilization_percentage, memory,
        disk, network; GPU use and memory where pynvml sees a GPU), sampled every
        SYSTEM_METRICS_S while it is RUNNING. Created here, not by mlflow.start_run, because the
        training run is made with MlflowClient. Returns the monitor: ``finish()`` it at the end."""
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        monitor = SystemMetricsMonitor(self.run_id, sampling_interval=SYSTEM_METRICS_S,
                                       resume_logging=bool(self.logged_up_to), tracking_uri=tracking_uri())
        monitor.start()
        return SystemMonitor(monitor)

    def abandon(self) -> None:
        """Stop the writer: after a failure the next run logs what is missing."""
        with self._cond:
            self._abandoned = True
            self._pending.clear()
            self._cond.notify_all()

    def mark_killed(self, run_id: str) -> None:
        """Another run of this store whose process is known to be gone: KILLED if it still reads
        RUNNING (a SIGKILL leaves no chance to say so itself). One quick try; this store may
        not hold it (the state was saved against another one)."""
        try:
            if self.client.get_run(run_id).info.status == "RUNNING":
                self.client.set_terminated(run_id, "KILLED")
                print(f"MLflow run {run_id} marked KILLED: its process is gone", flush=True)
        except Exception:  # noqa: BLE001 - not this store's run, or the store is busy: the record stays as it is
            pass

    def finish(self, status: str = "FINISHED") -> None:
        if status == "FINISHED":
            self._retrying("end run", self.client.set_terminated, self.run_id, status)
        else:  # on the way out of a failure: one quick try, the original error matters more
            self._guard("end run", self.client.set_terminated, self.run_id, status)


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [""])[0][:200]


def run_user() -> str:
    """Who made a run: the tracking server's user when there is one, else this machine's."""
    import getpass

    try:
        return os.environ.get("MLFLOW_TRACKING_USERNAME") or getpass.getuser()
    except Exception:  # noqa: BLE001 - no user name in this environment (a bare container)
        return "unknown"


def run_tags(run_name: str, device: str, script: str, description: str = "") -> dict[str, str]:
    """What a run says about itself: MLflow's own source tags (the UI's Source and commit
    columns), its description (the Overview note), and where and how it ran."""
    import torch

    root = repo_root()
    commit = git_commit(root)
    return {
        "mlflow.source.name": script,
        "mlflow.source.type": "PROJECT" if os.environ.get("MLFLOW_RUN_ID") else "LOCAL",
        "mlflow.source.git.commit": commit,
        "mlflow.user": run_user(),  # the UI's "Created by" (fluent start_run sets it; create_run does not)
        **({"mlflow.note.content": description} if description else {}),
        "git_commit": commit,
        # Only where DVC says: `dvc exp run` names its experiment, `dvc repro` in the workspace does not
        # (an empty value would read as a name in the UI's tag column and in searches).
        **{tag: os.environ[var] for tag, var in (("dvc_exp_name", "DVC_EXP_NAME"), ("dvc_stage", "DVC_STAGE"))
           if os.environ.get(var)},
        "device": device,
        "torch_version": torch.__version__,
        "run": run_name,
    }


PARENT_TAG = "mlflow.parentRunId"  # MLflow nests a run under the run this tag names
PARENT_MARK = "seeds_parent"  # tag of a report run's parent: it holds no training, only its seeds' aggregates
ENTRY_TAG = "entry_run"  # the `mlflow run` run a parent was created under ("none": dvc repro / dvc exp run)


def entry_run(client: MlflowClient, exp_id: str) -> str | None:
    """The run `mlflow run` started for its entry point (it sets MLFLOW_RUN_ID for the command),
    when it is in this project's experiment: the training runs are nested under it."""
    run_id = os.environ.get("MLFLOW_RUN_ID")
    if not run_id:
        return None
    try:
        run = client.get_run(run_id)
    except Exception:  # noqa: BLE001 - in another store: nothing to nest under
        print(f"MLflow: the `mlflow run` run {run_id} is not in {tracking_uri()}; the runs are not nested under it")
        return None
    if run.info.experiment_id != exp_id:
        print(f"MLflow: the `mlflow run` run {run_id} is in experiment {run.info.experiment_id}, not in this "
              f"project's ({exp_id}); pass --experiment-name (mlflow.experiment of params.yaml) to nest the runs under it")
        return None
    return run_id


def _find_parent(client: MlflowClient, exp_id: str, run_name: str, digest: str, entry: str) -> str | None:
    found = client.search_runs([exp_id], filter_string=f"tags.{PARENT_MARK} = 'true' and tags.run = '{run_name}' "
                                                       f"and tags.config_digest = '{digest}' and tags.{ENTRY_TAG} = '{entry}'",
                               max_results=1, order_by=["attributes.start_time ASC"])
    return found[0].info.run_id if found else None


def parent_run(experiment: str, run_name: str, digest: str, describes: str = "",
               params: dict | None = None) -> str:
    """The parent MLflow run of every seed of ``run_name`` with this config (found by its tags,
    created on first use by a training seed): the UI nests the seeds under it, compares parents
    by ``params`` (the run's, all but the seed), and it carries their aggregates. Under `mlflow
    run` the parent is one of that entry point's run, and nested under it."""
    client, exp_id = connect(experiment)
    return _parent_run(client, exp_id, run_name, digest, describes, params or {})


def open_parent(client: MlflowClient, parent: str) -> None:
    """A seed trains under ``parent`` (its run made): the parent reads RUNNING until its last
    seed ends (:func:`end_parent`), as the UI's parent row should while its seeds train."""
    try:
        client.update_run(parent, status="RUNNING")
    except Exception:  # noqa: BLE001 - a busy store: a parent's status is not worth stopping the training
        pass


def close_parent(experiment: str, parent: str) -> None:
    """A seed ended (finished, failed or stopped): see :func:`end_parent`."""
    try:
        client, exp_id = connect(experiment)
        end_parent(client, exp_id, parent)
    except Exception:  # noqa: BLE001 - a parent's status is not worth failing (or hiding the error of) a seed over
        pass


def end_parent(client: MlflowClient, exp_id: str, parent: str) -> None:
    """A seed under ``parent`` ended: the parent reads FINISHED, its end now (so its duration
    spans its seeds), unless another of its seeds still trains -- that one ends it. Each seed
    ends its own run first, so of two ending at once the later sees the other ended."""
    if not client.search_runs([exp_id], filter_string=f"tags.`{PARENT_TAG}` = '{parent}' and attributes.status = 'RUNNING'",
                              max_results=1):
        client.set_terminated(parent, "FINISHED", end_time=int(time.time() * 1000))


def _parent_run(client: MlflowClient, exp_id: str, run_name: str, digest: str, describes: str,
                params: dict) -> str:
    try:
        entry = entry_run(client, exp_id)
        found = _find_parent(client, exp_id, run_name, digest, entry or "none")
        if found:
            return found
        name = run_name + (f" ({os.environ['DVC_EXP_NAME']})" if os.environ.get("DVC_EXP_NAME") else "")
        commit = git_commit(repo_root())
        run = client.create_run(exp_id, run_name=name, tags={
            PARENT_MARK: "true", "run": run_name, "config_digest": digest, ENTRY_TAG: entry or "none",
            **({PARENT_TAG: entry} if entry else {}), "git_commit": commit, "mlflow.source.git.commit": commit,
            "mlflow.source.name": "stages/train.py", "mlflow.source.type": "LOCAL", "mlflow.user": run_user(),
            "mlflow.note.content": (f"{describes}. " if describes else "") +
                                   f"All seeds of `{run_name}` with config {digest}: each seed is a child run; "
                                   f"{SEEDS}* are their aggregates (written by the report stage)."})
        if params:
            client.log_batch(run.info.run_id, params=[Param(k, str(v)) for k, v in params.items()])
        client.set_terminated(run.info.run_id)  # ended until a seed trains under it (open_parent)
        first = _find_parent(client, exp_id, run_name, digest, entry or "none")  # two seeds starting at once (-j 2)
        if first != run.info.run_id:  # may both have created one: keep the earliest, drop ours
            client.delete_run(run.info.run_id)
        return first
    except Exception as err:  # noqa: BLE001
        raise UserError(f"MLflow store {tracking_uri()} refused the parent run of {run_name} "
                        f"({type(err).__name__}: {_first_line(err)}); re-run the stage when it answers") from err


def runs_held(experiment: str, run_ids: list[str]) -> list[str]:
    """Which of ``run_ids`` this store holds, in their order (the report prints no id it does
    not; aggregates go only to parents it holds)."""
    client, _ = connect(experiment)
    held = []
    for run_id in dict.fromkeys(run_ids):
        try:
            client.get_run(run_id)
            held.append(run_id)
        except Exception:  # noqa: BLE001 - not in this store (another server, a fresh mlflow.db)
            pass
    return held


def log_aggregates(experiment: str, run_name: str, digest: str, describes: str, aggregates: dict[str, float],
                   parents: list[str]) -> list[str]:
    """The seeds' mean, sd and n onto the parent runs the seeds were trained under (``parents``,
    from their run.json); when none of them is in this store, onto the run's parent found by its
    tags; with none, nowhere (the report has them): no parent without seeds is made."""
    client, exp_id = connect(experiment)
    now = int(time.time() * 1000)
    try:
        known = runs_held(experiment, parents)
        if not known:  # found by its tags; a parent is made only by a training seed, never here
            found = _find_parent(client, exp_id, run_name, digest, entry_run(client, exp_id) or "none")
            known = [found] if found else []
        if not known:
            print(f"MLflow: no parent run of {run_name} is in {tracking_uri()}; its seeds' aggregates are in the report "
                  f"only (`dvc repro --force` the seeds to log them)")
        for run_id in known:
            client.log_batch(run_id, metrics=[Metric(SEEDS + k, float(v), now, 0) for k, v in aggregates.items()])
    except UserError:
        raise
    except Exception as err:  # noqa: BLE001
        raise UserError(f"MLflow store {tracking_uri()} refused the aggregates of {run_name} "
                        f"({type(err).__name__}: {_first_line(err)}); re-run the stage when it answers") from err
    return known


CHAMPION = "champion"  # the registry alias of the version with the best validation accuracy


@dataclass
class ModelLog:
    """A model for the evaluate stage to log into the training run, once per checkpoint."""

    log: Callable[[], object]  # a flavour's log_model call (returns its ModelInfo)
    digest: str  # the checkpoint's sha256
    registered: str | None = None  # the registry name ``log`` registers a version under
    description: str = ""  # for its registry version
    tags: dict[str, str] = field(default_factory=dict)  # for its registry version; val_acc picks the champion


def describe_version(client: MlflowClient, name: str, version: str, description: str, tags: dict[str, str]) -> None:
    """A registry version that explains itself, and the ``champion`` alias on the best one."""
    client.update_model_version(name, version, description=description)
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, str(value))
    crown(client, name)


def crown(client: MlflowClient, name: str) -> str | None:
    """Point ``champion`` at the version with the highest ``val_acc`` tag (the earliest of equals):
    it moves only when a better one arrives. Set from the whole registry each time, so two
    evaluate stages finishing together still agree."""
    best: tuple[tuple[float, int], str] | None = None
    for v in client.search_model_versions(f"name = '{name}'"):
        try:
            key = (float(v.tags.get("val_acc")), -int(v.version))
        except (TypeError, ValueError):
            continue
        if best is None or key > best[0]:
            best = (key, v.version)
    if best is None:
        return None
    try:
        current = client.get_model_version_by_alias(name, CHAMPION).version
    except Exception:  # noqa: BLE001 - no champion yet
        current = None
    if str(current) != str(best[1]):  # a version is an int from a sqlite store, a string from a server
        client.set_registered_model_alias(name, CHAMPION, str(best[1]))
    return str(best[1])


def log_evaluation(experiment: str, run_name: str, run_id: str | None, metrics: dict, artifacts: list[Path],
                   model: ModelLog | None = None) -> str:
    """Log evaluation numbers and figures into the training run (a new run if that one is not in
    this store), and ``model`` once per checkpoint (a registered one described and ranked)."""
    run = MlflowRun.start(experiment, run_name, {**run_tags(run_name, metrics.get("device", ""), "stages/evaluate.py"),
                                                 "evaluation_only": "true"},
                          resume_id=run_id)
    if run.run_id != run_id:
        print(f"MLflow run {run_id} of {run_name} is not in {tracking_uri()}; logging the evaluation "
              f"into a new run {run.run_id}")
    flat = {k: v for k, v in metrics.items() if k.endswith(("_acc", "_loss", "_aug"))}
    flat.update({f"test_acc/{c}": v for c, v in metrics.get("test_class_acc", {}).items() if v is not None})
    run.log_summary(flat, prefix=SCORES)  # per class: scores/test_acc/<class>
    for path in artifacts:
        run.log_artifact(path)
    if model is not None:
        info = run.log_model(model.log, model.digest)
        version = getattr(info, "registered_model_version", None) if info is not None else None
        if version is not None and model.registered:
            run._retrying("describe the model version", describe_version, run.client, model.registered, str(version),
                          model.description, model.tags)
    if run.run_id != run_id:
        run.finish()
    return run.run_id
