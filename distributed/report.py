"""What a run tells its user: console lines, TensorBoard events and metrics.json, all from rank 0.

On other ranks every method does nothing, so the training loop never asks which rank it is on.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import TrainConfig
from .data import Split, Task
from .dist import DistEnv
from .engine import EvalResult
from .files import write_json
from .tb import open_logger
from .timing import phase_line

GRID_IMAGES = 32


class Reporter:
    def __init__(self, cfg: TrainConfig, env: DistEnv, task: Task, purge_step: int | None) -> None:
        self.cfg, self.env, self.task = cfg, env, task
        self.active = env.is_main
        self.run_dir = Path(cfg.run_dir)
        # purge_step drops TensorBoard events a killed run wrote after its last checkpoint: steps never rewind.
        self.logger = open_logger(env, self.run_dir, purge_step)
        self.progress = self.active and sys.stderr.isatty()

    def started(self, resumed_at: str | None, model: nn.Module, example: torch.Tensor) -> None:
        if not self.active:
            return
        write_json(self.run_dir / "config.json", self.cfg.to_dict())
        if resumed_at is not None:
            print(f"resumed from {self.run_dir / 'checkpoints' / 'last.pt'} at {resumed_at}", flush=True)
        else:
            self.logger.graph(model, example)

    def refitted(self, saved: dict[str, Any]) -> None:
        if self.active:
            print(f"resuming with world size {self.env.world_size}, --epochs {self.cfg.epochs}, --batch-size "
                  f"{self.cfg.batch_size} (checkpoint: {saved['world_size']}, {saved['epochs']}, "
                  f"{saved['batch_size']}): the epoch restarts, schedule re-fitted", flush=True)

    def step(self, step: int, loss: torch.Tensor, lr: float, epoch: int, batch: int, batches: int) -> None:
        if not self.active or step % self.cfg.log_every:
            return
        value = loss.item()
        self.logger.scalar("train/loss", value, step)
        self.logger.scalar("train/lr", lr, step)
        if self.progress:
            print(f"\repoch {epoch + 1} [{batch}/{batches}] loss {value:.4f}", end="", file=sys.stderr, flush=True)

    def epoch(self, record: dict[str, float], test: EvalResult, model: nn.Module, split: Split) -> None:
        if not self.active:
            return
        step, logger = int(record["step"]), self.logger
        for key in ("test_loss", "test_accuracy", "val_loss", "val_accuracy"):
            if key in record:
                logger.scalar(key.replace("_", "/", 1), record[key], step)
        logger.scalar("perf/images_per_second", record["images_per_second"], step)
        logger.scalar("perf/epoch_seconds", record["epoch_seconds"], step)
        index = torch.arange(min(GRID_IMAGES, len(split)), device=split.labels.device)
        with torch.inference_mode():
            was_training = model.training
            x, y = split.batch(index)
            predicted = model.eval()(x).argmax(1)
            model.train(was_training)
        logger.predictions(split.images[index], predicted, y, self.task.classes, step)
        logger.confusion(test.confusion, self.task.classes, step)
        if self.progress:
            print("\r\033[K", end="", file=sys.stderr)
        print(epoch_line(record, self.cfg.epochs), flush=True)

    def finished(self, metrics: dict[str, Any]) -> None:
        if not self.active:
            return
        write_json(self.run_dir / "metrics.json", metrics)
        hparams = {k: v for k, v in self.cfg.to_dict().items() if v is not None}
        self.logger.hparams(hparams | {"world_size": self.env.world_size},
                            {"hparam/test_accuracy": metrics["test_accuracy"],
                             "hparam/val_accuracy": metrics["val_accuracy"] or 0.0,
                             "hparam/train_seconds": metrics["train_seconds"]})

    def close(self) -> None:
        self.logger.close()


def epoch_line(record: dict[str, float], epochs: int) -> str:
    val = f"  val {record['val_accuracy']:.2%}" if "val_accuracy" in record else ""
    return (f"epoch {record['epoch']}/{epochs}  train loss {record['train_loss']:.4f}{val}"
            f"  test {record['test_accuracy']:.2%} (loss {record['test_loss']:.4f})"
            f"  {record['images_per_second']:,.0f} img/s  {record['epoch_seconds']:.1f}s")


def final_metrics(cfg: TrainConfig, env: DistEnv, task: Task, run: Any, amp: str, test: EvalResult,
                  val: EvalResult | None, fingerprints: list[str], phases: dict[str, float]) -> dict[str, Any]:
    """metrics.json: the run's result and every piece of work it did, resumed attempts included."""
    return {
        "task": cfg.task, "model": cfg.model, "classes": list(task.classes),
        "epochs": run.epoch, "steps": run.step, "world_size": env.world_size, "device": env.device.type,
        "amp": amp,
        "test_accuracy": test.accuracy, "test_loss": test.loss, "test_count": test.count,
        "val_accuracy": val.accuracy if val else None, "val_loss": val.loss if val else None,
        "best_val_accuracy": run.best_val_accuracy if val else None, "best_epoch": run.best_epoch,
        "train_seconds": run.train_seconds, "train_images": run.train_images,
        "train_images_per_second": run.train_images / run.train_seconds if run.train_seconds else 0.0,
        "replica_weight_sha256": fingerprints, "history": run.history,
        "phase_seconds": phases,  # this command's wall time (rank 0), process start to the final metrics
    }


def done_line(metrics: dict[str, Any], world_size: int, run_dir: str) -> str:
    return (f"done: test accuracy {metrics['test_accuracy']:.2%} after {metrics['epochs']} epoch(s), "
            f"{metrics['train_seconds']:.1f}s training ({metrics['train_images_per_second']:,.0f} img/s, "
            f"world size {world_size}); run dir {run_dir}\n{phase_line(metrics['phase_seconds'])}")
