"""A run's parts, built in the one order that works, and handed to the Trainer (torchtitan's way).

The order matters: the run dir is locked before anything is read from it; the checkpoint is read before the
data (a resume on other data is refused); the data is a collective (local rank 0 downloads first); the
weights are seeded identically on every rank, then each rank's own seed is set (dropout differs per rank);
the checkpoint is restored into the plain module before it is compiled and wrapped in DDP; TensorBoard's
writer purges the steps after the checkpoint. A test can skip all this and make a `Parts` of its own.
"""
from __future__ import annotations

from contextlib import ExitStack
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from . import checkpoint, comms
from .checkpoint import CheckpointError, RunState
from .config import TrainConfig
from .data import Split, Task, data_changes, fingerprint, load_data, task_of
from .datasets import DataError
from .engine import amp_dtype, make_scaler
from .run_dir import CHECKPOINT_DIR, lock_run_dir
from .models import build_model, has_batchnorm, to_device
from .metrics import AllReduceTimer, StepMeter, job_peak_flops, training_flops_per_image
from .optim import build_optimizer, build_scheduler
from .profiling import StepProfiler
from .report import Reporter
from .sampling import EpochPlan, eval_shard
from .timing import Phases


@dataclass(kw_only=True)
class Parts:
    """Everything a Trainer runs with. `cfg` is the flags with the global batch resolved; `model` is the plain
    module (checkpoints, evaluation, export); `net` is what the training forward calls (compiled and/or DDP)."""
    cfg: TrainConfig
    task: Task
    train: Split
    val: Split
    test: Split
    data: dict[str, Any]  # data.fingerprint: what the run trains and is scored on
    model: nn.Module
    net: nn.Module
    dtype: torch.dtype | None
    plan: EpochPlan  # which images each optimiser step trains on, and this rank's part of them
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler | None
    scaler: torch.amp.GradScaler
    report: Reporter
    test_shard: torch.Tensor
    val_shard: torch.Tensor
    run: RunState = field(default_factory=RunState)
    record: dict[str, float] = field(default_factory=dict)  # the last epoch's metrics
    closing: ExitStack = field(default_factory=ExitStack)  # the lock and the writer, released by Trainer.close
    meter: StepMeter | None = None  # step metrics every --log-every steps (None: --log-every 0)
    profiler: StepProfiler | None = None  # --profile-steps


def build_parts(cfg: TrainConfig, env: comms.DistEnv, phases: Phases) -> Parts:
    closing = ExitStack()
    try:
        return _build(cfg, env, phases, closing)
    except BaseException:
        closing.close()
        raise


def _build(cfg: TrainConfig, env: comms.DistEnv, phases: Phases, closing: ExitStack) -> Parts:
    run_dir = Path(cfg.run_dir)
    last = run_dir / CHECKPOINT_DIR / "last.pt"
    task = task_of(cfg.dataset, cfg.task)  # a folder's classes are its sub-folders: may raise DataError
    lock = lock_run_dir(run_dir, env)
    if lock is not None:
        closing.callback(lock.release)
    with phases("checkpoints/logging"):
        state = checkpoint.resume_state(cfg, last)
    cfg = dataclasses.replace(cfg, global_batch_size=global_batch(cfg, state, env.world_size))
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
    plan = EpochPlan(len(train), cfg.global_batch_size, cfg.batch_size, env.rank, env.world_size, cfg.seed,
                     shuffle=not cfg.overfit_batches, min_share=2 if has_batchnorm(model) else 1)
    if plan.min_share > len(train):
        raise DataError(f"{cfg.model} has BatchNorm, which needs at least 2 training images, and {cfg.dataset} "
                        f"leaves {len(train)}: lower --val-size, or use a model without BatchNorm")
    optimizer = build_optimizer(cfg, model.parameters())
    scheduler = build_scheduler(cfg, optimizer, plan.steps)
    scaler = make_scaler(env.device, dtype)
    restored = None
    if state is not None:
        restored = checkpoint.restore(state, last, model=model, optimizer=optimizer, scheduler=scheduler,
                                      scaler=scaler, cfg=cfg, rank=env.rank, device=env.device,
                                      steps_each_epoch=plan.steps)
    run, record = (restored.run, restored.metrics) if restored else (RunState(steps_per_epoch=plan.steps), {})
    # The training forward may be compiled (nanoGPT's order: compile, then DDP). Under torchrun the model is
    # always DDP, one rank too: one code path, and a one-GPU machine runs the same all-reduces as a cluster.
    net = torch.compile(model) if cfg.compile else model
    if env.is_distributed:
        net = DDP(net, device_ids=[env.device] if env.device.type == "cuda" else None)

    example = test.batch(torch.arange(min(2, len(test)), device=env.device))[0]
    meter = None
    if cfg.log_every:
        allreduce = None
        if isinstance(net, DDP):  # DDP's own all-reduce, timed (metrics.AllReduceTimer)
            allreduce = AllReduceTimer(env.device)
            net.register_comm_hook(None, allreduce.hook)
        meter = StepMeter(env.device, training_flops_per_image(model, tuple(example.shape[1:]), task.num_classes),
                          job_peak_flops(cfg.peak_flops, env.device, dtype, env.world_size, env.local_world_size),
                          allreduce)
    profiler = StepProfiler(cfg.profile_steps, run_dir / "profile", env.rank, env.world_size,
                            env.device) if cfg.profile_steps else None
    report = Reporter(cfg, env, task, purge_step=run.step + 1 if state is not None else None)
    closing.callback(report.close)
    if env.is_main:
        for stale in last.parent.glob(".*.tmp*"):  # a save killed half-way left its temp file
            stale.unlink(missing_ok=True)
    if plan.images_done(plan.steps) < len(train):
        notes.append(f"{cfg.model} has BatchNorm, which cannot train on one image: each epoch's last step, one "
                     f"image, is left out (1 of {len(train):,} images)")
    if plan.global_batch < plan.min_share * env.world_size:
        notes.append(f"--global-batch-size {plan.global_batch} is too small for {env.world_size} ranks: some "
                     f"ranks idle in every step")
    report.notes(notes, warnings=[env.warning] if env.warning else [])
    if restored:
        report.resumed_shape(restored.changed, restored.epoch_restarted, state["world_size"], plan.global_batch)
    resumed_at = None if state is None else (
        f"epoch {run.epoch}" + (f" + {run.step_in_epoch} steps" if run.step_in_epoch else "")
        + f", step {run.step}")
    with phases("checkpoints/logging"):
        report.started(resumed_at, model, example)
    return Parts(cfg=cfg, task=task, train=train, val=val, test=test, data=data, model=model, net=net, dtype=dtype,
                 plan=plan, optimizer=optimizer, scheduler=scheduler, scaler=scaler, report=report,
                 test_shard=eval_shard(len(test), env.rank, env.world_size, env.device),
                 val_shard=eval_shard(len(val), env.rank, env.world_size, env.device), run=run, record=record,
                 closing=closing, meter=meter, profiler=profiler)


def global_batch(cfg: TrainConfig, state: dict[str, Any] | None, world_size: int) -> int:
    """--global-batch-size, else the checkpoint's (a resume at another world size keeps the run's steps), else
    --batch-size x the world size this run starts with."""
    if cfg.global_batch_size is not None:
        return cfg.global_batch_size
    if state is not None:
        return state["config"]["global_batch_size"]
    return cfg.batch_size * world_size
