"""MLflow: what one training run leaves in the store, and failing fast on a dead server."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from helpers import eval_dir, merged, tiny_dataset, tiny_run
import mlflow
from mlflow.tracking import MlflowClient

from cifarcnn import tracking
from cifarcnn.config import config_digest
from cifarcnn.errors import UserError
from cifarcnn.pipeline import train_and_track
from cifarcnn.runfiles import run_dirs
from cifarcnn.training import data_fingerprint


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    monkeypatch.setenv("DVC_STAGE", "train@task2")
    monkeypatch.setenv("DVC_EXP_NAME", "test-exp")
    return tmp_path


def test_training_run_contents(store, monkeypatch):
    # An interval far longer than the run (the tiny run trains for about a second): MLflow's own
    # monitor would log nothing, tracking.SystemMonitor logs the window it was in when training ended.
    monkeypatch.setattr(tracking, "SYSTEM_METRICS_S", 600)
    cfg = tiny_run("task2", batch_size=32, evals_per_epoch=2)
    metrics = train_and_track(cfg, tiny_dataset(300, 60), store / "models" / "task2", store / "results" / "task2")
    assert tracking.tracking_uri() == f"sqlite:///{store / 'mlflow.db'}"
    client = MlflowClient(tracking.tracking_uri())
    exp = client.get_experiment_by_name(cfg.experiment)
    assert exp.artifact_location == (store / "mlartifacts").as_uri()
    run = client.get_run(metrics["mlflow_run_id"])
    assert run.info.run_name == "task2-0 (test-exp)" and run.info.status == "FINISHED"  # stage train@task2-0, DVC experiment
    tags = run.data.tags
    # Nested under the run's parent, which holds every seed of this config (found again, not duplicated).
    parent = client.get_run(tags["mlflow.parentRunId"])
    assert parent.info.run_name == "task2 (test-exp)" and parent.data.tags["seeds_parent"] == "true"
    assert tracking.parent_run(cfg.experiment, "task2", parent.data.tags["config_digest"]) == parent.info.run_id
    assert tags["seed"] == "0" and parent.data.tags["config_digest"] == config_digest(cfg.seedless_dict())
    # MLflow's own source tags and description: the UI's Source column and Overview note.
    assert tags["mlflow.source.name"] == "stages/train.py" and tags["mlflow.source.type"] == "LOCAL"
    assert tags["mlflow.source.git.commit"] == tags["git_commit"]
    assert tags["mlflow.note.content"] == "Task 2: the 3-conv-layer CNN (Tables 2-4, Figure 2), seed 0"
    assert parent.data.tags["mlflow.note.content"].startswith("Task 2: the 3-conv-layer CNN (Tables 2-4, Figure 2). All seeds")
    # The data as the run's input: source, digest and the split sizes.
    (data_input,) = run.inputs.dataset_inputs
    assert data_input.dataset.name == "cifar10" and data_input.dataset.digest == data_fingerprint(tiny_dataset(300, 60))
    input_tags = {t.key: t.value for t in data_input.tags}
    assert input_tags["mlflow.data.context"] == "training"
    assert (input_tags["train_images"], input_tags["val_images"], input_tags["test_images"]) == ("270", "30", "60")
    seed1 = train_and_track(cfg.replace(seed=1), tiny_dataset(300, 60), store / "models" / "s1",
                            store / "results" / "s1")
    assert client.get_run(seed1["mlflow_run_id"]).data.tags["mlflow.parentRunId"] == parent.info.run_id
    # The parent compares in the UI like its seeds (their params but the seed) and spans them in time.
    parent = client.get_run(parent.info.run_id)
    assert parent.data.params["lr"] == "0.05" and parent.data.params["batch_size"] == "32"
    assert "train.seed" not in parent.data.params and parent.data.tags["mlflow.source.name"] == "stages/train.py"
    assert parent.info.status == "FINISHED"
    assert parent.info.end_time >= client.get_run(seed1["mlflow_run_id"]).info.end_time > parent.info.start_time
    assert tags["dvc_stage"] == "train@task2" and tags["dvc_exp_name"] == "test-exp"
    assert tags["device"] == "cpu" and tags["torch_version"] and "git_commit" in tags
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= set(run.data.metrics)
    params = run.data.params
    assert params["lr"] == "0.05" and params["optimizer"] == "sgd" and params["batch_size"] == "32"
    assert params["train.seed"] == "0" and params["input.size"] == "32" and params["mlflow.experiment"] == cfg.experiment
    train_loss = client.get_metric_history(run.info.run_id, "curves/train_loss")
    assert [m.step for m in train_loss] == list(range(1, metrics["steps"] + 1))
    val = client.get_metric_history(run.info.run_id, "curves/val_loss")
    assert [m.step for m in val] == [4, 8]
    assert "test_acc" not in metrics and not [k for k in run.data.metrics if k.startswith(("final_", "scores/"))]
    assert not [k for k in run.data.metrics if "best_val" in k]  # the evaluate stage scores the checkpoint, once
    # The model is logged by the evaluate stage, which scored it: training depends on no serving code.
    assert client.list_artifacts(run.info.run_id) == [] and tags.get(tracking.MODEL_TAG) is None
    # Results written for DVC, pointing back at the run.
    written = merged(store / "results" / "task2", "train.json", "run.json")
    assert written["mlflow_run_id"] == run.info.run_id
    config = json.loads((store / "results" / "task2" / "config.json").read_text())
    assert config == json.loads(json.dumps(cfg.to_dict()))  # the resolved config, as in the checkpoint
    assert config["name"] == "task2" and float(run.data.params["lr"]) == config["lr"]
    assert (store / "results" / "task2" / "curves.csv").read_text().splitlines()[0] == "step,epoch,train_loss,val_loss,val_acc"
    assert metrics["mlflow_logging_share"] < 0.5  # tiny runs; the real share is measured in bench/


def test_parent_reads_running_while_a_seed_trains(store, monkeypatch):
    """The UI's parent row: RUNNING while any of its seeds trains, FINISHED once the last one
    ended (finished or failed), its end then -- never left RUNNING, never FINISHED mid-training."""
    from cifarcnn import training

    cfg, ds = tiny_run("task2", batch_size=32, evals_per_epoch=2), tiny_dataset(300, 60)
    client = MlflowClient(tracking.tracking_uri())
    seen: list[str] = []
    real_save = training.save_checkpoint

    def parents() -> list:
        exp = client.get_experiment_by_name(cfg.experiment)
        return client.search_runs([exp.experiment_id], "tags.seeds_parent = 'true'")

    def save_and_look(path, payload):  # mid-training, as another process reads the store
        seen.append(parents()[0].info.status)
        real_save(path, payload)
    monkeypatch.setattr(training, "save_checkpoint", save_and_look)
    first = train_and_track(cfg, ds, store / "m0", store / "r0")
    [parent] = parents()
    assert set(seen) == {"RUNNING"} and parent.info.status == "FINISHED", seen
    assert parent.info.end_time >= client.get_run(first["mlflow_run_id"]).info.end_time

    # Two seeds at once (dvc queue -j 2): the one that ends first leaves the parent RUNNING.
    other = client.create_run(parent.info.experiment_id, tags={tracking.PARENT_TAG: parent.info.run_id})
    train_and_track(cfg.replace(seed=1), ds, store / "m1", store / "r1")
    assert client.get_run(parent.info.run_id).info.status == "RUNNING"
    client.set_terminated(other.info.run_id)
    tracking.close_parent(cfg.experiment, parent.info.run_id)
    assert client.get_run(parent.info.run_id).info.status == "FINISHED"

    # A seed that fails ends its parent too.
    def save_and_fail(path, payload):
        assert parents()[0].info.status == "RUNNING"
        raise RuntimeError("disk gone")
    monkeypatch.setattr(training, "save_checkpoint", save_and_fail)
    with pytest.raises(RuntimeError):
        train_and_track(cfg.replace(seed=2), ds, store / "m2", store / "r2")
    assert client.get_run(parent.info.run_id).info.status == "FINISHED"
    children = client.search_runs([parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert sorted(r.info.status for r in children) == ["FAILED", "FINISHED", "FINISHED", "FINISHED"]


def test_evaluate_stage_logs_into_the_training_run(store, monkeypatch):
    """The evaluate stage script, as DVC runs it (through cifarcnn.warm, a fork of the warm server
    once one is up): figures and eval metrics join the training run."""
    import os
    import subprocess
    import sys

    from helpers import ROOT, tiny_params, write_params

    monkeypatch.chdir(store)
    EVALUATE = [sys.executable, "-m", "cifarcnn.warm", str(ROOT / "stages" / "evaluate.py"), "task2", "0"]
    write_params(store / "params.yaml", tiny_params())
    ds = tiny_dataset(300, 60)
    ds.save(store / "data" / "cifar10.npz")
    cfg = tiny_run("task2", batch_size=32, evals_per_epoch=2)
    trained = train_and_track(cfg, ds, store / "models" / "task2" / "seed0", run_dirs("task2", 0, store / "results").trained)
    proc = subprocess.run(EVALUATE, cwd=store,
                          capture_output=True, text=True, env={**os.environ})
    assert proc.returncode == 0, proc.stderr
    warned = [line for line in (proc.stdout + proc.stderr).splitlines() if "WARNING" in line or "Warning" in line]
    assert warned == [], warned  # nothing a user cannot act on (MLflow's CloudPickle warning: the model is code)
    evaluation = merged(eval_dir(store, "task2"), "eval.json", "eval_detail.json")
    assert evaluation["mlflow_run_id"] == trained["mlflow_run_id"]
    assert evaluation["val_loss"] == pytest.approx(trained["best_val_loss"], rel=1e-5)
    client = MlflowClient(tracking.tracking_uri())
    run = client.get_run(trained["mlflow_run_id"])
    assert run.data.metrics["scores/test_acc"] == pytest.approx(evaluation["test_acc"])
    assert run.data.metrics["scores/val_loss"] == pytest.approx(evaluation["val_loss"])
    assert {a.path for a in client.list_artifacts(run.info.run_id)} == {"curves.png", "confusion.png"}
    # One copy of the checkpoint in MLflow: inside the logged model, a pyfunc (raw uint8 images of
    # any size in, class names and probabilities out), tagged with the checkpoint's digest.
    import mlflow
    import numpy as np
    assert run.data.tags[tracking.MODEL_TAG] == trained["checkpoint_sha256"]
    models = mlflow.search_logged_models(experiment_ids=[run.info.experiment_id], output_format="list")
    assert [m.source_run_id for m in models] == [run.info.run_id]
    model = mlflow.pyfunc.load_model(models[0].model_uri)
    out = model.predict(ds.test_x[:5])
    assert list(out.columns) == ["class", *ds.classes] and len(out) == 5
    assert np.allclose(out[ds.classes].sum(axis=1), 1.0) and set(out["class"]) <= set(ds.classes)
    assert model.metadata.get_input_schema() is None  # checked by the model itself: MLflow would cast floats
    from mlflow.exceptions import MlflowException
    with pytest.raises(MlflowException, match=r"expected integer pixel values 0\.\.255 \(uint8\).*got float64 values"):
        model.predict(np.full((1, 32, 32, 3), 0.5))
    assert len(model.predict(np.zeros((2, 48, 40, 3), np.uint8))) == 2  # another size: resized inside
    # The same checkpoint evaluated again (a figure changed): no second model.
    proc = subprocess.run(EVALUATE, cwd=store,
                          capture_output=True, text=True, env={**os.environ})
    assert proc.returncode == 0, proc.stderr
    assert len(mlflow.search_logged_models(experiment_ids=[run.info.experiment_id], output_format="list")) == 1
    # A checkpoint that is not the one training wrote is never scored: one line, nothing written.
    best = store / "models" / "task2" / "seed0" / "best.pt"
    original = best.read_bytes()
    data = bytearray(original)
    data[-100] ^= 0xFF  # one byte flipped
    best.write_bytes(bytes(data))
    before = (eval_dir(store, "task2") / "eval.json").read_bytes()
    proc = subprocess.run(EVALUATE, cwd=store,
                          capture_output=True, text=True, env={**os.environ})
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        f"error: {Path('models/task2/seed0/best.pt')} is not the checkpoint `train@task2-0` wrote (its sha256 differs "
        "from run.json's); rebuild it with `dvc repro --force train@task2-0`"]
    assert (eval_dir(store, "task2") / "eval.json").read_bytes() == before
    best.write_bytes(original)
    for name in ("curves.png", "confusion.png"):
        assert (eval_dir(store, "task2") / name).read_bytes().startswith(b"\x89PNG")
    # A store that lost the run (another, empty one): the evaluation goes to a new run, with a
    # message, not a failure. (Not by deleting mlflow.db: this process still has it open.)
    proc = subprocess.run(EVALUATE, cwd=store,
                          capture_output=True, text=True,
                          env={**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{store / 'fresh.db'}"})
    assert proc.returncode == 0, proc.stderr
    assert f"MLflow run {trained['mlflow_run_id']} of task2-0 is not in" in proc.stdout
    assert json.loads((eval_dir(store, "task2") / "eval_detail.json").read_text())["mlflow_run_id"] != trained["mlflow_run_id"]
    # The store itself gone (mlflow.db deleted) while results name its runs: one line, no new store.
    db = store / "mlflow.db"
    kept = db.read_bytes()
    db.unlink()
    plain = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}  # mlflow set it in this process
    proc = subprocess.run(EVALUATE, cwd=store,
                          capture_output=True, text=True, env=plain)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        f"error: {db} is missing, but 1 results name MLflow runs in it (e.g. results/task2/seed0/train/run.json); put it "
        "back from a backup, or set CIFARCNN_NEW_STORE=1 to start a new store (those runs will not be in it; "
        "`dvc repro --force` logs them again)"]
    assert not db.exists()
    # A damaged store: one line at once (no waiting as for a restarting server), naming it and what to do.
    db.write_bytes(b"not a database " * 1000)
    started = time.monotonic()
    wait_s = 900  # what a restarting server would get: far more than a loaded machine's start-up
    proc = subprocess.run(EVALUATE, cwd=store,
                          capture_output=True, text=True, env={**plain, "CIFARCNN_MLFLOW_CONNECT_WAIT_S": str(wait_s)})
    [line] = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and line.startswith(f"error: MLflow store {db} is not a usable database (")
    assert line.endswith(f"move it aside (mv {db} {db}.broken), then put back a backup, or set CIFARCNN_NEW_STORE=1 "
                         "to start a new store")
    assert time.monotonic() - started < wait_s / 3  # not asked again and again
    db.write_bytes(kept)


def test_temp_experiment_workspace_logs_into_the_real_repo(monkeypatch, tmp_path):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("DVC_ROOT", str(tmp_path / ".dvc" / "tmp" / "exps" / "tmpabc123"))
    assert tracking.repo_root() == tmp_path
    assert tracking.tracking_uri() == f"sqlite:///{tmp_path / 'mlflow.db'}"


def test_a_new_store_is_a_copy_of_an_empty_one_with_mlflows_own_schema(tmp_path, monkeypatch):
    """A missing local store starts as a copy of an empty store that MLflow's migrations made once
    (per MLflow version, in the cache folder), instead of running them (about a second) for every
    store: the same tables, indexes and schema version as a store MLflow makes itself, and MLflow's
    Default experiment beside this project's, each with this store's artifact location. Where no
    template can be made (the cache folder is a file), MLflow makes the store as before."""
    import sqlite3

    import mlflow.store.db.utils as db_utils

    def schema(db: Path) -> tuple:
        """Tables, columns, constraints, indexes and the schema version; the clauses of a CREATE
        sorted (MLflow's own migrations write a table's CHECKs in a different order from run to run)."""
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
            return (sorted((kind, name, table, sorted(sql.replace(", \n", "\n").splitlines()) if sql else None)
                           for kind, name, table, sql in conn.execute("select type, name, tbl_name, sql from sqlite_master")),
                    conn.execute("select version_num from alembic_version").fetchall())

    def connect(root: Path):
        monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # which mlflow.set_tracking_uri sets
        monkeypatch.setenv("DVC_ROOT", str(root))
        return tracking.connect("exp")

    monkeypatch.setenv(tracking.CACHE_ENV, str(tmp_path / "cache"))
    own = tmp_path / "own" / "mlflow.db"
    own.parent.mkdir()
    MlflowClient(f"sqlite:///{own}").search_experiments()  # MLflow's own new store
    roots = {name: tmp_path / name for name in ("first", "second", "no-cache")}
    for root in roots.values():
        root.mkdir()
    connect(roots["first"])  # makes the template
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [f"mlflow-{mlflow.__version__}-empty-store.db"]

    with monkeypatch.context() as m:
        m.setattr(db_utils, "_initialize_tables", lambda engine: pytest.fail("the migrations ran again"))
        client, _ = connect(roots["second"])
    assert schema(roots["second"] / "mlflow.db") == schema(own)
    assert sorted(os.listdir(roots["second"])) == ["mlflow.db"]  # no copy left behind
    experiments = {e.name: e for e in client.search_experiments()}
    assert sorted(experiments) == ["Default", "exp"]
    assert experiments["exp"].artifact_location == (roots["second"] / "mlartifacts").as_uri()
    assert experiments["Default"].artifact_location == MlflowClient(f"sqlite:///{own}").get_experiment("0").artifact_location

    (tmp_path / "cache-file").write_text("")
    monkeypatch.setenv(tracking.CACHE_ENV, str(tmp_path / "cache-file"))
    client, _ = connect(roots["no-cache"])
    assert schema(roots["no-cache"] / "mlflow.db") == schema(own)
    assert sorted(e.name for e in client.search_experiments()) == ["Default", "exp"]


def test_unreachable_server_fails_fast_with_one_line(monkeypatch):
    """A server that does not answer is asked again for CONNECT_WAIT_S (it may be restarting: the
    team tests restart one under a running pipeline), then one line says what to do. Three
    seconds here instead of the default 20: the line is the same, and the wait still ends."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")  # nothing listens on port 9
    monkeypatch.setattr(tracking, "CONNECT_WAIT_S", 3.0)
    started = time.time()
    with pytest.raises(UserError, match=r"MLflow tracking store http://127\.0\.0\.1:9 is not usable .*unset MLFLOW_TRACKING_URI"):
        tracking.connect("x")
    assert time.time() - started < 60


def test_two_parents_created_at_once_converge_on_the_first(store, monkeypatch):
    """Two seeds of a run starting together (`dvc queue start -j 2`) may both find no parent and
    create one: each then keeps the earliest and the later one is deleted."""
    client, exp_id = tracking.connect("race")
    early = client.create_run(exp_id, run_name="task2", tags={tracking.PARENT_MARK: "true", "run": "task2",
                                                              "config_digest": "d1", tracking.ENTRY_TAG: "none"})
    time.sleep(0.01)
    real_find = tracking._find_parent
    calls = []

    def miss_once(*args):  # the first lookup misses, as if the other process had not committed yet
        calls.append(1)
        return None if len(calls) == 1 else real_find(*args)

    monkeypatch.setattr(tracking, "_find_parent", miss_once)
    chosen = tracking.parent_run("race", "task2", "d1")
    assert chosen == early.info.run_id
    parents = [r for r in client.search_runs([exp_id]) if r.data.tags.get(tracking.PARENT_MARK) == "true"]
    assert [r.info.run_id for r in parents] == [early.info.run_id]  # ours was deleted


def test_parents_nest_under_the_mlflow_run_entry_point(store, monkeypatch, capsys):
    """Under `mlflow run` (MLFLOW_RUN_ID set for the command) a run's parent is that entry
    point's own, nested under it; an entry run in another experiment cannot hold it: one line says why."""
    client, exp_id = tracking.connect("nest")
    outside = tracking.parent_run("nest", "task2", "d1")
    entry = client.create_run(exp_id, run_name="tune").info.run_id
    monkeypatch.setenv("MLFLOW_RUN_ID", entry)
    inside = tracking.parent_run("nest", "task2", "d1")
    assert inside != outside and client.get_run(inside).data.tags["mlflow.parentRunId"] == entry
    assert tracking.parent_run("nest", "task2", "d1") == inside  # found again, not duplicated
    other = client.create_run(client.create_experiment("elsewhere")).info.run_id
    monkeypatch.setenv("MLFLOW_RUN_ID", other)
    assert tracking.parent_run("nest", "task2", "d1") == outside
    assert "pass --experiment-name" in capsys.readouterr().out
    # The report stage's aggregates go to the parents the seeds were trained under.
    monkeypatch.delenv("MLFLOW_RUN_ID")
    assert tracking.log_aggregates("nest", "task2", "d1", "", {"n_seeds": 2}, [inside, "gone"]) == [inside]
    assert client.get_run(inside).data.metrics == {"seeds/n_seeds": 2}


def test_moved_checkout_is_refused_until_rebound(tmp_path, monkeypatch):
    """A checkout moved with its mlflow.db: training refuses in one line before writing anything
    (MLflow would recreate the old path and write there); `python -m cifarcnn.rebind` points the
    store here, old runs list their artifacts again and new ones land in this checkout."""
    import os
    import shutil
    import subprocess
    import sys

    old, new = tmp_path / "old", tmp_path / "new"
    old.mkdir()
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("DVC_ROOT", str(old))
    cfg, ds = tiny_run("task2", batch_size=32, evals_per_epoch=2), tiny_dataset(300, 60)
    first = train_and_track(cfg, ds, old / "models", old / "results")
    MlflowClient(f"sqlite:///{old / 'mlflow.db'}").log_text(first["mlflow_run_id"], "kept", "note.txt")
    shutil.move(old, new)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # mlflow.set_tracking_uri exported the old one
    monkeypatch.setenv("DVC_ROOT", str(new))
    with pytest.raises(UserError) as err:
        train_and_track(cfg, ds, new / "models2", new / "results2")
    assert str(err.value) == (
        f"experiment '{cfg.experiment}' in {new / 'mlflow.db'} keeps its artifacts in {(old / 'mlartifacts').as_uri()}, "
        f"not in this checkout's {(new / 'mlartifacts').as_uri()}: the checkout was moved (or mlflow.db copied). Run "
        f"`python -m cifarcnn.rebind` here to point the store at {(new / 'mlartifacts').as_uri()}, or move the checkout back")
    assert not old.exists()  # nothing written into the old path
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    proc = subprocess.run([sys.executable, "-m", "cifarcnn.rebind"], cwd=new, env=env, capture_output=True, text=True)
    assert proc.returncode == 0 and f"-> {(new / 'mlartifacts').as_uri()}" in proc.stdout, proc.stdout + proc.stderr
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    second = train_and_track(cfg, ds, new / "models2", new / "results2")
    client = MlflowClient(f"sqlite:///{new / 'mlflow.db'}")
    assert [a.path for a in client.list_artifacts(first["mlflow_run_id"])] == ["note.txt"]
    assert client.get_run(second["mlflow_run_id"]).info.artifact_uri.startswith((new / "mlartifacts").as_uri())
    assert not old.exists()
    again = subprocess.run([sys.executable, "-m", "cifarcnn.rebind"], cwd=new, env=env, capture_output=True, text=True)
    assert "nothing to do" in again.stdout


def test_champion_moves_only_to_a_better_version(tmp_path):
    """`champion` is the version with the best validation accuracy; a tie keeps the earlier one."""
    client = MlflowClient(f"sqlite:///{tmp_path / 'registry.db'}")
    client.create_registered_model("m")

    def add(val_acc: float) -> str:
        version = client.create_model_version("m", source=(tmp_path / "model").as_uri()).version
        tracking.describe_version(client, "m", version, f"val {val_acc}", {"val_acc": f"{val_acc:.6f}", "seed": "0"})
        return str(client.get_model_version_by_alias("m", tracking.CHAMPION).version)

    assert [add(0.5), add(0.7), add(0.6), add(0.7), add(0.8)] == ["1", "2", "2", "2", "5"]
    v3 = client.get_model_version("m", "3")
    assert v3.description == "val 0.6" and v3.tags == {"val_acc": "0.600000", "seed": "0"}
