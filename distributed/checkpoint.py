"""The checkpoint file: its schema, written atomically, read back with weights_only=True and checked.

Schema (version 3), a plain dict of tensors and plain values:
  version     int, CHECKPOINT_VERSION
  digest      sha256 over everything else in the file (`content_digest`), checked by `load`: a flipped byte in
              the weights is refused, not trained on or exported
  model       the unwrapped network's state_dict
  optimizer   optimiser state_dict
  scheduler   LR scheduler state_dict, or None (--schedule none)
  scaler      GradScaler state_dict
  config      TrainConfig as a dict (the flags of the run; global_batch_size resolved, absent before it existed:
              migrated as batch_size x world_size, what it was then)
  classes     class names in output order
  normalization  {mean, std} the network's inputs were normalised with (its dataset's; absent before
              --dataset: MNIST's 0.1307 / 0.3081)
  world_size  how many ranks wrote it (the steps do not depend on it: config's global_batch_size fixes them)
  rng         one {cpu[, cuda]} RNG state per rank
  run         RunState as a dict: epoch (completed), step, step_in_epoch, the work done so far, history
  metrics     the last completed epoch's record
  amp         the autocast dtype the run trained and evaluated in ("off", "bfloat16", "float16")
  data        what the run trained and was scored on (`data.fingerprint`): digest of every split, digest of the
              test split alone, images per class in train (with validation) and test

This module owns it whole: `RunState`, `capture` (a run's parts -> the dict) beside `restore` (the dict ->
a run's parts, with the rule for when the schedule is re-fitted), `save`/`load` (atomic; weights_only,
version and digest checked; older versions migrated to this schema) and `summary`, what export needs.
Versions 1 and 2 (no digest, amp or data; version 1 has `epoch`/`step` twice) load too, unchecked.
"""
from __future__ import annotations

import errno
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from serve_cli.base.cli import first_line
from serve_cli.base.files import atomic_write

from .config import TrainConfig, flags_of, hparams_of
from .data import MEAN, STD
from .digest import digest

if TYPE_CHECKING:
    from torch.amp import GradScaler
    from torch.optim import Optimizer
    from torch.optim.lr_scheduler import LRScheduler

CHECKPOINT_VERSION = 3
READABLE_VERSIONS = (1, 2, 3)
REQUIRED_KEYS = ("version", "model", "config", "run")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable, or not one of ours."""


@dataclass
class RunState:
    """What survives a restart besides the weights and optimiser: kept in every checkpoint."""
    epoch: int = 0  # epochs completed
    step: int = 0  # optimiser steps completed
    step_in_epoch: int = 0  # steps of epoch `epoch` already done (mid-epoch checkpoints)
    steps_per_epoch: int = 0  # of the plan the run stepped its schedule with (0: not recorded, before it was)
    train_seconds: float = 0.0  # every training step ever taken, interrupted attempts included
    train_images: int = 0
    epoch_loss_sum: float = 0.0  # the current epoch's work so far (it may span a restart)
    epoch_seconds: float = 0.0
    best_val_accuracy: float = -1.0
    best_epoch: int = 0
    history: list[dict[str, float]] = field(default_factory=list)


def capture(*, model: nn.Module, optimizer: Optimizer, scheduler: LRScheduler | None, scaler: GradScaler,
            cfg: TrainConfig, classes: tuple[str, ...], world_size: int, rng: list[dict[str, torch.Tensor]],
            normalization: tuple[float, float], run: RunState, metrics: dict[str, float], amp: str,
            data: dict[str, Any]) -> dict[str, Any]:
    """The checkpoint of a run, in this module's schema (save adds version and digest)."""
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict() if scheduler else None, "scaler": scaler.state_dict(),
            "config": cfg.to_dict(), "classes": list(classes), "world_size": world_size, "rng": rng,
            "normalization": {"mean": normalization[0], "std": normalization[1]}, "run": asdict(run),
            "metrics": metrics, "amp": amp, "data": data}


@dataclass(frozen=True)
class Restored:
    run: RunState
    metrics: dict[str, float]  # the last completed epoch's record
    changed: list[str]  # `--flag old -> new` for each length flag that changed: the schedule was re-fitted
    epoch_restarted: bool  # the global batch changed: the interrupted epoch's steps are other steps now


def restore(state: dict[str, Any], path: Path, *, model: nn.Module, optimizer: Optimizer,
            scheduler: LRScheduler | None, scaler: GradScaler, cfg: TrainConfig, rank: int,
            device: torch.device, steps_each_epoch: int) -> Restored:
    """Load a checkpoint into a run's parts.

    The steps do not depend on the world size (sampling.py), so at any world size with the same length flags
    the run continues exactly where the checkpoint stopped: same step, same images, same schedule (each rank's
    RNG too, for the ranks the checkpoint had). Another --epochs re-fits the schedule to the new length; another
    --global-batch-size also makes other steps of the epoch, so the interrupted epoch restarts."""
    try:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        run = RunState(**state["run"])
        saved = state["config"]
        changed = [f"--{name.replace('_', '-')} {saved.get(name)} -> {getattr(cfg, name)}"
                   for name in flags_of("length") if saved.get(name) != getattr(cfg, name)]
        # other steps in an epoch: another global batch, or a plan that counts them otherwise (0: not recorded)
        other_steps = (saved.get("global_batch_size") != cfg.global_batch_size
                       or run.steps_per_epoch not in (0, steps_each_epoch))
        if other_steps and not changed:
            changed = [f"steps per epoch {run.steps_per_epoch} -> {steps_each_epoch}"]
        if not changed and scheduler is not None and state["scheduler"]:
            scheduler.load_state_dict(state["scheduler"])
        if rank < len(state["rng"]):
            set_rng_state(state["rng"][rank], device)
    except (KeyError, TypeError, ValueError, RuntimeError, IndexError) as e:
        raise CheckpointError(f"{path} does not fit this run ({first_line(e, 160)}): use another --run-dir "
                              f"or --no-resume") from None
    metrics = dict(state["metrics"] or {})
    restarted = run.step_in_epoch > 0 and other_steps
    if restarted:
        run.step_in_epoch, run.epoch_loss_sum, run.epoch_seconds = 0, 0.0, 0.0
    run.steps_per_epoch = steps_each_epoch
    if changed and scheduler is not None:
        done = run.epoch * steps_each_epoch + run.step_in_epoch
        refit(scheduler, optimizer, min(done, cfg.epochs * steps_each_epoch))
    return Restored(run, metrics, changed, restarted)


def refit(scheduler: LRScheduler, optimizer: Optimizer, steps: int) -> None:
    """The fresh schedule (built for the new length) advanced to `steps`, from each group's initial rate: the
    optimiser state just loaded holds the old schedule's current one, which chained schedules would build on.
    Capped by the caller at the new length: a run resumed with fewer --epochs than it has done only scores."""
    for group in optimizer.param_groups:
        group["lr"] = group.get("initial_lr", group["lr"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # stepping a scheduler without optimiser steps warns
        for _ in range(steps):
            scheduler.step()


def content_digest(state: dict[str, Any]) -> str:
    """sha256 over every value but `digest` itself (digest.py: what torch.load gives back hashes as what
    torch.save was given)."""
    return digest({k: v for k, v in state.items() if k != "digest"})


def save(path: Path, state: dict[str, Any]) -> None:
    """Atomic: on a full disk (torch raises RuntimeError for it, not OSError) the previous file stays."""
    state = {"version": CHECKPOINT_VERSION, **state}
    state["digest"] = content_digest(state)
    try:
        atomic_write(path, lambda p: torch.save(state, p))
    except (OSError, RuntimeError) as e:
        # torch's writer says only "file write failed", which is how a full disk shows
        full = getattr(e, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or not isinstance(e, OSError)
        kept = f"the previous {path.name} is kept" if path.is_file() else f"no {path.name} was written"
        raise CheckpointError(f"cannot write {path} ({first_line(e, 120)}{'; is the disk full?' if full else ''}): "
                              f"{kept}") from None


def load(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint without unpickling arbitrary objects; one clear error for every way it can be bad."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path} is not a readable checkpoint ({first_line(e)})") from None
    if not isinstance(state, dict) or any(k not in state for k in REQUIRED_KEYS):
        raise CheckpointError(f"{path} is not a checkpoint of this project (expected keys {REQUIRED_KEYS})")
    if state["version"] not in READABLE_VERSIONS:
        raise CheckpointError(f"{path} has checkpoint version {state['version']!r}; this version reads "
                              f"{READABLE_VERSIONS}: use the release that wrote it")
    if not isinstance(state["config"], dict) or not isinstance(state["run"], dict):
        raise CheckpointError(f"{path} is not a checkpoint of this project (config or run is malformed)")
    if state["version"] >= 3 and state.get("digest") != content_digest(state):
        raise CheckpointError(f"{path} is damaged: its contents no longer match the digest written with it; "
                              f"use another checkpoint (last.pt, best.pt, a backup) or train again")
    return migrate(state)


def migrate(state: dict[str, Any]) -> dict[str, Any]:
    """An older version's fields in this version's schema, so that no reader needs defaults of its own."""
    state.setdefault("normalization", None)
    state["normalization"] = state["normalization"] or {"mean": MEAN, "std": STD}  # before --dataset: MNIST
    for key in ("amp", "data", "metrics", "classes", "scheduler"):
        state.setdefault(key, None)
    state["config"].setdefault("dataset", "mnist")
    if "batch_in_epoch" in state["run"]:  # its name until it was seen to count optimiser steps, not batches
        state["run"]["step_in_epoch"] = state["run"].pop("batch_in_epoch")
    # before --global-batch-size, the global batch was the per-rank batch times the world size
    state["config"].setdefault("global_batch_size", state["config"].get("batch_size", 64) * state.get("world_size", 1))
    return state


def resume_state(cfg: TrainConfig, last: Path) -> dict[str, Any] | None:
    if cfg.resume is False or (cfg.resume is None and not last.exists()):
        return None
    if not last.exists():
        raise CheckpointError(f"--resume given but {last} does not exist; drop --resume to start fresh")
    state = load(last)
    conflicts = cfg.resume_conflicts(state["config"])
    if conflicts:
        raise CheckpointError(f"{last} is another experiment ({', '.join(conflicts)}): repeat its flags to resume, "
                              f"or start over with --no-resume or another --run-dir")
    return state


def summary(state: dict[str, Any]) -> dict[str, Any]:
    """What a loaded checkpoint says about the network it holds, for export."""
    config, norm = state["config"], state["normalization"]
    return {"name": config.get("model"), "task": config.get("task"), "classes": state["classes"],
            "dataset": config["dataset"], "mean": float(norm["mean"]), "std": float(norm["std"]),
            "epoch": state["run"].get("epoch"), "metrics": state["metrics"] or {},
            "data_dir": config.get("data_dir"), "amp": state["amp"],
            # the metrics were scored on these weights (a mid-epoch save keeps the last epoch's record)
            "scored": not state["run"].get("step_in_epoch"),
            "test_digest": (state["data"] or {}).get("test_digest"),
            # how the weights were made: every flag but paths and logging, and the world size that wrote them
            "training": {**hparams_of(config), "world_size": state.get("world_size")}}


def rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)
