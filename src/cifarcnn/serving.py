"""A model people can use: raw images in, class names and probabilities out.

An MLflow pyfunc around a best checkpoint. It takes uint8 images, ``[N, H, W, 3]`` of any H and
W (one size per request), resizes them to the 32×32 the model was trained on (a larger image:
each pixel the mean of its area, as CIFAR-10's own downsampling; a smaller one: bilinear), then applies the run's own input
pipeline (the ResNet's resize, the normalisation), so nobody needs to know the preprocessing.
It answers, per image, the class name and one probability per class.

    mlflow models serve -m models:/cifar10-task3e/latest --env-manager local -h 127.0.0.1 -p 5001
    curl -s 127.0.0.1:5001/invocations -H 'Content-Type: application/json' -d '{"inputs": [[[[...]]]]}'
"""
from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from .batches import Preprocess
from .checkpoint import load_best_model

CIFAR_SIZE = 32  # the images every model here was trained on
CHECKPOINT = "checkpoint"  # the artifact key of the best checkpoint inside the logged model


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
        return classify(self.model, self.prep, self.classes, model_input)


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
def classify(model: torch.nn.Module, prep, classes: list[str], images: np.ndarray) -> pd.DataFrame:
    logits = model(prep(to_cifar(images)))
    probs = torch.softmax(logits.float(), dim=1).numpy()
    out = pd.DataFrame(probs, columns=classes)
    out.insert(0, "class", [classes[i] for i in probs.argmax(1)])
    return out


def signature(classes: list[str]):
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, Schema, TensorSpec

    return ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, -1, -1, 3))]),
                          outputs=Schema([ColSpec("string", "class")] + [ColSpec("double", c) for c in classes]))


def log_classifier(checkpoint: Path, classes: list[str], example: np.ndarray, registered_name: str | None):
    """Log the pyfunc into the active run (and register it as a new version of ``registered_name``)."""
    package = Path(__file__).resolve().parent
    return mlflow.pyfunc.log_model(
        name="classifier", python_model=ImageClassifier(), artifacts={CHECKPOINT: str(checkpoint)},
        code_paths=[str(package)],  # the model carries this package: it loads without the repository
        signature=signature(classes), input_example=example, registered_model_name=registered_name,
        # explicit requirements: inferring them imports the whole environment (slow)
        pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", f"mlflow=={mlflow.__version__}",
                          "numpy", "pandas"])
