"""Bad params end in one clear line that names the key."""
from __future__ import annotations

import copy
import re

import pytest
from helpers import ROOT, tiny_params

from cifarcnn.config import RUN_ORDER, configured_runs, load_params, resolve_all, resolve_data, resolve_run, resolve_split
from cifarcnn.errors import UserError


def mutate(fn):
    params = copy.deepcopy(tiny_params())
    fn(params)
    return params


@pytest.mark.parametrize("change, message", [
    (lambda p: p["runs"]["task2"].update(lrr=0.1), r"runs\.task2\.lrr: unknown key"),
    (lambda p: p["runs"]["task2"].update(lr="fast"), r"runs\.task2\.lr: expected a number, got 'fast'"),
    (lambda p: p["runs"]["task2"].update(lr=0), r"runs\.task2\.lr: must be > 0"),
    (lambda p: p["runs"]["task2"].update(lr=-0.1), r"runs\.task2\.lr: must be > 0"),
    (lambda p: p.update(lr=-1), r"^lr: must be > 0"),
    (lambda p: p["runs"]["task2"].update(model="vgg"), r"runs\.task2\.model: unknown model 'vgg'"),
    (lambda p: p["runs"]["task2"].update(optimizer="rmsprop"), r"runs\.task2\.optimizer: expected one of sgd, adam"),
    (lambda p: p["runs"]["task2"].update(batch_size=6.5), r"runs\.task2\.batch_size: expected an integer"),
    (lambda p: p["runs"]["task2"].update(batch_size=True), r"runs\.task2\.batch_size: expected an integer"),
    (lambda p: p["runs"]["task2"].update(epochs=0), r"runs\.task2\.epochs: must be >= 1"),
    (lambda p: p["runs"]["task2"].pop("optimizer"), r"runs\.task2\.optimizer: missing"),
    (lambda p: p["runs"]["task2"].update(model_params={"dropout": True}), r"runs\.task2\.model_params\.dropout: model 'task2' has no such parameter"),
    (lambda p: p["runs"]["task3e"]["augment"].update(hue=0.7), r"runs\.task3e\.augment\.hue: must be <= 0\.5, got 0\.7"),
    (lambda p: p["runs"]["task2"]["input"].update(std=[0.2, 0, 0.2]), r"runs\.task2\.input\.std\[1\]: must be > 0"),
    (lambda p: p["runs"]["task2"].update(takes_param="nope"), r"runs\.task2\.takes_param: 'nope' is not a top-level key"),
    (lambda p: p["runs"]["task2"].update(lr={"param": "lr"}), r"runs\.task2\.lr: refers to param 'lr' but the run's takes_param is 'train'"),
    (lambda p: p["runs"]["task2"].update(lr={"param": "nope"}), r"runs\.task2\.lr: refers to param 'nope', which is not a top-level key"),
    (lambda p: p["train"].update(devise="cpu"), r"train\.devise: unknown key"),
    (lambda p: p["train"].update(device="tpu"), r"train\.device: expected one of auto, cpu, cuda"),
    (lambda p: p["train"].update(max_epochs=0), r"train\.max_epochs: must be >= 1"),
    (lambda p: p["train"].update(val_fraction=0.9), r"train\.val_fraction: must be <= 0\.5, got 0\.9"),
    (lambda p: p["train"].update(seeds=[0, 0]), r"train\.seeds: each seed once, got \[0, 0\]"),
    (lambda p: p["train"].update(seeds=[]), r"train\.seeds: expected a non-empty list, got \[\]"),
    (lambda p: p["train"].update(seeds=3), r"train\.seeds: expected a list, got 3"),
    (lambda p: p["train"].update(seeds=[1, -2]), r"train\.seeds\[1\]: must be >= 0, got -2"),
    (lambda p: p["train"].update(seed=0), r"train\.seed: unknown key"),
    (lambda p: p["train"].update(seeds=[0, 2**32]), r"train\.seeds\[1\]: must be < 4294967296, got 4294967296$"),
    (lambda p: p["runs"].update({"task 2": p["runs"]["task2"]}), r"runs\.task 2: a run's name must be lowercase letters, digits and _"),
    (lambda p: p["runs"].update({"a/b": p["runs"]["task2"]}), r"runs\.a/b: a run's name must be lowercase"),
])
def test_bad_run_params_name_the_key(change, message):
    with pytest.raises(UserError, match=message) as err:
        resolve_all(mutate(change))
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("change, message", [
    (lambda p: p["data"].update(md5="abc"), r"data\.md5: expected 32 hex digits or null"),
    (lambda p: p["data"].update(subset="all"), r"data\.subset: expected an integer or null"),
    (lambda p: p["data"].update(extra=1), r"data\.extra: unknown key"),
])
def test_bad_data_params_name_the_key(change, message):
    with pytest.raises(UserError, match=message):
        resolve_data(mutate(change))


def test_the_split_validates_its_two_keys_and_reads_no_other():
    """The split stage declares train.val_fraction and train.split_seed alone (dvc.yaml), so it
    checks those two with the key in the error, and a bad key it does not read (configure names
    that one) does not stop it."""
    split = resolve_split(mutate(lambda p: p["train"].update(seeds=[], device="tpu")))
    assert (split.val_fraction, split.split_seed) == (0.1, 0)
    for change, message in ((lambda p: p["train"].update(val_fraction=0.9), r"^train\.val_fraction: must be <= 0\.5, got 0\.9$"),
                            (lambda p: p["train"].pop("split_seed"), r"^train\.split_seed: missing$"),
                            (lambda p: p["train"].update(split_seed=-1), r"^train\.split_seed: must be >= 0, got -1$")):
        with pytest.raises(UserError, match=message):
            resolve_split(mutate(change))


def test_the_report_takes_its_runs_in_order_from_the_configure_stage(tmp_path):
    with pytest.raises(UserError, match=r"run-order\.json not found; run `dvc repro configure` \(or dvc repro\) first$"):
        configured_runs(tmp_path)
    (tmp_path / RUN_ORDER).write_text('["task3e", "task2"]')
    assert configured_runs(tmp_path) == ["task3e", "task2"]  # params.yaml's order, not the folder's
    (tmp_path / RUN_ORDER).write_text('["task2", "tas')  # cut short
    with pytest.raises(UserError, match=r"run-order\.json is not valid JSON .*; it is damaged"):
        configured_runs(tmp_path)
    (tmp_path / RUN_ORDER).write_text('{"task2": 1}')
    with pytest.raises(UserError, match=r"expected a list of run names; run `dvc repro -f configure`"):
        configured_runs(tmp_path)


def test_top_level_lr_drives_task3e_only():
    params = mutate(lambda p: p.update(lr=0.001))
    runs = resolve_all(params)
    assert runs["task3e"].lr == 0.001
    assert runs["task2"].lr == 0.05 and runs["task3a_model1"].lr == 0.00049


def test_resnet_weights_flow_into_task4a_as_its_pretrained_choice():
    task4a = resolve_run(mutate(lambda p: p.update(resnet_weights="/w.pth")), "task4a")
    assert task4a.pretrained == "/w.pth" and task4a.model_params == {}
    assert resolve_run(mutate(lambda p: p.update(resnet_weights="none")), "task4a").pretrained is None  # random init
    assert resolve_run(tiny_params(), "task2").pretrained is None


def test_max_epochs_caps_every_run():
    runs = resolve_all(tiny_params(max_epochs=2))
    assert {c.epochs for c in runs.values()} == {2}


def test_unreadable_params_file(tmp_path):
    (tmp_path / "params.yaml").write_text("runs: [unclosed")
    with pytest.raises(UserError, match="not valid YAML"):
        load_params(tmp_path / "params.yaml")
    with pytest.raises(UserError, match="not found"):
        load_params(tmp_path / "missing.yaml")


def test_flat_params_use_params_yaml_names():
    flat = resolve_run(tiny_params(), "task3e").flat_params()
    assert flat["lr"] == 0.0006 and flat["batch_size"] == 32 and flat["model_params.second_dropout"] == 0.1
    assert flat["augment.hue"] == 0.5 and flat["train.seed"] == 0 and flat["input.size"] == 32


def test_digits_only_md5_asks_for_quotes(tmp_path):
    """YAML reads 32 digits as a number (dropping leading zeros): refused with what to do."""
    text = (ROOT / "params.yaml").read_text()
    digits = "12345678901234567890123456789012"
    (tmp_path / "params.yaml").write_text(re.sub(r"(?m)^(\s*md5:) \S+", rf"\g<1> {digits}", text, count=1))
    with pytest.raises(UserError, match=r'data\.md5: YAML read the checksum as the number .*put it in quotes \("\.\.\."\)'):
        resolve_data(load_params(tmp_path / "params.yaml"))
    (tmp_path / "params.yaml").write_text(re.sub(r"(?m)^(\s*md5:) \S+", rf'\g<1> "{digits}"', text, count=1))
    assert resolve_data(load_params(tmp_path / "params.yaml")).md5 == digits
