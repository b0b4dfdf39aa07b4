"""Entry point: `torchrun --nproc_per_node=N -m distributed.train` (or plain `python -m distributed.train`).

args -> process group -> data on device -> model (DDP) -> epochs of train/eval -> checkpoints and metrics.
Rank-0-only side effects (files, TensorBoard, console) are all made in `Trainer` under `env.is_main`.
A restarted worker (torchrun --max-restarts) finds RUN_DIR/checkpoints/last.pt and carries on from it.
"""
from __future__ import annotations

import itertools
import os
import signal
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from . import checkpoint, dist
from .config import TrainConfig, parse_args
from .data import TASKS, DataError, Split, Task, epoch_batches, eval_shard, load_splits, make_sampler, steps_per_epoch
from .engine import EpochStats, EvalResult, amp_dtype, evaluate, make_scaler, train_one_epoch
from .models import build_model, to_device
from .tb import open_logger

GRID_IMAGES = 32
STOP_CHECK_EVERY = 10  # steps between the ranks' agreement on a pending SIGTERM (a collective)
EXIT_PREEMPTED = 128 + signal.SIGTERM


class Preempted(Exception):
    """A stop signal arrived; a checkpoint was saved and the run can resume."""


@dataclass
class StopRequest:
    """Set by the signal handler, read by the training loop: SLURM and Kubernetes stop jobs with SIGTERM."""
    signal: int | None = None

    def __call__(self, signum: int, frame: Any) -> None:
        self.signal = signum


@dataclass
class RunState:
    """What survives a restart besides the weights and optimiser: kept in every checkpoint."""
    epoch: int = 0  # epochs completed
    step: int = 0  # optimiser steps completed
    batch_in_epoch: int = 0  # batches of epoch `epoch` already done (mid-epoch checkpoints)
    train_seconds: float = 0.0
    train_images: int = 0
    best_val_accuracy: float = -1.0
    best_epoch: int = 0
    history: list[dict[str, float]] = field(default_factory=list)


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


def load_data(cfg: TrainConfig, task: Task, env: dist.DistEnv) -> tuple[Split, Split, Split]:
    """Local rank 0 downloads/extracts first; the others wait, then read the same files."""
    splits, error = None, None
    if env.local_rank == 0:
        try:
            splits = load_splits(cfg.data_dir, task, cfg.val_size, cfg.seed, env.device)
        except DataError as e:
            error = e
    if not dist.all_ok(error is None, env):
        raise error or DataError(f"MNIST could not be prepared in {cfg.data_dir} (see local rank 0's error)")
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


class Trainer:
    """The model, optimiser and progress of one run: everything a checkpoint captures."""

    def __init__(self, cfg: TrainConfig, env: dist.DistEnv, stop: StopRequest) -> None:
        self.cfg, self.env, self.stop = cfg, env, stop
        self.task = TASKS[cfg.task]
        self.run_dir = Path(cfg.run_dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        state = resume_state(cfg, self.ckpt_dir / "last.pt")
        self.train, self.val, self.test = load_data(cfg, self.task, env)
        self.dtype = amp_dtype(cfg.amp, env.device)

        torch.manual_seed(cfg.seed)  # identical initial weights on every rank (DDP also broadcasts rank 0's)
        self.model = to_device(build_model(cfg.model, self.task.num_classes), env.device, cfg.channels_last)
        if state is not None:
            self.model.load_state_dict(state["model"])
        self.net: nn.Module = self.model if env.world_size == 1 else \
            DDP(self.model, device_ids=[env.device] if env.device.type == "cuda" else None)
        torch.manual_seed(cfg.seed + env.rank)  # ranks drop out different units

        self.sampler = make_sampler(len(self.train), env.rank, env.world_size, cfg.seed,
                                    shuffle=not cfg.overfit_batches)
        self.steps_each_epoch = steps_per_epoch(self.sampler, cfg.batch_size)
        self.optimizer = build_optimizer(cfg, self.model.parameters())
        self.scheduler = build_scheduler(cfg, self.optimizer, self.steps_each_epoch)
        self.scaler = make_scaler(env.device, self.dtype)
        self.run = RunState()
        self.record: dict[str, float] = {}
        if state is not None:
            self._restore(state)
        self.test_shard = eval_shard(len(self.test), env.rank, env.world_size, env.device)
        self.val_shard = eval_shard(len(self.val), env.rank, env.world_size, env.device)
        # purge_step drops TensorBoard events a killed run wrote after its last checkpoint: steps never rewind.
        self.logger = open_logger(env, self.run_dir, purge_step=self.run.step + 1 if state is not None else None)
        if env.is_main:
            self._start_run_dir(resumed=state is not None)

    def _restore(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.run = RunState(**state["run"])
        self.record = dict(state.get("metrics") or {})
        saved = state["config"]
        same_shape = (state.get("world_size") == self.env.world_size and saved.get("epochs") == self.cfg.epochs
                      and saved.get("batch_size") == self.cfg.batch_size)
        if same_shape:
            if self.scheduler is not None and state.get("scheduler"):
                self.scheduler.load_state_dict(state["scheduler"])
            checkpoint.set_rng_state(state["rng"][self.env.rank], self.env.device)
            return
        # Elastic restart with another world size (or new --epochs/--batch-size): the shards and the step
        # count per epoch changed, so restart the current epoch and re-fit the schedule to the new length.
        self.run.batch_in_epoch = 0
        if self.scheduler is not None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # stepping a scheduler without optimiser steps warns
                for _ in range(self.run.epoch * self.steps_each_epoch):
                    self.scheduler.step()
        if self.env.is_main:
            print(f"resuming with world size {self.env.world_size}, --epochs {self.cfg.epochs}, --batch-size "
                  f"{self.cfg.batch_size} (checkpoint: {state.get('world_size')}, {saved.get('epochs')}, "
                  f"{saved.get('batch_size')}): epoch {self.run.epoch + 1} restarts, schedule re-fitted", flush=True)

    def _start_run_dir(self, resumed: bool) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        for stale in self.ckpt_dir.glob(".*.tmp*"):  # a save killed half-way left its temp file
            stale.unlink(missing_ok=True)
        checkpoint.write_json(self.run_dir / "config.json", self.cfg.to_dict())
        if resumed:
            where = f"epoch {self.run.epoch}" + (f" + {self.run.batch_in_epoch} batches" if self.run.batch_in_epoch else "")
            print(f"resumed from {self.ckpt_dir / 'last.pt'} at {where}, step {self.run.step}", flush=True)
        else:
            self.logger.graph(self.model, self.test.batch(torch.arange(min(2, len(self.test)),
                                                                       device=self.env.device))[0])

    # -- checkpoints ---------------------------------------------------------------------------------
    def save_checkpoint(self, best: bool = False) -> None:
        """Collective (RNG states of every rank), then rank 0 writes atomically."""
        rng = dist.all_gather_objects(checkpoint.rng_state(self.env.device), self.env)
        if not self.env.is_main:
            return
        state = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "scheduler": self.scheduler.state_dict() if self.scheduler else None,
                 "scaler": self.scaler.state_dict(), "epoch": self.run.epoch, "step": self.run.step,
                 "world_size": self.env.world_size,
                 "config": self.cfg.to_dict(), "classes": list(self.task.classes),
                 "metrics": self.record, "rng": rng, "run": vars(self.run)}
        checkpoint.save(self.ckpt_dir / "last.pt", state)
        if best:
            checkpoint.save(self.ckpt_dir / "best.pt", state)

    # -- the loop ----------------------------------------------------------------------------------
    def on_step(self, step: int, loss: torch.Tensor) -> bool:
        """After every optimiser step, on every rank; True stops the epoch (after a checkpoint)."""
        self.run.step = step
        self.run.batch_in_epoch += 1
        if self.env.is_main and step % self.cfg.log_every == 0:
            value = loss.item()
            self.logger.scalar("train/loss", value, step)
            self.logger.scalar("train/lr", self.optimizer.param_groups[0]["lr"], step)
            if sys.stderr.isatty():
                print(f"\repoch {self.run.epoch + 1} [{self.run.batch_in_epoch}/{self.steps_each_epoch}] "
                      f"loss {value:.4f}", end="", file=sys.stderr, flush=True)
        stopping = step % STOP_CHECK_EVERY == 0 and self.stop_agreed()
        every = self.cfg.checkpoint_every_steps
        if stopping or (every and step % every == 0 and self.run.batch_in_epoch < self.steps_each_epoch):
            self.save_checkpoint()
        return stopping

    def stop_agreed(self) -> bool:
        """Every rank must stop at the same step, or the others would wait forever in the next all-reduce."""
        return not dist.all_ok(self.stop.signal is None, self.env)

    def score(self, split: Split, shard: torch.Tensor) -> EvalResult:
        return evaluate(self.model, split, shard, self.cfg.eval_batch_size, self.task.num_classes,
                        self.dtype, self.env)

    def score_all(self) -> tuple[EvalResult, EvalResult | None]:
        """(test, val); val is None when --val-size is 0."""
        val = self.score(self.val, self.val_shard) if len(self.val) else None
        return self.score(self.test, self.test_shard), val

    def train_epoch(self) -> tuple[EpochStats, int]:
        """One epoch (or what is left of it); returns its stats and the images all ranks trained on."""
        batches = epoch_batches(self.sampler, self.run.epoch, self.cfg.batch_size, self.env.device)
        batches = itertools.islice(batches, self.run.batch_in_epoch, None)  # resuming mid-epoch
        stats = train_one_epoch(self.net, self.optimizer, self.scheduler, self.scaler, self.train, batches,
                                self.dtype, self.env.device, self.run.step, self.on_step,
                                self.cfg.augment, self.cfg.label_smoothing)
        images = int(dist.all_reduce_sum(torch.tensor([stats.images], device=self.env.device), self.env).item())
        self.run.train_seconds += stats.seconds
        self.run.train_images += images
        return stats, images

    def fit(self, stop_after_epoch: int | None = None) -> dict[str, Any]:
        """Train to cfg.epochs; returns the final metrics. `stop_after_epoch` stops early, as a preemption would."""
        test_result = val_result = None
        try:
            while self.run.epoch < self.cfg.epochs:
                stats, images = self.train_epoch()
                if stats.stopped:
                    raise Preempted(self.preempted_message())
                test_result, val_result = self.score_all()
                self.end_epoch(stats, images, test_result, val_result)
                if stop_after_epoch is not None and self.run.epoch >= stop_after_epoch:
                    break
                if self.stop_agreed():
                    raise Preempted(self.preempted_message())
            if test_result is None:  # resumed a finished run: score the weights we have
                test_result, val_result = self.score_all()
            return self.finish(test_result, val_result)
        finally:
            self.logger.close()

    def preempted_message(self) -> str:
        return (f"stopped by signal {self.stop.signal} at epoch {self.run.epoch + 1}, step {self.run.step}; "
                f"checkpoint saved in {self.ckpt_dir}: run the same command again to resume")

    def end_epoch(self, stats: EpochStats, images: int, test: EvalResult, val: EvalResult | None) -> None:
        run = self.run
        run.epoch, run.batch_in_epoch = run.epoch + 1, 0
        is_best = val is None or val.accuracy > run.best_val_accuracy
        if is_best:
            run.best_val_accuracy, run.best_epoch = (val or test).accuracy, run.epoch
        self.record = {"epoch": run.epoch, "step": run.step, "train_loss": stats.loss,
                       "test_loss": test.loss, "test_accuracy": test.accuracy,
                       "images_per_second": images / stats.seconds, "epoch_seconds": stats.seconds}
        if val is not None:
            self.record.update(val_loss=val.loss, val_accuracy=val.accuracy)
        run.history.append(self.record)
        self.save_checkpoint(best=is_best)
        if self.env.is_main:
            self.log_epoch(test)
            if sys.stderr.isatty():
                print("\r\033[K", end="", file=sys.stderr)
            print(epoch_line(self.record, self.cfg.epochs), flush=True)

    def log_epoch(self, result: EvalResult) -> None:
        step, logger = self.run.step, self.logger
        for key in ("test_loss", "test_accuracy", "val_loss", "val_accuracy"):
            if key in self.record:
                logger.scalar(key.replace("_", "/", 1), self.record[key], step)
        logger.scalar("perf/images_per_second", self.record["images_per_second"], step)
        logger.scalar("perf/epoch_seconds", self.record["epoch_seconds"], step)
        index = torch.arange(min(GRID_IMAGES, len(self.test)), device=self.env.device)
        with torch.inference_mode():
            self.model.eval()
            x, y = self.test.batch(index)
            predicted = self.model(x).argmax(1)
            self.model.train()
        logger.predictions(self.test.images[index], predicted, y, self.task.classes, step)
        logger.confusion(result.confusion, self.task.classes, step)

    def finish(self, test: EvalResult, val: EvalResult | None) -> dict[str, Any]:
        fingerprints = dist.all_gather_objects(dist.weights_fingerprint(self.model), self.env)
        metrics = final_metrics(self.cfg, self.env, self.task, self.run, test, val, fingerprints)
        if self.env.is_main:
            checkpoint.write_json(self.run_dir / "metrics.json", metrics)
            hparams = {k: v for k, v in self.cfg.to_dict().items() if v is not None}
            self.logger.hparams(hparams | {"world_size": self.env.world_size},
                                {"hparam/test_accuracy": metrics["test_accuracy"],
                                 "hparam/val_accuracy": metrics["val_accuracy"] or 0.0,
                                 "hparam/train_seconds": metrics["train_seconds"]})
        return metrics


def fit(cfg: TrainConfig, env: dist.DistEnv, stop_after_epoch: int | None = None,
        stop: StopRequest | None = None) -> dict[str, Any]:
    return Trainer(cfg, env, stop or StopRequest()).fit(stop_after_epoch)


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
    stop = StopRequest()
    previous = {signum: signal.signal(signum, stop) for signum in (signal.SIGTERM, signal.SIGINT)}
    try:
        env = dist.setup(cfg.device)
        in_step = False  # True when all ranks leave fit() together: finished, or agreed to stop
        try:
            metrics = fit(cfg, env, stop=stop)
            in_step = True
        except Preempted:
            in_step = True
            raise
        finally:
            dist.teardown(peers_in_step=in_step)
    except Preempted as e:
        if int(os.environ.get("RANK", 0)) == 0:
            print(str(e), file=sys.stderr, flush=True)
        return EXIT_PREEMPTED
    except (DataError, checkpoint.CheckpointError, dist.LaunchError) as e:
        if int(os.environ.get("RANK", 0)) == 0:
            print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if env.is_main:
        print(f"done: test accuracy {metrics['test_accuracy']:.2%} after {metrics['epochs']} epoch(s), "
              f"{metrics['train_seconds']:.1f}s training ({metrics['train_images_per_second']:,.0f} img/s, "
              f"world size {env.world_size}), {time.perf_counter() - start:.1f}s total; run dir {cfg.run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
