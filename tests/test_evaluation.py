"""Evaluating a best checkpoint, the download of Task 4 inputs, and the report's tables."""
from __future__ import annotations

import json
import time
import re

import numpy as np
import pytest
import torch
from fixtures import serve_directory, stripes_photo
from helpers import tiny_dataset, tiny_run
from PIL import Image

from cifarcnn import assets, report
from cifarcnn.errors import UserError
from cifarcnn.evaluation import confusion_matrix, evaluate_checkpoint
from cifarcnn.fsutil import file_digest
from cifarcnn.runfiles import BEST, run_dirs
from cifarcnn.training import train


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


def test_augmented_runs_are_also_scored_on_augmented_train_and_val(tmp_path):
    """Like for like with the original, whose Task 3e train/val numbers were on augmented images:
    the same checkpoint scored on augmented copies (fixed draws), beside the clean numbers."""
    import torch

    from cifarcnn.batches import Preprocess, make_splits
    from cifarcnn.checkpoint import load_best_model
    from cifarcnn.scoring import predict

    ds = tiny_dataset(200, 50)
    train(tiny_run("task3e"), ds, tmp_path / "e")
    ev = evaluate_checkpoint(tmp_path / "e" / BEST, ds, "cpu")
    assert ev == evaluate_checkpoint(tmp_path / "e" / BEST, ds, "cpu")  # fixed draws: the same numbers again
    model, cfg, _ = load_best_model(tmp_path / "e" / BEST)
    splits = make_splits(ds, cfg.val_fraction, cfg.split_seed, torch.device("cpu"))
    prep = Preprocess(cfg.input, torch.device("cpu"), False)
    for name in ("train", "val"):
        loss, preds = predict(model, splits[name], prep, cfg.augment, seed=0)
        assert ev[f"{name}_acc_aug"] == pytest.approx(float((preds == splits[name].y).float().mean()))
        assert ev[f"{name}_loss_aug"] == pytest.approx(loss)
        assert ev[f"{name}_loss_aug"] != pytest.approx(ev[f"{name}_loss"])  # the images were changed
    train(tiny_run("task2", batch_size=32), ds, tmp_path / "c")
    clean_only = evaluate_checkpoint(tmp_path / "c" / BEST, ds, "cpu")
    assert not any(k.endswith("_aug") for k in clean_only)


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
    # never an empty folder: DVC warns "'data/pretrained' is empty" wherever it is a dep
    assert [p.name for p in (tmp_path / "pretrained").iterdir()] == ["ABOUT.txt"]
    assert "random weights" in (tmp_path / "pretrained" / "ABOUT.txt").read_text()


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


def _fake_results(tmp_path, runs, seeds=(0,), augmented=False):
    """results/<run>/seed<k>/{train,eval}/ as the train and evaluate stages write them: accuracy
    0.5 + i/100 for the i-th run, plus seed/1000 so that the seeds spread."""
    for i, run in enumerate(runs):
        for seed in seeds:
            _, d, e = run_dirs(run, seed, tmp_path)
            d.mkdir(parents=True)
            e.mkdir(parents=True)
            acc = 0.5 + i / 100 + seed / 1000
            (d / "train.json").write_text(json.dumps({
                "epochs_run": 1 + seed, "train_seconds": 3.0, "train_images_per_s": 100.0}))
            (d / "run.json").write_text(json.dumps({
                "device": "cpu", "best_step": 4 + seed, "stopped_early": seed == 1, "mlflow_run_id": f"id{i}-{seed}",
                "n_train": 270, "n_val": 30, "n_test": 60, "data_source": "x", "data_subset": 300}))
            (e / "eval.json").write_text(json.dumps({
                "train_acc": acc, "val_acc": acc - 0.1, "test_acc": acc - 0.05,
                **({"train_acc_aug": acc - 0.03, "val_acc_aug": acc - 0.12} if augmented else {})}))
            (e / "eval_detail.json").write_text(json.dumps({"test_class_acc": {"cat": 0.5, "dog": 0.25}}))


def test_accuracy_table_beside_the_report(tmp_path):
    _fake_results(tmp_path, ["task2", "extra_run"])
    results = report.load_results(tmp_path, ["extra_run", "task2"], [0])
    assert list(results) == ["task2", "extra_run"]  # the report's order first
    md = report.accuracy_table(results, "task2")
    assert "| -37.28 " in md  # training: 50.00% vs the report's 87.28%
    assert "73.58" in md and "45.00 (n = 1)" in md and "-28.58" in md
    assert "no verdict (n = 1; 3 seeds at least)" in md and "±" not in md.split("\n", 2)[2]  # no spread below the header
    md = report.accuracy_table(results, "extra_run")
    assert md.count("n/a") == 9  # per split: no report number, no difference, no verdict


def test_report_over_three_seeds_gives_spread_verdicts_and_claims(tmp_path):
    runs = ["task2", "task3a_model1", "task3a_model2", "task3d_dropout", "task3d_no_dropout", "task3e"]
    _fake_results(tmp_path, runs, seeds=(0, 1, 2))
    _fake_results(tmp_path / "aug", ["task3e"], seeds=(0, 1, 2), augmented=True)
    for seed in (0, 1, 2):  # task3e with augmented numbers
        for name in ("eval.json",):
            (run_dirs("task3e", seed, tmp_path).scored / name).write_text(
                (run_dirs("task3e", seed, tmp_path / "aug").scored / name).read_text())
    _fake_results(tmp_path, ["task2"], seeds=(7,))  # a seed no longer in train.seeds: ignored
    results = report.load_results(tmp_path, runs, [0, 1, 2])
    assert [s["seed"] for s in results["task2"]] == [0, 1, 2]
    md = report.accuracy_table(results, "task2")
    assert "50.10 ± 0.10 (n = 3)" in md and "50.00–50.20" in md  # train: 50.0, 50.1, 50.2
    assert re.search(r"report above \(95% PI [\d.]+–[\d.]+; t = [\d.]+, p = ", md)  # one run of ours vs the report's one
    e = report.accuracy_table(results, "task3e")
    assert "Training, augmented images" in e and "| 81.77 " in e  # the report's number on its own terms
    assert "measured on augmented images: see below" in e  # the clean row is not judged against it
    claims = "\n".join(report.claims_section(results))
    assert "Table 8: Model 2 beats Model 1" in claims and "n = 3" in claims and "p = " in claims
    assert "Task 3e: the final model beats Task 2's" in claims
    assert "Task 3c: Adam beats SGD on the same network (Model 1 vs Task 2)** (test accuracy; the report: +1.51 " \
           "points). Ours: task3a_model1 beats task2 by +1.00 points with n = 3: no test (no spread in the differences)" \
        in claims  # paired by seed (same network, same initial weights and batches), so the differences are tested
    # task3d's runs pair by seed (same weights, same batches): a paired test; here every difference is equal
    assert "dropout beats no dropout** (test accuracy; the report: +3.82 points). Ours: task3d_dropout does not beat " \
           "task3d_no_dropout by -1.00 points with n = 3: no test (no spread in the differences)" in claims
    assert "**Task 3d: dropout reduces overfitting** (the report: \"the model overfits much less\", from Figure 5). " \
           "Train − validation accuracy gap, with dropout " in claims
    assert "(the report's Figure 5 numbers: 10.47 with, 8.30 without). Without dropout the gap is larger by" in claims
    assert "**Task 3f: the final model's training accuracy is close to its test accuracy** (the report: 81.77 on " \
           "augmented training images vs 80.89 test, +0.88 points). Ours: training on augmented images minus test is " \
           in claims
    task1 = {"parameters": {"task2": {"rows": [{"n": 1, "type": "Conv2d", "weight_shape": "x", "weights": 1,
                                                 "biases": 1, "parameters": 2}], "total": 2}}}
    full = report.results_markdown(results, task1, None, {}, {"method": "np.random.seed(0); ...", "order": "o"})
    assert "Seeds per run: 3" in full and "## The report's claims, tested over seeds" in full
    # report − ours over the five independent numbers: a one-sample t-test (every seed here 0.5 + i/100 ...)
    assert "## Is the report above us across runs?" in full and "one-sample t(4) = " in full
    assert "the report sits systematically above our runs" in full
    assert re.search(r"\| task2 +\| 0, 1, 2 +\| 1–3 +\| 1 of 3 ", full)  # the stopping table: seeds, epochs run, stops
    one = report.results_markdown(report.load_results(tmp_path, runs, [0]), task1, None, {})
    assert "Seeds per run: 1" in one and "no test (at least two seeds a side are needed)" in one
    assert " ± " not in "".join(line for line in one.split("## Runs")[1].splitlines() if not line.startswith("| Dataset"))
    aggregates = report.aggregates(results["task2"])
    assert aggregates["n_seeds"] == 3 and aggregates["mean_test_acc"] == pytest.approx(0.451)
    assert aggregates["sd_test_acc"] == pytest.approx(0.001)


def test_report_says_when_task4a_is_not_the_reports_set_up(tmp_path):
    _fake_results(tmp_path, ["task4a"])
    config = {"input": {"size": 64, "mean": [0.5] * 3, "std": [0.25] * 3}, "epochs": 1, "pretrained": None}
    (run_dirs("task4a", 0, tmp_path).trained / "config.json").write_text(json.dumps(config))
    shrunk = report.load_results(tmp_path, ["task4a"], [0])["task4a"][0]
    caveat = "".join(report._task4a_caveats(shrunk))
    assert "random weights" in caveat and "64×64" in caveat and "1 epoch(s)" in caveat
    assert "| 64 px" in report.runs_table({"task4a": [shrunk]}) and "1 of 1" in report.runs_table({"task4a": [shrunk]})

    assert "| not comparable: random weights |" in report.accuracy_table({"task4a": [shrunk]}, "task4a")
    _fake_results(tmp_path, ["task3e"])
    both = report.load_results(tmp_path, ["task3e", "task4a"], [0])
    claims = "\n".join(report.claims_section(both))
    assert "Task 4a: ResNet18 transfer learning beats the final model** (the report: +8.57 points). Not testable " \
           "here: task4a trained from random weights" in claims
    as_reported = {**shrunk, "config": {**config, "input": {**config["input"], "size": 224}, "epochs": 5,
                                        "pretrained": "imagenet"}}
    assert report._task4a_caveats(as_reported) == []


def test_served_images_are_resized_to_cifar_as_uint8():
    import numpy as np
    import torch

    from cifarcnn.serving import to_cifar

    img = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    assert torch.equal(to_cifar(img), torch.from_numpy(img).permute(0, 3, 1, 2))  # 32 x 32: untouched
    big = img.repeat(4, axis=1).repeat(4, axis=2)  # 128 x 128 blocks of 4 x 4: averaging gives the original back
    assert (to_cifar(big).int() - torch.from_numpy(img).permute(0, 3, 1, 2).int()).abs().max() <= 1
    assert to_cifar(img[0]).shape == (1, 3, 32, 32)  # a single H x W x 3 image
    with pytest.raises(ValueError, match=r"expected uint8 images \[N, H, W, 3\]"):
        to_cifar(np.zeros((2, 32, 32), np.uint8))


def test_runs_table_prints_no_run_id_the_store_does_not_hold(tmp_path):
    """After a store was lost, the report names no run that is nowhere; a seed whose evaluation
    went to a new run (eval_detail.json's id) is listed under that one."""
    _fake_results(tmp_path, ["task2"], seeds=(0, 1))
    results = report.load_results(tmp_path, ["task2"], [0, 1])
    ids = [r["train"]["mlflow_run_id"] for r in results["task2"]]
    results["task2"][1]["eval"]["mlflow_run_id"] = "re-logged"
    table = report.runs_table(results, held_runs={"re-logged"})
    assert "not in the store" in table and f"`{ids[0]}`" not in table and "`re-logged`" in table
    assert ids[1] not in table
    assert f"`{ids[0]}`" in report.runs_table(results)  # the store not asked: as recorded


@pytest.mark.parametrize("images, reason", [
    (np.full((2, 32, 32, 3), 0.7), "got float64 values (images in [0, 1]: multiply by 255 and round)"),
    (np.full((1, 32, 32, 3), 300), "got values from 300 to 300"),
    (np.full((1, 32, 32, 3), -1), "got values from -1 to -1"),
    (np.zeros((2, 32, 32), np.uint8), "got an array of shape (2, 32, 32)"),
    (np.zeros((0, 32, 32, 3), np.uint8), "got an array of shape (0, 32, 32, 3)"),
    (np.zeros((3, 700, 700, 3), np.uint8), "3 image(s) of 700x700 are 4 MB of pixels, more than the 2 MB"),
])
def test_served_model_refuses_what_it_cannot_classify(images, reason, monkeypatch):
    """Each refusal is one message saying what is wrong and what is expected (a 400 when served)."""
    from cifarcnn import serving

    monkeypatch.setattr(serving, "MAX_MB", 2.0)
    with pytest.raises(serving.RequestRefused) as err:
        serving.checked_images(images)
    assert reason in err.value.message and len(err.value.message) < 300
    err.value.message = "Failed to predict data '<every pixel>'"  # what MLflow's scoring server does
    assert reason in err.value.message and "every pixel" not in err.value.serialize_as_json()


def test_served_model_takes_integer_pixels_and_one_image():
    from cifarcnn import serving

    assert serving.checked_images(np.full((2, 8, 8, 3), 255, np.int64)).dtype == np.uint8
    assert serving.checked_images(np.zeros((32, 32, 3), np.uint8)).shape == (1, 32, 32, 3)


def test_classification_stops_at_the_deadline():
    """Past the server's timeout no further chunk is classified."""
    from cifarcnn import serving

    calls = []

    def model(x):
        calls.append(len(x))
        return torch.zeros(len(x), 2)

    images = np.zeros((serving.CHUNK * 3, 32, 32, 3), np.uint8)
    with pytest.raises(serving.RequestRefused, match=r"stopped after 0 of 768 images: the request ran past"):
        serving.classify(model, lambda x: x.float(), ["a", "b"], images, deadline=time.monotonic() - 1)
    assert calls == []
    out = serving.classify(model, lambda x: x.float(), ["a", "b"], images, deadline=time.monotonic() + 60)
    assert calls == [serving.CHUNK] * 3 and len(out) == len(images)


def test_summary_is_numbers_per_run(tmp_path):
    """reports/summary/<run>.json: one entry per run, numbers only (DVC shows each as a column)."""
    _fake_results(tmp_path, ["task2", "task3e"], seeds=(0, 1))
    summary = report.summary(report.load_results(tmp_path, ["task2", "task3e"], [0, 1]))
    assert set(summary) == {"task2", "task3e"}
    assert summary["task2"] == {"test_acc": pytest.approx(0.4505), "test_acc_sd": pytest.approx(0.000707, abs=1e-6),
                                "val_acc": pytest.approx(0.4005), "n": 2}
    one = report.summary(report.load_results(tmp_path, ["task2"], [0]))
    assert set(one["task2"]) == {"test_acc", "val_acc", "n"}  # no sd from one seed


def test_hyperparameter_table_matches_the_reports_tables_for_the_real_params(tmp_path):
    """params.yaml as committed reproduces Tables 3, 5, 7, 11 and 12: no cell differs; a shrunk
    run (CI's one epoch) shows ours in bold with the report's value beside it."""
    from helpers import real_params

    from cifarcnn.config import resolve_run

    runs = list(report.REPORT_HYPER)
    _fake_results(tmp_path, runs)
    params = real_params()
    for run in runs:
        (run_dirs(run, 0, tmp_path).trained / "config.json").write_text(json.dumps(resolve_run(params, run).to_dict()))
    results = report.load_results(tmp_path, runs, [0])
    table = re.sub(r" +", " ", report.hyperparameter_table(results))
    assert "report:" not in table and table.count("\n") == len(runs) + 1, table
    assert "| task3e | Table 11 | Adam | 32 | 0.0006 | 10 | 4 | flip 0.5, rotation ±10°, jitter 0.5/0.5/0.5/0.5 | 32 px |" in table
    results["task2"][0]["config"]["epochs"] = 1
    assert "| **1** (report: 10) |" in re.sub(r" +", " ", report.hyperparameter_table(results))


def test_validation_loss_rise_is_read_from_the_curves(tmp_path):
    """How far the validation loss ends above its minimum, per seed, from curves.csv."""
    _fake_results(tmp_path, ["task3d_dropout", "task3d_no_dropout"], seeds=(0, 1, 2))
    for run, rises in (("task3d_dropout", [0.0, 0.1, 0.05]), ("task3d_no_dropout", [0.5, 0.7, 0.6])):
        for seed, rise in enumerate(rises):
            rows = ["step,epoch,train_loss,val_loss,val_acc", "1,0.5,2.0,1.5,0.4", "2,1.0,1.5,1.0,0.5",
                    f"3,1.5,1.2,{1.0 + rise},0.5"]
            (run_dirs(run, seed, tmp_path).trained / "curves.csv").write_text("\n".join(rows) + "\n")
    results = report.load_results(tmp_path, ["task3d_dropout", "task3d_no_dropout"], [0, 1, 2])
    assert [round(r["val_loss_rise"], 6) for r in results["task3d_no_dropout"]] == [0.5, 0.7, 0.6]
    lines = report.overfitting_claim(results)
    assert "with dropout 0.050 ± 0.050 (n = 3), without 0.600 ± 0.100 (n = 3); without dropout it rises larger by " \
           "+0.55 ± 0.03" in lines[1] and "paired t-test" in lines[1], lines


def test_architecture_tables_are_the_reports_but_task3e_second_dropout():
    """Tables 2, 6 and 10 rebuilt from the registry with the committed params: the same layers,
    but for task3e's second dropout, which params.yaml sets to the original code's 0.1."""
    from helpers import real_params

    from cifarcnn.config import resolve_run

    params = real_params()
    results = {run: [{"config": resolve_run(params, run).to_dict()}] for run in ("task2", "task3a_model2", "task3e")}
    text = "\n".join(report.architecture_section(results))
    assert "**`task2`** (model `task2`, 390,410 parameters). Layer for layer as the report's Table 2." in text
    assert "**`task3a_model2`** (model `task3_model2`, 826,730 parameters). Layer for layer as the report's Table 6." in text
    assert "Differs from the report's Table 10: row 17: ours Dropout(0.1), the report's Dropout(0.2)." in text
    assert re.search(r"\| Conv2D +\| 32 +\| ReLU +\| 5×5, stride 1, padding 2 +\| 32×32×32 +\|", text)


def test_the_old_layout_moves_into_the_folders(tmp_path):
    """`python -m cifarcnn.runfiles` (README, "Upgrading"): a workspace trained before session 18
    had each seed's files side by side in results/<run>/seed<n>/; they move into train/ and eval/,
    where the report reads exactly what it read before; a second run moves nothing."""
    import subprocess
    import sys

    results = tmp_path / "results"
    _fake_results(results, ["task2", "task3e"], seeds=(0, 1))
    expected = report.load_results(results, ["task2", "task3e"], [0, 1])
    for folder in results.glob("*/seed*/*"):  # back to the old layout
        for file in folder.iterdir():
            file.replace(folder.parent / file.name)
        folder.rmdir()
    (results / "task2" / "seed0" / "notes.txt").write_text("mine")  # not the stages': left alone
    assert report.load_results(results, ["task2", "task3e"], [0, 1]) == {}
    run = [sys.executable, "-m", "cifarcnn.runfiles"]
    out = subprocess.run(run, cwd=tmp_path, capture_output=True, text=True, check=True).stdout
    assert out.startswith("moved 16 file(s) into results/<run>/seed<n>/{train,eval}/; now run `dvc commit -f`"), out
    assert report.load_results(results, ["task2", "task3e"], [0, 1]) == expected
    assert (results / "task2" / "seed0" / "notes.txt").read_text() == "mine"
    again = subprocess.run(run, cwd=tmp_path, capture_output=True, text=True, check=True).stdout
    assert again.strip() == "moved 0 file(s) into results/<run>/seed<n>/{train,eval}/", again
