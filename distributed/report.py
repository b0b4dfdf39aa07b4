"""What a run tells its user: console lines, TensorBoard events and metrics.json, all from rank 0.

On other ranks every method does nothing, so the training loop never asks which rank it is on.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from serve_cli.base.files import write_json

from .checkpoint import RunState
from .config import TrainConfig, hparams_of
from .data import Split, Task
from .comms import DistEnv
from .evaluation import EvalResult, confident_mistakes, most_confused, penultimate_features, per_class
from .tb import TensorBoardLogger, confusion_image, note_image, tag_name, tile_grid
from .timing import phase_line

GRID_IMAGES = 32  # the first test images, the same ones every epoch
GALLERY_IMAGES = 64  # the most confident mistakes
PROJECTOR_IMAGES = 2000
# Per-class artifacts grow with the class count (the confusion image with its square): a folder of 300 classes
# took 7.4 GB and 22 s per epoch before these bounds.
MATRIX_CLASSES = 30  # the confusion image shows the classes with the most mistakes
CURVE_CLASSES = 50  # per-class recall/precision curves and PR curves: the first classes, the same every epoch
# Hyper-parameters shown in the HParams tab: what the model learned from, not where files went.


class Reporter:
    def __init__(self, cfg: TrainConfig, env: DistEnv, task: Task, purge_step: int | None) -> None:
        self.cfg, self.env, self.task = cfg, env, task
        self.active = env.is_main
        self.run_dir = Path(cfg.run_dir)
        # purge_step drops TensorBoard events a killed run wrote after its last checkpoint: steps never rewind.
        # Rank 0 alone writes: every method below returns at once elsewhere (the one rank-0 guard).
        self.logger = TensorBoardLogger(self.run_dir, purge_step) if self.active else None
        self.progress = self.active and sys.stderr.isatty()

    def started(self, resumed_at: str | None, model: nn.Module, example: torch.Tensor) -> None:
        if not self.active:
            return
        write_json(self.run_dir / "config.json", self.cfg.to_dict())
        if resumed_at is not None:
            print(f"resumed from {self.run_dir / 'checkpoints' / 'last.pt'} at {resumed_at}", flush=True)
        else:
            self.logger.graph(model, example)
        self.logger.layout({"recall": [r"test_per_class/recall/.*"], "precision": [r"test_per_class/precision/.*"]})

    def notes(self, lines: list[str], warnings: Sequence[str] = ()) -> None:
        if self.active:
            for line in warnings:
                print(line, file=sys.stderr, flush=True)
            for line in lines:
                print(line, flush=True)

    def resumed_shape(self, changed: list[str], epoch_restarted: bool, saved_world_size: int,
                      global_batch: int) -> None:
        """What a resume in another shape keeps: the steps at another world size, the epoch unless the
        global batch changed."""
        if not self.active:
            return
        if saved_world_size != self.env.world_size:
            print(f"resuming at world size {self.env.world_size} (checkpoint: {saved_world_size}): the same "
                  f"{global_batch} images per step" + ("" if epoch_restarted else ", from the same step"), flush=True)
        if changed:
            print(f"resuming with {', '.join(changed)}: "
                  + ("the interrupted epoch restarts, " if epoch_restarted else "")
                  + "schedule re-fitted to the new length", flush=True)

    def step(self, step: int, loss: torch.Tensor, per_image: float, lr: float, epoch: int, batch: int,
             batches: int) -> None:
        """Every --log-every steps: rank 0's mean loss (its weighted loss times `per_image`) and the rate."""
        if not self.active or step % self.cfg.log_every:
            return
        value = loss.item() * per_image
        self.logger.scalar("train/loss", value, step)
        self.logger.scalar("train/lr", lr, step)
        if self.progress:
            print(f"\repoch {epoch + 1} [{batch}/{batches}] loss {value:.4f}", end="", file=sys.stderr, flush=True)

    def epoch(self, record: dict[str, float], test: EvalResult | None, split: Split) -> None:
        """An epoch's console line and TensorBoard scalars; the test split's views when it was scored."""
        if not self.active:
            return
        step, logger = int(record["step"]), self.logger
        for key in ("test_loss", "test_accuracy", "val_loss", "val_accuracy"):
            if key in record:
                logger.scalar(key.replace("_", "/", 1), record[key], step)
        for key in ("images_per_second", "epoch_seconds", "train_seconds"):
            logger.scalar(f"perf/{key}", record[key], step)
        if test is not None:
            self.test_views(test, split, step)
        if self.progress:
            print("\r\033[K", end="", file=sys.stderr)
        print(epoch_line(record, self.cfg.epochs), flush=True)

    def test_views(self, test: EvalResult, split: Split, step: int) -> None:
        """Per-class curves, the confusion matrix, the predictions grid and the mistakes of a scored test split."""
        logger, classes = self.logger, self.task.classes
        recall, precision = per_class(test.confusion)
        for c, name in enumerate(classes[:CURVE_CLASSES]):
            logger.scalar(f"test_per_class/recall/{tag_name(name)}", recall[c], step)
            logger.scalar(f"test_per_class/precision/{tag_name(name)}", precision[c], step)
        shown = most_confused(test.confusion, MATRIX_CLASSES)
        title = "predicted" if len(shown) == len(classes) else \
            f"predicted ({len(shown)} of {len(classes)} classes: those with the most mistakes)"
        logger.image("test/confusion_matrix", confusion_image(test.confusion[shown][:, shown],
                                                              [classes[c] for c in shown.tolist()], title=title), step)
        labels = split.labels.cpu()
        predicted = test.probabilities.argmax(1)
        first = slice(0, min(GRID_IMAGES, len(labels)))
        wrong = (predicted[first] != labels[first]).tolist()
        captions = [f"{classes[t]} -> {classes[p]}" if w else classes[p]
                    for t, p, w in zip(labels[first].tolist(), predicted[first].tolist(), wrong)]
        logger.image("test/predictions", tile_grid(split.images[first], captions, wrong), step)
        self.mistakes(test.probabilities, labels, split, step)

    def mistakes(self, probabilities: torch.Tensor, labels: torch.Tensor, split: Split, step: int) -> None:
        """The gallery of the most confident mistakes, and the same list as a table (test index included)."""
        classes = self.task.classes
        index, predicted, confidence = confident_mistakes(probabilities, labels)
        total = len(index)
        index, predicted, confidence = index[:GALLERY_IMAGES], predicted[:GALLERY_IMAGES], confidence[:GALLERY_IMAGES]
        if total == 0:  # an image too, or the gallery would go on showing an earlier epoch's mistakes
            note = f"No mistakes on the {len(labels):,} test images."
            self.logger.image("test/mistakes", note_image(note), step)
            self.logger.text("test/mistakes", note, step)
            return
        true = labels[index].tolist()
        captions = [f"{classes[t]} -> {classes[p]} ({c:.2f})"
                    for t, p, c in zip(true, predicted.tolist(), confidence.tolist())]
        self.logger.image("test/mistakes", tile_grid(split.images[index.to(split.images.device)], captions,
                                                     [True] * len(index)), step)
        rows = [f"| {r + 1} | {i} | {classes[t]} | {classes[p]} | {c:.4f} |" for r, (i, t, p, c) in
                enumerate(zip(index.tolist(), true, predicted.tolist(), confidence.tolist()))]
        self.logger.text("test/mistakes", "\n".join(
            [f"{total:,} mistakes on the {len(labels):,} test images; the {len(index)} most confident:", "",
             "| rank | test index | true | predicted | confidence |", "|---|---|---|---|---|", *rows]), step)

    def finished(self, metrics: dict[str, Any], test: EvalResult, model: nn.Module, split: Split) -> None:
        if not self.active:
            return
        write_json(self.run_dir / "metrics.json", metrics)
        step, logger, classes = metrics["steps"], self.logger, self.task.classes
        labels = split.labels.cpu()
        for c, name in enumerate(classes[:CURVE_CLASSES]):
            logger.pr_curve(f"pr/{tag_name(name)}", labels == c, test.probabilities[:, c], step)
        subset = torch.randperm(len(split), generator=torch.Generator().manual_seed(self.cfg.seed))
        subset = subset[:PROJECTOR_IMAGES].sort().values
        predicted = test.probabilities[subset].argmax(1)
        metadata = [[classes[t], classes[p], "yes" if t == p else "no"]
                    for t, p in zip(labels[subset].tolist(), predicted.tolist())]
        logger.projector(penultimate_features(model, split, subset.to(split.labels.device), self.cfg.eval_batch_size),
                         metadata, ("label", "predicted", "correct"), split.images[subset.to(split.images.device)])
        logger.text("run/phases", "| phase | seconds |\n|---|---|\n" + "\n".join(
            f"| {name} | {seconds:.2f} |" for name, seconds in metrics["phase_seconds"].items()), step)
        hparams = {k: v for k, v in hparams_of(self.cfg.to_dict()).items() if v is not None}
        metric_tags = ["test/accuracy", "test/loss", "perf/train_seconds"]
        if metrics["val_accuracy"] is not None:
            metric_tags.insert(1, "val/accuracy")
        logger.hparams(hparams | {"world_size": self.env.world_size, "device": self.env.device.type}, metric_tags)

    def close(self) -> None:
        if self.logger is not None:
            self.logger.close()


def epoch_line(record: dict[str, float], epochs: int) -> str:
    val = f"  val {record['val_accuracy']:.2%}" if "val_accuracy" in record else ""
    test = f"  test {record['test_accuracy']:.2%} (loss {record['test_loss']:.4f})" if "test_accuracy" in record else ""
    return (f"epoch {record['epoch']}/{epochs}  train loss {record['train_loss']:.4f}{val}{test}"
            f"  {record['images_per_second']:,.0f} img/s  {record['epoch_seconds']:.1f}s")


def final_metrics(cfg: TrainConfig, env: DistEnv, task: Task, run: RunState, amp: str, test: EvalResult,
                  val: EvalResult | None, fingerprints: list[str], phases: dict[str, float]) -> dict[str, Any]:
    """metrics.json: the run's result and every piece of work it did, resumed attempts included."""
    return {
        "dataset": cfg.dataset, "task": cfg.task, "model": cfg.model, "classes": list(task.classes),
        "epochs": run.epoch, "steps": run.step, "global_batch_size": cfg.global_batch_size,
        "world_size": env.world_size, "device": env.device.type,
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
