"""The checkpoint file: its schema, written atomically, read back with weights_only=True and checked.

Schema (version 2), a plain dict of tensors and plain values:
  version     int, CHECKPOINT_VERSION
  model       the unwrapped network's state_dict
  optimizer   optimiser state_dict
  scheduler   LR scheduler state_dict, or None (--schedule none)
  scaler      GradScaler state_dict
  config      TrainConfig as a dict (the flags of the run)
  classes     class names in output order
  normalization  {mean, std} the network's inputs were normalised with (its dataset's; absent before
              --dataset: MNIST's 0.1307 / 0.3081)
  world_size  how many ranks wrote it
  rng         one {cpu[, cuda]} RNG state per rank
  run         RunState as a dict: epoch (completed), step, batch_in_epoch, the work done so far, history
  metrics     the last completed epoch's record

`Trainer.state_dict` (distributed/train.py) writes it and `Trainer.load_state_dict` reads it; `summary`
is what everything else (export) needs from it. Version 1 (the same, plus `epoch`/`step` twice) loads too.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .files import atomic_write

if TYPE_CHECKING:
    from .config import TrainConfig

CHECKPOINT_VERSION = 2
READABLE_VERSIONS = (1, 2)
REQUIRED_KEYS = ("version", "model", "config", "run")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable, or not one of ours."""


def save(path: Path, state: dict[str, Any]) -> None:
    """Atomic: on a full disk (torch raises RuntimeError for it, not OSError) the previous file stays."""
    try:
        atomic_write(path, lambda p: torch.save({"version": CHECKPOINT_VERSION, **state}, p))
    except (OSError, RuntimeError) as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:120]
        raise CheckpointError(f"cannot write {path} ({reason}; is the disk full?): the previous checkpoint "
                              f"is kept") from None


def load(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint without unpickling arbitrary objects; one clear error for every way it can be bad."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path} is not a readable checkpoint ({reason[:200]})") from None
    if not isinstance(state, dict) or any(k not in state for k in REQUIRED_KEYS):
        raise CheckpointError(f"{path} is not a checkpoint of this project (expected keys {REQUIRED_KEYS})")
    if state["version"] not in READABLE_VERSIONS:
        raise CheckpointError(f"{path} has checkpoint version {state['version']!r}; this version reads "
                              f"{READABLE_VERSIONS}: use the release that wrote it")
    if not isinstance(state["config"], dict) or not isinstance(state["run"], dict):
        raise CheckpointError(f"{path} is not a checkpoint of this project (config or run is malformed)")
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
    config = state["config"]
    norm = state.get("normalization") or {"mean": 0.1307, "std": 0.3081}
    return {"name": config.get("model"), "task": config.get("task"), "classes": state.get("classes"),
            "dataset": config.get("dataset", "mnist"), "mean": float(norm["mean"]), "std": float(norm["std"]),
            "epoch": state["run"].get("epoch"), "metrics": state.get("metrics") or {},
            "data_dir": config.get("data_dir")}


def rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)
