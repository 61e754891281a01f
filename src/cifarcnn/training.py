"""The one training loop for every run of the report.

A run differs only by its config: model, optimizer, learning rate, batch size, epochs,
early stopping, augmentation and input size. Semantics kept from the original:

- a fixed-seed validation split, validation every ``steps_per_epoch // evals_per_epoch`` steps;
- early stopping when the oldest of the last ``early_stop_count`` validation losses is the
  lowest of them;
- the best checkpoint is the one with the lowest validation loss; final numbers come from it
  (scored by the evaluate stage in the pipeline, by ``train(score=True)`` elsewhere).

Fixed on purpose: augmentation only on training batches; accuracy counted per image.
"""
from __future__ import annotations

import hashlib
import json
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from .augment import AugmentDraws, draw_augment
from .batches import Preprocess, epoch_batches, make_splits, training_inputs
from .checkpoint import cpu_copy, load_checkpoint, save_checkpoint
from .codedeps import code_digest
from .config import RunConfig
from .data import Dataset
from .device import resolve_device, use_channels_last
from .errors import UserError
from .models import create_model
from .runfiles import BEST, resume_file
from .scoring import evaluate
from .step import EagerStep, GraphedStep, StepFn

LOSS_FLUSH_STEPS = 50  # copy per-step losses off the device (and check them) this often
AUGMENT_AHEAD_STEPS = 128  # on a GPU, steps augmented in one pass (128 x 32 images: 50 MB of floats)


class NonFiniteLoss(UserError):
    pass


class RunLogger(Protocol):
    """What the loop reports to (MLflow in the pipeline; nothing in some tests)."""

    def log_train_losses(self, steps: list[int], losses: list[float]) -> None: ...

    def log_validation(self, step: int, epoch: float, val_loss: float, val_acc: float) -> None: ...


@dataclass
class History:
    steps: list[int] = field(default_factory=list)  # every training step
    losses: list[float] = field(default_factory=list)  # its training loss
    validations: list[dict] = field(default_factory=list)  # step, epoch, train_loss, val_loss, val_acc

    def to_dict(self) -> dict:
        return {"steps": self.steps, "losses": self.losses, "validations": self.validations}

    def loss_blocks(self, window: int | None = None) -> dict[str, list]:
        """Training loss as mean and std over consecutive blocks of ``window`` steps (the
        report's "mean over 50 steps" and its band); ``step`` is each block's last step.
        Default: 50 steps, fewer for a run under 1,000 steps (at least 20 points on its chart,
        so a short run's loss curve is not a single dot)."""
        window = window or loss_window(len(self.losses))
        n = len(self.losses) // window * window
        if n == 0:
            return {"step": self.steps[-1:], "mean": [float(np.mean(self.losses))] if self.losses else [],
                    "std": [0.0] if self.losses else []}
        blocks = np.asarray(self.losses[:n], dtype=float).reshape(-1, window)
        return {"step": [int(s) for s in self.steps[window - 1:n:window]],
                "mean": blocks.mean(1).tolist(), "std": blocks.std(1).tolist()}


LOSS_WINDOW = 50  # steps per training-loss point, as the report's figures


def loss_window(n_steps: int) -> int:
    """50 steps per point for a real run; fewer (down to 1) when that would leave under 20 points."""
    return max(1, min(LOSS_WINDOW, n_steps // 20))


def should_stop(val_losses: list[float], count: int | None) -> bool:
    """Early stopping: the oldest of the last ``count`` validation losses is their minimum."""
    if not count or len(val_losses) < count:
        return False
    window = val_losses[-count:]
    return window[0] == min(window)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def make_optimizer(cfg: RunConfig, model: torch.nn.Module, capturable: bool = False) -> torch.optim.Optimizer:
    """``capturable``: Adam keeps its step count on the device, so a CUDA graph can hold its step."""
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr)  # plain SGD, no momentum (the original)
    return torch.optim.Adam(params, lr=cfg.lr, capturable=capturable)


# On by default on CUDA: measured on an H200 (bench/results/gpu_report_h200.json) at 4.5x (task2)
# and 3.9x (task3e) the eager step (one epoch each), with the same losses from the same weights (task2's first
# loss equal, mean |difference| 0.002 over 100 steps) and five-seed accuracies within the eager
# runs' noise. Dropout masks come from the graph's own RNG stream, so a dropout model's numbers
# differ from eager ones as another seed's would. The CPU never uses graphs.
CUDA_GRAPHS_BY_DEFAULT = True


def use_cuda_graphs(device: torch.device, requested: bool | None = None) -> bool:
    """Graphs only on CUDA, where the step is launch-bound; ``requested`` None takes the default."""
    return device.type == "cuda" and (CUDA_GRAPHS_BY_DEFAULT if requested is None else requested)


def make_step(fn: StepFn, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
              inputs: tuple[torch.Tensor, ...], graphs: bool) -> EagerStep | GraphedStep:
    if graphs:
        try:
            return GraphedStep(fn, model, optimizer, inputs)
        except Exception as err:  # noqa: BLE001 - an op this torch/GPU cannot capture: train eagerly
            print(f"CUDA graph capture failed ({type(err).__name__}: {str(err).splitlines()[0]}); "
                  f"training without CUDA graphs", flush=True)
    return EagerStep(fn)


def data_fingerprint(ds: Dataset) -> str:
    digest = hashlib.sha256()
    for arr in (ds.train_y, ds.test_y, ds.train_x[:64], ds.test_x[:64]):
        digest.update(np.ascontiguousarray(arr).tobytes())
    digest.update(f"{len(ds.train_y)}/{len(ds.test_y)}".encode())
    return digest.hexdigest()[:16]


def resume_key(cfg: RunConfig, ds: Dataset) -> str:
    """What a resume state continues: the resolved config (seed included), the data and the
    training code. Its file is named by it (runfiles.resume_file), so the question "may this
    state continue this run?" is settled by the name, before anything is opened."""
    digest = hashlib.sha256()
    for part in (cfg.to_dict(), data_fingerprint(ds), code_digest(__name__)):
        digest.update(json.dumps(part, sort_keys=True, default=str).encode())
    return digest.hexdigest()[:16]


def resume_mismatch(state: dict, config: dict, data: str, code: str) -> str | None:
    """Why a saved resume state cannot continue this run (None: it can)."""
    if state.get("config") != config:
        return "it was saved with other params"
    if state.get("data") != data:
        return "it was saved with other data"
    if state.get("code") != code:
        return "the training code changed since it was saved"
    if "best_model" not in state:
        return "it has no best checkpoint"
    return None


def _rng_state(device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


@dataclass
class TrainResult:
    metrics: dict
    history: History
    model: torch.nn.Module
    resumed_from_step: int | None


def train(cfg: RunConfig, ds: Dataset, out_dir: str | Path, logger: RunLogger | None = None,
          run_state: dict | None = None, cuda_graphs: bool | None = None, resume_dir: str | Path | None = None,
          keep_resume: bool = False, score: bool = True, resume_state: dict | None = None) -> TrainResult:
    """Train ``cfg`` on ``ds``; the best checkpoint goes to ``out_dir``/best.pt.

    The resume state (``resume_dir``/resume-<resume_key>.pt, default ``out_dir``) is written at every
    validation and holds everything to continue a killed run, the best weights included (DVC
    deletes best.pt before it re-runs a stage). It is discarded, with the reason printed, when
    params, data or training code differ. ``keep_resume`` leaves the final state in place for
    the caller to remove once the run is safely recorded (the pipeline: after MLflow).
    On a resume the restored history is handed to ``logger`` again (it skips what it has).

    ``run_state`` is extra plain data saved with the resume state (the MLflow run id), so a
    resumed run can report to the same place; the resumed copy is returned in the metrics.
    ``score``: the best checkpoint's loss and accuracy on train/val/test in the metrics (the
    pipeline leaves this to its evaluate stage, so each checkpoint is scored once).
    ``cuda_graphs``: True replays each step from a CUDA graph on CUDA; False never; None takes
    ``CUDA_GRAPHS_BY_DEFAULT``. ``resume_state``: the resume file's contents when the caller has
    already read them (the pipeline does, for the MLflow run id), so the file is read once.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = resolve_device(cfg.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    seed_everything(cfg.seed)
    splits = make_splits(ds, cfg.val_fraction, cfg.split_seed, device)
    n_train = len(splits["train"])
    if cfg.batch_size > n_train:
        raise UserError(f"runs.{cfg.name}.batch_size: {cfg.batch_size} is larger than the {n_train} "
                        f"training images (data.subset too small?)")
    channels_last = use_channels_last(device, cfg.input.size)
    prep = Preprocess(cfg.input, device, channels_last)
    model = create_model(cfg.model, pretrained=cfg.pretrained, **cfg.model_params).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    graphs = use_cuda_graphs(device, cuda_graphs)
    optimizer = make_optimizer(cfg, model, capturable=graphs)
    steps_per_epoch = n_train // cfg.batch_size
    eval_every = max(1, steps_per_epoch // cfg.evals_per_epoch)
    total_steps = steps_per_epoch * cfg.epochs
    history = History()
    best = {"val_loss": math.inf, "step": -1}
    best_weights: dict[str, torch.Tensor] | None = None  # on the CPU
    start_step = 0
    fingerprint, code = data_fingerprint(ds), code_digest(__name__)
    config_dict = cfg.to_dict()
    resume_path, best_path = resume_file(Path(resume_dir or out_dir), resume_key(cfg, ds)), out_dir / BEST

    def save_best() -> None:
        save_checkpoint(best_path, {"model": best_weights, "config": config_dict, "classes": list(ds.classes), **best})

    resumed_from = None
    state = resume_state if resume_state is not None else (load_checkpoint(resume_path) if resume_path.exists() else None)
    if state is not None:
        why_not = resume_mismatch(state, config_dict, fingerprint, code)
        if why_not is None:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            _set_rng_state(state["rng"], device)
            history = History(**state["history"])
            best, best_weights = state["best"], state["best_model"]
            start_step = resumed_from = state["step"]
            if run_state is not None:
                run_state.update(state.get("run_state", {}))
            if best_weights is not None:
                save_best()  # DVC removed it before running the stage
            print(f"resuming {cfg.name} from step {start_step} ({resume_path})", flush=True)
            if logger is not None:  # what the killed process may not have logged
                logger.log_train_losses(list(history.steps), list(history.losses))
                for v in history.validations:
                    logger.log_validation(v["step"], v["epoch"], v["val_loss"], v["val_acc"])
        else:
            print(f"ignoring {resume_path}: {why_not}; training {cfg.name} from the start", flush=True)
            resume_path.unlink()
    if resumed_from is None:
        best_path.unlink(missing_ok=True)
    saved_step = start_step if resumed_from is not None else -1

    def save_resume() -> None:
        nonlocal saved_step
        save_checkpoint(resume_path, {
            "config": config_dict, "data": fingerprint, "code": code, "step": step, "model": model.state_dict(),
            "optimizer": optimizer.state_dict(), "rng": _rng_state(device), "history": history.to_dict(),
            "best": best, "best_model": best_weights, "run_state": dict(run_state or {}),
        })
        saved_step = step

    model.train()
    step = start_step
    pending_steps: list[int] = []
    pending_losses: list[torch.Tensor] = []
    # A run killed right after the validation that stopped it must not train on when resumed.
    stopped_early = should_stop([v["val_loss"] for v in history.validations], cfg.early_stop_count)
    aug_gen = torch.Generator(device=device)
    train_split = splits["train"]

    def optimisation_step(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        loss = F.cross_entropy(model(prep.finish(x)), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss

    def draws_for(step: int) -> AugmentDraws:
        aug_gen.manual_seed(cfg.seed * 1_000_003 + step)  # augmentation is a function of the step
        return draw_augment(cfg.augment, cfg.batch_size, aug_gen, device)

    run_step: EagerStep | GraphedStep | None = None
    augment_ahead = AUGMENT_AHEAD_STEPS if device.type == "cuda" else 1
    started = time.perf_counter()

    def flush_losses() -> None:
        if not pending_losses:
            return
        values = torch.stack(pending_losses).float().cpu().tolist()
        for s, v in zip(pending_steps, values):
            if not math.isfinite(v):
                raise NonFiniteLoss(
                    f"runs.{cfg.name}: training loss became {v} at step {s}; stopped. The last good "
                    f"checkpoint is kept in {out_dir}. Lower the learning rate (now {cfg.lr:g}) and re-run."
                )
        history.steps.extend(pending_steps)
        history.losses.extend(values)
        if logger is not None:
            logger.log_train_losses(list(pending_steps), values)
        pending_steps.clear()
        pending_losses.clear()

    epoch = step // steps_per_epoch
    while epoch < cfg.epochs and not stopped_early:
        order_gen = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)  # same order after a resume
        batches = epoch_batches(n_train, cfg.batch_size, order_gen, device)
        skip = step - epoch * steps_per_epoch
        bar = tqdm(total=steps_per_epoch, initial=skip, desc=f"{cfg.name} epoch {epoch + 1}/{cfg.epochs}",
                   unit="step", disable=None, leave=False, dynamic_ncols=True)
        for x, y in training_inputs(train_split, batches[skip:], step, cfg.augment, draws_for, augment_ahead):
            if run_step is None:  # built on the first real batch (capture needs real inputs)
                run_step = make_step(optimisation_step, model, optimizer, (x, y), graphs)
            loss = run_step(x, y)
            step += 1
            pending_steps.append(step)
            pending_losses.append(loss)
            bar.update(1)
            if len(pending_losses) >= LOSS_FLUSH_STEPS:
                flush_losses()
                bar.set_postfix(loss=f"{history.losses[-1]:.3f}", refresh=False)
            if step % eval_every == 0:
                flush_losses()
                val_loss, val_acc = evaluate(model, splits["val"], prep)
                if not math.isfinite(val_loss):
                    raise NonFiniteLoss(f"runs.{cfg.name}: validation loss became {val_loss} at step {step}; "
                                        f"stopped. Lower the learning rate (now {cfg.lr:g}) and re-run.")
                recent = history.losses[-eval_every:]
                record = {"step": step, "epoch": round(step / steps_per_epoch, 4),
                          "train_loss": float(np.mean(recent)) if recent else float("nan"),
                          "val_loss": val_loss, "val_acc": val_acc}
                history.validations.append(record)
                if logger is not None:
                    logger.log_validation(step, record["epoch"], val_loss, val_acc)
                if val_loss < best["val_loss"]:
                    best = {"val_loss": val_loss, "val_acc": val_acc, "step": step, "epoch": record["epoch"]}
                    best_weights = cpu_copy(model)
                    save_best()
                stopped_early = should_stop([v["val_loss"] for v in history.validations], cfg.early_stop_count)
                save_resume()
                bar.set_postfix(loss=f"{record['train_loss']:.3f}", val_loss=f"{val_loss:.3f}",
                                val_acc=f"{val_acc:.3f}")
                if bar.disable:
                    print(f"{cfg.name} step {step}/{total_steps} epoch {record['epoch']:.2f}: train loss "
                          f"{record['train_loss']:.4f}, val loss {val_loss:.4f}, val acc {val_acc:.4f}", flush=True)
                if stopped_early:
                    break
        bar.close()
        flush_losses()
        if not stopped_early:
            epoch += 1
    train_seconds = time.perf_counter() - started
    if best_weights is None:  # fewer steps than one validation interval: keep the final state
        val_loss, val_acc = evaluate(model, splits["val"], prep)
        best = {"val_loss": val_loss, "val_acc": val_acc, "step": step, "epoch": round(step / steps_per_epoch, 4)}
        best_weights = cpu_copy(model)
        save_best()
    if saved_step != step:  # the steps after the last validation: a rerun need not repeat them
        save_resume()

    model.load_state_dict(best_weights)
    final = {f"{name}_{kind}": value for name in ("train", "val", "test")
             for kind, value in zip(("loss", "acc"), evaluate(model, splits[name], prep))} if score else {}
    steps_run = step - start_step
    metrics = {
        **final,
        "best_val_loss": best["val_loss"], "best_val_acc": best["val_acc"], "best_step": best["step"],
        "best_epoch": best["epoch"], "steps": step,
        "epochs_run": round(step / steps_per_epoch, 4), "stopped_early": stopped_early,
        "train_seconds": round(train_seconds, 2),
        "train_images_per_s": round(steps_run * cfg.batch_size / train_seconds, 1) if steps_run else None,
        "device": str(device), "cuda_graph": bool(run_step is not None and run_step.graphed),
        "n_train": n_train, "n_val": len(splits["val"]), "n_test": len(splits["test"]),
    }
    if not keep_resume:
        resume_path.unlink(missing_ok=True)
    return TrainResult(metrics, history, model, resumed_from)


