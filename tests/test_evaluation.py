"""Evaluating a best checkpoint, the download of Task 4 inputs, and the report's tables."""
from __future__ import annotations

import json

import numpy as np
import pytest
from fixtures import serve_directory, stripes_photo
from helpers import tiny_dataset, tiny_run
from PIL import Image

from cifarcnn import assets, report
from cifarcnn.errors import UserError
from cifarcnn.evaluation import confusion_matrix, evaluate_checkpoint
from cifarcnn.fetch import file_digest
from cifarcnn.training import BEST, train


def test_confusion_matrix_counts():
    cm = confusion_matrix(np.array([0, 0, 1, 2, 2, 2]), np.array([0, 1, 1, 2, 0, 2]), 3)
    assert cm.tolist() == [[1, 1, 0], [0, 1, 0], [1, 0, 2]]


def test_evaluate_matches_training_numbers(tmp_path):
    cfg = tiny_run("task2", batch_size=32)
    ds = tiny_dataset(200, 50)
    result = train(cfg, ds, tmp_path)
    ev = evaluate_checkpoint(tmp_path / BEST, ds, "cpu")
    for split in ("train", "val", "test"):
        assert ev[f"{split}_acc"] == pytest.approx(result.metrics[f"{split}_acc"])
        assert ev[f"{split}_loss"] == pytest.approx(result.metrics[f"{split}_loss"], rel=1e-5)
    cm = np.array(ev["test_confusion"])
    assert cm.sum() == 50 and np.trace(cm) / 50 == pytest.approx(ev["test_acc"])
    assert set(ev["test_class_acc"]) == set(ds.classes)


def test_evaluate_missing_checkpoint(tmp_path):
    with pytest.raises(UserError, match="does not exist; run its train stage first"):
        evaluate_checkpoint(tmp_path / "nope.pt", tiny_dataset(50, 50))


def test_photo_download_and_pin(tmp_path):
    served = tmp_path / "served"
    served.mkdir()
    Image.fromarray(stripes_photo()).save(served / "zebra.png")
    digest = file_digest(served / "zebra.png", "sha256")
    with serve_directory(served) as url:
        out, got = assets.fetch_photo(f"{url}/zebra.png", None, tmp_path / "cache", tmp_path / "viz_image")
        assert got == digest and out.read_bytes() == (served / "zebra.png").read_bytes()
        with pytest.raises(UserError, match="viz.image: sha256 of .* expected 0{64}"):
            assets.fetch_photo(f"{url}/zebra.png", "0" * 64, tmp_path / "cache2", tmp_path / "viz2")
    (tmp_path / "fake.jpg").write_text("text")
    with pytest.raises(UserError, match="viz.image: .*fake.jpg is not an image"):
        assets.fetch_photo(str(tmp_path / "fake.jpg"), None, tmp_path / "cache", tmp_path / "viz3")


def test_weights_not_fetched_unless_imagenet(tmp_path):
    assert assets.fetch_resnet_weights("none", tmp_path / "cache", tmp_path / "pretrained") is None
    assert (tmp_path / "pretrained").is_dir() and not any((tmp_path / "pretrained").iterdir())


def test_weights_offline_say_what_to_put_where(tmp_path, monkeypatch):
    monkeypatch.setattr(assets, "RESNET18_IMAGENET_URL", "http://127.0.0.1:9/resnet18-f37072fd.pth")
    monkeypatch.setattr("cifarcnn.fetch.RETRIES", 1)
    with pytest.raises(UserError, match=r"resnet_weights: imagenet: could not download .* put it at "
                                        r".*cache/resnet18-f37072fd\.pth"):
        assets.fetch_resnet_weights("imagenet", tmp_path / "cache", tmp_path / "pretrained")


def test_weights_from_cache_are_verified_and_copied(tmp_path, monkeypatch):
    (tmp_path / "cache").mkdir()
    blob = b"pretend weights"
    (tmp_path / "cache" / "resnet18-f37072fd.pth").write_bytes(blob)
    monkeypatch.setattr(assets, "RESNET18_IMAGENET_SHA256", file_digest(tmp_path / "cache" / "resnet18-f37072fd.pth", "sha256"))
    monkeypatch.setattr(assets, "RESNET18_IMAGENET_URL", "http://127.0.0.1:9/resnet18-f37072fd.pth")
    path = assets.fetch_resnet_weights("imagenet", tmp_path / "cache", tmp_path / "pretrained")
    assert path.read_bytes() == blob


def _fake_results(tmp_path, runs):
    for i, run in enumerate(runs):
        d = tmp_path / run
        d.mkdir(parents=True)
        acc = 0.5 + i / 100
        (d / "train.json").write_text(json.dumps({
            "device": "cpu", "epochs_run": 1, "best_step": 4, "stopped_early": False, "train_seconds": 3.0,
            "train_images_per_s": 100.0, "mlflow_run_id": f"id{i}", "n_train": 270, "n_val": 30, "n_test": 60,
            "data_source": "x", "data_subset": 300}))
        (d / "eval.json").write_text(json.dumps({
            "train_acc": acc, "val_acc": acc - 0.1, "test_acc": acc - 0.05,
            "test_class_acc": {"cat": 0.5, "dog": 0.25}}))


def test_accuracy_table_beside_the_report(tmp_path):
    _fake_results(tmp_path, ["task2", "extra_run"])
    results = report.load_results(tmp_path)
    assert list(results) == ["task2", "extra_run"]
    md = report.accuracy_table(results, ["task2"])
    assert "-37.28 pp" in md  # training: 50.00% vs the report's 87.28%
    assert "73.58%" in md and "45.00%" in md and "-28.58 pp" in md
    md = report.accuracy_table(results, ["extra_run"])
    assert "n/a (not in the report)" in md


def test_report_says_when_task4a_is_not_the_reports_set_up(tmp_path):
    _fake_results(tmp_path, ["task4a"])
    config = {"input": {"size": 64, "mean": [0.5] * 3, "std": [0.25] * 3}, "epochs": 1}
    (tmp_path / "task4a" / "config.json").write_text(json.dumps(config))
    shrunk = report.load_results(tmp_path)["task4a"]
    shrunk["train"]["resnet_weights"] = "none"
    caveat = "".join(report._task4a_caveats(shrunk))
    assert "random weights" in caveat and "64×64" in caveat and "1 epoch(s)" in caveat
    assert "| 64 px" in report.runs_table({"task4a": shrunk}) and "1 of 1" in report.runs_table({"task4a": shrunk})

    as_reported = {**shrunk, "train": {**shrunk["train"], "resnet_weights": "imagenet"},
                   "config": {**config, "input": {**config["input"], "size": 224}, "epochs": 5}}
    assert report._task4a_caveats(as_reported) == []
