"""CIFAR-10 in: fetch, verify, extract and convert a source to ``data/cifar10.npz`` (the download stage).

Sources (``data.source``): the official python archive by URL or local path, its extracted
folder, or an image-folder tree (``train/<class>/*.png|jpg``, ``test/<class>/...``).
"""
from __future__ import annotations

import pickle
import tarfile
import tempfile
from pathlib import Path

import numpy as np

from .data import IMAGE_SHAPE, Dataset
from .errors import UserError
from .fetch import fetch, is_url

TRAIN_BATCHES = [f"data_batch_{i}" for i in range(1, 6)]
TEST_BATCH = "test_batch"
META = "batches.meta"
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp"}
# The ten classes, in CIFAR-10's label order (also alphabetical): an image folder must have
# exactly these in train/ and in test/, so labels, the report's per-class tables and the served
# model's class names mean what they say.
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
SIXTEEN_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I"}  # Pillow's modes for 16-bit grey PNG/TIFF
ORDER_ARCHIVE = "the official archive's order (data_batch_1 ... data_batch_5), as the original indexed it"
ORDER_FOLDER = ("an image folder's order: classes sorted by name, files sorted by name within a class "
                "(not the official archive's order, so the original's indices pick other images)")
TEST_PER_TRAIN = 5  # data.subset keeps N train and N / 5 test images (CIFAR's 50k / 10k ratio)


# --- the official python-pickle format -------------------------------------------------

class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays and plain containers only: a batch file cannot run code."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def _unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as fh:
            raw = _ArrayUnpickler(fh, encoding="bytes").load()
    except FileNotFoundError:
        raise UserError(f"missing batch file {path.name} in {path.parent}") from None
    except Exception as err:  # truncated or not a pickle
        raise UserError(f"{path}: not a readable CIFAR batch file ({err})") from err
    if not isinstance(raw, dict):
        raise UserError(f"{path}: expected a dict, found {type(raw).__name__}")
    # Keys are bytes when pickled by Python 2 (the official archive), str otherwise.
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in raw.items()}


def _read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    batch = _unpickle(path)
    try:
        flat = np.asarray(batch["data"], dtype=np.uint8)
        labels = np.asarray(batch["labels"], dtype=np.int64)
    except KeyError as err:
        raise UserError(f"{path}: batch has no {err.args[0]!r} entry") from None
    if flat.ndim != 2 or flat.shape[1] != 3 * 32 * 32:
        raise UserError(f"{path}: data has shape {flat.shape}, expected [N, 3072]")
    if labels.shape != (len(flat),):
        raise UserError(f"{path}: {len(flat)} images but {labels.size} labels")
    # Rows are channel-major (1024 R, 1024 G, 1024 B); store HWC like an image file.
    return flat.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).copy(), labels


def _batches_folder(root: Path) -> Path | None:
    """The folder holding ``data_batch_1`` etc.: ``root`` or one level below it."""
    for candidate in [root, *sorted(p for p in root.iterdir() if p.is_dir())]:
        if (candidate / TEST_BATCH).exists() or (candidate / TRAIN_BATCHES[0]).exists():
            return candidate
    return None


def read_pickle_folder(folder: Path) -> Dataset:
    meta = _unpickle(folder / META)
    classes = [c.decode() if isinstance(c, bytes) else str(c) for c in meta.get("label_names", [])]
    if not classes:
        raise UserError(f"{folder / META}: no label_names")
    parts = [_read_batch(folder / name) for name in TRAIN_BATCHES]
    test_x, test_y = _read_batch(folder / TEST_BATCH)
    ds = Dataset(np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]),
                 test_x, test_y, classes, ORDER_ARCHIVE)
    ds.validate(str(folder))
    return ds


def extract_archive(archive: Path, target: Path) -> None:
    """Extract a .tar.gz safely: no absolute paths, no ``..``, no links out of ``target``."""
    try:
        with tarfile.open(archive, "r:gz") as tar:
            for member in tar.getmembers():  # the data filter would silently strip a leading "/"
                if member.name.startswith(("/", "\\")) or ".." in Path(member.name).parts:
                    raise UserError(f"{archive}: unsafe archive entry {member.name!r} "
                                    "(absolute or outside the target folder); refusing to extract")
            tar.extractall(target, filter="data")
    except tarfile.FilterError as err:
        raise UserError(f"{archive}: unsafe archive entry {err.tarinfo.name!r} ({err}); refusing to extract") from err
    except (tarfile.TarError, EOFError, OSError) as err:
        raise UserError(f"{archive}: not a readable .tar.gz archive ({err})") from err


# --- the image-folder format -----------------------------------------------------------

def _class_folders(root: Path) -> None:
    """One line naming what differs when ``root``/train and ``root``/test do not hold exactly the
    ten CIFAR-10 class folders."""
    for split in ("train", "test"):
        folder = root / split
        if not folder.is_dir():
            raise UserError(f"{folder}: missing (an image folder has train/<class>/ and test/<class>/)")
        found = {p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")}
        missing, extra = sorted(set(CIFAR10_CLASSES) - found), sorted(found - set(CIFAR10_CLASSES))
        if missing or extra:
            what = "; ".join(part for part in (f"missing: {', '.join(missing)}" if missing else "",
                                               f"not a CIFAR-10 class: {', '.join(extra)}" if extra else "") if part)
            raise UserError(f"{folder}: expected the ten CIFAR-10 class folders ({', '.join(CIFAR10_CLASSES)}); {what}")


def _image_files(folder: Path) -> list[Path]:
    """A class folder's images, by name; anything else there (but hidden files) is refused."""
    entries = sorted(p for p in folder.iterdir() if not p.name.startswith("."))
    others = [p for p in entries if p.is_dir() or p.suffix.lower() not in IMAGE_SUFFIXES]
    if others:
        more = f" (and {len(others) - 1} more)" if len(others) > 1 else ""
        raise UserError(f"{others[0]}: not a {'/'.join(sorted(IMAGE_SUFFIXES))} image{more}; convert or remove it "
                        f"(a file skipped silently would change the data without a word)")
    if not entries:
        raise UserError(f"{folder}: empty class folder (no .png/.jpg images)")
    return entries


def _rgb8(img, file: Path) -> np.ndarray:
    """Pillow image -> HxWx3 uint8. 16-bit grey keeps its top 8 bits (Pillow's convert("RGB")
    clips it to 255: almost white); palette, grey and alpha images convert as Pillow does."""
    if img.mode in SIXTEEN_BIT_MODES:
        grey = np.asarray(img, dtype=np.int64)
        if grey.min() < 0 or grey.max() > 0xFFFF:
            raise UserError(f"{file}: a {img.mode} image with values outside 0..65535; save it as 8-bit RGB")
        return np.repeat((grey >> 8).astype(np.uint8)[..., None], 3, axis=2)
    if img.mode == "F":
        raise UserError(f"{file}: a floating-point image (mode F) has no fixed scale; save it as 8-bit RGB")
    return np.asarray(img.convert("RGB"), dtype=np.uint8)


def read_image_folder(root: Path) -> Dataset:
    from PIL import Image, UnidentifiedImageError

    _class_folders(root)
    classes = list(CIFAR10_CLASSES)
    splits = {}
    for split in ("train", "test"):
        images, labels = [], []
        for label, name in enumerate(classes):
            for file in _image_files(root / split / name):
                try:
                    with Image.open(file) as img:
                        array = _rgb8(img, file)
                except (UnidentifiedImageError, OSError) as err:
                    raise UserError(f"{file}: not a readable image ({err})") from err
                if array.shape != IMAGE_SHAPE:
                    raise UserError(f"{file}: image is {array.shape[1]}x{array.shape[0]}, expected 32x32")
                images.append(array)
                labels.append(label)
        splits[split] = (np.stack(images), np.asarray(labels, dtype=np.int64))
    return Dataset(*splits["train"], *splits["test"], classes, ORDER_FOLDER)


# --- subset and the whole conversion ---------------------------------------------------

def stratified_first(labels: np.ndarray, n: int, num_classes: int, what: str) -> np.ndarray:
    """Indices of the first ``n`` items, balanced over classes (the remainder to the lowest labels)."""
    per_class = [n // num_classes + (1 if c < n % num_classes else 0) for c in range(num_classes)]
    chosen = []
    for c, k in enumerate(per_class):
        idx = np.flatnonzero(labels == c)
        if len(idx) < k:
            raise UserError(f"data.subset: {what} class {c} has {len(idx)} images, {k} requested")
        chosen.append(idx[:k])
    return np.sort(np.concatenate(chosen))


def take_subset(ds: Dataset, subset: int | None) -> Dataset:
    if subset is None:
        return ds
    n_classes = len(ds.classes)
    n_test = subset // TEST_PER_TRAIN
    if subset > len(ds.train_y):
        raise UserError(f"data.subset: {subset} is more than the {len(ds.train_y)} training images")
    if n_test < n_classes:
        raise UserError(f"data.subset: {subset} leaves {n_test} test images for {n_classes} classes; "
                        f"use at least {n_classes * TEST_PER_TRAIN}")
    tr = stratified_first(ds.train_y, subset, n_classes, "train")
    te = stratified_first(ds.test_y, n_test, n_classes, "test")
    return Dataset(ds.train_x[tr], ds.train_y[tr], ds.test_x[te], ds.test_y[te], ds.classes,
                   f"the first {subset} training images, balanced over classes, of: {ds.train_order}")


def read_source(source: str, md5: str | None, cache_dir: Path) -> Dataset:
    """Read any supported ``data.source`` into memory (downloading and verifying if a URL)."""
    if md5 is None and is_url(source):
        raise UserError("data.md5: null is only allowed for a local data.source; "
                        "set the archive's md5 for a URL")
    local = fetch(source, cache_dir, algorithm="md5", expected=md5, what="data.source")
    if local.is_dir():
        if md5 is not None:
            raise UserError(f"data.md5 is set but data.source {local} is a folder; set data.md5: null")
        if (local / "train").is_dir():
            return read_image_folder(local)
        folder = _batches_folder(local)
        if folder is None:
            raise UserError(f"{local}: neither an image-folder tree (train/, test/) nor a CIFAR "
                            f"batches folder (data_batch_1..5, test_batch, batches.meta)")
        return read_pickle_folder(folder)
    with tempfile.TemporaryDirectory(dir=cache_dir, prefix=".extract-") as tmp:
        extract_archive(local, Path(tmp))
        folder = _batches_folder(Path(tmp))
        if folder is None:
            raise UserError(f"{local}: archive holds no CIFAR batch files (data_batch_1..5, test_batch)")
        return read_pickle_folder(folder)


def prepare(source: str, md5: str | None, subset: int | None, out: Path, cache_dir: Path) -> Dataset:
    """The download stage: any source -> verified, optionally subset -> ``out`` (.npz)."""
    if subset is not None and (not isinstance(subset, int) or isinstance(subset, bool) or subset <= 0):
        raise UserError(f"data.subset must be null or a positive integer, got {subset!r}")
    cache_dir.mkdir(parents=True, exist_ok=True)
    ds = take_subset(read_source(str(source), md5, cache_dir), subset)
    ds.save(out)
    return ds
