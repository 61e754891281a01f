"""params.yaml -> validated, typed configs (pydantic models). Resolved once, before any work.

Every error is one line that names the key path (``runs.task2.lr: must be > 0, got -0.1``), so
a typo in params.yaml stops the stage before it starts instead of halfway through training.
Numbers are strict: ``true`` is not an integer, ``"0.1"`` is not a number.
"""
from __future__ import annotations

import hashlib
import json
import re
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, Strict, ValidationError, field_validator
from pydantic_core import PydanticCustomError

from .errors import UserError
from .fsutil import parse_yaml, read_json
from .models import get_model_fn, has_pretrained, model_params

PARAMS_FILE = "params.yaml"
CONFIGS = Path("configs")  # the configure stage's output: <run>.json per run, and RUN_ORDER
RUN_ORDER = "run-order.json"  # the runs' names in params.yaml's order ('-' is in no run's name)

# Strict scalars: YAML's `true` is no integer and `"0.1"` no number (an int is a fine float).
PositiveInt = Annotated[int, Strict(), Field(ge=1)]
NonNegativeInt = Annotated[int, Strict(), Field(ge=0)]
Seed = Annotated[int, Strict(), Field(ge=0, lt=2**32)]  # numpy's seeds are 32-bit
RUN_NAME = re.compile(r"[a-z0-9_]+")  # it names DVC stages (train@<run>-<seed>), folders and MLflow runs
Number = Annotated[float, Strict()]
PositiveNumber = Annotated[float, Strict(), Field(gt=0)]
NonNegativeNumber = Annotated[float, Strict(), Field(ge=0)]
Text = Annotated[str, Strict()]
NonEmptyText = Annotated[str, Strict(), Field(min_length=1)]


class Section(BaseModel):
    """A mapping of params.yaml: unknown keys are errors, values immutable, no NaN/inf."""

    # defer_build: a model's validator is built when first used, not at import (13 ms that every
    # stage paid, most of which validate one section or none)
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False, defer_build=True)


def load_params(path: str | Path = PARAMS_FILE) -> dict:
    path = Path(path)
    try:
        params = parse_yaml(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path} not found; run from the repository root") from None
    except yaml.YAMLError as err:
        raise UserError(f"{path}: not valid YAML ({err})".replace("\n", " ")) from err
    if not isinstance(params, dict):
        raise UserError(f"{path}: expected a mapping at the top level")
    return params


# --- the sections of params.yaml ------------------------------------------------------

class InputSpec(Section):
    """How uint8 images become model input: resize (square, pixels) then normalise per channel."""

    size: Annotated[int, Strict(), Field(ge=8)]
    mean: tuple[Number, Number, Number]  # RGB, of pixels / 255
    std: tuple[PositiveNumber, PositiveNumber, PositiveNumber]


class AugmentSpec(Section):
    """Per-image training augmentation (torchvision semantics): flip, rotate, colour jitter."""

    hflip_p: Annotated[float, Strict(), Field(ge=0, le=1)]  # probability of a horizontal flip
    rotate_deg: Annotated[float, Strict(), Field(ge=0, le=180)]  # angle uniform in [-rotate_deg, rotate_deg]
    brightness: NonNegativeNumber  # factor uniform in [max(0, 1 - b), 1 + b]
    contrast: NonNegativeNumber
    saturation: NonNegativeNumber
    hue: Annotated[float, Strict(), Field(ge=0, le=0.5)]  # shift uniform in [-hue, hue] of a full turn


class RunSpec(Section):
    """One entry of ``runs:`` as written, after ``{param: name}`` is replaced by that param."""

    model: Text
    model_params: dict[str, Any] = {}
    pretrained: Text | None = None  # imagenet | none | a .pth path, for models that have pretrained weights
    optimizer: Literal["sgd", "adam"]
    lr: PositiveNumber
    batch_size: PositiveInt
    epochs: PositiveInt
    early_stop_count: Annotated[int, Strict(), Field(ge=2)] | None = None  # null: no early stopping
    augment: AugmentSpec | None = None
    input: InputSpec
    takes_param: Text
    # `register:` in params.yaml (an attribute of BaseModel, so the field is named otherwise)
    registered_model: Annotated[str, Strict(), Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")] | None = \
        Field(None, alias="register")
    describes: Text = ""

    @field_validator("model")
    @classmethod
    def _registered(cls, name: str) -> str:
        try:
            get_model_fn(name)
        except UserError as err:
            raise PydanticCustomError("unknown_model", str(err)) from None
        return name


class SplitSection(Section):
    """The two keys of ``train`` that draw the validation split: all the split stage reads."""
    val_fraction: Annotated[float, Strict(), Field(gt=0, le=0.5)]
    split_seed: NonNegativeInt


class TrainSection(SplitSection):
    seeds: Annotated[list[Seed], Field(min_length=1)]
    max_epochs: PositiveInt | None
    evals_per_epoch: PositiveInt
    device: Literal["auto", "cpu", "cuda"]

    @field_validator("seeds")
    @classmethod
    def _distinct(cls, seeds: list[int]) -> list[int]:
        if len(set(seeds)) != len(seeds):
            raise PydanticCustomError("repeated", "each seed once, got {seeds}", {"seeds": seeds})
        return seeds


class _Seed(Section):
    seed: Seed


class MlflowSection(Section):
    experiment: NonEmptyText


def _checksum(length: int):
    """A checksum of ``length`` hex digits, or None. One made only of digits (or digits and an
    ``e``) is read by YAML as a number, which loses leading zeros: ask for quotes instead."""
    def check(value: Any) -> Any:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            raise PydanticCustomError(
                "checksum_number", "YAML read the checksum as the number {value}; put it in quotes (\"...\") "
                                   "so every digit is kept", {"value": repr(value)})
        if value is not None and not (isinstance(value, str) and re.fullmatch(rf"[0-9a-fA-F]{{{length}}}", value)):
            raise PydanticCustomError("checksum", "expected {length} hex digits or null, got {value}",
                                      {"length": length, "value": repr(value)})
        return value
    return check


class DataConfig(Section):
    source: NonEmptyText  # URL or local path
    md5: str | None
    subset: PositiveInt | None

    _md5 = field_validator("md5", mode="before")(_checksum(32))


class VizConfig(Section):
    image: NonEmptyText
    image_sha256: str | None
    filter_indices: Annotated[list[NonNegativeInt], Field(min_length=1)]
    activation_indices: Annotated[list[NonNegativeInt], Field(min_length=1)]

    _sha = field_validator("image_sha256", mode="before")(_checksum(64))


class RunConfig(Section):
    """Everything one training run reads, resolved from params.yaml (and saved in its checkpoint)."""

    name: str
    model: str
    model_params: dict[str, Any]
    pretrained: str | None = None  # imagenet or a path: the factory loads it (None: random init)
    optimizer: Literal["sgd", "adam"]
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
    data_params: dict = {}
    registered_model: str | None = None  # MLflow Model Registry name: each trained seed becomes a new version
    describes: str = ""  # which part of the report the run produces (the MLflow run's description)

    def flat_params(self) -> dict[str, Any]:
        """Loggable params, dotted like params.yaml (run keys relative to the run's block)."""
        flat: dict[str, Any] = {"run": self.name, "model": self.model, "optimizer": self.optimizer,
                                "lr": self.lr, "batch_size": self.batch_size, "epochs": self.epochs,
                                "early_stop_count": self.early_stop_count, "pretrained": self.pretrained}
        flat.update({f"model_params.{k}": v for k, v in self.model_params.items()})
        flat.update({f"input.{k}": v for k, v in self.input.model_dump().items()})
        flat.update({f"augment.{k}": v for k, v in self.augment.model_dump().items()}
                    if self.augment else {"augment": None})
        flat.update({"train.seed": self.seed, "train.val_fraction": self.val_fraction,
                     "train.split_seed": self.split_seed, "train.evals_per_epoch": self.evals_per_epoch,
                     "train.device": self.device, "mlflow.experiment": self.experiment})
        flat.update({f"data.{k}": v for k, v in self.data_params.items()})
        return flat

    def to_dict(self) -> dict:
        """Plain types only, for the checkpoint (``torch.load(weights_only=True)`` reads it)."""
        return self.model_dump(mode="json")

    def seedless_dict(self) -> dict:
        """What every seed of this run shares: configs/<run>.json, on which each seed's train
        stage depends (so a new seed trains alone, and a changed knob re-trains every seed)."""
        out = self.to_dict()
        del out["seed"]
        return out

    def replace(self, **changes: Any) -> "RunConfig":
        """A copy with ``changes``, validated again (quick runs in tests and benchmarks)."""
        return RunConfig.model_validate({**self.model_dump(), **changes})

    @classmethod
    def from_dict(cls, raw: dict, seed: int | None = None) -> "RunConfig":
        return cls.model_validate(raw if seed is None else {**raw, "seed": seed})


# --- errors: pydantic's list -> one line naming the key -------------------------------

_WORDS = {
    "missing": "missing",
    "int_type": "expected an integer", "int_parsing": "expected an integer", "int_from_float": "expected an integer",
    "float_type": "expected a number", "float_parsing": "expected a number", "finite_number": "expected a finite number",
    "string_type": "expected text", "string_too_short": "expected non-empty text", "bool_type": "expected true or false",
    "dict_type": "expected a mapping", "model_type": "expected a mapping", "model_attributes_type": "expected a mapping",
    "list_type": "expected a list", "tuple_type": "expected a list",
}
_BOUNDS = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}


def _key_path(loc: tuple) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def _annotation(model: type, loc: tuple) -> tuple[Any, bool]:
    """The type declared at ``loc`` under ``model`` (None if not a field), and whether null is allowed."""
    nullable = False
    for part in loc:
        if not (isinstance(model, type) and issubclass(model, BaseModel)) or part not in model.model_fields:
            return None, False
        model, nullable = model.model_fields[part].annotation, False
        while typing.get_origin(model) in (typing.Union, types.UnionType):  # X | None -> X
            nullable = type(None) in typing.get_args(model)
            model = next(a for a in typing.get_args(model) if a is not type(None))
    return model, nullable


def _known_keys(model: type, loc: tuple) -> list[str]:
    """The keys the mapping at ``loc`` (under ``model``) accepts: named in an unknown-key error."""
    mapping = _annotation(model, loc)[0]
    return sorted(mapping.model_fields) if isinstance(mapping, type) and issubclass(mapping, BaseModel) else []


def _number(x: int | float) -> str:
    return str(x) if isinstance(x, int) else f"{x:g}"  # a seed bound reads 4294967296, not 4.29497e+09


def _message(err: dict, model: type) -> str:
    kind, ctx, value = err["type"], err.get("ctx") or {}, err.get("input")
    if kind == "extra_forbidden":
        known = _known_keys(model, err["loc"][:-1])
        return "unknown key" + (f" (known: {', '.join(known)})" if known else "")
    if kind in _BOUNDS:
        bound = next(iter(ctx.values()))
        return f"must be {_BOUNDS[kind]} {_number(bound)}, got {_number(value)}" if isinstance(value, (int, float)) \
            else f"must be {_BOUNDS[kind]} {_number(bound)}"
    if kind == "literal_error":
        choices = re.findall(r"'(.*?)'", ctx.get("expected", ""))  # pydantic's "'sgd' or 'adam'"
        return f"expected one of {', '.join(choices)}, got {value!r}"
    if kind == "too_short" and ctx.get("min_length") == 1:
        return f"expected a non-empty list, got {value!r}"
    if kind == "string_pattern_mismatch":
        return f"expected letters, digits, '.', '_' and '-' (starting with a letter or digit), got {value!r}"
    if kind in _WORDS:
        or_null = " or null" if kind != "missing" and _annotation(model, tuple(err["loc"]))[1] else ""
        return _WORDS[kind] + or_null + ("" if kind == "missing" else f", got {value!r}")
    return err["msg"]  # our own PydanticCustomError texts, and anything rarer


def validate(model: type, raw: Any, where: tuple = (), renamed: dict[tuple, str] | None = None):
    """``model.model_validate(raw)``, or a UserError naming the first bad key's full path.

    ``renamed``: a run's values that came from a top-level param (``{param: lr}``): their
    errors name that param, where the user set it.
    """
    try:
        return model.model_validate(raw)
    except ValidationError as err:
        first = err.errors()[0]
        loc = tuple(first["loc"])
        for prefix, param in (renamed or {}).items():
            if loc[:len(prefix)] == prefix:
                loc, where = (param, *loc[len(prefix):]), ()
                break
        path = _key_path((*where, *loc))
        raise UserError(f"{path}: {_message(first, model)}" if path else _message(first, model)) from None


def _section(params: dict, key: str) -> dict:
    value = params.get(key)
    if not isinstance(value, dict):
        raise UserError(f"{key}: missing or not a mapping in params.yaml")
    return value


# --- resolving ----------------------------------------------------------------------

def _resolve_refs(value: Any, params: dict, where: str, takes_param: Any, loc: tuple = (),
                  used: dict[tuple, str] | None = None) -> Any:
    """Replace ``{param: name}`` by the top-level param ``name`` (the run must take it), and
    note in ``used`` where each came from.

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
        if used is not None:
            used[loc] = name
        return params[name]
    if isinstance(value, dict):
        return {k: _resolve_refs(v, params, f"{where}.{k}", takes_param, (*loc, k), used) for k, v in value.items()}
    return value


def run_names(params: dict) -> list[str]:
    names = list(_section(params, "runs"))
    for name in names:
        if not isinstance(name, str) or not RUN_NAME.fullmatch(name):
            raise UserError(f"runs.{name}: a run's name must be lowercase letters, digits and _ (it names DVC "
                            f"stages, folders and MLflow runs); rename it")
    return names


def config_digest(seedless: dict) -> str:
    """Identifies a run's config across its seeds (the MLflow parent run of its seeds)."""
    return hashlib.sha256(json.dumps(seedless, sort_keys=True).encode()).hexdigest()[:16]


def resolve_seeds(params: dict) -> list[int]:
    """``train.seeds``: every run is trained once per seed (a DVC stage each)."""
    return validate(TrainSection, _section(params, "train"), ("train",)).seeds


def resolve_split(params: dict) -> SplitSection:
    """``train.val_fraction`` and ``train.split_seed``, validated, and nothing else of params.yaml
    (the split stage declares just these two, so no other edit re-runs it)."""
    train = _section(params, "train")
    return validate(SplitSection, {k: train[k] for k in SplitSection.model_fields if k in train}, ("train",))


def configured_runs(folder: Path = CONFIGS) -> list[str]:
    """The runs the configure stage resolved, in params.yaml's order: what the report covers, read
    from the stage's output rather than from params.yaml's ``runs`` (which, as a DVC param, would
    copy every run's settings into the report's entry in dvc.lock)."""
    path = folder / RUN_ORDER
    if not path.exists():
        raise UserError(f"{path} not found; run `dvc repro configure` (or dvc repro) first")
    names = read_json(path)  # a damaged file: one line naming it
    if not isinstance(names, list) or not all(isinstance(n, str) and RUN_NAME.fullmatch(n) for n in names):
        raise UserError(f"{path}: expected a list of run names; run `dvc repro -f configure` to rewrite it")
    return names


def pretrained_choice(value: str | None) -> str | None:
    """``imagenet`` or a path -> itself; ``none`` (random initialisation) -> None."""
    return None if value in (None, "none") else value


def resolve_run(params: dict, name: str, seed: int | None = None) -> RunConfig:
    """Validate and resolve ``runs.<name>`` with the shared sections it reads, for ``seed``
    (default: the first of ``train.seeds``)."""
    runs = _section(params, "runs")
    if name not in runs:
        raise UserError(f"runs.{name}: no such run (runs: {', '.join(runs)})")
    run_names(params)
    where = ("runs", name)
    raw = runs[name]
    if not isinstance(raw, dict):
        raise UserError(f"runs.{name}: expected a mapping")
    takes_param = raw.get("takes_param")
    if takes_param is not None and (not isinstance(takes_param, str) or takes_param not in params):
        raise UserError(f"runs.{name}.takes_param: {takes_param!r} is not a top-level key of params.yaml")
    from_params: dict[tuple, str] = {}
    raw = _resolve_refs(raw, params, f"runs.{name}", takes_param, used=from_params)
    spec: RunSpec = validate(RunSpec, raw, where, from_params)
    known = model_params(spec.model)
    for key in spec.model_params:
        if key not in known:
            raise UserError(f"runs.{name}.model_params.{key}: model {spec.model!r} has no such parameter "
                            f"(it takes: {', '.join(known) or 'none'})")
    pretrained = pretrained_choice(spec.pretrained)
    if pretrained and not has_pretrained(spec.model):
        raise UserError(f"{from_params.get(('pretrained',), f'runs.{name}.pretrained')}: model {spec.model!r} "
                        "has no pretrained weights to load; remove the key")

    train = validate(TrainSection, _section(params, "train"), ("train",))
    mlflow = validate(MlflowSection, _section(params, "mlflow"), ("mlflow",))
    data = _section(params, "data")
    if seed is not None:
        validate(_Seed, {"seed": seed})
    return RunConfig(
        name=name, model=spec.model, model_params=dict(spec.model_params), pretrained=pretrained,
        optimizer=spec.optimizer, lr=spec.lr, batch_size=spec.batch_size,
        epochs=min(spec.epochs, train.max_epochs) if train.max_epochs else spec.epochs,
        early_stop_count=spec.early_stop_count, augment=spec.augment, input=spec.input,
        seed=train.seeds[0] if seed is None else seed,
        val_fraction=train.val_fraction, split_seed=train.split_seed, evals_per_epoch=train.evals_per_epoch,
        device=train.device, experiment=mlflow.experiment, takes_param=spec.takes_param,
        data_params={k: data.get(k) for k in ("source", "subset")},
        registered_model=spec.registered_model, describes=spec.describes,
    )


def resolve_all(params: dict) -> dict[str, RunConfig]:
    return {name: resolve_run(params, name) for name in run_names(params)}


def resolve_data(params: dict) -> DataConfig:
    return validate(DataConfig, _section(params, "data"), ("data",))


def resolve_viz(params: dict) -> VizConfig:
    return validate(VizConfig, _section(params, "viz"), ("viz",))


def resolve_resnet_weights(params: dict) -> str:
    """``resnet_weights``: imagenet, none or a path to a .pth file (``pretrained_choice`` maps
    it to what ``create_model(..., pretrained=)`` takes)."""
    value = params.get("resnet_weights")
    if not isinstance(value, str) or not value:
        raise UserError(f"resnet_weights: expected imagenet, none or a path to a .pth file, got {value!r}")
    return value
