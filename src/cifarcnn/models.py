"""The report's networks, built by name from a registry (like timm's ``create_model``).

Every model returns logits: the tables' final "Softmax" lives inside the cross-entropy loss.
Variants are parameters of one definition, never copies.
"""
from __future__ import annotations

import inspect
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

from .errors import UserError
from .fsutil import file_digest

NUM_CLASSES = 10
_REGISTRY: dict[str, Callable[..., nn.Module]] = {}
# name -> how to put pretrained weights (imagenet, or a path) into a freshly built model
_PRETRAINED: dict[str, Callable[[nn.Module, str], None]] = {}

# torchvision's ResNet18_Weights.IMAGENET1K_V1 file; the download stage fetches it here.
RESNET18_IMAGENET_URL = "https://download.pytorch.org/models/resnet18-f37072fd.pth"
RESNET18_IMAGENET_SHA256 = "f37072fd47e89c5e827621c5baffa7500819f7896bbacec160b1a16c560e07ec"
RESNET18_IMAGENET_FILE = Path("data/pretrained/resnet18-f37072fd.pth")  # relative to the repo root


def register_model(fn: Callable[..., nn.Module] | None = None, *,
                   pretrained: Callable[[nn.Module, str], None] | None = None):
    """``@register_model``, or ``@register_model(pretrained=loader)`` for a model whose
    pretrained weights ``create_model(name, pretrained=...)`` loads with ``loader(model, choice)``."""
    def add(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if fn.__name__ in _REGISTRY:
            raise ValueError(f"model {fn.__name__!r} registered twice")
        _REGISTRY[fn.__name__] = fn
        if pretrained is not None:
            _PRETRAINED[fn.__name__] = pretrained
        return fn
    return add(fn) if fn is not None else add


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def model_params(name: str) -> dict[str, object]:
    """The parameters a registered model takes, with their defaults."""
    return {k: p.default for k, p in inspect.signature(get_model_fn(name)).parameters.items()}


def has_pretrained(name: str) -> bool:
    get_model_fn(name)
    return name in _PRETRAINED


def get_model_fn(name: str) -> Callable[..., nn.Module]:
    if name not in _REGISTRY:
        raise UserError(f"unknown model {name!r}; known models: {', '.join(list_models())}")
    return _REGISTRY[name]


def create_model(name: str, pretrained: str | None = None, **params) -> nn.Module:
    """Build ``name`` with ``params``; ``pretrained`` (imagenet, or a path to a state dict)
    loads weights into it, None leaves the random initialisation (and a checkpoint's restore
    builds the model this way, then loads its own weights)."""
    fn = get_model_fn(name)
    known = model_params(name)
    unknown = sorted(set(params) - set(known))
    if unknown:
        raise UserError(f"model {name!r} has no parameter {unknown[0]!r}; it takes: {', '.join(known) or 'none'}")
    if pretrained is not None and name not in _PRETRAINED:
        raise UserError(f"model {name!r} has no pretrained weights to load")
    model = fn(**params)
    if pretrained is not None:
        _PRETRAINED[name](model, pretrained)
    return model


# --- building blocks (every conv 5x5, padding 2, stride 1; every pool 2x2, stride 2) ----

def conv_relu(c_in: int, c_out: int, batch_norm: bool = False) -> list[nn.Module]:
    layers: list[nn.Module] = [nn.Conv2d(c_in, c_out, kernel_size=5, padding=2), nn.ReLU()]
    if batch_norm:  # the original's order inside a block: Conv -> ReLU -> BatchNorm
        layers.append(nn.BatchNorm2d(c_out))
    return layers


def classifier(widths: list[int], dropouts: dict[int, float]) -> list[nn.Module]:
    """Fully connected layers ``widths[0] -> ... -> widths[-1]`` with ReLU between them.

    ``dropouts`` maps a position (0 = before the first Linear) to a dropout rate.
    """
    layers: list[nn.Module] = []
    for i, (w_in, w_out) in enumerate(zip(widths[:-1], widths[1:])):
        if dropouts.get(i):
            layers.append(nn.Dropout(dropouts[i]))
        layers.append(nn.Linear(w_in, w_out))
        if i < len(widths) - 2:
            layers.append(nn.ReLU())
    return layers


def three_conv_features() -> list[nn.Module]:
    """Table 2's feature extractor: 3 x [conv 5x5 -> ReLU -> maxpool 2x2]; 32x32 -> 128x4x4."""
    layers: list[nn.Module] = []
    for c_in, c_out in [(3, 32), (32, 64), (64, 128)]:
        layers += [*conv_relu(c_in, c_out), nn.MaxPool2d(2, 2)]
    return layers


# --- the report's models --------------------------------------------------------------

@register_model
def task2() -> nn.Module:
    """Table 2: three conv blocks, FC 64, FC 10 (390,410 parameters)."""
    return nn.Sequential(*three_conv_features(), nn.Flatten(), *classifier([128 * 4 * 4, 64, NUM_CLASSES], {}))


@register_model
def task3_model2(dropout: bool = True) -> nn.Module:
    """Table 6: Table 2's features, Dropout(0.4), FC 256, FC 128, Dropout(0.2), FC 64, FC 32, FC 10.

    ``dropout=False`` removes both Dropout layers (the Task 3d comparison).
    """
    dropouts = {0: 0.4, 2: 0.2} if dropout else {}
    return nn.Sequential(*three_conv_features(), nn.Flatten(),
                         *classifier([128 * 4 * 4, 256, 128, 64, 32, NUM_CLASSES], dropouts))


@register_model
def task3e(second_dropout: float = 0.2) -> nn.Module:
    """Table 10: 6 convs (BatchNorm after conv 1, 3, 5; pool after 2, 4, 6), FC 128, 64, 64, 10.

    ``second_dropout`` is the rate after FC 64 (layer 8): the report's table says 0.2, the
    original code used 0.1.
    """
    features: list[nn.Module] = []
    for c_in, c_out in [(3, 32), (32, 64), (64, 128)]:
        features += [*conv_relu(c_in, c_out, batch_norm=True), *conv_relu(c_out, c_out), nn.MaxPool2d(2, 2)]
    return nn.Sequential(*features, nn.Flatten(),
                         *classifier([128 * 4 * 4, 128, 64, 64, NUM_CLASSES], {0: 0.4, 2: second_dropout}))


def load_resnet18_weights(model: nn.Module, weights: str) -> None:
    """``weights`` (imagenet, or a path to a ResNet18 state dict) into ``model``, all but ``fc``."""
    missing, unexpected = model.load_state_dict(load_resnet18_state_dict(weights), strict=False)
    missing = [k for k in missing if not k.startswith("fc.")]
    if missing or unexpected:
        raise UserError(f"resnet_weights {weights}: not a ResNet18 state dict "
                        f"(missing {missing[:3]}, unexpected {unexpected[:3]})")


@register_model(pretrained=load_resnet18_weights)
def resnet18_transfer() -> nn.Module:
    """torchvision ResNet18, ``fc`` -> Linear(512, 10), all frozen but ``layer4`` and ``fc``.

    Pretrained weights come through ``create_model(..., pretrained=...)``: ``imagenet``
    (torchvision's IMAGENET1K_V1 file, SHA-256 checked) or a path to a ResNet18 state dict.
    """
    from torchvision.models import resnet18

    model = resnet18(weights=None)
    model.fc = nn.Linear(model.fc.in_features, NUM_CLASSES)
    for name, param in model.named_parameters():
        param.requires_grad = name.startswith(("layer4.", "fc."))
    return model


def imagenet_weights_path() -> Path:
    """Where the ImageNet ResNet18 file is: the pipeline's copy, else torch hub's cache."""
    if RESNET18_IMAGENET_FILE.exists():
        return RESNET18_IMAGENET_FILE
    hub = Path(torch.hub.get_dir()) / "checkpoints" / RESNET18_IMAGENET_FILE.name
    if hub.exists():
        return hub
    raise UserError(
        f"ResNet18 ImageNet weights not found: run `dvc repro download` online, or fetch "
        f"{RESNET18_IMAGENET_URL} into {RESNET18_IMAGENET_FILE}, or set resnet_weights: none"
    )


def load_resnet18_state_dict(weights: str) -> dict[str, torch.Tensor]:
    """Read a ResNet18 state dict safely (``weights_only=True``); ImageNet's is SHA-256 checked."""
    if weights == "imagenet":
        path = imagenet_weights_path()
        actual = file_digest(path, "sha256")
        if actual != RESNET18_IMAGENET_SHA256:
            raise UserError(f"{path}: sha256 {actual} is not torchvision's {RESNET18_IMAGENET_SHA256}; "
                            f"delete it and fetch {RESNET18_IMAGENET_URL} again")
    else:
        path = Path(weights)
        if not path.is_file():
            raise UserError(f"resnet_weights: {path} is not a file (use imagenet, none or a path to a .pth file)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise UserError(f"{path}: not a loadable weights file ({err})") from err
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]  # one of our own checkpoints
    if not isinstance(state, dict):
        raise UserError(f"{path}: expected a state dict, found {type(state).__name__}")
    return {k: v for k, v in state.items() if not k.startswith("fc.")}  # fc is replaced anyway


def count_parameters(model: nn.Module) -> dict[str, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return {"total": total, "trainable": trainable, "frozen": total - trainable}
