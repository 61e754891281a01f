"""The Task 4 inputs the download stage fetches besides CIFAR-10: ResNet18 weights, the photo."""
from __future__ import annotations

import shutil
from pathlib import Path

from .errors import UserError
from .fetch import fetch
from .fsutil import atomic_path, file_digest
from .models import RESNET18_IMAGENET_FILE, RESNET18_IMAGENET_SHA256, RESNET18_IMAGENET_URL

PRETRAINED_DIR = RESNET18_IMAGENET_FILE.parent  # a DVC output: the weights file, or empty
PHOTO = Path("data/viz_image")  # a DVC output: the photo for Task 4b/4c, as fetched


def _copy(src: Path, dest: Path) -> None:
    with atomic_path(dest) as tmp:
        shutil.copyfile(src, tmp)


ABOUT = "ABOUT.txt"  # what data/pretrained holds: never an empty DVC output (DVC warns on every use of one)


def fetch_resnet_weights(resnet_weights: str, cache_dir: Path, out_dir: Path = PRETRAINED_DIR) -> Path | None:
    """``imagenet``: fetch torchvision's file (SHA-256 checked) into ``out_dir``; anything else
    leaves only ABOUT.txt there, which says why there are no weights."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if resnet_weights != "imagenet":
        (out_dir / RESNET18_IMAGENET_FILE.name).unlink(missing_ok=True)
        _write_about(out_dir, f"resnet_weights: {resnet_weights}: no ImageNet weights here; task4a's ResNet18 "
                              + ("starts from random weights" if resnet_weights == "none" else
                                 f"loads {resnet_weights}") + ".\n")
        return None
    _write_about(out_dir, f"resnet_weights: imagenet: {RESNET18_IMAGENET_FILE.name} from {RESNET18_IMAGENET_URL} "
                          f"(sha256 {RESNET18_IMAGENET_SHA256}).\n")
    src = fetch(RESNET18_IMAGENET_URL, cache_dir, algorithm="sha256", expected=RESNET18_IMAGENET_SHA256,
                what="resnet_weights: imagenet")
    dest = out_dir / RESNET18_IMAGENET_FILE.name
    _copy(src, dest)
    return dest


def _write_about(out_dir: Path, text: str) -> None:
    with atomic_path(out_dir / ABOUT) as tmp:
        tmp.write_text(text)


def fetch_photo(image: str, sha256: str | None, cache_dir: Path, out: Path = PHOTO) -> tuple[Path, str]:
    """The photo (URL or local path) -> ``out``; returns it and its SHA-256 (to pin in params)."""
    from PIL import Image, UnidentifiedImageError

    src = fetch(image, cache_dir, algorithm="sha256", expected=sha256, what="viz.image", require_checksum=False)
    if src.is_dir():
        raise UserError(f"viz.image: {src} is a folder; give an image file or URL")
    try:
        with Image.open(src) as img:
            img.verify()
    except (UnidentifiedImageError, OSError) as err:
        raise UserError(f"viz.image: {src} is not an image PIL can read ({err})") from err
    _copy(src, out)
    return out, file_digest(out, "sha256")
