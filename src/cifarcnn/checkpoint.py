"""Checkpoints on disk: written atomically, read safely (``weights_only``), turned back into a model.

Every stage that reads a trained model (evaluate, visualize, the served model) comes here, not
to the training loop, so a change to the loop is not a change to them.
"""
from __future__ import annotations

from pathlib import Path

import torch

from .config import RunConfig
from .errors import UserError
from .fsutil import atomic_path, file_digest, write_error
from .models import create_model


def cpu_copy(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's state on the CPU, detached from further training."""
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def save_checkpoint(path: Path, payload: dict) -> None:
    """Atomic: a kill during the write leaves the previous checkpoint intact.

    Written through a file object: given a path, torch.save names the zip's records after the
    file (here a random temporary name), so the same weights made a different file each time,
    and DVC and run.json saw a new checkpoint. Now the bytes depend on the payload alone."""
    with atomic_path(path, suffix=".pt") as tmp:
        try:
            with open(tmp, "wb") as f:
                torch.save(payload, f)
        except RuntimeError as err:  # torch's writer reports a full disk as a RuntimeError
            raise write_error(path, err) from err


def load_checkpoint(path: Path, mmap: bool = False) -> dict:
    """``mmap=True`` maps the tensors instead of reading them: for a look at a state's
    config, step and run id without reading its weights and optimizer moments."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as err:
        raise UserError(f"{path}: not a readable checkpoint ({err}); delete it to start over") from err


def load_best_model(path: str | Path) -> tuple[torch.nn.Module, RunConfig, dict]:
    """A best checkpoint -> (model in eval mode on CPU, its config, the checkpoint)."""
    ckpt = load_checkpoint(Path(path))
    cfg = RunConfig.from_dict(ckpt["config"])
    model = create_model(cfg.model, **cfg.model_params)  # its own weights replace any pretrained ones
    model.load_state_dict(ckpt["model"])
    return model.eval(), cfg, ckpt


def verified_checkpoint(path: Path, sha256: str | None, stage: str) -> Path:
    """``path``, after checking it is the file its train stage wrote (the digest in run.json):
    a changed or corrupted checkpoint is never scored, served or drawn."""
    if not path.exists():
        raise UserError(f"{path} does not exist; run `dvc repro {stage}`")
    if sha256 is not None and file_digest(path, "sha256") != sha256:
        raise UserError(f"{path} is not the checkpoint `{stage}` wrote (its sha256 differs from run.json's); "
                        f"rebuild it with `dvc repro --force {stage}`")
    return path
