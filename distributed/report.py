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
from serve_cli.base.progress import Progress

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
# What tells runs apart: the HParams table's first columns, ticked when it opens (tb.TensorBoardLogger.hparams).
HPARAMS_APART = ("dataset", "task", "model", "lr", "global_batch_size", "epochs", "world_size")
# A window's step metrics (metrics.StepMeter.close) -> their TensorBoard tags; FLOP/s are written in TFLOP/s.
WINDOW_TAGS = (("images_per_second", "perf/step/images_per_second"), ("step_ms", "perf/step/ms"),
               ("data_ms", "perf/step/data_ms"), ("compute_ms", "perf/step/compute_ms"),
               ("allreduce_ms", "perf/step/allreduce_ms"), ("flops_per_second", "perf/step/tflops"),
               ("mfu", "perf/step/mfu"), ("memory_gib", "perf/memory/peak_gib"),
               ("memory_reserved_gib", "perf/memory/reserved_gib"))


class Reporter:
    def __init__(self, cfg: TrainConfig, env: DistEnv, task: Task, purge_step: int | None) -> None:
        self.cfg, self.env, self.task = cfg, env, task
        self.active = env.is_main
        self.run_dir = Path(cfg.run_dir)
        # purge_step drops TensorBoard events a killed run wrote after its last checkpoint: steps never rewind.
        # Rank 0 alone writes: every method below returns at once elsewhere (the one rank-0 guard).
        self.logger = TensorBoardLogger(self.run_dir, purge_step) if self.active else None
        self.progress: Progress | None = None  # made at the first step: its total needs the steps per epoch
        self.progress_epoch = -1
        self.progress_fields = ""  # the last window's figures, shown by the progress line

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

    def step(self, epoch: int, step_in_epoch: int, steps: int) -> None:
        """Every step: the progress line (a live bar on a terminal, else a plain line every --progress-every s)."""
        if not self.active:
            return
        if self.progress is None:
            self.progress = Progress(self.cfg.epochs * steps, f"epoch {epoch + 1}/{self.cfg.epochs}", "step",
                                     initial=epoch * steps + step_in_epoch - 1, every=self.cfg.progress_every,
                                     plain=sys.stdout)
            self.progress_epoch = epoch
            self.progress.show(self.progress_fields)
        if self.progress_epoch != epoch:
            self.progress_epoch = epoch
            self.progress.describe(f"epoch {epoch + 1}/{self.cfg.epochs}")
        self.progress.update()

    def window(self, step: int, m: dict[str, Any]) -> None:
        """Every --log-every steps: the window's step metrics (metrics.py) in TensorBoard and the progress line."""
        if not self.active:
            return
        logger = self.logger
        for key in ("loss", "lr", "grad_norm", "loss_scale"):
            if key in m:
                logger.scalar(f"train/{key}", m[key], step)
        for key, tag in WINDOW_TAGS:
            if key in m:
                logger.scalar(tag, m[key] * (1e-12 if key == "flops_per_second" else 1), step)
        for name, values in m["ranks"].items():
            if name in ("data_ms", "memory_gib") and len(values) > 1:
                for rank, value in enumerate(values):
                    logger.scalar(f"perf/rank/{name}/rank{rank}", value, step)
        mfu = f"  MFU {m['mfu']:.1%}" if "mfu" in m else f"  {m['flops_per_second'] / 1e9:,.1f} GFLOP/s"
        self.progress_fields = (f"{m['images_per_second']:,.0f} img/s  {m['step_ms']:.1f} ms/step  loss "
                                f"{m['loss']:.4f}{mfu}  mem {m['memory_gib']:.2f} GiB")
        if self.progress is not None:
            self.progress.show(self.progress_fields)

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
        line = epoch_line(record, self.cfg.epochs)
        self.progress.write(line) if self.progress is not None else print(line, flush=True)

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
        self.close_progress()
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
        logger.hparams(hparams | {"world_size": self.env.world_size, "device": self.env.device.type}, metric_tags,
                       apart=HPARAMS_APART)

    def close_progress(self) -> None:
        if self.progress is not None:
            self.progress.close()
            self.progress = None

    def close(self) -> None:
        self.close_progress()
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
