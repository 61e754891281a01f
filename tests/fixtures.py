"""Tiny CIFAR-format datasets made on the spot, and a loopback HTTP server to fetch them from."""
from __future__ import annotations

import contextlib
import functools
import hashlib
import http.server
import io
import os
import pickle
import re
import shutil
import subprocess
import sys
import tarfile
import threading
from pathlib import Path

import numpy as np

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def fake_images(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` 32x32 RGB images whose mean colour depends on the label (so a model can learn it)."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % len(CLASSES)
    rng.shuffle(labels)
    base = (labels[:, None, None, None] * 25 + 10).astype(np.int16)
    noise = rng.integers(-10, 11, size=(n, 32, 32, 3))
    images = np.clip(base + noise + np.array([0, 40, 80]), 0, 255).astype(np.uint8)
    return images, labels


def write_pickle_folder(folder: Path, n_train: int = 60, n_test: int = 20, seed: int = 0,
                        bytes_keys: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The official python layout: data_batch_1..5, test_batch, batches.meta."""
    folder.mkdir(parents=True, exist_ok=True)
    key = (lambda s: s.encode()) if bytes_keys else (lambda s: s)
    train_x, train_y = fake_images(n_train, seed)
    test_x, test_y = fake_images(n_test, seed + 1)

    def dump(name: str, x: np.ndarray, y: np.ndarray) -> None:
        flat = x.transpose(0, 3, 1, 2).reshape(len(x), -1)  # channel-major rows, as the original
        with open(folder / name, "wb") as fh:
            pickle.dump({key("data"): flat, key("labels"): y.tolist(), key("batch_label"): key(name)}, fh)

    for i, part in enumerate(np.array_split(np.arange(n_train), 5), start=1):
        dump(f"data_batch_{i}", train_x[part], train_y[part])
    dump("test_batch", test_x, test_y)
    with open(folder / "batches.meta", "wb") as fh:
        pickle.dump({key("label_names"): [key(c) if bytes_keys else c for c in CLASSES]}, fh)
    return train_x, train_y, test_x, test_y


def write_archive(path: Path, **kwargs) -> str:
    """A ``cifar-10-python.tar.gz`` lookalike; returns its md5."""
    staging = path.parent / "staging"
    write_pickle_folder(staging / "cifar-10-batches-py", **kwargs)
    with tarfile.open(path, "w:gz") as tar:
        tar.add(staging / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    return hashlib.md5(path.read_bytes()).hexdigest()


def write_image_folder(root: Path, n_train: int = 40, n_test: int = 20, seed: int = 0, suffix: str = ".png") -> None:
    from PIL import Image

    for split, n, s in (("train", n_train, seed), ("test", n_test, seed + 1)):
        x, y = fake_images(n, s)
        for i, (img, label) in enumerate(zip(x, y)):
            folder = root / split / CLASSES[label]
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(folder / f"{i:04d}{suffix}")


BROKEN_FOLDERS = ("nine_classes", "eleven_classes", "unknown_extension", "sixteen_bit", "wrong_image_size",
                  "empty_class", "not_an_image")


def broken_image_folder(root: Path, case: str) -> Path:
    """An image-folder tree (write_image_folder) broken one way, as a user's own data might be:
    a class missing from train/, an eleventh class, a .webp and a .gif, every image a 16-bit grey
    PNG (of 122 * 256 + 200), a 28x28 image, an empty class folder, a .jpg that is not an image."""
    from PIL import Image

    write_image_folder(root)
    if case == "nine_classes":  # a class present only in test/
        shutil.rmtree(root / "train" / "truck")
    elif case == "eleven_classes":
        shutil.copytree(root / "test" / "cat", root / "test" / "zebra")
    elif case == "unknown_extension":
        Image.new("RGB", (32, 32)).save(root / "train" / "cat" / "x.webp")
        (root / "train" / "cat" / "y.gif").write_bytes(b"GIF8")
    elif case == "sixteen_bit":
        for path in root.rglob("*.png"):
            Image.fromarray(np.full((32, 32), 122 * 256 + 200, np.uint16)).save(path)
    elif case == "wrong_image_size":
        Image.new("RGB", (28, 28)).save(root / "train" / "cat" / "odd.png")
    elif case == "empty_class":
        for path in (root / "test" / "dog").iterdir():
            path.unlink()
    elif case == "not_an_image":
        (root / "train" / "cat" / "broken.jpg").write_bytes(b"nope")
    else:
        raise AssertionError(f"no broken image folder {case!r}: one of {BROKEN_FOLDERS}")
    return root


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:  # keep test output clean
        pass


@contextlib.contextmanager
def serve_directory(directory: Path, handler=_QuietHandler):
    """Serve ``directory`` on a free 127.0.0.1 port; yields the base URL."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(directory)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def tar_with_member(path: Path, name: str, data: bytes = b"x", symlink_to: str | None = None) -> None:
    with tarfile.open(path, "w:gz") as tar:
        info = tarfile.TarInfo(name)
        if symlink_to is not None:
            info.type, info.linkname = tarfile.SYMTYPE, symlink_to
            tar.addfile(info)
        else:
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def stripes_photo(size: int = 224, period: int = 16) -> np.ndarray:
    """An RGB photo of vertical black and white stripes over a green lower half."""
    img = np.zeros((size, size, 3), np.uint8)
    stripes = ((np.arange(size) // (period // 2)) % 2 * 255).astype(np.uint8)
    img[:, :, :] = stripes[None, :, None]
    img[size // 2:, :, 0] //= 3
    img[size // 2:, :, 2] //= 3
    return img


def copy_tracked(repo: Path) -> Path:
    """This repository's tracked files (as they are in the working tree) copied into ``repo``."""
    root = Path(__file__).resolve().parents[1]
    files = subprocess.run(["git", "ls-files", "-z"], cwd=root, capture_output=True, text=True, check=True).stdout
    for rel in filter(None, files.split("\0")):
        if (root / rel).is_file():
            (repo / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(root / rel, repo / rel)
    return repo


def set_params(text: str, values: dict[str, str]) -> str:
    """params.yaml's text with the first ``key: value`` line of each key set, edited line by line
    (its comments and anchors are part of what DVC rewrites)."""
    for key, value in values.items():
        text, n = re.subn(rf"^(\s*{key}:) \S+", rf"\g<1> {value}", text, count=1, flags=re.M)
        assert n == 1, key
    return text


def project_env() -> dict[str, str]:
    """This environment for a scratch project: no MLFLOW_*/DVC_* of the caller's, this Python's
    tools (dvc, mlflow) first on PATH, a git identity."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    env.update(PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
               GIT_AUTHOR_NAME="smoke", GIT_AUTHOR_EMAIL="smoke@example.com",
               GIT_COMMITTER_NAME="smoke", GIT_COMMITTER_EMAIL="smoke@example.com", DVC_NO_ANALYTICS="1")
    return env


def commit_all(repo: Path, env: dict[str, str], message: str) -> None:
    """``repo`` a new git repository with everything in it committed."""
    for args in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", message]):
        subprocess.run(args, cwd=repo, env=env, check=True, capture_output=True)


@contextlib.contextmanager
def tiny_project(work: Path, runs: list[str] | None = None, task4a_size: int | None = None):
    """The project's tracked files in a new git repo under ``work``, with params shrunk as CI
    runs it (300 generated images served on 127.0.0.1, one epoch, resnet_weights: none);
    yields (repo, env) while the data is served. ``env``: this environment without MLFLOW_*/DVC_*.
    ``runs``: keep only these entries of params.yaml's runs; ``task4a_size``: task4a's input size
    (224 by default; 64 trains it in a tenth of the time, as the README's CPU advice)."""
    from PIL import Image

    repo = copy_tracked(work / "repo")
    served = work / "served"
    served.mkdir()
    md5 = write_archive(served / "cifar-10-python.tar.gz", n_train=400, n_test=100)
    Image.fromarray(stripes_photo()).save(served / "photo.png")
    env = project_env()
    with serve_directory(served) as url:
        text = set_params((repo / "params.yaml").read_text(), {
            "source": f"{url}/cifar-10-python.tar.gz", "md5": md5, "subset": "300", "max_epochs": "1",
            "resnet_weights": "none", "image": f"{url}/photo.png"})
        if task4a_size is not None:
            text, n = re.subn(r"^(    input:  # resized per batch on the device\n      size:) 224$", rf"\g<1> {task4a_size}", text,
                              flags=re.M)
            assert n == 1, "task4a's input size"
        if runs is not None:  # drop whole entries of runs: (the block from "  <name>:" to the next one)
            blocks = re.split(r"(?m)^(?=  \w+:)", text[text.index("\nruns:\n") + len("\nruns:\n"):])
            kept = [b for b in blocks if b.split(":", 1)[0].strip() in runs]
            assert len(kept) == len(runs), runs
            text = text[:text.index("\nruns:\n") + len("\nruns:\n")] + "".join(kept)
        (repo / "params.yaml").write_text(text)
        commit_all(repo, env, "tiny project")
        yield repo, env
