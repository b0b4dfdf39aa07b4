"""Every training flag and its default, in one dataclass; argparse is built from it."""
from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# The recipe of the source documents: torchvision MNIST, batch 64, SGD(lr=0.01, momentum=0.5).
SEED_RECIPE = ["--optimizer", "sgd", "--lr", "0.01", "--momentum", "0.5",
               "--batch-size", "64", "--schedule", "none"]

# Fastest measured model per task to reach the accuracy goals (see docs/PERFORMANCE.md).
DEFAULT_MODEL = {"digits": "fastnet", "binary": "fastnet"}


def _opt(default: Any, help: str, **kwargs: Any) -> Any:
    return field(default=default, metadata={"help": help, **kwargs})


@dataclass
class TrainConfig:
    task: str = _opt("digits", "digits: 10 classes; binary: 0-4 vs 5-9", choices=["digits", "binary"])
    model: str | None = _opt(None, "network from the registry (default: fastest for the task)")
    data_dir: str = _opt("data", "MNIST root; the four files go in DATA_DIR/MNIST/raw/ (downloaded if absent)")
    run_dir: str | None = _opt(None, "where checkpoints, TensorBoard events and metrics go (default: runs/TASK)")
    epochs: int = _opt(2, "number of passes over the training split")
    batch_size: int = _opt(64, "batch size PER RANK (global batch = this x world size)")
    optimizer: str = _opt("adam", "optimiser", choices=["sgd", "adam", "adamw"])
    lr: float = _opt(5e-3, "learning rate (peak rate for onecycle)")
    momentum: float = _opt(0.9, "SGD momentum")
    weight_decay: float = _opt(0.0, "weight decay")
    schedule: str = _opt("onecycle", "learning-rate schedule, stepped every batch",
                         choices=["onecycle", "cosine", "step", "none"])
    augment: bool = _opt(False, "random rotation (10 deg), scale (10%%) and shift (10%%) of every training "
                                "image, on the device", action=argparse.BooleanOptionalAction)
    label_smoothing: float = _opt(0.0, "cross-entropy label smoothing")
    seed: int = _opt(0, "seed for weights, shuffling, dropout and the validation split")
    val_size: int = _opt(5000, "training images held out for model selection (0: train on all 60,000)")
    amp: str = _opt("auto", "autocast: auto = bf16 on CUDA if supported, else fp16; off on CPU",
                    choices=["auto", "bf16", "fp16", "off"])
    channels_last: bool = _opt(True, "keep conv weights in channels-last layout (2-3x faster on CPU via oneDNN, "
                                     "and on CUDA tensor cores)", action=argparse.BooleanOptionalAction)
    device: str = _opt("auto", "auto: CUDA when available, else CPU (gloo)", choices=["auto", "cuda", "cpu"])
    eval_batch_size: int = _opt(2000, "batch size for validation and test evaluation")
    overfit_batches: int = _opt(0, "debug: train and evaluate on the first N batches only (loss should go to ~0)")
    log_every: int = _opt(20, "log train loss and lr to TensorBoard every N steps")
    checkpoint_every_steps: int = _opt(0, "also save last.pt every N steps inside an epoch, so a killed worker "
                                          "loses at most N steps (0: at epoch ends only)")
    resume: bool | None = _opt(None, "--resume: continue from RUN_DIR/checkpoints/last.pt (error if absent); "
                                     "--no-resume: start over; default: resume when last.pt exists",
                               action=argparse.BooleanOptionalAction)

    def __post_init__(self) -> None:
        if self.model is None:
            self.model = DEFAULT_MODEL[self.task]
        if self.run_dir is None:
            self.run_dir = str(Path("runs") / self.task)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m distributed.train",
        description="Train an MNIST classifier with DistributedDataParallel and AMP. "
                    "Launch with torchrun for several processes: "
                    "torchrun --nproc_per_node=N -m distributed.train ...",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    for f in dataclasses.fields(TrainConfig):
        meta = dict(f.metadata)
        flag = "--" + f.name.replace("_", "-")
        if "action" not in meta:
            meta["type"] = _arg_type(f.type)
        parser.add_argument(flag, default=f.default, **meta)
    return parser


def _arg_type(annotation: str) -> type:
    # Annotations are strings under `from __future__ import annotations`.
    return {"int": int, "float": float}.get(annotation, str)


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    from .models import MODELS

    parser = build_parser()
    ns = parser.parse_args(argv)
    if ns.model is not None and ns.model not in MODELS:
        parser.error(f"unknown --model {ns.model!r}: choose one of {', '.join(MODELS)}")
    cfg = TrainConfig(**vars(ns))
    for name in ("epochs", "batch_size", "eval_batch_size", "log_every"):
        if getattr(cfg, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if min(cfg.val_size, cfg.overfit_batches, cfg.checkpoint_every_steps) < 0:
        parser.error("--val-size, --overfit-batches and --checkpoint-every-steps must not be negative")
    return cfg
