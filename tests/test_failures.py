"""What a user sees when something outside the code goes wrong: a full disk, a read-only
folder, a busy tracking store, a store that is down during evaluation. One line, a FAILED
MLflow run (never RUNNING), no half-written output, and training that survives a busy store."""
from __future__ import annotations

import contextlib
import json
import re
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from fixtures import BROKEN_FOLDERS, broken_image_folder
from helpers import ROOT, tiny_dataset, tiny_params, tiny_run, training_runs, write_params
from mlflow.tracking import MlflowClient

from cifarcnn import pipeline, tracking, training
from cifarcnn.errors import UserError
from cifarcnn.errors import Interrupted
from cifarcnn.fsutil import staged_outputs, try_lock, write_json, write_text
from cifarcnn.runfiles import RESUME_GLOB, resume_file, run_dirs
from cifarcnn.pipeline import train_and_track


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    return tmp_path


@contextlib.contextmanager
def small_mount(path: Path, options: str):
    """A tmpfs at ``path`` (root only); skips the test, saying why, where it cannot be made."""
    path.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True, text=True)
    if proc.returncode != 0:
        reason = f"cannot mount a tmpfs here ({(proc.stderr or proc.stdout).strip() or 'not root'}); skipped"
        print(reason)
        pytest.skip(reason)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_outputs_follow_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        write_json(tmp_path / "a.json", {"x": 1})
        with staged_outputs(tmp_path / "run") as staged:
            write_text(staged / "b.csv", "x\n")
    finally:
        os.umask(old)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == mode
    assert (tmp_path / "run" / "b.csv").stat().st_mode & 0o777 == mode


def test_staged_outputs_appear_together_or_not_at_all(tmp_path):
    (tmp_path / "eval.json").write_text("old")
    with pytest.raises(RuntimeError), staged_outputs(tmp_path) as staged:
        write_text(staged / "curves.png", "new")
        raise RuntimeError("the tracking store went away")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval.json"]
    assert (tmp_path / "eval.json").read_text() == "old"


def test_read_only_folder_is_one_line(tmp_path):
    with small_mount(tmp_path / "ro", "ro,size=1m") as ro:
        with pytest.raises(UserError) as err:
            write_json(ro / "results" / "train.json", {})
    message = str(err.value)
    assert "\n" not in message and str(ro / "results") in message
    assert "not writable" in message or "Read-only" in message


def test_disk_full_during_training_is_one_line_and_a_failed_run(store):
    """The checkpoint folder on a 1 MB disk: the first best.pt (1.6 MB) does not fit."""
    cfg = tiny_run("task2", batch_size=32, evals_per_epoch=2)
    with small_mount(store / "small", "size=1m") as small:
        with pytest.raises(UserError) as err:
            train_and_track(cfg, tiny_dataset(300, 60), small / "models", store / "results")
        leftovers = sorted(p.name for p in (small / "models").iterdir())
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"could not write {small / 'models'}/") and "the disk is full" in message, message
    assert leftovers == []  # no half-written checkpoint
    assert not (store / "results").exists() or not any((store / "results").iterdir())
    client = MlflowClient(tracking.tracking_uri())
    runs = training_runs(client, cfg.experiment)
    assert [r.info.status for r in runs] == ["FAILED"]


LOCKER = """
import select, sqlite3, sys, time
db = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=60)
db.execute("BEGIN EXCLUSIVE")
print("locked", flush=True)
select.select([sys.stdin], [], [], float(sys.argv[2]))  # until told to let go (a line), at most argv[2] s
print(time.monotonic(), flush=True)  # the moment the lock goes (a system-wide clock)
db.execute("COMMIT")
"""


def test_busy_store_does_not_stop_training(store, monkeypatch):
    """Another process holds mlflow.db's write lock from just after the run starts until training
    ends (told so then; at most 60 s, so a training held up by the lock ends after the lock goes
    and fails the test): training goes on, the metrics are written once the lock is gone,
    nothing twice."""
    monkeypatch.setattr(tracking, "FINAL_WAIT_S", 90.0)
    cfg = tiny_run("task2", batch_size=16, evals_per_epoch=2, epochs=3)
    lockers = []
    real_log_params = tracking.MlflowRun.log_params

    def log_params_then_lock(self, params):
        real_log_params(self, params)
        locker = subprocess.Popen([sys.executable, "-c", LOCKER, str(store / "mlflow.db"), "60"],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert locker.stdout.readline().strip() == "locked"
        lockers.append((locker, time.monotonic()))

    trained_at = []
    real_train = pipeline.train

    def train_and_note_the_time(*args, **kwargs):
        result = real_train(*args, **kwargs)
        trained_at.append(time.monotonic())
        lockers[0][0].stdin.write("let go\n")
        lockers[0][0].stdin.flush()
        return result

    monkeypatch.setattr(tracking.MlflowRun, "log_params", log_params_then_lock)
    monkeypatch.setattr(pipeline, "train", train_and_note_the_time)
    metrics = train_and_track(cfg, tiny_dataset(300, 60), store / "models", store / "results")
    locker, locked_at = lockers[0]
    assert locker.wait(timeout=60) == 0
    released_at = float(locker.stdout.readline())
    assert trained_at[0] < released_at  # training was not held up by the lock: it ended while the lock held
    assert metrics["mlflow_logging_seconds"] < 1
    client = MlflowClient(tracking.tracking_uri())
    run = client.get_run(metrics["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "curves/train_loss")]
    assert steps == list(range(1, metrics["steps"] + 1))
    assert len({m.step for m in client.get_metric_history(run.info.run_id, "curves/val_loss")}) == metrics["steps"] // 8
    assert json.loads((store / "results" / "run.json").read_text())["mlflow_run_id"] == run.info.run_id


def test_store_down_during_evaluate_leaves_the_outputs_as_they_were(store, monkeypatch):
    monkeypatch.chdir(store)
    write_params(store / "params.yaml", tiny_params())
    ds = tiny_dataset(300, 60)
    ds.save(store / "data" / "cifar10.npz")
    _, trained, results = run_dirs("task2", 0, store / "results")
    train_and_track(tiny_run("task2", batch_size=32), ds, store / "models" / "task2" / "seed0", trained)
    outputs = ("eval.json", "eval_detail.json", "curves.png", "confusion.png")
    results.mkdir()
    for name in outputs:
        (results / name).write_text("previous")
    # Asked again for 3 s, not the 20 s a restarting server gets: the outcome is the same.
    env = {**os.environ, "MLFLOW_TRACKING_URI": "http://127.0.0.1:9", "CIFARCNN_MLFLOW_CONNECT_WAIT_S": "3"}
    proc = subprocess.run([sys.executable, str(ROOT / "stages" / "evaluate.py"), "task2", "0"], cwd=store,
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and "MLflow tracking store http://127.0.0.1:9 is not usable" in proc.stderr
    assert {n: (results / n).read_text() for n in outputs} == dict.fromkeys(outputs, "previous")
    assert not list(results.glob(".staging-*"))


class FlakyClient:
    """A store that refuses the first ``failures`` writes, then takes everything."""

    def __init__(self, failures: int) -> None:
        self.failures, self.calls, self.written = failures, 0, []

    def log_batch(self, run_id, metrics=()):
        self.calls += 1
        if self.calls <= self.failures:
            raise RuntimeError("(sqlite3.OperationalError) database is locked\n[SQL: INSERT ...]")
        self.written.extend(metrics)


def test_refused_writes_are_retried_and_written_once(monkeypatch, capsys):
    monkeypatch.setattr(tracking, "MAX_BACKOFF_S", 0.05)
    client = FlakyClient(failures=3)
    run = tracking.MlflowRun(client, "run-1")
    for start in range(0, 100, 10):
        run.log_train_losses(list(range(start + 1, start + 11)), [0.5] * 10)
    run.log_train_losses([5, 6], [0.5, 0.5])  # already queued: not again
    run.flush()
    assert [m.step for m in client.written] == list(range(1, 101))
    out = capsys.readouterr().out
    assert out.count("MLflow store not answering (RuntimeError: (sqlite3.OperationalError) database is locked); training goes on") == 1
    assert "answers again after 3 failed tries" in out


def test_store_that_never_answers_ends_in_one_line(monkeypatch):
    monkeypatch.setattr(tracking, "MAX_BACKOFF_S", 0.05)
    monkeypatch.setattr(tracking, "FINAL_WAIT_S", 1.0)
    run = tracking.MlflowRun(FlakyClient(failures=10 ** 9), "run-1")
    run.log_train_losses([1, 2], [0.5, 0.4])
    with pytest.raises(UserError, match=r"did not take the run's metrics for 1 s \(RuntimeError: .*database is locked\); "
                                        r"the trained checkpoint is kept, so once the store answers `dvc repro` logs"):
        run.flush()


def test_params_wait_for_a_restarting_store_and_a_refusal_ends_at_once(monkeypatch):
    """The params, the last write before training: a store that is restarting (its database
    away) is asked again until it answers; an answer that refuses them (a value the run already
    holds differently) is one line at once, not FINAL_WAIT_S of asking the same again."""
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

    monkeypatch.setattr(tracking, "MAX_BACKOFF_S", 0.05)
    restarting = FlakyClient(failures=3)
    restarting.log_batch = lambda run_id, params=(), _real=restarting.log_batch: _real(run_id, metrics=params)
    tracking.MlflowRun(restarting, "run-1").log_params({"lr": 0.05, "batch_size": 64})
    assert restarting.calls == 4 and [p.key for p in restarting.written] == ["lr", "batch_size"]

    class Refusing:
        calls = 0

        def log_batch(self, run_id, params=()):
            self.calls += 1
            raise MlflowException("Changing param values is not allowed. Param with key='lr' was already logged "
                                  "with value='0.05'", error_code=INVALID_PARAMETER_VALUE)
    refusing = Refusing()
    started = time.monotonic()
    with pytest.raises(UserError, match=r"MLflow log params: the store .* refused it \(MlflowException: Changing param"):
        tracking.MlflowRun(refusing, "run-1").log_params({"lr": 0.01})
    assert refusing.calls == 1 and time.monotonic() - started < 1
    monkeypatch.setattr(tracking, "FINAL_WAIT_S", 0.5)  # a store that never answers: nothing trained to keep yet
    restarting.failures = 10 ** 9
    with pytest.raises(UserError, match=r"did not answer for 0\.5 s \(RuntimeError: .*locked\); nothing was trained by "
                                        r"this process yet; re-run it once the store answers$"):
        tracking.MlflowRun(restarting, "run-1").log_params({"lr": 0.05})


def test_resumed_run_skips_steps_the_store_holds():
    client = FlakyClient(failures=0)
    run = tracking.MlflowRun(client, "run-1", logged_up_to={"curves/train_loss": 40, "curves/val_loss": 40})
    run.log_train_losses(list(range(1, 61)), [0.1] * 60)
    run.log_validation(40, 1.0, 0.3, 0.9)
    run.log_validation(60, 1.5, 0.2, 0.9)
    run.flush()
    assert [m.step for m in client.written if m.key == "curves/train_loss"] == list(range(41, 61))
    assert [m.step for m in client.written if m.key == "curves/val_loss"] == [60]


def test_store_down_at_the_end_keeps_the_training_and_the_next_run_only_logs(store, monkeypatch, capsys):
    """The store stops taking writes during training and is still down at the end: the stage
    fails with one line, writes no results, keeps the finished state; the next run (store back)
    logs the same MLflow run without training again."""
    monkeypatch.setattr(tracking, "FINAL_WAIT_S", 1.0)
    monkeypatch.setattr(tracking, "MAX_BACKOFF_S", 0.1)
    real_write = tracking.MlflowRun._write

    def refuse(self, metrics):
        raise ConnectionError("server restarting")

    monkeypatch.setattr(tracking.MlflowRun, "_write", refuse)
    cfg = tiny_run("task2", batch_size=32, evals_per_epoch=2)
    ds = tiny_dataset(300, 60)
    with pytest.raises(UserError, match=r"did not take the run's metrics for 1 s \(ConnectionError: server restarting\)"):
        train_and_track(cfg, ds, store / "models", store / "results")
    resume = resume_file(store / "models", training.resume_key(cfg, ds))
    assert resume.exists() and (store / "models" / "best.pt").exists()
    assert not (store / "results").exists() or not list((store / "results").iterdir())
    client = MlflowClient(tracking.tracking_uri())
    (failed,) = training_runs(client, cfg.experiment)
    assert failed.info.status == "FAILED"

    monkeypatch.setattr(tracking.MlflowRun, "_write", real_write)
    (store / "models" / "best.pt").unlink()  # as DVC does before it runs the stage again
    capsys.readouterr()
    reads, real_load = [], training.load_checkpoint

    def counted(path):
        reads.append(Path(path).name)
        return real_load(path)

    monkeypatch.setattr(pipeline, "load_checkpoint", counted)
    monkeypatch.setattr(training, "load_checkpoint", counted)
    metrics = train_and_track(cfg, ds, store / "models", store / "results")
    assert reads.count(resume.name) == 1  # the MLflow run id and the state come from one read
    assert re.search(rf"resuming task2 from step {metrics['steps']} ", capsys.readouterr().out)
    assert metrics["mlflow_run_id"] == failed.info.run_id and metrics["resumed_from_step"] == metrics["steps"]
    run = client.get_run(failed.info.run_id)
    assert run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "curves/train_loss")] == list(range(1, metrics["steps"] + 1))
    assert not resume.exists()
    unbroken = train_and_track(cfg, ds, store / "models2", store / "results2")
    keys = ["best_val_loss", "best_val_acc", "best_step", "steps"]
    assert {k: unbroken[k] for k in keys} == {k: metrics[k] for k in keys}


def test_interrupted_run_is_killed_and_left_alone_by_a_run_with_other_params(store, monkeypatch, capsys):
    """SIGTERM (Interrupted) mid-training: the run reads KILLED and its state is kept. A run with
    another lr neither re-opens that run nor uses the state: it says in one line why it left it.
    Putting the lr back continues the killed run in the same MLflow run."""
    cfg, ds = tiny_run("task2", batch_size=32, evals_per_epoch=2, epochs=2), tiny_dataset(300, 60)
    real_save = training.save_checkpoint

    def save_then_stop(path, payload):
        real_save(path, payload)
        if path.name.startswith("resume-"):
            raise Interrupted(15)  # what errors.cli's SIGTERM handler raises
    monkeypatch.setattr(training, "save_checkpoint", save_then_stop)
    with pytest.raises(Interrupted):
        train_and_track(cfg, ds, store / "models", store / "results")
    monkeypatch.setattr(training, "save_checkpoint", real_save)
    client = MlflowClient(tracking.tracking_uri())
    (killed,) = training_runs(client, cfg.experiment)
    assert killed.info.status == "KILLED"
    [state] = (store / "models").glob(RESUME_GLOB)
    assert f"MLflow run {killed.info.run_id} marked KILLED; `dvc repro` continues it from {state}" in capsys.readouterr().out

    other = cfg.replace(lr=0.002)
    metrics = train_and_track(other, ds, store / "models", store / "results")
    out = capsys.readouterr().out
    assert f"left {state} as it is: it was saved at step 4 with lr {cfg.lr} -> 0.002; it resumes if those come back" in out
    assert metrics["mlflow_run_id"] != killed.info.run_id and metrics["resumed_from_step"] is None
    assert client.get_run(killed.info.run_id).info.status == "KILLED" and state.exists()

    again = train_and_track(cfg, ds, store / "models", store / "results")
    assert again["mlflow_run_id"] == killed.info.run_id and again["resumed_from_step"] == 4
    assert client.get_run(killed.info.run_id).info.status == "FINISHED" and not state.exists()


@pytest.mark.parametrize("as_stage", [False, True], ids=["print-first", "stage-script"])
def test_a_run_whose_output_nobody_reads_is_killed_not_failed(store, as_stage):
    """A cancelled sweep trial: its Ray worker, the only reader of the training's stdout and
    stderr, dies. The training's next print raises BrokenPipeError (print-first: no watcher), or
    errors.watch_parent sees the closed pipes and sends SIGTERM (stage-script: run through
    errors.cli as a stage is) -- whichever comes first, the run was stopped from outside: it reads
    KILLED, not FAILED, and its resume state is kept for `dvc repro`."""
    script = f"""
import sys
sys.path[:0] = {[str(ROOT / "tests"), str(ROOT / "src")]!r}
from pathlib import Path
from helpers import tiny_dataset, tiny_run
from cifarcnn.errors import cli
from cifarcnn.pipeline import train_and_track

def main():
    cfg = tiny_run("task2", batch_size=32, evals_per_epoch=4, epochs=200, early_stop_count=1000)
    train_and_track(cfg, tiny_dataset(300, 60), Path("models"), Path("results"))

(cli(main) if {as_stage!r} else main)()
"""
    env = {**os.environ, "DVC_ROOT": str(store), "PYTHONUNBUFFERED": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=store, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    try:
        line = proc.stdout.readline()  # its first validation: the run is open and training
        assert line.startswith(b"task2 step "), line + proc.stderr.read()
        proc.stdout.close()  # the reader dies: nobody reads its output any more
        proc.stderr.close()
        assert proc.wait(timeout=120) != 0
    finally:
        if proc.poll() is None:
            proc.kill()
    (run,) = training_runs(MlflowClient(tracking.tracking_uri()), tiny_run("task2").experiment)
    assert run.info.status == "KILLED", run.info
    assert list((store / "models").glob(RESUME_GLOB)), "the resume state is kept"


def test_a_state_in_use_is_not_shared(store, capsys):
    """Two copies with the same config and seed (a queued experiment while the workspace trains):
    the second trains without the first's resume state and says so; the first's is untouched."""
    cfg, ds = tiny_run("task2", batch_size=32, evals_per_epoch=2), tiny_dataset(300, 60)
    state = resume_file(store / "models", training.resume_key(cfg, ds))
    state.parent.mkdir(parents=True)
    state.write_bytes(b"the other process's state")
    held = try_lock(state.with_suffix(".lock"))  # another open file description: as another process
    assert held is not None
    try:
        metrics = train_and_track(cfg, ds, store / "models", store / "results")
    finally:
        os.close(held)
    assert f"{state} is in use by another process training the same config and seed" in capsys.readouterr().out
    assert metrics["resumed_from_step"] is None and state.read_bytes() == b"the other process's state"


def test_truncated_metrics_file_is_named(tmp_path):
    """`dvc repro -s report` over a train.json cut short: one line naming the file and the fix."""
    from cifarcnn.report import load_results

    _, folder, scored = run_dirs("task2", 0, tmp_path)
    folder.mkdir(parents=True)
    scored.mkdir()
    (folder / "train.json").write_text('{"best_val_loss": 1.2')
    (scored / "eval.json").write_text("{}")
    with pytest.raises(UserError) as err:
        load_results(tmp_path, ["task2"], [0])
    message = str(err.value)
    assert message.startswith(f"{folder / 'train.json'} is not valid JSON (") and "\n" not in message
    assert f"`dvc checkout --force {folder / 'train.json'}` restores it" in message


# --- bad inputs through `dvc repro`, as a user meets them -----------------------------------

@pytest.fixture(scope="module")
def bare_project(tmp_path_factory):
    """The tiny project (task2 only), nothing run yet: each case edits params.yaml, runs the
    `dvc repro` target that reads it, and puts params.yaml back."""
    from fixtures import tiny_project

    work = tmp_path_factory.mktemp("bare")
    with tiny_project(work, runs=["task2"]) as (repo, env):
        yield work, repo, env


BAD_PARAMS = {  # case: (line of params.yaml to change, its new value, dvc repro target, the one line expected)
    "seeds_empty": (r"seeds", "[]", "configure", "ERROR: failed to parse 'stages.visualize.cmd' in 'dvc.yaml': "
                    "Could not find 'train.seeds.0'"),
    "seed_too_large": (r"seeds", "[0, 4294967296]", "configure",
                       "error: train.seeds[1]: must be < 4294967296, got 4294967296"),
    "name_with_space": (r"  task2", None, "configure", "error: runs.task 2: a run's name must be lowercase letters, "
                        "digits and _ (it names DVC stages, folders and MLflow runs); rename it"),
    "name_with_slash": (r"  task2", None, "configure", "error: runs.a/b: a run's name must be lowercase letters, "
                        "digits and _ (it names DVC stages, folders and MLflow runs); rename it"),
    "nine_classes": ("source", "FOLDER", "download", "error: FOLDER/train: expected the ten CIFAR-10 class folders "
                     "(airplane, automobile, bird, cat, deer, dog, frog, horse, ship, truck); missing: truck"),
    "eleven_classes": ("source", "FOLDER", "download", "error: FOLDER/test: expected the ten CIFAR-10 class "
                       "folders (airplane, automobile, bird, cat, deer, dog, frog, horse, ship, truck); not a "
                       "CIFAR-10 class: zebra"),
    "unknown_extension": ("source", "FOLDER", "download", "error: FOLDER/train/cat/x.webp: not a .bmp/.jpeg/.jpg/.png "
                          "image (and 1 more); convert or remove it (a file skipped silently would change the data "
                          "without a word)"),
}


@pytest.mark.parametrize("case", [*BAD_PARAMS, "sixteen_bit"])
def test_bad_inputs_under_dvc_repro_end_in_one_line(bare_project, case):
    """Issue 18's bad inputs as `dvc repro` meets them: the stage that reads the input fails in
    one line (DVC's own for an empty seed list, which it meets parsing dvc.yaml), no traceback,
    nothing written, dvc.lock as it was. A 16-bit PNG folder is read as its colours."""
    import re

    from helpers import sh

    work, repo, env = bare_project
    params = repo / "params.yaml"
    original = params.read_text()

    def locked(stage: str):
        import yaml

        lock = repo / "dvc.lock"
        return (yaml.safe_load(lock.read_text()) or {}).get("stages", {}).get(stage) if lock.exists() else None

    text = original
    folder = broken_image_folder(work / case, case) if case in BROKEN_FOLDERS else None
    if folder is not None:  # a local image folder: no md5, every image
        for key, value in (("source", str(folder)), ("md5", "null"), ("subset", "null")):
            text, n = re.subn(rf"(?m)^(\s*{key}:) \S+", rf"\g<1> {value}", text, count=1)
            assert n == 1, key
    if case in BAD_PARAMS:
        key, value, target, expected = BAD_PARAMS[case]
        if key == "seeds":
            text, n = re.subn(r"(?m)^(\s*seeds:) \S.*$", rf"\g<1> {value}", text, count=1)
            assert n == 1
        elif key == "  task2":
            text = text.replace("\n  task2:", "\n  task 2:" if case == "name_with_space" else "\n  a/b:", 1)
    try:
        params.write_text(text)
        if case == "sixteen_bit":
            sh(["dvc", "repro", "download"], repo, env)
            x = np.load(repo / "data" / "cifar10.npz")["train_x"]
            assert x.shape[0] == 40 and (x == 122).all(), np.unique(x)[:5]  # not 255, almost white
            return
        before = locked(target)
        out = sh(["dvc", "repro", target], repo, env, ok=False)
        expected = expected.replace("FOLDER", str(folder))
        ours = [line for line in out.splitlines() if line.startswith(("error:", "ERROR:"))]
        assert ours[0] == expected, out
        assert len(ours) == 1 or ours[1].startswith(f"ERROR: failed to reproduce '{target}'"), out
        assert "Traceback" not in out
        assert locked(target) == before
        assert not (repo / "data" / "cifar10.npz").exists() and not (repo / "configs").exists()
    finally:
        params.write_text(original)
