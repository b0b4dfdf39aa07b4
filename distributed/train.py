"""Entry point: `torchrun --nproc_per_node=N -m distributed.train` (or plain `python -m distributed.train`).

args -> process group -> data on device -> model (DDP) -> epochs of train/eval -> checkpoints and metrics.
Rank-0-only side effects (files, TensorBoard, console) are all made from `fit` under `env.is_main`.
"""
from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from . import checkpoint, dist
from .config import TrainConfig, parse_args
from .data import TASKS, DataError, Split, Task, epoch_batches, eval_shard, load_splits, make_sampler, steps_per_epoch
from .engine import EvalResult, amp_dtype, evaluate, make_scaler, train_one_epoch
from .models import build_model
from .tb import NullLogger, open_logger

GRID_IMAGES = 32


def build_optimizer(cfg: TrainConfig, params: Any) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def build_scheduler(cfg: TrainConfig, optimizer: torch.optim.Optimizer,
                    steps_each_epoch: int) -> torch.optim.lr_scheduler.LRScheduler | None:
    total = cfg.epochs * steps_each_epoch
    if cfg.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=cfg.lr, total_steps=total)
    if cfg.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)
    if cfg.schedule == "step":  # the PyTorch MNIST example: x0.7 every epoch
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=steps_each_epoch, gamma=0.7)
    return None


@dataclass
class RunState:
    """What survives a restart besides the weights and optimiser: kept in every checkpoint."""
    epoch: int = 0  # epochs completed
    step: int = 0  # optimiser steps completed
    train_seconds: float = 0.0
    train_images: int = 0
    best_val_accuracy: float = -1.0
    best_epoch: int = 0
    history: list[dict[str, float]] = field(default_factory=list)


def load_data(cfg: TrainConfig, task: Task, env: dist.DistEnv) -> tuple[Split, Split, Split]:
    """Local rank 0 downloads/extracts first; the others wait, then read the same files."""
    splits, error = None, None
    if env.local_rank == 0:
        try:
            splits = load_splits(cfg.data_dir, task, cfg.val_size, cfg.seed, env.device)
        except DataError as e:
            error = e
    if not dist.all_ok(error is None, env):
        raise error or DataError(f"MNIST could not be prepared in {cfg.data_dir} (see rank 0's error)")
    if splits is None:
        splits = load_splits(cfg.data_dir, task, cfg.val_size, cfg.seed, env.device)
    train, val, test = splits
    if cfg.overfit_batches:
        # The notebook's sanity check: a model that cannot drive these few batches to ~0 loss is broken.
        n = min(len(train), cfg.overfit_batches * cfg.batch_size * env.world_size)
        train = train.subset(torch.arange(n, device=env.device))
        val = test = train
    return train, val, test


def resume_state(cfg: TrainConfig, last: Path) -> dict[str, Any] | None:
    if cfg.resume is False or (cfg.resume is None and not last.exists()):
        return None
    if not last.exists():
        raise checkpoint.CheckpointError(f"--resume given but {last} does not exist; drop --resume to start fresh")
    state = checkpoint.load(last)
    for key in ("task", "model"):
        if state["config"].get(key) != getattr(cfg, key):
            raise checkpoint.CheckpointError(
                f"{last} was trained with --{key} {state['config'].get(key)}, not {getattr(cfg, key)}: "
                f"use another --run-dir or --no-resume")
    return state


def make_step_hook(logger: NullLogger, optimizer: torch.optim.Optimizer, log_every: int,
                   epoch: int, steps_this_epoch: int, first_step: int):
    show_progress = sys.stderr.isatty()

    def on_step(step: int, loss: torch.Tensor) -> None:
        if step % log_every == 0:
            value = loss.item()
            logger.scalar("train/loss", value, step)
            logger.scalar("train/lr", optimizer.param_groups[0]["lr"], step)
            if show_progress:
                done = step - first_step
                print(f"\repoch {epoch} [{done}/{steps_this_epoch}] loss {value:.4f}",
                      end="", file=sys.stderr, flush=True)
    return on_step


def fit(cfg: TrainConfig, env: dist.DistEnv, stop_after_epoch: int | None = None) -> dict[str, Any]:
    """Train to cfg.epochs (resuming if asked); returns the final metrics. `stop_after_epoch` simulates preemption."""
    task = TASKS[cfg.task]
    run_dir = Path(cfg.run_dir)
    ckpt_dir = run_dir / "checkpoints"
    state = resume_state(cfg, ckpt_dir / "last.pt")
    train, val, test = load_data(cfg, task, env)
    dtype = amp_dtype(cfg.amp, env.device)

    torch.manual_seed(cfg.seed)  # identical initial weights on every rank (DDP also broadcasts rank 0's)
    model = build_model(cfg.model, task.num_classes).to(env.device)
    if state is not None:
        model.load_state_dict(state["model"])
    net: nn.Module = DDP(model, device_ids=[env.device] if env.device.type == "cuda" else None) \
        if env.world_size > 1 else model
    torch.manual_seed(cfg.seed + env.rank)  # ranks drop out different units

    sampler = make_sampler(len(train), env.rank, env.world_size, cfg.seed, shuffle=not cfg.overfit_batches)
    steps_each_epoch = steps_per_epoch(sampler, cfg.batch_size)
    optimizer = build_optimizer(cfg, model.parameters())
    scheduler = build_scheduler(cfg, optimizer, steps_each_epoch)
    scaler = make_scaler(env.device, dtype)
    run = RunState()
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None and state.get("scheduler"):
            scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        run = RunState(**state["run"])
        rng = state["rng"]
        if len(rng) == env.world_size:
            checkpoint.set_rng_state(rng[env.rank], env.device)

    logger = open_logger(env, run_dir, purge_step=run.step + 1 if state is not None else None)
    if env.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        checkpoint.write_json(run_dir / "config.json", cfg.to_dict())
        if state is None:
            logger.graph(model, test.batch(torch.arange(min(2, len(test)), device=env.device))[0])
        else:
            print(f"resumed from {ckpt_dir / 'last.pt'} at epoch {run.epoch}, step {run.step}")

    test_shard = eval_shard(len(test), env.rank, env.world_size, env.device)
    val_shard = eval_shard(len(val), env.rank, env.world_size, env.device)
    score = lambda split, shard: evaluate(net.module if isinstance(net, DDP) else net, split, shard,  # noqa: E731
                                          cfg.eval_batch_size, task.num_classes, dtype, env)
    test_result: EvalResult | None = None
    val_result: EvalResult | None = None
    try:
        for epoch in range(run.epoch, cfg.epochs):
            hook = make_step_hook(logger, optimizer, cfg.log_every, epoch + 1, steps_each_epoch, run.step) \
                if env.is_main else None
            stats = train_one_epoch(net, optimizer, scheduler, scaler, train,
                                    epoch_batches(sampler, epoch, cfg.batch_size, env.device),
                                    dtype, env.device, run.step, hook)
            images = int(dist.all_reduce_sum(torch.tensor([stats.images], device=env.device), env).item())
            val_result = score(val, val_shard) if len(val) else None
            test_result = score(test, test_shard)
            run.epoch, run.step = epoch + 1, run.step + stats.steps
            run.train_seconds += stats.seconds
            run.train_images += images
            is_best = val_result is None or val_result.accuracy > run.best_val_accuracy
            if is_best:
                run.best_val_accuracy = val_result.accuracy if val_result else test_result.accuracy
                run.best_epoch = run.epoch
            record = {"epoch": run.epoch, "step": run.step, "train_loss": stats.loss,
                      "test_loss": test_result.loss, "test_accuracy": test_result.accuracy,
                      "images_per_second": images / stats.seconds, "epoch_seconds": stats.seconds}
            if val_result is not None:
                record.update(val_loss=val_result.loss, val_accuracy=val_result.accuracy)
            run.history.append(record)
            rng = dist.all_gather_objects(checkpoint.rng_state(env.device), env)  # collective: every rank
            if env.is_main:
                ckpt = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict() if scheduler else None,
                        "scaler": scaler.state_dict(), "epoch": run.epoch, "step": run.step,
                        "config": cfg.to_dict(), "classes": list(task.classes),
                        "metrics": record, "rng": rng, "run": vars(run)}
                checkpoint.save(ckpt_dir / "last.pt", ckpt)
                if is_best:
                    checkpoint.save(ckpt_dir / "best.pt", ckpt)
                log_epoch(logger, record, test, test_result, net, task, env)
                print(epoch_line(record, cfg.epochs), flush=True)
            if stop_after_epoch is not None and run.epoch >= stop_after_epoch:
                break
        if test_result is None:  # resumed a finished run: score the weights we have
            val_result = score(val, val_shard) if len(val) else None
            test_result = score(test, test_shard)
        fingerprints = dist.all_gather_objects(dist.weights_fingerprint(model), env)
        metrics = final_metrics(cfg, env, task, run, test_result, val_result, fingerprints)
        if env.is_main:
            checkpoint.write_json(run_dir / "metrics.json", metrics)
            logger.hparams({k: v for k, v in cfg.to_dict().items() if v is not None} | {"world_size": env.world_size},
                           {"hparam/test_accuracy": metrics["test_accuracy"],
                            "hparam/val_accuracy": metrics["val_accuracy"],
                            "hparam/train_seconds": metrics["train_seconds"]})
        return metrics
    finally:
        logger.close()


def log_epoch(logger: NullLogger, record: dict[str, float], test: Split, result: EvalResult,
              net: nn.Module, task: Task, env: dist.DistEnv) -> None:
    step = int(record["step"])
    for key in ("test_loss", "test_accuracy", "val_loss", "val_accuracy"):
        if key in record:
            logger.scalar(key.replace("_", "/", 1), record[key], step)
    logger.scalar("perf/images_per_second", record["images_per_second"], step)
    logger.scalar("perf/epoch_seconds", record["epoch_seconds"], step)
    index = torch.arange(min(GRID_IMAGES, len(test)), device=env.device)
    model = net.module if isinstance(net, DDP) else net
    with torch.inference_mode():
        was_training = model.training
        model.eval()
        x, y = test.batch(index)
        predicted = model(x).argmax(1)
        model.train(was_training)
    logger.predictions(test.images[index], predicted, y, task.classes, step)
    logger.confusion(result.confusion, task.classes, step)


def epoch_line(record: dict[str, float], epochs: int) -> str:
    val = f"  val {record['val_accuracy']:.2%}" if "val_accuracy" in record else ""
    return (f"epoch {record['epoch']}/{epochs}  train loss {record['train_loss']:.4f}{val}"
            f"  test {record['test_accuracy']:.2%} (loss {record['test_loss']:.4f})"
            f"  {record['images_per_second']:,.0f} img/s  {record['epoch_seconds']:.1f}s")


def final_metrics(cfg: TrainConfig, env: dist.DistEnv, task: Task, run: RunState, test: EvalResult,
                  val: EvalResult | None, fingerprints: list[str]) -> dict[str, Any]:
    return {
        "task": cfg.task, "model": cfg.model, "classes": list(task.classes),
        "epochs": run.epoch, "steps": run.step, "world_size": env.world_size, "device": env.device.type,
        "amp": str(amp_dtype(cfg.amp, env.device) or "off").replace("torch.", ""),
        "test_accuracy": test.accuracy, "test_loss": test.loss, "test_count": test.count,
        "val_accuracy": val.accuracy if val else None, "val_loss": val.loss if val else None,
        "best_val_accuracy": run.best_val_accuracy if val else None, "best_epoch": run.best_epoch,
        "train_seconds": run.train_seconds, "train_images": run.train_images,
        "train_images_per_second": run.train_images / run.train_seconds if run.train_seconds else 0.0,
        "replica_weight_sha256": fingerprints, "history": run.history,
    }


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    start = time.perf_counter()
    try:
        env = dist.setup(cfg.device)
        try:
            metrics = fit(cfg, env)
        finally:
            dist.teardown()
    except (DataError, checkpoint.CheckpointError, dist.LaunchError) as e:
        if int(os.environ.get("RANK", 0)) == 0:
            print(f"error: {e}", file=sys.stderr)
        return 1
    if env.is_main:
        print(f"done: test accuracy {metrics['test_accuracy']:.2%} after {metrics['epochs']} epoch(s), "
              f"{metrics['train_seconds']:.1f}s training ({metrics['train_images_per_second']:,.0f} img/s, "
              f"world size {env.world_size}), {time.perf_counter() - start:.1f}s total; run dir {cfg.run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
