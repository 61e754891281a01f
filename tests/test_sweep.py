"""The sweep's grid: -S values crossed with seeds, experiment names that git and DVC accept,
and one clear line for each bad setting. (The sweep itself runs in tests/test_smoke.py.)"""
from __future__ import annotations

import subprocess

import pytest

from cifarcnn.errors import UserError
from cifarcnn.sweep import _table, parse_grid, parse_seeds, points, sweep


def test_grid_is_the_cross_product_of_values_and_seeds():
    grid = parse_grid(["lr=0.0004,0.0006", "train.batch_size=32,64"])
    assert grid == {"lr": ["0.0004", "0.0006"], "train.batch_size": ["32", "64"]}
    todo = points(grid, [0, 1])
    assert len(todo) == 8
    assert todo[0] == {"name": "lr0.0004-batch_size32-seed0", "params": {"lr": "0.0004", "train.batch_size": "32"},
                       "seed": 0}
    assert {p["name"] for p in todo} == {f"lr{lr}-batch_size{b}-seed{s}" for lr in ("0.0004", "0.0006")
                                         for b in (32, 64) for s in (0, 1)}


def test_names_are_valid_git_refs():
    todo = points(parse_grid(["runs.task2.augment=[flip]"]), [3])
    [point] = todo
    assert point["name"] == "augment_flip_-seed3"
    assert subprocess.run(["git", "check-ref-format", f"refs/exps/{point['name']}"]).returncode == 0


@pytest.mark.parametrize("settings, message", [
    (["lr"], r"-S 'lr': expected KEY=V1,V2,\.\.\."),
    (["lr="], r"-S 'lr=': expected KEY=V1,V2"),
    (["lr=0.1,,0.2"], r"each value once, none empty"),
    (["lr=0.1,0.1"], r"each value once"),
    (["lr=0.1", "lr=0.2"], r"-S lr given twice"),
    ([], r"nothing to sweep"),
])
def test_bad_settings_are_one_line(settings, message):
    with pytest.raises(UserError, match=message):
        parse_grid(settings)


@pytest.mark.parametrize("text, message", [("0,x", "expected integers"), ("1,1", "each seed once"),
                                           ("4294967296", r"in \[0, 2\*\*32\)")])
def test_bad_seeds_are_one_line(text, message):
    with pytest.raises(UserError, match=message):
        parse_seeds(text)


def test_names_that_collide_are_refused():
    with pytest.raises(UserError, match="share an experiment name"):
        points(parse_grid(["x=a/b,a_b"]), [0])


def test_table_picks_the_best_point_by_mean_validation_accuracy():
    grid = {"lr": ["0.1", "0.2"]}
    results = [
        {"name": "a0", "params": {"lr": "0.1"}, "seed": 0, "eval": {"val_acc": 0.50, "test_acc": 0.90}},
        {"name": "a1", "params": {"lr": "0.1"}, "seed": 1, "eval": {"val_acc": 0.60, "test_acc": 0.90}},
        {"name": "b0", "params": {"lr": "0.2"}, "seed": 0, "eval": {"val_acc": 0.58, "test_acc": 0.10}},
        {"name": "b1", "params": {"lr": "0.2"}, "seed": 1, "error": "boom"},
    ]
    table, best = _table(results, grid)
    assert best == {"params": {"lr": "0.2"}, "val_acc": 0.58, "test_acc": 0.10, "n": 1}  # not by test accuracy
    assert "0: 0.5000/0.9000, 1: 0.6000/0.9000" in table and "1: failed" in table


def test_a_cluster_sweep_needs_a_tracking_server(monkeypatch, tmp_path):
    """Trials on other nodes cannot reach this checkout's sqlite store: refused before anything
    starts (no Ray, no MLflow run)."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    with pytest.raises(UserError, match=rf"--address: trials on other nodes log to MLFLOW_TRACKING_URI, and this "
                                        rf"checkout logs to sqlite:///{tmp_path}/mlflow\.db, which they cannot reach"):
        sweep({"lr": ["0.1"]}, [0], "task3e", "127.0.0.1:6379")
    assert not (tmp_path / "mlflow.db").exists()


def test_cancelled_sweep_leaves_no_seed_or_parent_running(tmp_path):
    """After a cancel: a seed still RUNNING is marked KILLED and its parent ended; a parent whose
    seed had marked itself KILLED before its stage was killed (so before it ended the parent) is
    ended too; a parent of another experiment's seed, still training, is left alone."""
    from mlflow.tracking import MlflowClient

    from cifarcnn.sweep import _kill_left_runs
    from cifarcnn.tracking import PARENT_TAG

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp_id = client.create_experiment("sweep-test", artifact_location=(tmp_path / "artifacts").as_uri())

    def seed(name: str, status: str) -> tuple[str, str]:
        parent = client.create_run(exp_id, tags={"seeds_parent": "true"}).info.run_id  # RUNNING, as open_parent leaves it
        run = client.create_run(exp_id, tags={"dvc_exp_name": name, PARENT_TAG: parent}).info.run_id
        if status != "RUNNING":
            client.set_terminated(run, status)
        return parent, run

    lost_parent, lost = seed("lr0.1-seed0", "RUNNING")  # its stage died with it
    half_parent, half = seed("lr0.2-seed0", "KILLED")  # its stage ended its own run, then was killed
    other_parent, other = seed("someone-else", "RUNNING")
    assert _kill_left_runs(client, exp_id, ["lr0.1-seed0", "lr0.2-seed0"], 0, "test") == 1
    status = {run: client.get_run(run).info.status for run in (lost, lost_parent, half, half_parent, other, other_parent)}
    assert status == {lost: "KILLED", lost_parent: "FINISHED", half: "KILLED", half_parent: "FINISHED",
                      other: "RUNNING", other_parent: "RUNNING"}, status
    assert client.get_run(lost).data.tags["killed_by"] == "test"
