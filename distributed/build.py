"""A run's parts, built in the one order that works, and handed to the Trainer (torchtitan's way).

The order matters: the run dir is locked before anything is read from it; the checkpoint is read before the
data (a resume on other data is refused); the data is a collective (local rank 0 downloads first); the
weights are seeded identically on every rank, then each rank's own seed is set (dropout differs per rank);
the checkpoint is restored into the plain module before it is compiled and wrapped in DDP; TensorBoard's
writer purges the steps after the checkpoint. A test can skip all this and make a `Parts` of its own.
"""
from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data.distributed import DistributedSampler

from . import checkpoint, dist
from .checkpoint import CheckpointError, RunState
from .config import TrainConfig
from .data import Split, Task, data_changes, fingerprint, load_data, task_of
from .datasets import DataError
from .engine import amp_dtype, make_scaler
from .files import lock_run_dir
from .models import build_model, has_batchnorm, to_device
from .optim import build_optimizer, build_scheduler
from .report import Reporter
from .sampling import eval_shard, make_sampler, steps_per_epoch
from .timing import Phases


@dataclass
class Parts:
    """Everything a Trainer runs with. `model` is the plain module (checkpoints, evaluation, export); `net` is
    what the training forward calls (compiled and/or DDP)."""
    task: Task
    train: Split
    val: Split
    test: Split
    data: dict[str, Any]  # data.fingerprint: what the run trains and is scored on
    model: nn.Module
    net: nn.Module
    dtype: torch.dtype | None
    sampler: DistributedSampler
    drop_single: bool  # BatchNorm: an epoch's last batch of one image is left out
    steps_each_epoch: int
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler | None
    scaler: torch.amp.GradScaler
    report: Reporter
    test_shard: torch.Tensor
    val_shard: torch.Tensor
    run: RunState = field(default_factory=RunState)
    record: dict[str, float] = field(default_factory=dict)  # the last epoch's metrics
    closing: ExitStack = field(default_factory=ExitStack)  # the lock and the writer, released by Trainer.close


def build_parts(cfg: TrainConfig, env: dist.DistEnv, phases: Phases) -> Parts:
    closing = ExitStack()
    try:
        return _build(cfg, env, phases, closing)
    except BaseException:
        closing.close()
        raise


def _build(cfg: TrainConfig, env: dist.DistEnv, phases: Phases, closing: ExitStack) -> Parts:
    run_dir = Path(cfg.run_dir)
    last = run_dir / "checkpoints" / "last.pt"
    task = task_of(cfg.dataset, cfg.task)  # a folder's classes are its sub-folders: may raise DataError
    lock = lock_run_dir(run_dir, env)
    if lock is not None:
        closing.callback(lock.release)
    with phases("checkpoints/logging"):
        state = checkpoint.resume_state(cfg, last)
    with phases("data"):
        train, val, test, notes = load_data(cfg, task, env)
        data = fingerprint(train, val, test, task.num_classes)
    if state is not None and state["data"]:
        changed = data_changes(state["data"], data, task.classes)
        if changed:  # another split, another validation set: not the run the checkpoint belongs to
            raise CheckpointError(f"{last} was trained on other data ({cfg.dataset} changed: {changed}): restore "
                                  f"the data, or start over with --no-resume or another --run-dir")
    dtype = amp_dtype(cfg.amp, env.device)

    torch.manual_seed(cfg.seed)  # identical initial weights on every rank (DDP also broadcasts rank 0's)
    model = to_device(build_model(cfg.model, task.num_classes), env.device, cfg.channels_last)
    torch.manual_seed(cfg.seed + env.rank)  # ranks drop out different units (a resume restores each rank's)
    sampler = make_sampler(len(train), env.rank, env.world_size, cfg.seed, shuffle=not cfg.overfit_batches)
    drop_single = has_batchnorm(model)
    if drop_single and len(sampler) < 2:
        raise DataError(f"{cfg.model} has BatchNorm, which needs at least 2 training images per rank, and "
                        f"{len(train)} over {env.world_size} rank(s) leave {len(sampler)}: lower --val-size, use "
                        f"fewer ranks, or a model without BatchNorm")
    steps = steps_per_epoch(sampler, cfg.batch_size, drop_single)
    optimizer = build_optimizer(cfg, model.parameters())
    scheduler = build_scheduler(cfg, optimizer, steps)
    scaler = make_scaler(env.device, dtype)
    run, record, refitted = RunState(), {}, False
    if state is not None:
        run, record, refitted = checkpoint.restore(
            state, last, model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler, cfg=cfg,
            world_size=env.world_size, rank=env.rank, device=env.device, steps_each_epoch=steps)
    # The training forward may be compiled (nanoGPT's order: compile, then DDP). Under torchrun the model is
    # always DDP, one rank too: one code path, and a one-GPU machine runs the same all-reduces as a cluster.
    net = torch.compile(model) if cfg.compile else model
    if env.is_distributed:
        net = DDP(net, device_ids=[env.device] if env.device.type == "cuda" else None)

    report = Reporter(cfg, env, task, purge_step=run.step + 1 if state is not None else None)
    closing.callback(report.close)
    if env.is_main:
        for stale in last.parent.glob(".*.tmp*"):  # a save killed half-way left its temp file
            stale.unlink(missing_ok=True)
    if steps < steps_per_epoch(sampler, cfg.batch_size):
        notes.append(f"{cfg.model} has BatchNorm, which cannot train on one image: each epoch's last batch, one "
                     f"image per rank, is left out ({env.world_size} of {len(train):,} images)")
    report.notes(notes, warnings=[env.warning] if env.warning else [])
    if refitted:
        report.refitted({"world_size": state["world_size"], **state["config"]})
    resumed_at = None if state is None else (
        f"epoch {run.epoch}" + (f" + {run.batch_in_epoch} batches" if run.batch_in_epoch else "")
        + f", step {run.step}")
    with phases("checkpoints/logging"):
        report.started(resumed_at, model, test.batch(torch.arange(min(2, len(test)), device=env.device))[0])
    return Parts(task, train, val, test, data, model, net, dtype, sampler, drop_single, steps, optimizer, scheduler,
                 scaler, report, eval_shard(len(test), env.rank, env.world_size, env.device),
                 eval_shard(len(val), env.rank, env.world_size, env.device), run, record, closing)
