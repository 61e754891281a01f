"""The download stage's library: fetch -> verify -> extract -> convert, and every bad input."""
from __future__ import annotations

import http.server
import json
import os
import pickle
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from fixtures import (CLASSES, broken_image_folder, serve_directory, tar_with_member, write_archive, write_image_folder,
                      write_pickle_folder)

from helpers import tiny_params, write_params

from cifarcnn import fetch as fetch_mod
from cifarcnn.data import Dataset
from cifarcnn.ingest import prepare, read_image_folder, take_subset
from cifarcnn.errors import UserError

ROOT = Path(__file__).resolve().parents[1]


def no_leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name != "downloads")


def test_archive_over_http_round_trip(tmp_path):
    served = tmp_path / "served"
    served.mkdir()
    md5 = write_archive(served / "cifar-10-python.tar.gz", n_train=60, n_test=20)
    train_x, train_y, test_x, test_y = write_pickle_folder(tmp_path / "expected", n_train=60, n_test=20)
    out = tmp_path / "out" / "cifar10.npz"
    with serve_directory(served) as url:
        prepare(f"{url}/cifar-10-python.tar.gz", md5, None, out, tmp_path / "out" / "downloads")
    ds = Dataset.load(out)
    assert ds.classes == CLASSES
    assert ds.train_x.shape == (60, 32, 32, 3) and ds.train_x.dtype == np.uint8
    np.testing.assert_array_equal(ds.train_x, train_x)
    np.testing.assert_array_equal(ds.train_y, train_y)
    np.testing.assert_array_equal(ds.test_x, test_x)
    np.testing.assert_array_equal(ds.test_y, test_y)
    # The verified download is cached: a second prepare works with the server gone.
    prepare("http://127.0.0.1:9/cifar-10-python.tar.gz", md5, None, out, tmp_path / "out" / "downloads")


def test_wrong_md5_fails_and_leaves_nothing(tmp_path):
    served = tmp_path / "served"
    served.mkdir()
    write_archive(served / "cifar-10-python.tar.gz")
    out_dir = tmp_path / "out"
    with serve_directory(served) as url, pytest.raises(UserError, match=r"md5 of .*cifar-10-python.tar.gz.* expected 0{32}"):
        prepare(f"{url}/cifar-10-python.tar.gz", "0" * 32, None, out_dir / "cifar10.npz", out_dir / "downloads")
    assert not (out_dir / "cifar10.npz").exists()
    assert list((out_dir / "downloads").iterdir()) == []  # the bad download is not kept


class FlakyHandler(http.server.SimpleHTTPRequestHandler):
    """Sends only the first half of the file on the first request; honours Range after that."""

    calls = 0

    def log_message(self, *args):
        pass

    def do_GET(self):
        type(self).calls += 1
        data = Path(self.translate_path(self.path)).read_bytes()
        start = 0
        if rng := self.headers.get("Range"):
            start = int(rng.split("=")[1].split("-")[0])
        if type(self).calls == 1:
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            self.connection.shutdown(2)  # broken transfer
            return
        self.send_response(206 if start else 200)
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        self.wfile.write(data[start:])


def test_broken_transfer_is_resumed(tmp_path):
    served = tmp_path / "served"
    served.mkdir()
    md5 = write_archive(served / "a.tar.gz", n_train=200, n_test=40)
    FlakyHandler.calls = 0
    with serve_directory(served, handler=FlakyHandler) as url:
        path = fetch_mod.fetch(f"{url}/a.tar.gz", tmp_path / "dl", algorithm="md5", expected=md5, what="t")
    assert FlakyHandler.calls >= 2
    assert fetch_mod.file_digest(path, "md5") == md5


def test_unreachable_server_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(fetch_mod, "RETRIES", 2)
    with pytest.raises(UserError, match=r"could not download http://127\.0\.0\.1:9/x\.tar\.gz after 2 attempts"):
        fetch_mod.fetch("http://127.0.0.1:9/x.tar.gz", tmp_path, algorithm="md5", expected="0" * 32, what="t")


def test_http_404_is_one_clear_error(tmp_path):
    with serve_directory(tmp_path) as url, pytest.raises(UserError, match="HTTP 404"):
        fetch_mod.fetch(f"{url}/missing.tar.gz", tmp_path / "dl", algorithm="md5", expected="0" * 32, what="t")


def test_url_source_requires_md5(tmp_path):
    with pytest.raises(UserError, match="data.md5: null is only allowed for a local"):
        prepare("http://127.0.0.1:9/a.tar.gz", None, None, tmp_path / "o.npz", tmp_path)


@pytest.mark.parametrize("bytes_keys", [True, False])
def test_extracted_folder_with_str_or_bytes_keys(tmp_path, bytes_keys):
    train_x, *_ = write_pickle_folder(tmp_path / "src" / "cifar-10-batches-py", bytes_keys=bytes_keys)
    ds = prepare(str(tmp_path / "src"), None, None, tmp_path / "o.npz", tmp_path / "dl")
    np.testing.assert_array_equal(ds.train_x, train_x)
    assert ds.classes == CLASSES


def test_local_archive_checked_and_converted(tmp_path):
    md5 = write_archive(tmp_path / "a.tar.gz")
    ds = prepare(str(tmp_path / "a.tar.gz"), md5, None, tmp_path / "o.npz", tmp_path / "dl")
    assert len(ds.train_y) == 60 and len(ds.test_y) == 20


@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_image_folder_source(tmp_path, suffix):
    write_image_folder(tmp_path / "tree", n_train=40, n_test=20, suffix=suffix)
    ds = prepare(str(tmp_path / "tree"), None, None, tmp_path / "o.npz", tmp_path / "dl")
    assert ds.classes == sorted(CLASSES)
    assert ds.train_x.shape == (40, 32, 32, 3) and ds.test_x.shape == (20, 32, 32, 3)
    assert np.bincount(ds.train_y).tolist() == [4] * 10
    if suffix == ".png":  # lossless: pixels survive exactly
        from fixtures import fake_images
        x, y = fake_images(40, 0)
        first_plane = x[y == sorted(CLASSES).index("airplane")][0]
        np.testing.assert_array_equal(ds.train_x[0], first_plane)


def test_subset_is_first_n_stratified():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 10, 1000)
    ds = Dataset(np.zeros((1000, 32, 32, 3), np.uint8), y, np.zeros((500, 32, 32, 3), np.uint8),
                 rng.integers(0, 10, 500), CLASSES)
    sub = take_subset(ds, 105)
    assert len(sub.train_y) == 105 and len(sub.test_y) == 21
    assert np.bincount(sub.train_y).tolist() == [11] * 5 + [10] * 5
    first_of_class0 = np.flatnonzero(y == 0)[:11]
    assert np.array_equal(np.flatnonzero(np.isin(np.arange(1000), first_of_class0)), first_of_class0)


@pytest.mark.parametrize("subset, message", [(10, "leaves 2 test images"), (10**6, "more than the"), (0, "positive integer")])
def test_bad_subset(tmp_path, subset, message):
    write_pickle_folder(tmp_path / "src")
    with pytest.raises(UserError, match=message):
        prepare(str(tmp_path / "src"), None, subset, tmp_path / "o.npz", tmp_path / "dl")


# --- bad inputs: one clear line naming the file, nothing written --------------------------

def _bad_case(tmp_path: Path, case: str) -> tuple[str, str | None, str]:
    src = tmp_path / "src"
    if case == "truncated":
        write_archive(tmp_path / "good.tar.gz")
        data = (tmp_path / "good.tar.gz").read_bytes()
        (tmp_path / "bad.tar.gz").write_bytes(data[: len(data) // 2])
        return str(tmp_path / "bad.tar.gz"), None, "bad.tar.gz: not a readable .tar.gz"
    if case == "not_gzip":
        (tmp_path / "bad.tar.gz").write_bytes(b"this is not an archive at all" * 10)
        return str(tmp_path / "bad.tar.gz"), None, "bad.tar.gz: not a readable .tar.gz"
    if case == "missing_batch":
        write_pickle_folder(src)
        (src / "data_batch_3").unlink()
        return str(src), None, "missing batch file data_batch_3"
    if case == "escaping_entry":
        tar_with_member(tmp_path / "bad.tar.gz", "../evil.txt")
        return str(tmp_path / "bad.tar.gz"), None, "unsafe archive entry '../evil.txt'"
    if case == "absolute_entry":
        tar_with_member(tmp_path / "bad.tar.gz", "/tmp/evil.txt")
        return str(tmp_path / "bad.tar.gz"), None, "unsafe archive entry"
    if case == "link_out":
        tar_with_member(tmp_path / "bad.tar.gz", "cifar/link", symlink_to="/etc/passwd")
        return str(tmp_path / "bad.tar.gz"), None, "unsafe archive entry 'cifar/link'"
    if case == "wrong_shape":
        write_pickle_folder(src)
        with open(src / "data_batch_2", "wb") as fh:
            pickle.dump({b"data": np.zeros((12, 100), np.uint8), b"labels": [0] * 12}, fh)
        return str(src), None, r"data_batch_2: data has shape \(12, 100\), expected \[N, 3072\]"
    messages = {
        "wrong_image_size": r"odd.png: image is 28x28, expected 32x32",
        "empty_class": r"test/dog: empty class folder",
        "not_an_image": r"broken.jpg: not a readable image",
        "nine_classes": r"train: expected the ten CIFAR-10 class folders \(.*\); missing: truck$",
        "eleven_classes": r"test: expected the ten CIFAR-10 class folders \(.*\); not a CIFAR-10 class: zebra$",
        "unknown_extension": r"train/cat/x\.webp: not a \.bmp/\.jpeg/\.jpg/\.png image \(and 1 more\); convert or remove it",
    }
    if case in messages:
        return str(broken_image_folder(src, case)), None, messages[case]
    raise AssertionError(case)


BAD_CASES = ["truncated", "not_gzip", "missing_batch", "escaping_entry", "absolute_entry", "link_out",
             "wrong_shape", "wrong_image_size", "empty_class", "not_an_image", "nine_classes", "eleven_classes",
             "unknown_extension"]


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_input_is_one_clear_error_and_no_output(tmp_path, case):
    source, md5, message = _bad_case(tmp_path, case)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    with pytest.raises(UserError, match=message) as err:
        prepare(source, md5, None, out_dir / "cifar10.npz", out_dir / "downloads")
    assert "\n" not in str(err.value)
    assert no_leftovers(out_dir) == []
    assert not (tmp_path / "evil.txt").exists()


def test_sixteen_bit_and_palette_images_read_as_their_colours(tmp_path):
    """A 16-bit grey PNG keeps its top 8 bits (Pillow's convert("RGB") would clip it to 255, almost
    white); a palette PNG reads as its RGB colours."""
    from PIL import Image

    write_image_folder(tmp_path / "tree", n_train=40, n_test=20)
    cat = sorted((tmp_path / "tree" / "train" / "cat").iterdir())
    Image.fromarray(np.full((32, 32), 122 * 256 + 200, np.uint16)).save(cat[0])
    colours = np.zeros((32, 32, 3), np.uint8)
    colours[:16] = (200, 30, 90)
    Image.fromarray(colours).convert("P", palette=Image.Palette.ADAPTIVE, colors=4).save(cat[1])
    ds = read_image_folder(tmp_path / "tree")
    files = sorted(p for c in CLASSES for p in (tmp_path / "tree" / "train" / c).iterdir())
    first, second = files.index(cat[0]), files.index(cat[1])
    assert (ds.train_x[first] == 122).all()
    np.testing.assert_array_equal(ds.train_x[second], colours)


def test_stage_script_prints_one_line_and_exits_2(tmp_path):
    """The real stage script, run as DVC runs it, on a corrupted archive."""
    (tmp_path / "bad.tar.gz").write_bytes(b"\x1f\x8b garbage")
    params = tiny_params()
    params["data"].update(source=str(tmp_path / "bad.tar.gz"), md5=None)
    write_params(tmp_path / "params.yaml", params)
    proc = subprocess.run([sys.executable, str(ROOT / "stages" / "download.py")], cwd=tmp_path,
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and proc.stderr.startswith("error: ")
    assert "bad.tar.gz" in proc.stderr
    assert not (tmp_path / "data" / "cifar10.npz").exists()


def test_load_rejects_wrong_file(tmp_path):
    (tmp_path / "x.npz").write_bytes(b"junk")
    with pytest.raises(UserError, match="not a valid dataset file"):
        Dataset.load(tmp_path / "x.npz")
    with pytest.raises(UserError, match="run `dvc repro download` first"):
        Dataset.load(tmp_path / "missing.npz")


def test_batch_file_cannot_run_code(tmp_path):
    write_pickle_folder(tmp_path / "src")

    class Evil:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    with open(tmp_path / "src" / "data_batch_1", "wb") as fh:
        pickle.dump({b"data": Evil(), b"labels": []}, fh)
    with pytest.raises(UserError, match="data_batch_1: not a readable CIFAR batch file .*refusing to load"):
        prepare(str(tmp_path / "src"), None, None, tmp_path / "o.npz", tmp_path / "dl")
    assert not (tmp_path / "pwned").exists()


class TrickleHandler(http.server.SimpleHTTPRequestHandler):
    """Announces a large file, then sends one byte every 0.3 s: each read 'makes progress'."""

    def log_message(self, *args):
        pass

    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", str(10 ** 6))
        self.end_headers()
        try:
            for _ in range(200):
                self.wfile.write(b"x")
                self.wfile.flush()
                time.sleep(0.3)
        except OSError:  # the client gave up: what the test wants
            pass


def test_trickling_server_fails_within_the_no_progress_limit(tmp_path, monkeypatch):
    monkeypatch.setattr(fetch_mod, "STALL_WINDOW_S", 2)
    started = time.monotonic()
    with serve_directory(tmp_path, handler=TrickleHandler) as url, pytest.raises(UserError) as err:
        fetch_mod.fetch(f"{url}/cifar.tar.gz", tmp_path / "dl", algorithm="md5", expected="0" * 32, what="data.source")
    took = time.monotonic() - started
    message = str(err.value)
    assert 2 <= took < 30, took  # the 2 s window, not the 300 s the server would trickle for
    assert re.search(rf"data\.source: {url}/cifar\.tar\.gz sent \d+ bytes in 2 s \(less than 16384 bytes per 2 s\); "
                     rf"gave up after \d+ bytes\. .*put it at {re.escape(str(tmp_path / 'dl' / 'cifar.tar.gz'))}", message), message
    assert not any((tmp_path / "dl").iterdir())  # no partial file left


def test_slow_server_fails_at_the_total_limit(tmp_path, monkeypatch):
    monkeypatch.setattr(fetch_mod, "TOTAL_LIMIT_S", 1.5)
    started = time.monotonic()
    with serve_directory(tmp_path, handler=TrickleHandler) as url, pytest.raises(UserError, match=r"took longer than the 1\.5 s limit; gave up after \d+ bytes"):
        fetch_mod.fetch(f"{url}/cifar.tar.gz", tmp_path / "dl", algorithm="md5", expected="0" * 32, what="data.source")
    assert time.monotonic() - started < 30  # the 1.5 s limit, not the 300 s of trickling


def test_validation_split_is_the_originals_on_a_generated_archive(tmp_path):
    """The original: np.random.seed(0); np.random.choice(N, N // 10, replace=False) over the
    archive's order (data_batch_1..5). Here a generated 1,000-image archive, through the download
    stage's library and the training splits."""
    import torch

    from cifarcnn.batches import make_splits, split_record

    md5 = write_archive(tmp_path / "cifar-10-python.tar.gz", n_train=1000, n_test=200)
    ds = prepare(str(tmp_path / "cifar-10-python.tar.gz"), md5, None, tmp_path / "cifar10.npz", tmp_path / "dl")
    ds = Dataset.load(tmp_path / "cifar10.npz")
    np.random.seed(0)
    original = np.random.choice(1000, 100, replace=False)
    record = split_record(ds, 0.1, 0)
    assert record["val_indices"] == sorted(original.tolist())
    assert record["method"] == "np.random.seed(0); np.random.choice(1000, 100, replace=False)"
    assert "official archive's order" in record["order"] and record["train_images"] == 900
    splits = make_splits(ds, 0.1, 0, torch.device("cpu"))
    expected_val = torch.from_numpy(ds.train_x[np.sort(original)]).permute(0, 3, 1, 2)
    assert torch.equal(splits["val"].x, expected_val)
    train_rows = {bytes(img) for img in splits["train"].x.permute(0, 2, 3, 1).numpy()}
    assert not train_rows & {bytes(img) for img in ds.train_x[original]}  # held out, not trained on
    assert len(splits["train"]) == 900
    np.random.seed(123)
    before = np.random.get_state()[1].copy()
    split_record(ds, 0.1, 0)
    np.testing.assert_array_equal(np.random.get_state()[1], before)  # numpy's global state is left alone


def test_image_folder_split_says_which_order_its_indices_mean(tmp_path):
    from cifarcnn.batches import split_record

    write_image_folder(tmp_path / "folder", n_train=100, n_test=20)
    prepare(str(tmp_path / "folder"), None, None, tmp_path / "cifar10.npz", tmp_path / "dl")
    order = split_record(Dataset.load(tmp_path / "cifar10.npz"), 0.1, 0)["order"]
    assert "image folder" in order and "not the official archive's order" in order
    subset = prepare(str(tmp_path / "folder"), None, 50, tmp_path / "sub.npz", tmp_path / "dl")
    assert subset.train_order.startswith("the first 50 training images") and "image folder" in subset.train_order


def test_editing_an_image_of_a_local_source_reruns_download(tmp_path):
    """A local image folder as data.source: `dvc repro download` re-runs when one image in it
    changes (the always-run `source` stage keys its files), and only then."""
    from fixtures import tiny_project
    from helpers import ran_stages, sh

    folder = tmp_path / "images"
    write_image_folder(folder, n_train=40, n_test=20)
    with tiny_project(tmp_path / "work") as (repo, env):
        text = (repo / "params.yaml").read_text()
        for key, value in (("source", str(folder)), ("md5", "null"), ("subset", "null")):
            text, n = re.subn(rf"^(\s*{key}:) \S+", rf"\g<1> {value}", text, count=1, flags=re.M)
            assert n == 1, key
        (repo / "params.yaml").write_text(text)
        first = sh(["dvc", "repro", "download"], repo, env)
        assert ran_stages(first) == ["source", "download"], first
        npz = (repo / "data" / "cifar10.npz").read_bytes()
        again = sh(["dvc", "repro", "download"], repo, env)
        assert ran_stages(again) == ["source"] and "Stage 'download' didn't change" in again, again
        image = sorted((folder / "train").rglob("*.png"))[0]
        from PIL import Image

        pixels = np.asarray(Image.open(image)).copy()
        Image.fromarray(255 - pixels).save(image)  # the same name, other content
        edited = sh(["dvc", "repro", "download"], repo, env)
        assert ran_stages(edited) == ["source", "download"], edited
        assert (repo / "data" / "cifar10.npz").read_bytes() != npz
        key = json.loads((repo / "data" / "source.json").read_text())
        assert key["kind"] == "folder" and key["files"] == 60
