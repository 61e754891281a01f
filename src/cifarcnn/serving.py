"""A model people can use: raw images in, class names and probabilities out.

An MLflow pyfunc around a best checkpoint. It takes uint8 images, ``[N, H, W, 3]`` of any H and
W (one size per request), resizes them to the 32×32 the model was trained on (a larger image:
each pixel the mean of its area, as CIFAR-10's own downsampling; a smaller one: bilinear), then applies the run's own input
pipeline (the ResNet's resize, the normalisation), so nobody needs to know the preprocessing.
It answers, per image, the class name and one probability per class.

What a request may hold is checked before any work: integer pixel values 0..255 (floats such as
images scaled to [0, 1] are refused, not cut to 0 and 1), ``[N, H, W, 3]`` or one ``[H, W, 3]``
image, and at most ``CIFARCNN_SERVE_MAX_MB`` (64) MB of decoded pixels. The images are classified
in chunks, and a request past the server's timeout (``MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT``)
stops at the next chunk instead of running on after its client got the timeout. Each refusal is
a 400 whose message says what is wrong and what is expected, without a dump of the input.

    mlflow models serve -m models:/cifar10-task3e@champion --env-manager local -h 127.0.0.1 -p 5001
    curl -s 127.0.0.1:5001/invocations -H 'Content-Type: application/json' -d '{"inputs": [[[[...]]]]}'
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import mlflow
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

from .batches import Preprocess
from .checkpoint import load_best_model
from .tracking import ModelLog, git_commit, repo_root

if TYPE_CHECKING:
    from .data import Dataset

CIFAR_SIZE = 32  # the images every model here was trained on
CHECKPOINT = "checkpoint"  # the artifact key of the best checkpoint inside the logged model
MODEL_CODE = Path(__file__).with_name("served_model.py")  # what MLflow runs to build the model
MAX_MB = float(os.environ.get("CIFARCNN_SERVE_MAX_MB", 64))  # decoded pixels per request (N x H x W x 3 bytes)
CHUNK = int(os.environ.get("CIFARCNN_SERVE_CHUNK", 256))  # images per forward pass; the timeout is checked between chunks
EXPECTED = "integer pixel values 0..255 (uint8), shaped [N, H, W, 3] or [H, W, 3]"


class RequestRefused(MlflowException):
    """A 400 that says only what is wrong. MLflow's scoring server prefixes an error raised in
    ``predict`` with the whole input ("Failed to predict data '<every pixel>'"), burying the
    reason in kilobytes of numbers; this message keeps its own text."""

    def __init__(self, reason: str) -> None:
        self._reason = reason
        super().__init__(reason, error_code=INVALID_PARAMETER_VALUE)

    @property
    def message(self) -> str:
        return self._reason

    @message.setter
    def message(self, _value: str) -> None:  # the server's prefixed copy: kept out
        pass


def checked_images(images) -> np.ndarray:
    """``images`` as uint8 ``[N, H, W, 3]``, or RequestRefused saying what is expected."""
    x = np.asarray(images)
    if x.dtype == object or x.ndim not in (3, 4) or x.shape[-1] != 3 or 0 in x.shape:
        raise RequestRefused(f"expected {EXPECTED}; got an array of shape {x.shape}")
    if x.ndim == 3:
        x = x[None]
    size_mb = x.shape[0] * x.shape[1] * x.shape[2] * 3 / 1e6
    if size_mb > MAX_MB:
        raise RequestRefused(f"{x.shape[0]} image(s) of {x.shape[2]}x{x.shape[1]} are {size_mb:.0f} MB of pixels, more "
                             f"than the {MAX_MB:g} MB a request may hold; send fewer or smaller images per request")
    if x.dtype == np.uint8:
        return x
    if x.dtype.kind not in "iu":
        raise RequestRefused(f"expected {EXPECTED}; got {x.dtype} values (images in [0, 1]: multiply by 255 and "
                             f"round)")
    low, high = int(x.min()), int(x.max())
    if low < 0 or high > 255:
        raise RequestRefused(f"expected {EXPECTED}; got values from {low} to {high}")
    return x.astype(np.uint8)


class ImageClassifier(mlflow.pyfunc.PythonModel):
    """Loaded by MLflow from the logged model: the checkpoint carries the config and classes."""

    def load_context(self, context) -> None:
        self.model, cfg, ckpt = load_best_model(context.artifacts[CHECKPOINT])
        self.model.eval()
        self.classes = list(ckpt["classes"])
        self.prep = Preprocess(cfg.input, torch.device("cpu"), channels_last=False)

    # Typed np.ndarray: MLflow takes the signature from log_model (it infers none from this hint) and
    # no longer warns that predict has no type hints.
    def predict(self, context, model_input: np.ndarray, params: dict | None = None) -> pd.DataFrame:
        timeout = os.environ.get("MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT")  # set by `mlflow models serve`
        deadline = time.monotonic() + float(timeout) if timeout else None
        return classify(self.model, self.prep, self.classes, checked_images(model_input), deadline)


def to_cifar(images: np.ndarray) -> torch.Tensor:
    """uint8 ``[N, H, W, 3]`` -> uint8 ``[N, 3, 32, 32]``, resized as needed (32×32 passes untouched)."""
    images = np.asarray(images)
    if images.ndim == 3:
        images = images[None]
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected uint8 images [N, H, W, 3], got shape {images.shape}")
    x = torch.from_numpy(np.ascontiguousarray(images.astype(np.uint8, copy=False))).permute(0, 3, 1, 2)
    if x.shape[-2:] == (CIFAR_SIZE, CIFAR_SIZE):
        return x.contiguous()
    if x.shape[-1] >= CIFAR_SIZE and x.shape[-2] >= CIFAR_SIZE:  # shrinking: each pixel the mean of its area
        resized = F.interpolate(x.float(), size=(CIFAR_SIZE, CIFAR_SIZE), mode="area")
    else:
        resized = F.interpolate(x.float(), size=(CIFAR_SIZE, CIFAR_SIZE), mode="bilinear", align_corners=False)
    return resized.round_().clamp_(0, 255).to(torch.uint8)


@torch.no_grad()
def classify(model: torch.nn.Module, prep, classes: list[str], images: np.ndarray,
             deadline: float | None = None) -> pd.DataFrame:
    """Class names and probabilities, CHUNK images at a time; past ``deadline`` (monotonic
    seconds) it stops at the next chunk: the client has had its timeout."""
    parts = []
    for start in range(0, len(images), CHUNK):
        if deadline is not None and time.monotonic() > deadline:
            print(f"cifarcnn: stopped after {start} of {len(images)} images: past the request timeout", file=sys.stderr,
                  flush=True)  # the server's log: the client had its 504 already
            raise RequestRefused(f"stopped after {start} of {len(images)} images: the request ran past the server's "
                                 f"timeout; send fewer images per request")
        logits = model(prep(to_cifar(images[start:start + CHUNK])))
        parts.append(torch.softmax(logits.float(), dim=1))
    probs = torch.cat(parts).numpy()
    out = pd.DataFrame(probs, columns=classes)
    out.insert(0, "class", [classes[i] for i in probs.argmax(1)])
    return out


def signature(classes: list[str]):
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, Schema

    # No input schema: MLflow would parse a JSON request with it as np.array(data, dtype=uint8),
    # silently cutting floats (0.7 -> 0) before predict could refuse them; checked_images checks.
    return ModelSignature(inputs=None,
                          outputs=Schema([ColSpec("string", "class")] + [ColSpec("double", c) for c in classes]))


def log_classifier(checkpoint: Path, classes: list[str], example: np.ndarray, registered_name: str | None):
    """Log the pyfunc into the active run (and register it as a new version of ``registered_name``)."""
    package = Path(__file__).resolve().parent
    return mlflow.pyfunc.log_model(  # as code (served_model.py): nothing pickled
        name="classifier", python_model=str(MODEL_CODE), artifacts={CHECKPOINT: str(checkpoint)},
        code_paths=[str(package)],  # the model carries this package: it loads without the repository
        signature=signature(classes), input_example=example, registered_model_name=registered_name,
        # explicit requirements: inferring them imports the whole environment (slow)
        pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", f"mlflow=={mlflow.__version__}",
                          "numpy", "pandas"])


def served_model(run_name: str, seed: int, best: Path, ds: Dataset, train_info: dict, config: dict,
              metrics: dict) -> ModelLog | None:
    """The served model of this checkpoint, and what its registry version says about itself
    (for tracking.log_evaluation: the evaluate stage, and cifarcnn.publish)."""
    digest, registered = train_info.get("checkpoint_sha256"), train_info.get("registered_model")
    if not digest:
        return None
    experiment = os.environ.get("DVC_EXP_NAME") or "workspace"
    return ModelLog(
        log=lambda: log_classifier(best, ds.classes, ds.test_x[:2], registered),  # 2 real images as the example
        digest=digest, registered=registered,
        description=(f"{run_name}, seed {seed}: validation accuracy {metrics['val_acc']:.2%}, test accuracy "
                     f"{metrics['test_acc']:.2%}; {config['optimizer']} lr {config['lr']:g}, batch "
                     f"{config['batch_size']}, {train_info.get('epochs_run', config['epochs'])} epochs; data "
                     f"{train_info.get('data_source')} (subset {train_info.get('data_subset')}); DVC experiment "
                     f"{experiment}; checkpoint sha256 {digest[:16]}"),
        tags={"run": run_name, "seed": str(seed), "lr": f"{config['lr']:g}", "val_acc": f"{metrics['val_acc']:.6f}",
              "test_acc": f"{metrics['test_acc']:.6f}", "dvc_experiment": experiment,
              "git_commit": git_commit(repo_root()), "checkpoint_sha256": digest})
