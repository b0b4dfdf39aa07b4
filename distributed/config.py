"""Every training flag and its default, in one dataclass; argparse is built from it."""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from serve_cli.base.cli import (FRACTION, NON_NEGATIVE, NON_NEGATIVE_INT, POSITIVE, POSITIVE_INT, DefaultsHelpFormatter,
                           number_in, path_text)

from .data import TASKS
from .datasets import DATASETS, FOLDER_PREFIX, folder_path
from .models import MODELS, build_model, has_batchnorm

# The recipe of the source documents: torchvision MNIST, batch 64, SGD(lr=0.01, momentum=0.5).
SEED_RECIPE = ["--optimizer", "sgd", "--lr", "0.01", "--momentum", "0.5",
               "--batch-size", "64", "--schedule", "none", "--label-smoothing", "0"]

# The default recipe (slimnet, 1 epoch, --lr 1e-2, --label-smoothing 0.1, --val-size 0, global batch 128 at
# 2 ranks): the fastest measured to >= 99.0% for seeds 0-2 on both MNIST tasks (see docs/PERFORMANCE.md).
DEFAULT_MODEL = "slimnet"

# Every flag has one category, given where the flag is declared (`_opt(..., kind=...)`); the resume rule, the
# schedule's re-fit and the TensorBoard hparams are read from it:
#   recipe    what the run learns: a different value on resume is another experiment, refused (a new --seed or
#             --val-size would even move validation images into training); an hparam
#   length    how long and in what steps: may change on resume, which re-fits the schedule; an hparam
#   runtime   where the same maths runs: may change on resume; an hparam
#   logistics paths, logging and checkpointing: may change on resume; not an hparam
KINDS = ("recipe", "length", "runtime", "logistics")


class ConfigError(ValueError):
    """A TrainConfig that no run can have; the message names the flag."""


def own_task(dataset: str) -> str:
    """The task name of a dataset other than MNIST: its own classes (a folder's name, else the dataset's)."""
    folder = folder_path(dataset)
    return folder.resolve().name if folder else dataset


def dataset_name(text: str) -> str:
    """An argparse type: a torchvision dataset's name or folder:PATH."""
    if text in DATASETS or (text.startswith(FOLDER_PREFIX) and len(text) > len(FOLDER_PREFIX)):
        return text
    raise argparse.ArgumentTypeError(f"{text!r}: choose one of {', '.join(DATASETS)}, or folder:PATH")


def step_range(text: str) -> str:
    """An argparse type: 'A:B', whole numbers with 1 <= A <= B (kept as text: a config stays JSON)."""
    first, sep, last = text.partition(":")
    if not (sep and first.strip().isdigit() and last.strip().isdigit() and 1 <= int(first) <= int(last)):
        raise argparse.ArgumentTypeError(f"{text!r} is not A:B with whole numbers 1 <= A <= B (e.g. 10:15)")
    return f"{int(first)}:{int(last)}"


def _opt(default: Any, help: str, *, kind: str, **kwargs: Any) -> Any:
    assert kind in KINDS, kind
    return field(default=default, metadata={"help": help, "kind": kind, **kwargs})


@dataclass
class TrainConfig:
    dataset: str = _opt("mnist", f"{', '.join(DATASETS)} (torchvision's MNIST-format datasets, downloaded into "
                                 f"--data-dir on first use), or folder:PATH (one sub-folder of images per class)",
                        type=dataset_name, kind="recipe")
    task: str | None = _opt(None, "MNIST only: digits (10 classes, the default) or binary (0-4 vs 5-9); other "
                                  "datasets learn their own classes", choices=list(TASKS), kind="recipe")
    model: str | None = _opt(None, f"network from the registry (default: {DEFAULT_MODEL})", kind="recipe")
    data_dir: str = _opt("data", "dataset root; the four IDX files go in DATA_DIR/MNIST/raw/ (FashionMNIST/raw/, "
                                 "KMNIST/raw/ for the others; downloaded if absent)", type=path_text, kind="logistics")
    run_dir: str | None = _opt(None, "where checkpoints, TensorBoard events and metrics go (default: runs/TASK)",
                               type=path_text, kind="logistics")
    epochs: int = _opt(1, "number of passes over the training split", type=POSITIVE_INT, kind="length")
    batch_size: int = _opt(64, "micro-batch: the most images one rank computes at once; it accumulates as many "
                               "as --global-batch-size needs", type=POSITIVE_INT, kind="runtime")
    global_batch_size: int | None = _opt(None, "images per optimiser step over all ranks, the same at any world "
                                               "size (default: --batch-size x the world size at the run's start; "
                                               "then kept in the checkpoint)", type=POSITIVE_INT, kind="length")
    optimizer: str = _opt("adam", "optimiser", choices=["sgd", "adam", "adamw"], kind="recipe")
    lr: float = _opt(1e-2, "learning rate (peak rate for onecycle)", type=POSITIVE, kind="recipe")
    momentum: float = _opt(0.9, "SGD momentum, in [0, 1)", type=FRACTION, kind="recipe")
    weight_decay: float = _opt(0.0, "weight decay", type=NON_NEGATIVE, kind="recipe")
    schedule: str = _opt("onecycle", "learning-rate schedule, stepped every batch",
                         choices=["onecycle", "cosine", "step", "none"], kind="recipe")
    augment: bool = _opt(False, "random rotation (10 deg), scale (10%%) and shift (10%%) of every training "
                                "image, on the device", action=argparse.BooleanOptionalAction, kind="recipe")
    label_smoothing: float = _opt(0.1, "cross-entropy label smoothing, in [0, 1)", type=FRACTION, kind="recipe")
    seed: int = _opt(0, "seed for weights, shuffling, dropout and the validation split, in [0, 2^32)",
                     type=number_in(int, 0, 2 ** 32, high_open=True), kind="recipe")
    val_size: int = _opt(0, "training images held out for model selection between epochs (e.g. 5000 for a run of "
                            "several epochs; 0: train on every image, best.pt = last.pt)",
                         type=NON_NEGATIVE_INT, kind="recipe")
    amp: str = _opt("auto", "autocast: auto = bf16 on CUDA if supported, else fp16; off on CPU",
                    choices=["auto", "bf16", "fp16", "off"], kind="recipe")
    channels_last: bool = _opt(True, "keep conv weights in channels-last layout (2-3x faster on CPU via oneDNN, "
                                     "and on CUDA tensor cores)", action=argparse.BooleanOptionalAction, kind="runtime")
    device: str = _opt("auto", "auto: CUDA when available, else CPU (gloo)", choices=["auto", "cuda", "cpu"],
                       kind="runtime")
    compile: bool = _opt(False, "torch.compile the model for training (compile time is paid at the first steps; "
                                "see docs/PERFORMANCE.md for when it wins)", action=argparse.BooleanOptionalAction,
                        kind="runtime")
    test_every_epoch: bool = _opt(False, "score the test split after every epoch (per-epoch test curves); by "
                                         "default once, after the last epoch, where the final metrics and the "
                                         "dashboard read it", action=argparse.BooleanOptionalAction,
                                  kind="logistics")
    eval_batch_size: int = _opt(2000, "batch size for validation and test evaluation", type=POSITIVE_INT,
                                kind="logistics")
    overfit_batches: int = _opt(0, "debug: train and evaluate on the first N batches only (loss should go to ~0)",
                                type=NON_NEGATIVE_INT, kind="recipe")
    log_every: int = _opt(20, "step metrics every N steps (TensorBoard's train/ and perf/, metrics.json, the "
                              "progress line): loss, lr, gradient norm, images/s, time per step and where it "
                              "went, utilisation, memory; 0: none of them", type=NON_NEGATIVE_INT, kind="logistics")
    progress_every: float = _opt(30.0, "seconds between plain progress lines when stdout is not a terminal "
                                       "(SLURM, Kubernetes, a pipe); on a terminal a live line instead; 0: every "
                                       "step", type=NON_NEGATIVE, kind="logistics")
    peak_flops: float | None = _opt(None, "peak FLOP/s of one node's devices together, for the utilisation "
                                          "(MFU) figure; default on CUDA: the GPU's datasheet figure, on the "
                                          "CPU: none (measure it: python benchmarks/flops.py)", type=POSITIVE,
                                    kind="logistics")
    profile_steps: str | None = _opt(None, "A:B: torch.profiler over optimiser steps A to B (1-based) on every "
                                           "rank: RUN_DIR/profile/rankR.trace.json.gz (Perfetto, "
                                           "chrome://tracing) and rankR.operators.txt", type=step_range,
                                     kind="logistics")
    checkpoint_every_steps: int = _opt(0, "also save last.pt every N steps inside an epoch, so a killed worker "
                                          "loses at most N steps (0: at epoch ends only)", type=NON_NEGATIVE_INT,
                                     kind="logistics")
    resume: bool | None = _opt(None, "--resume: continue from RUN_DIR/checkpoints/last.pt (error if absent); "
                                     "--no-resume: start over; default: resume when last.pt exists. "
                                     "the recipe's flags must be the checkpoint's (see the README's Resuming)",
                               action=argparse.BooleanOptionalAction, kind="logistics")

    def __post_init__(self) -> None:
        """The defaults that depend on other flags, then validate(): a config built in code is checked as one
        from the command line is (dataclasses.replace included)."""
        if self.task is None:
            self.task = "digits" if self.dataset == "mnist" else own_task(self.dataset)
        if self.model is None:
            self.model = DEFAULT_MODEL
        if self.run_dir is None:
            self.run_dir = str(Path("runs") / self.task)
        self.validate()

    def validate(self) -> None:
        """Each flag's own check (the argparse type and choices it is declared with), then the checks across
        flags. ConfigError names the flag; parse_args turns it into a usage error."""
        for f in dataclasses.fields(self):
            value, flag = getattr(self, f.name), "--" + f.name.replace("_", "-")
            if value is None or f.name == "task":  # the task's choices are MNIST's, checked below
                continue
            if "choices" in f.metadata and value not in f.metadata["choices"]:
                raise ConfigError(f"{flag} {value!r}: choose one of {', '.join(map(str, f.metadata['choices']))}")
            check = f.metadata.get("type")
            try:
                if check is not None and not isinstance(value, bool):
                    check(str(value))
            except argparse.ArgumentTypeError as e:
                raise ConfigError(f"{flag}: {e}") from None
        if self.model not in MODELS:
            raise ConfigError(f"unknown --model {self.model!r}: choose one of {', '.join(MODELS)}")
        if self.dataset == "mnist" and self.task not in TASKS:
            raise ConfigError(f"--task {self.task!r}: choose one of {', '.join(TASKS)}")
        if self.dataset != "mnist" and self.task != own_task(self.dataset):
            raise ConfigError(f"--task {self.task} is MNIST's; leave --task out to learn {self.dataset}'s own "
                              f"classes")
        for flag, value in (("--batch-size", self.batch_size), ("--global-batch-size", self.global_batch_size)):
            if value == 1 and has_batchnorm(build_model(self.model, 2)):
                raise ConfigError(f"{flag} 1: {self.model} has BatchNorm, which cannot train on one image at a "
                                  f"time; use {flag} 2 or more, or a model without BatchNorm")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def resume_conflicts(self, saved: dict[str, Any]) -> list[str]:
        """`--flag saved -> now` for each flag in which this run would be another experiment than `saved`."""
        # A flag newer than the checkpoint had its default then (--dataset mnist before there was a choice).
        default = {f.name: f.default for f in dataclasses.fields(self)} | {"task": "digits"}
        return [f"--{name.replace('_', '-')} {saved.get(name, default[name])} -> {value}"
                for name, value in self.to_dict().items()
                if name in flags_of("recipe") and saved.get(name, default[name]) != value]


def flags_of(*kinds: str) -> tuple[str, ...]:
    """The TrainConfig fields of these categories, in declaration order."""
    return tuple(f.name for f in dataclasses.fields(TrainConfig) if f.metadata["kind"] in kinds)


def hparams_of(config: dict[str, Any]) -> dict[str, Any]:
    """Every flag of a run's config but the logistics: what makes the run what it is (TensorBoard's hparams,
    the manifest's record of how the weights were made)."""
    return {name: config.get(name) for name in flags_of("recipe", "length", "runtime")}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m distributed.train",
        description="Train an MNIST classifier with DistributedDataParallel and AMP. "
                    "Launch with torchrun for several processes: "
                    "torchrun --nproc_per_node=N -m distributed.train ...",
        formatter_class=DefaultsHelpFormatter,
    )
    for f in dataclasses.fields(TrainConfig):
        meta = {k: v for k, v in f.metadata.items() if k != "kind"}
        flag = "--" + f.name.replace("_", "-")
        if "action" not in meta:
            meta.setdefault("type", _arg_type(f.type))
        parser.add_argument(flag, default=f.default, **meta)
    return parser


def _arg_type(annotation: str) -> type:
    # Annotations are strings under `from __future__ import annotations`.
    return {"int": int, "float": float}.get(annotation, str)


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    parser = build_parser()
    ns = parser.parse_args(argv)
    if ns.task is not None and ns.dataset != "mnist":  # given, not derived: the dataclass cannot tell them apart
        parser.error(f"--task {ns.task} is MNIST's; leave --task out to learn {ns.dataset}'s own classes")
    try:
        return TrainConfig(**vars(ns))
    except ConfigError as e:
        parser.error(str(e))
