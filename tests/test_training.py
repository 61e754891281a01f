"""The one training loop: every run config, early stopping, best checkpoint, resume, errors."""
from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from helpers import tiny_dataset, tiny_params, tiny_run

from cifarcnn import step as step_module
from cifarcnn import training
from cifarcnn.config import resolve_all
from cifarcnn.errors import UserError
from cifarcnn.step import GraphedStep
from cifarcnn.checkpoint import load_best_model
from cifarcnn.device import resolve_device
from cifarcnn.runfiles import BEST, RESUME_GLOB, resume_file
from cifarcnn.training import NonFiniteLoss, should_stop, train

RUNS = list(resolve_all(tiny_params()))


def test_params_yaml_holds_the_report_runs():
    runs = resolve_all(tiny_params(max_epochs=None))
    assert list(runs) == ["task2", "task3a_model1", "task3a_model2", "task3d_dropout", "task3d_no_dropout",
                          "task3e", "task4a"]
    table = {n: (c.model, c.optimizer, c.lr, c.batch_size, c.epochs, c.early_stop_count) for n, c in runs.items()}
    assert table["task2"] == ("task2", "sgd", 0.05, 64, 10, 4)
    assert table["task3a_model1"] == ("task2", "adam", 0.00049, 64, 10, 4)
    assert table["task3a_model2"] == ("task3_model2", "sgd", 0.15, 64, 10, 4)
    assert table["task3d_dropout"] == ("task3_model2", "sgd", 0.15, 64, 10, None)
    assert table["task3d_no_dropout"][4:] == (10, None) and runs["task3d_no_dropout"].model_params == {"dropout": False}
    assert table["task3e"] == ("task3e", "adam", 0.0006, 32, 10, 4)  # lr from the top-level `lr`
    assert table["task4a"] == ("resnet18_transfer", "adam", 0.0005, 32, 5, 4)
    assert runs["task3e"].augment is not None and all(c.augment is None for n, c in runs.items() if n != "task3e")
    assert runs["task4a"].input.size == 224 and runs["task2"].input.std == (0.25, 0.25, 0.25)


@pytest.mark.parametrize("name", RUNS)
def test_one_step_of_every_run(name, tmp_path):
    """The real config of each run, on a batch and a few images: one optimisation step, then the final numbers."""
    cfg = tiny_run(name, evals_per_epoch=1)
    ds = tiny_dataset(n_train=int((cfg.batch_size + 6) / 0.9) + 1, n_test=20)
    result = train(cfg, ds, tmp_path)
    assert result.metrics["steps"] == 1
    for split in ("train", "val", "test"):
        assert 0.0 <= result.metrics[f"{split}_acc"] <= 1.0 and math.isfinite(result.metrics[f"{split}_loss"])
    ckpt = torch.load(tmp_path / BEST, weights_only=True)
    assert ckpt["config"]["name"] == name and ckpt["step"] == 1
    assert not list(tmp_path.glob(RESUME_GLOB))


@pytest.mark.parametrize("losses, stop_at", [
    ([1.0, 0.9, 0.95, 0.97, 0.96], 5),  # oldest of the last 4 (0.9) is their minimum
    ([1.0, 0.9, 0.8, 0.7, 0.6, 0.5], None),
    ([1.0, 1.1, 1.2, 1.3], 4),
    ([1.0, 0.9, 0.95, 0.85, 0.97, 0.96, 0.99], 7),
])
def test_early_stopping_rule(losses, stop_at):
    stops = [i + 1 for i in range(len(losses)) if should_stop(losses[: i + 1], 4)]
    assert (stops[0] if stops else None) == stop_at
    assert not any(should_stop(losses[: i + 1], None) for i in range(len(losses)))


def test_best_checkpoint_is_lowest_validation_loss(tmp_path):
    cfg = tiny_run("task2", epochs=3, evals_per_epoch=4, early_stop_count=None, lr=0.01, batch_size=16)
    result = train(cfg, tiny_dataset(300, 60), tmp_path)
    vals = result.history.validations
    best = min(vals, key=lambda v: v["val_loss"])
    ckpt = torch.load(tmp_path / BEST, weights_only=True)
    assert ckpt["step"] == best["step"] == result.metrics["best_step"]
    assert result.metrics["val_loss"] == pytest.approx(best["val_loss"], rel=1e-5)
    assert len(vals) == 12 and [v["step"] for v in vals] == list(range(4, 52, 4))


def test_early_stopping_stops_the_run(tmp_path):
    cfg = tiny_run("task2", epochs=30, evals_per_epoch=1, early_stop_count=2, lr=0.2, batch_size=16)
    result = train(cfg, tiny_dataset(300, 60), tmp_path)
    assert result.metrics["stopped_early"] and result.metrics["epochs_run"] < 30
    assert should_stop([v["val_loss"] for v in result.history.validations], 2)


def test_same_seed_same_numbers(tmp_path):
    cfg = tiny_run("task3e", batch_size=32)  # dropout, batch norm and augmentation all draw randomness
    a = train(cfg, tiny_dataset(200, 40), tmp_path / "a").metrics
    b = train(cfg, tiny_dataset(200, 40), tmp_path / "b").metrics
    assert {k: a[k] for k in a if "loss" in k or "acc" in k} == {k: b[k] for k in b if "loss" in k or "acc" in k}
    # and the same file, byte for byte: DVC's md5 and run.json's sha256 name the weights, not the write
    assert (tmp_path / "a" / BEST).read_bytes() == (tmp_path / "b" / BEST).read_bytes()


KILLABLE = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {tests!r})
    from helpers import tiny_run, tiny_dataset
    from cifarcnn import training
    slow = training.save_checkpoint
    def save_then_sleep(path, payload):
        slow(path, payload)
        if path.name.startswith("resume-"):
            time.sleep(0.5)  # give the test time to kill us right after a resume point
    training.save_checkpoint = save_then_sleep
    cfg = tiny_run("task3e", epochs=2, batch_size=16, evals_per_epoch=2, early_stop_count=None)
    training.train(cfg, tiny_dataset(200, 40), {out!r})
""")


def test_resume_after_sigkill_gives_the_same_result(tmp_path):
    """A run killed (SIGKILL) after a resume point, started again, ends exactly like an unbroken run."""
    out = tmp_path / "killed"
    script = KILLABLE.format(tests=str(Path(__file__).parent), out=str(out))
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 120
    while not list(out.glob(RESUME_GLOB)):
        assert proc.poll() is None, proc.stdout.read().decode()
        assert time.time() < deadline, "no resume checkpoint within 120 s"
        time.sleep(0.05)
    [saved] = out.glob(RESUME_GLOB)
    state = torch.load(saved, weights_only=True)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert state["step"] < 2 * (180 // 16)  # killed before the end

    cfg = tiny_run("task3e", epochs=2, batch_size=16, evals_per_epoch=2, early_stop_count=None)
    resumed = train(cfg, tiny_dataset(200, 40), out)
    assert resumed.resumed_from_step is not None and resumed.resumed_from_step >= state["step"]
    unbroken = train(cfg, tiny_dataset(200, 40), tmp_path / "unbroken")
    keys = [k for k in unbroken.metrics if k.endswith(("_acc", "_loss"))] + ["best_step", "steps"]
    assert {k: resumed.metrics[k] for k in keys} == {k: unbroken.metrics[k] for k in keys}
    assert resumed.history.losses == unbroken.history.losses
    assert (out / BEST).read_bytes() == (tmp_path / "unbroken" / BEST).read_bytes()
    assert not saved.exists()


def test_resume_state_that_does_not_match_its_name_is_ignored(tmp_path, capsys):
    """The file name says which run a state continues; its contents are checked all the same."""
    cfg, ds = tiny_run("task2", batch_size=32), tiny_dataset(200, 40)
    path = resume_file(tmp_path, training.resume_key(cfg, ds))
    torch.save({"config": {"name": "other"}, "step": 3}, path)
    result = train(cfg, ds, tmp_path)
    assert result.resumed_from_step is None
    assert f"ignoring {path}: it was saved with other params" in capsys.readouterr().out


def test_non_finite_loss_stops_with_a_clear_error(tmp_path):
    cfg = tiny_run("task2", epochs=5, lr=1e6, batch_size=16, evals_per_epoch=4)
    with pytest.raises(NonFiniteLoss, match=r"runs\.task2: (training|validation) loss became (nan|inf) at step \d+"):
        train(cfg, tiny_dataset(300, 60), tmp_path)


def test_batch_larger_than_data_names_the_key(tmp_path):
    with pytest.raises(UserError, match=r"runs\.task2\.batch_size: 64 is larger than the 54 training images"):
        train(tiny_run("task2"), tiny_dataset(60, 20), tmp_path)


def test_load_best_model_round_trip(tmp_path):
    cfg = tiny_run("task3d_no_dropout", batch_size=32)
    result = train(cfg, tiny_dataset(200, 40), tmp_path)
    model, loaded_cfg, ckpt = load_best_model(tmp_path / BEST)
    assert loaded_cfg == cfg
    x = torch.randn(3, 3, 32, 32)
    torch.testing.assert_close(model(x), result.model.eval()(x))


def test_device_auto_falls_back_to_cpu():
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="train.device: cuda requested but no CUDA device"):
            resolve_device("cuda")


def test_resume_after_the_stopping_validation_does_not_train_on(tmp_path, monkeypatch):
    """Killed between the validation that triggered early stopping and the end of the run."""
    cfg = tiny_run("task2", epochs=30, evals_per_epoch=1, early_stop_count=2, lr=0.2, batch_size=16)
    ds = tiny_dataset(300, 60)
    finished = train(cfg, ds, tmp_path / "a")
    assert finished.metrics["stopped_early"]
    real_unlink = Path.unlink

    def crash_instead_of_cleanup(self, missing_ok=False):
        if self.name.startswith("resume-"):
            raise KeyboardInterrupt  # "killed" just before the resume state would be removed
        return real_unlink(self, missing_ok=missing_ok)

    monkeypatch.setattr(Path, "unlink", crash_instead_of_cleanup)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, ds, tmp_path / "b")
    monkeypatch.setattr(Path, "unlink", real_unlink)
    resumed = train(cfg, ds, tmp_path / "b")
    assert resumed.resumed_from_step == finished.metrics["steps"]
    assert resumed.metrics["steps"] == finished.metrics["steps"] and resumed.metrics["stopped_early"]
    assert resumed.metrics["test_acc"] == finished.metrics["test_acc"]


# --- the CUDA-graph step's protocol, checked on the CPU -----------------------------------------
# On CUDA each step is replayed from a graph captured after a few warm-up steps (step.py). The
# capture itself needs a GPU (bench/gpu_report.py checks it there); everything around it (static
# input buffers, the warm-up undone in place) runs here with capture=False and must train
# bit-identically to the eager step.

def static_step(fn, model, optimizer, inputs, graphs):
    return GraphedStep(fn, model, optimizer, inputs, capture=False)


@pytest.mark.parametrize("name", ["task3e", "task3a_model1", "task3d_dropout"])  # Adam+BN+augment, Adam, SGD+dropout
def test_static_step_with_warmup_undone_trains_like_eager(name, tmp_path, monkeypatch):
    cfg = tiny_run(name, batch_size=16, evals_per_epoch=2)
    eager = train(cfg, tiny_dataset(200, 40), tmp_path / "eager")
    monkeypatch.setattr(training, "make_step", static_step)
    static = train(cfg, tiny_dataset(200, 40), tmp_path / "static")
    assert static.metrics["cuda_graph"] and not eager.metrics["cuda_graph"]
    assert static.history.losses == eager.history.losses
    for (key, a), b in zip(eager.model.state_dict().items(), static.model.state_dict().values()):
        assert torch.equal(a, b), key


def test_static_step_check_has_power(tmp_path, monkeypatch):
    """Without undoing the warm-up the same comparison fails."""
    cfg = tiny_run("task3e", batch_size=16, evals_per_epoch=2)
    eager = train(cfg, tiny_dataset(200, 40), tmp_path / "eager")
    monkeypatch.setattr(training, "make_step", static_step)
    monkeypatch.setattr(step_module._TrainingState, "restore", lambda self: None)
    static = train(cfg, tiny_dataset(200, 40), tmp_path / "static")
    assert static.history.losses != eager.history.losses


def test_warmup_restores_existing_optimizer_state():
    """A resumed run has Adam state before capture: the warm-up must leave it as it was."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 3))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))

    def fn(xb, yb):
        loss = torch.nn.functional.cross_entropy(model(xb), yb)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss

    for _ in range(2):
        fn(x[:16], y[:16])
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    state = {i: {k: v.clone() for k, v in s.items()} for i, s in enumerate(optimizer.state.values())}
    GraphedStep(fn, model, optimizer, (x[16:], y[16:]), capture=False)
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
    for i, s in enumerate(optimizer.state.values()):
        assert all(torch.equal(v, state[i][k]) for k, v in s.items())


@pytest.mark.parametrize("ahead", [3, 128])
def test_augmenting_several_steps_at_once_gives_each_step_its_batch(ahead):
    """The GPU augments many steps in one pass; every step must still get exactly its images
    with its own draws (the CPU's one-step-at-a-time result)."""
    from cifarcnn.augment import draw_augment
    from cifarcnn.batches import epoch_batches, to_device_split, training_inputs

    cfg = tiny_run("task3e")
    ds = tiny_dataset(400, 20)
    split = to_device_split(ds.train_x, ds.train_y, torch.device("cpu"))
    batches = epoch_batches(len(split), 32, torch.Generator().manual_seed(1))
    gen = torch.Generator()

    def draws_for(step):
        return draw_augment(cfg.augment, 32, gen.manual_seed(step), "cpu")

    one = list(training_inputs(split, batches[2:], 7, cfg.augment, draws_for, ahead=1))
    many = list(training_inputs(split, batches[2:], 7, cfg.augment, draws_for, ahead=ahead))
    assert len(one) == len(many) == len(batches) - 2
    for (x1, y1), (x2, y2) in zip(one, many):
        assert torch.equal(y1, y2)
        torch.testing.assert_close(x1, x2, atol=1e-6, rtol=0)
    assert not torch.equal(one[0][0], one[1][0])


@pytest.mark.parametrize("change", ["params", "data", "code"])
def test_resume_state_of_another_config_is_left_alone(change, tmp_path, monkeypatch):
    """Other params, data or training code: another key, so another file. The old state is
    neither used nor deleted (changing the param back resumes it)."""
    cfg, ds = tiny_run("task2", batch_size=32), tiny_dataset(200, 40)
    train(cfg, ds, tmp_path, keep_resume=True)
    [kept] = tmp_path.glob(RESUME_GLOB)  # the finished state, kept for the caller
    assert kept == resume_file(tmp_path, training.resume_key(cfg, ds))
    if change == "params":
        cfg = tiny_run("task2", batch_size=32, lr=0.01)
    elif change == "data":
        ds = tiny_dataset(200, 40, seed=5)
    else:
        monkeypatch.setattr(training, "code_digest", lambda module: "edited")
    assert training.resume_key(cfg, ds) not in kept.name
    result = train(cfg, ds, tmp_path)
    assert result.resumed_from_step is None
    assert list(tmp_path.glob(RESUME_GLOB)) == [kept]


def test_a_finished_state_resumes_without_training(tmp_path, capsys):
    cfg = tiny_run("task2", batch_size=32)
    first = train(cfg, tiny_dataset(200, 40), tmp_path, keep_resume=True)
    (tmp_path / BEST).unlink()  # DVC removes outputs before re-running
    capsys.readouterr()
    again = train(cfg, tiny_dataset(200, 40), tmp_path)
    assert again.resumed_from_step == first.metrics["steps"] == again.metrics["steps"]
    assert again.metrics["test_acc"] == first.metrics["test_acc"] and (tmp_path / BEST).exists()
    assert f"step {first.metrics['steps']}/" not in capsys.readouterr().out  # no training step ran


def test_training_loss_points_are_50_step_means_or_20_points_for_short_runs():
    """A real run's loss curve is the report's 50-step means; a short one keeps at least 20 points
    (a 48-step CI run would otherwise chart one dot)."""
    long, short = training.History(), training.History()
    long.steps, long.losses = list(range(1, 2001)), [float(i % 7) for i in range(2000)]
    short.steps, short.losses = list(range(1, 49)), [1.0] * 48
    assert len(long.loss_blocks()["step"]) == 40 and long.loss_blocks()["step"][0] == 50
    assert short.loss_blocks()["step"][:3] == [2, 4, 6] and len(short.loss_blocks()["mean"]) == 24
    assert training.loss_window(5) == 1
