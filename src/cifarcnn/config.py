"""params.yaml -> validated, typed run configs. Resolved once, before any work.

Every error names the offending key (``runs.task2.lr``), so a typo in params.yaml ends in one
clear line instead of a stack trace halfway through training.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import UserError
from .models import get_model_fn, model_params

PARAMS_FILE = "params.yaml"
OPTIMIZERS = ("sgd", "adam")
DEVICES = ("auto", "cpu", "cuda")


def load_params(path: str | Path = PARAMS_FILE) -> dict:
    path = Path(path)
    try:
        params = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path} not found; run from the repository root") from None
    except yaml.YAMLError as err:
        raise UserError(f"{path}: not valid YAML ({err})".replace("\n", " ")) from err
    if not isinstance(params, dict):
        raise UserError(f"{path}: expected a mapping at the top level")
    return params


# --- small typed readers that name the key on failure ---------------------------------

def _section(params: dict, key: str) -> dict:
    value = params.get(key)
    if not isinstance(value, dict):
        raise UserError(f"{key}: missing or not a mapping in params.yaml")
    return value


def _check_keys(mapping: dict, allowed: set[str], where: str, required: set[str] = frozenset()) -> None:
    for key in mapping:
        if key not in allowed:
            raise UserError(f"{where}.{key}: unknown key (known: {', '.join(sorted(allowed))})")
    for key in sorted(required - set(mapping)):
        raise UserError(f"{where}.{key}: missing")


def _int(value: Any, key: str, minimum: int | None = 1, allow_none: bool = False) -> int | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise UserError(f"{key}: expected an integer{' or null' if allow_none else ''}, got {value!r}")
    if minimum is not None and value < minimum:
        raise UserError(f"{key}: must be >= {minimum}, got {value}")
    return value


def _float(value: Any, key: str, low: float = 0.0, high: float = math.inf, low_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UserError(f"{key}: expected a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value) or value < low or value > high or (low_open and value == low):
        bound = f"{'>' if low_open else '>='} {low:g}" + (f" and <= {high:g}" if high != math.inf else "")
        raise UserError(f"{key}: must be {bound}, got {value:g}")
    return value


def _choice(value: Any, key: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise UserError(f"{key}: expected one of {', '.join(choices)}, got {value!r}")
    return value


def _triple(value: Any, key: str, positive: bool = False) -> tuple[float, float, float]:
    if not isinstance(value, (list, tuple)) or len(value) != 3:
        raise UserError(f"{key}: expected a list of 3 numbers (one per RGB channel), got {value!r}")
    return tuple(_float(v, f"{key}[{i}]", low_open=positive) if positive else
                 _float(v, f"{key}[{i}]", low=-math.inf) for i, v in enumerate(value))


# --- typed configs ----------------------------------------------------------------------

@dataclass(frozen=True)
class InputSpec:
    """How uint8 images become model input: resize (square, pixels) then normalise."""

    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @classmethod
    def parse(cls, raw: Any, where: str) -> "InputSpec":
        if not isinstance(raw, dict):
            raise UserError(f"{where}: expected a mapping with size, mean, std")
        _check_keys(raw, {"size", "mean", "std"}, where, required={"size", "mean", "std"})
        return cls(_int(raw["size"], f"{where}.size", minimum=8),
                   _triple(raw["mean"], f"{where}.mean"), _triple(raw["std"], f"{where}.std", positive=True))


@dataclass(frozen=True)
class AugmentSpec:
    """Per-image training augmentation (torchvision semantics): flip, rotate, colour jitter."""

    hflip_p: float  # probability of a horizontal flip
    rotate_deg: float  # angle uniform in [-rotate_deg, rotate_deg], degrees
    brightness: float  # factor uniform in [max(0, 1 - b), 1 + b]
    contrast: float
    saturation: float
    hue: float  # shift uniform in [-hue, hue] of a full turn; hue <= 0.5

    @classmethod
    def parse(cls, raw: Any, where: str) -> "AugmentSpec | None":
        if raw is None:
            return None
        if not isinstance(raw, dict):
            raise UserError(f"{where}: expected null or a mapping")
        names = [f.name for f in dataclasses.fields(cls)]
        _check_keys(raw, set(names), where, required=set(names))
        return cls(
            hflip_p=_float(raw["hflip_p"], f"{where}.hflip_p", high=1.0),
            rotate_deg=_float(raw["rotate_deg"], f"{where}.rotate_deg", high=180.0),
            brightness=_float(raw["brightness"], f"{where}.brightness"),
            contrast=_float(raw["contrast"], f"{where}.contrast"),
            saturation=_float(raw["saturation"], f"{where}.saturation"),
            hue=_float(raw["hue"], f"{where}.hue", high=0.5),
        )


@dataclass(frozen=True)
class RunConfig:
    """Everything one training run reads, resolved from params.yaml."""

    name: str
    model: str
    model_params: dict
    optimizer: str
    lr: float
    batch_size: int
    epochs: int  # after train.max_epochs is applied
    early_stop_count: int | None  # None: no early stopping
    augment: AugmentSpec | None
    input: InputSpec
    seed: int
    val_fraction: float
    split_seed: int
    evals_per_epoch: int
    device: str
    experiment: str
    takes_param: str  # the top-level param this run reads through {param: ...} (`train` when none)
    data_params: dict = field(default_factory=dict)
    register: str | None = None  # MLflow Model Registry name: each trained seed becomes a new version
    describes: str = ""  # which part of the report the run produces (the MLflow run's description)

    def flat_params(self) -> dict[str, Any]:
        """Loggable params, dotted like params.yaml (run keys relative to the run's block)."""
        flat: dict[str, Any] = {"run": self.name, "model": self.model, "optimizer": self.optimizer,
                                "lr": self.lr, "batch_size": self.batch_size, "epochs": self.epochs,
                                "early_stop_count": self.early_stop_count}
        flat.update({f"model_params.{k}": v for k, v in self.model_params.items()})
        flat.update({f"input.{k}": v for k, v in dataclasses.asdict(self.input).items()})
        flat.update({f"augment.{k}": v for k, v in dataclasses.asdict(self.augment).items()}
                    if self.augment else {"augment": None})
        flat.update({"train.seed": self.seed, "train.val_fraction": self.val_fraction,
                     "train.split_seed": self.split_seed, "train.evals_per_epoch": self.evals_per_epoch,
                     "train.device": self.device, "mlflow.experiment": self.experiment})
        flat.update({f"data.{k}": v for k, v in self.data_params.items()})
        return flat

    def to_dict(self) -> dict:
        """Plain types only, for the checkpoint (``torch.load(weights_only=True)`` reads it)."""
        out = dataclasses.asdict(self)
        out["input"] = {k: list(v) if isinstance(v, tuple) else v for k, v in out["input"].items()}
        return out

    def seedless_dict(self) -> dict:
        """What every seed of this run shares: configs/<run>.json, on which each seed's train
        stage depends (so a new seed trains alone, and a changed knob re-trains every seed)."""
        out = self.to_dict()
        del out["seed"]
        return out

    @classmethod
    def from_dict(cls, raw: dict, seed: int | None = None) -> "RunConfig":
        raw = dict(raw) if seed is None else {**raw, "seed": seed}
        raw["input"] = InputSpec(raw["input"]["size"], tuple(raw["input"]["mean"]), tuple(raw["input"]["std"]))
        raw["augment"] = AugmentSpec(**raw["augment"]) if raw["augment"] else None
        return cls(**raw)


RUN_KEYS = {"model", "model_params", "optimizer", "lr", "batch_size", "epochs", "early_stop_count",
            "augment", "input", "takes_param", "register", "describes"}
TRAIN_KEYS = {"seeds", "max_epochs", "val_fraction", "split_seed", "evals_per_epoch", "device"}


def _resolve_refs(value: Any, params: dict, where: str, takes_param: str) -> Any:
    """Replace ``{param: name}`` by the top-level param ``name`` (the run must follow it).

    Not DVC's ``${name}``: `dvc exp run -S` would resolve that in params.yaml itself when it
    rewrites the file, freezing the value.
    """
    if isinstance(value, dict) and set(value) == {"param"}:
        name = value["param"]
        if not isinstance(name, str) or name not in params:
            raise UserError(f"{where}: refers to param {name!r}, which is not a top-level key of params.yaml")
        if name != takes_param:
            raise UserError(f"{where}: refers to param {name!r} but the run's takes_param is {takes_param!r}; "
                            f"set takes_param: {name} so DVC re-runs it when {name} changes")
        return params[name]
    if isinstance(value, dict):
        return {k: _resolve_refs(v, params, f"{where}.{k}", takes_param) for k, v in value.items()}
    return value


def run_names(params: dict) -> list[str]:
    return list(_section(params, "runs"))


def run_dirs(run_name: str, seed: int) -> tuple[Path, Path]:
    """(models/<run>/seed<seed>, results/<run>/seed<seed>): where one seed of a run lives."""
    return Path("models") / run_name / f"seed{seed}", Path("results") / run_name / f"seed{seed}"


def config_digest(seedless: dict) -> str:
    """Identifies a run's config across its seeds (the MLflow parent run of its seeds)."""
    return hashlib.sha256(json.dumps(seedless, sort_keys=True).encode()).hexdigest()[:16]


def resolve_seeds(params: dict) -> list[int]:
    """``train.seeds``: every run is trained once per seed (a DVC stage each)."""
    seeds = _section(params, "train").get("seeds")
    if not isinstance(seeds, list) or not seeds or not all(
            isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds) or len(set(seeds)) != len(seeds):
        raise UserError(f"train.seeds: expected a non-empty list of distinct integers >= 0 (e.g. [0, 1, 2]), got {seeds!r}")
    return seeds


def resolve_run(params: dict, name: str, seed: int | None = None) -> RunConfig:
    """Validate and resolve ``runs.<name>`` with the shared sections it reads, for ``seed``
    (default: the first of ``train.seeds``)."""
    runs = _section(params, "runs")
    if name not in runs:
        raise UserError(f"runs.{name}: no such run (runs: {', '.join(runs)})")
    where = f"runs.{name}"
    raw = runs[name]
    if not isinstance(raw, dict):
        raise UserError(f"{where}: expected a mapping")
    _check_keys(raw, RUN_KEYS, where, required={"model", "optimizer", "lr", "batch_size", "epochs", "input", "takes_param"})
    takes_param = raw["takes_param"]
    if not isinstance(takes_param, str) or takes_param not in params:
        raise UserError(f"{where}.takes_param: {takes_param!r} is not a top-level key of params.yaml")
    raw = _resolve_refs(raw, params, where, takes_param)

    train = _section(params, "train")
    _check_keys(train, TRAIN_KEYS, "train", required=TRAIN_KEYS)
    model = raw["model"]
    if not isinstance(model, str):
        raise UserError(f"{where}.model: expected a model name, got {model!r}")
    try:
        get_model_fn(model)
    except UserError as err:
        raise UserError(f"{where}.model: {err}") from None
    mparams = raw.get("model_params") or {}
    if not isinstance(mparams, dict):
        raise UserError(f"{where}.model_params: expected a mapping")
    known = model_params(model)
    for key in mparams:
        if key not in known:
            raise UserError(f"{where}.model_params.{key}: model {model!r} has no such parameter "
                            f"(it takes: {', '.join(known) or 'none'})")

    epochs = _int(raw["epochs"], f"{where}.epochs")
    max_epochs = _int(train["max_epochs"], "train.max_epochs", allow_none=True)
    mlflow_section = _section(params, "mlflow")
    _check_keys(mlflow_section, {"experiment"}, "mlflow", required={"experiment"})
    data = _section(params, "data")
    return RunConfig(
        name=name,
        model=model,
        model_params=dict(mparams),
        optimizer=_choice(raw["optimizer"], f"{where}.optimizer", OPTIMIZERS),
        lr=_float(raw["lr"], f"{where}.lr" if takes_param != "lr" else "lr", low_open=True),
        batch_size=_int(raw["batch_size"], f"{where}.batch_size"),
        epochs=min(epochs, max_epochs) if max_epochs else epochs,
        early_stop_count=_int(raw.get("early_stop_count"), f"{where}.early_stop_count", minimum=2, allow_none=True),
        augment=AugmentSpec.parse(raw.get("augment"), f"{where}.augment"),
        input=InputSpec.parse(raw["input"], f"{where}.input"),
        seed=resolve_seeds(params)[0] if seed is None else _int(seed, "seed", minimum=0),
        val_fraction=_float(train["val_fraction"], "train.val_fraction", high=0.5, low_open=True),
        split_seed=_int(train["split_seed"], "train.split_seed", minimum=0),
        evals_per_epoch=_int(train["evals_per_epoch"], "train.evals_per_epoch"),
        device=_choice(train["device"], "train.device", DEVICES),
        experiment=str(mlflow_section["experiment"]),
        takes_param=takes_param,
        data_params={k: data.get(k) for k in ("source", "subset")},
        register=_registered_name(raw.get("register"), f"{where}.register"),
        describes=_text(raw.get("describes", ""), f"{where}.describes"),
    )


def _text(value: Any, key: str) -> str:
    if not isinstance(value, str):
        raise UserError(f"{key}: expected text, got {value!r}")
    return value


def _registered_name(value: Any, key: str) -> str | None:
    if value is not None and not (isinstance(value, str) and re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", value)):
        raise UserError(f"{key}: expected null or a model name of letters, digits, '.', '_' and '-', got {value!r}")
    return value


def resolve_all(params: dict) -> dict[str, RunConfig]:
    return {name: resolve_run(params, name) for name in run_names(params)}


@dataclass(frozen=True)
class DataConfig:
    source: str
    md5: str | None
    subset: int | None


def resolve_data(params: dict) -> DataConfig:
    data = _section(params, "data")
    _check_keys(data, {"source", "md5", "subset"}, "data", required={"source", "md5", "subset"})
    source, md5 = data["source"], data["md5"]
    if not isinstance(source, str) or not source:
        raise UserError(f"data.source: expected a URL or a local path, got {source!r}")
    md5 = _hex_digest(md5, "data.md5", 32)
    return DataConfig(source, md5, _int(data["subset"], "data.subset", allow_none=True))


def _hex_digest(value: Any, key: str, length: int) -> str | None:
    """A checksum of ``length`` hex digits, or None. One made only of digits (or digits and an
    ``e``) is read by YAML as a number, which loses leading zeros: ask for quotes instead."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        raise UserError(f"{key}: YAML read the checksum as the number {value!r}; put it in quotes "
                        f"({key.split('.')[-1]}: \"...\") so every digit is kept")
    if value is not None and not (isinstance(value, str) and re.fullmatch(rf"[0-9a-fA-F]{{{length}}}", value)):
        raise UserError(f"{key}: expected {length} hex digits or null, got {value!r}")
    return value


@dataclass(frozen=True)
class VizConfig:
    image: str
    image_sha256: str | None
    filter_indices: list[int]
    activation_indices: list[int]


def resolve_viz(params: dict) -> VizConfig:
    viz = _section(params, "viz")
    keys = {"image", "image_sha256", "filter_indices", "activation_indices"}
    _check_keys(viz, keys, "viz", required=keys)
    image, sha = viz["image"], viz["image_sha256"]
    if not isinstance(image, str) or not image:
        raise UserError(f"viz.image: expected a URL or a local path, got {image!r}")
    sha = _hex_digest(sha, "viz.image_sha256", 64)
    lists = {}
    for key in ("filter_indices", "activation_indices"):
        value = viz[key]
        if not isinstance(value, list) or not value or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0
                                                                for i in value):
            raise UserError(f"viz.{key}: expected a non-empty list of indices >= 0, got {value!r}")
        lists[key] = value
    return VizConfig(image, sha, **lists)


def resolve_resnet_weights(params: dict) -> str:
    value = params.get("resnet_weights")
    if not isinstance(value, str) or not value:
        raise UserError(f"resnet_weights: expected imagenet, none or a path to a .pth file, got {value!r}")
    return value
