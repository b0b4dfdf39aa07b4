"""Entry point: `torchrun --nproc_per_node=N -m distributed.train` (or plain `python -m distributed.train`).

args -> process group -> data on device -> model (DDP) -> epochs of train/eval -> checkpoints and metrics.
The training loop is `Trainer.train_epoch`; the checkpoint is `Trainer.state_dict`/`load_state_dict`;
what the user sees is `report.Reporter` (rank 0). A restarted worker (torchrun --max-restarts) finds
RUN_DIR/checkpoints/last.pt and carries on from it.
"""
from __future__ import annotations

import itertools
import os
import signal
import sys
import time
import warnings
from contextlib import ExitStack, suppress
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from serve_cli.cli import first_line

from . import checkpoint, dist
from .checkpoint import CheckpointError
from .config import TrainConfig, flags_of, parse_args
from .data import (DataError, Split, data_changes, epoch_batches, eval_shard, fingerprint, images_seen, load_data,
                   make_sampler, steps_per_epoch, task_of)
from .engine import EvalResult, amp_dtype, evaluate, make_scaler, synchronize, train_step
from .files import RunDirError, lock_run_dir
from .models import build_model, has_batchnorm, to_device
from .optim import build_optimizer, build_scheduler
from .report import Reporter, done_line, final_metrics
from .timing import Phases

STOP_CHECK_EVERY = 10  # steps between the ranks' agreement on a stop signal and a finite loss (a collective)
FAIL_GRACE_SECONDS = 1.0  # how long the other ranks wait for rank 0 to report an error they all hit


class Preempted(Exception):
    """A stop signal arrived; a checkpoint was saved and the run can resume."""


class Interrupted(BaseException):
    """A stop signal before training began (set-up, data, a folder's decoding): nothing new to save.
    A BaseException, as KeyboardInterrupt is: no `except Exception` on its way swallows it."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"stopped by signal {signum} before training began; nothing new was saved: run the same "
                         f"command again to start")
        self.signum = signum


class Diverged(RuntimeError):
    """The loss became NaN or infinite; nothing after the last good checkpoint was saved."""


USER_ERRORS = (DataError, CheckpointError, RunDirError, Diverged, dist.LaunchError)


@dataclass
class StopRequest:
    """Set by the signal handler, read by the training loop: SLURM and Kubernetes stop jobs with SIGTERM.

    Before the loop starts there is nothing to save, so the handler stops the process at once (the data phase
    may take a while: a folder's first decoding); once it runs, the ranks agree on a step to stop at together."""
    signal: int | None = None
    training: bool = False

    def __call__(self, signum: int, frame: Any) -> None:
        self.signal = signum
        if not self.training:
            raise Interrupted(signum)


@dataclass
class RunState:
    """What survives a restart besides the weights and optimiser: kept in every checkpoint."""
    epoch: int = 0  # epochs completed
    step: int = 0  # optimiser steps completed
    batch_in_epoch: int = 0  # batches of epoch `epoch` already done (mid-epoch checkpoints)
    train_seconds: float = 0.0  # every training step ever taken, interrupted attempts included
    train_images: int = 0
    epoch_loss_sum: float = 0.0  # the current epoch's work so far (it may span a restart)
    epoch_seconds: float = 0.0
    best_val_accuracy: float = -1.0
    best_epoch: int = 0
    history: list[dict[str, float]] = field(default_factory=list)


@dataclass
class Segment:
    """Training steps since the last time their work was added to RunState (a save or an epoch's end)."""
    first_batch: int
    start: float = field(default_factory=time.perf_counter)
    loss_sum: torch.Tensor | None = None  # on the device: summing it needs no host sync

    def add(self, loss: torch.Tensor) -> None:
        self.loss_sum = loss if self.loss_sum is None else self.loss_sum + loss

    def finite(self) -> bool:
        return self.loss_sum is None or bool(torch.isfinite(self.loss_sum).item())


class Trainer:
    """The model, optimiser and progress of one run: everything a checkpoint captures, and the loop."""

    def __init__(self, cfg: TrainConfig, env: dist.DistEnv, stop: StopRequest, phases: Phases) -> None:
        self.cfg, self.env, self.stop, self.phases = cfg, env, stop, phases
        self.run_dir = Path(cfg.run_dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.closing = ExitStack()  # what close() undoes, also when __init__ fails half-way
        try:
            self._build()
        except BaseException:
            self.closing.close()
            raise

    def _build(self) -> None:
        cfg, env = self.cfg, self.env
        self.task = task_of(cfg.dataset, cfg.task)  # a folder's classes are its sub-folders: may raise DataError
        lock = lock_run_dir(self.run_dir, env)
        if lock is not None:
            self.closing.callback(lock.release)
        with self.phases("checkpoints/logging"):
            state = checkpoint.resume_state(cfg, self.ckpt_dir / "last.pt")
        with self.phases("data"):
            self.train, self.val, self.test, data_notes = load_data(cfg, self.task, env)
            self.data = fingerprint(self.train, self.val, self.test, self.task.num_classes)
        if state is not None and state.get("data"):
            changed = data_changes(state["data"], self.data, self.task.classes)
            if changed:  # another split, another validation set: not the run the checkpoint belongs to
                raise CheckpointError(f"{self.ckpt_dir / 'last.pt'} was trained on other data ({cfg.dataset} "
                                      f"changed: {changed}): restore the data, or start over with --no-resume "
                                      f"or another --run-dir")
        self.dtype = amp_dtype(cfg.amp, env.device)
        self.amp = str(self.dtype or "off").replace("torch.", "")  # as the checkpoint and metrics name it

        torch.manual_seed(cfg.seed)  # identical initial weights on every rank (DDP also broadcasts rank 0's)
        self.model = to_device(build_model(cfg.model, self.task.num_classes), env.device, cfg.channels_last)
        torch.manual_seed(cfg.seed + env.rank)  # ranks drop out different units (a resume restores each rank's)
        self.sampler = make_sampler(len(self.train), env.rank, env.world_size, cfg.seed,
                                    shuffle=not cfg.overfit_batches)
        # BatchNorm cannot train on one image: such a model leaves out an epoch's last batch when it holds one
        self.drop_single = has_batchnorm(self.model)
        self.steps_each_epoch = steps_per_epoch(self.sampler, cfg.batch_size, self.drop_single)
        self.optimizer = build_optimizer(cfg, self.model.parameters())
        self.scheduler = build_scheduler(cfg, self.optimizer, self.steps_each_epoch)
        self.scaler = make_scaler(env.device, self.dtype)
        self.run = RunState()
        self.record: dict[str, float] = {}
        refitted = state is not None and self.load_state_dict(state, self.ckpt_dir / "last.pt")
        # The training forward may be compiled; self.model stays the plain module that checkpoints, evaluation
        # and export use (nanoGPT's order: compile, then wrap in DDP).
        net = torch.compile(self.model) if cfg.compile else self.model
        # Under torchrun the model is always DDP, one rank too (as nanoGPT does): one code path, and a one-GPU
        # machine runs the same DDP, buffer broadcast and all-reduces as a cluster.
        self.net: nn.Module = DDP(net, device_ids=[env.device] if env.device.type == "cuda" else None) \
            if env.is_distributed else net
        self.test_shard = eval_shard(len(self.test), env.rank, env.world_size, env.device)
        self.val_shard = eval_shard(len(self.val), env.rank, env.world_size, env.device)

        self.report = Reporter(cfg, env, self.task, purge_step=self.run.step + 1 if state is not None else None)
        self.closing.callback(self.report.close)
        if env.is_main:
            for stale in self.ckpt_dir.glob(".*.tmp*"):  # a save killed half-way left its temp file
                stale.unlink(missing_ok=True)
        if self.steps_each_epoch < steps_per_epoch(self.sampler, cfg.batch_size):
            data_notes.append(f"{cfg.model} has BatchNorm, which cannot train on one image: each epoch's last batch, "
                              f"one image per rank, is left out ({env.world_size} of {len(self.train):,} images)")
        self.report.notes(data_notes, warnings=[env.warning] if env.warning else [])
        if refitted:
            self.report.refitted({"world_size": state["world_size"], **state["config"]})
        resumed_at = None if state is None else (
            f"epoch {self.run.epoch}" + (f" + {self.run.batch_in_epoch} batches" if self.run.batch_in_epoch else "")
            + f", step {self.run.step}")
        with self.phases("checkpoints/logging"):
            self.report.started(resumed_at, self.model,
                                self.test.batch(torch.arange(min(2, len(self.test)), device=env.device))[0])

    def close(self) -> None:
        self.closing.close()

    # -- the checkpoint: writer and reader side by side (schema in checkpoint.py) --------------------
    def state_dict(self, rng: list[dict[str, torch.Tensor]]) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict() if self.scheduler else None,
                "scaler": self.scaler.state_dict(), "config": self.cfg.to_dict(),
                "classes": list(self.task.classes), "world_size": self.env.world_size, "rng": rng,
                "normalization": {"mean": self.train.mean, "std": self.train.std},
                "run": asdict(self.run), "metrics": self.record, "amp": self.amp,
                "data": self.data}

    def load_state_dict(self, state: dict[str, Any], path: Path) -> bool:
        """Restore a checkpoint; True when the epoch restarts with a re-fitted schedule (a new shape of run)."""
        try:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.scaler.load_state_dict(state["scaler"])
            self.run = RunState(**state["run"])
            same_shape = state["world_size"] == self.env.world_size and all(
                state["config"].get(name) == getattr(self.cfg, name) for name in flags_of("length"))
            if same_shape and self.scheduler is not None and state["scheduler"]:
                self.scheduler.load_state_dict(state["scheduler"])
            if same_shape:
                checkpoint.set_rng_state(state["rng"][self.env.rank], self.env.device)
        except (KeyError, TypeError, ValueError, RuntimeError, IndexError) as e:
            raise CheckpointError(f"{path} does not fit this run ({first_line(e, 160)}): use another --run-dir "
                                  f"or --no-resume") from None
        self.record = dict(state.get("metrics") or {})
        if same_shape:
            return False
        # Another world size, --epochs or --batch-size: the shards and the steps per epoch changed, so the
        # current epoch restarts and the LR schedule is re-fitted to the new length.
        self.run.batch_in_epoch = 0
        self.run.epoch_loss_sum, self.run.epoch_seconds = 0.0, 0.0
        if self.scheduler is not None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # stepping a scheduler without optimiser steps warns
                for _ in range(self.run.epoch * self.steps_each_epoch):
                    self.scheduler.step()
        return True

    def save_checkpoint(self, best: bool = False) -> None:
        """Collective (buffers and RNG states of every rank), then rank 0 writes atomically; every rank learns
        whether it could (a full disk on rank 0 would otherwise leave the others waiting in a collective)."""
        with self.phases("checkpoints/logging"):
            dist.sync_buffers(self.model, self.env)
            rng = dist.all_gather_objects(checkpoint.rng_state(self.env.device), self.env)
            error = None
            if self.env.is_main:
                state = self.state_dict(rng)
                try:
                    checkpoint.save(self.ckpt_dir / "last.pt", state)
                    if best:
                        checkpoint.save(self.ckpt_dir / "best.pt", state)
                except CheckpointError as e:
                    error = e
            if not dist.all_ok(error is None, self.env):
                raise error or CheckpointError(f"rank 0 could not write to {self.ckpt_dir} (see its error); "
                                               f"earlier checkpoints are kept")

    # -- the loop ----------------------------------------------------------------------------------
    def fit(self, stop_after_epoch: int | None = None) -> dict[str, Any]:
        """Train to cfg.epochs; returns the final metrics. `stop_after_epoch` stops early, as a preemption would."""
        test = val = None
        self.stop.training = True
        while self.run.epoch < self.cfg.epochs:
            with self.phases("training"):
                stopping = self.train_epoch()
            test, val = self.score_all()
            self.end_epoch(test, val)
            # a signal during the evaluation: the epoch's checkpoint is saved, stop there
            if stopping or dist.any_rank([self.stop.signal is not None], self.env)[0]:
                raise Preempted(self.preempted_message())
            if stop_after_epoch is not None and self.run.epoch >= stop_after_epoch:
                break
        if test is None:  # resumed a finished run: score the weights we have
            test, val = self.score_all()
        return self.finish(test, val)

    def train_epoch(self) -> bool:
        """The rest of the current epoch; True when the ranks agreed to stop at its end."""
        run, cfg = self.run, self.cfg
        batches = epoch_batches(self.sampler, run.epoch, cfg.batch_size, self.env.device)
        segment = Segment(run.batch_in_epoch)
        self.net.train()
        synchronize(self.env.device)
        for index in itertools.islice(batches, run.batch_in_epoch, None):  # resuming mid-epoch skips
            loss = train_step(self.net, self.optimizer, self.scheduler, self.scaler,
                              *self.train.batch(index, cfg.augment), self.dtype, cfg.label_smoothing)
            segment.add(loss)
            run.step += 1
            run.batch_in_epoch += 1
            self.report.step(run.step, loss, self.optimizer.param_groups[0]["lr"], run.epoch, run.batch_in_epoch,
                             self.steps_each_epoch)
            if run.batch_in_epoch == self.steps_each_epoch:
                break
            save = cfg.checkpoint_every_steps and run.step % cfg.checkpoint_every_steps == 0
            if save or run.step % STOP_CHECK_EVERY == 0:
                stopping = self.agree(segment)
                if save or stopping:
                    self.account(segment)
                    self.save_checkpoint()
                    segment = Segment(run.batch_in_epoch)
                if stopping:
                    raise Preempted(self.preempted_message())
        stopping = self.agree(segment)
        self.account(segment)
        return stopping

    def agree(self, segment: Segment) -> bool:
        """One collective: whether any rank got a stop signal (stop together, or the others would wait forever
        in the next all-reduce), and whether any rank's loss stopped being finite (raises Diverged)."""
        stop, diverged = dist.any_rank([self.stop.signal is not None, not segment.finite()], self.env)
        if diverged:
            raise Diverged(f"the training loss became NaN or infinite in epoch {self.run.epoch + 1} before step "
                           f"{self.run.step}; no checkpoint was written since (those in {self.ckpt_dir} are from "
                           f"before): lower --lr, or try --amp off or another --seed")
        return stop

    def account(self, segment: Segment) -> None:
        """Add the segment's work to RunState (every rank; the loss is all-reduced), so a checkpoint holds it."""
        synchronize(self.env.device)
        seconds = time.perf_counter() - segment.start
        loss = segment.loss_sum if segment.loss_sum is not None else torch.zeros((), device=self.env.device)
        loss_sum = dist.all_reduce_sum(loss.float().reshape(1).clone(), self.env).item() / self.env.world_size
        images = self.images_done(self.run.batch_in_epoch) - self.images_done(segment.first_batch)
        run = self.run
        run.epoch_loss_sum += loss_sum
        run.epoch_seconds += seconds
        run.train_seconds += seconds
        run.train_images += images

    def images_done(self, batches: int) -> int:
        return images_seen(self.sampler, self.cfg.batch_size, batches, self.drop_single)

    def preempted_message(self) -> str:
        return (f"stopped by signal {self.stop.signal} at epoch {self.run.epoch + (self.run.batch_in_epoch > 0)}, "
                f"step {self.run.step}; checkpoint saved in {self.ckpt_dir}: run the same command again to resume")

    def score(self, split: Split, shard: torch.Tensor, keep_probabilities: bool = False) -> EvalResult:
        return evaluate(self.model, split, shard, self.cfg.eval_batch_size, self.task.num_classes,
                        self.dtype, self.env, keep_probabilities)

    def score_all(self) -> tuple[EvalResult, EvalResult | None]:
        """(test, val); val is None when --val-size is 0. Every rank scores rank 0's BatchNorm statistics."""
        with self.phases("evaluation"):
            dist.sync_buffers(self.model, self.env)
            val = self.score(self.val, self.val_shard) if len(self.val) else None
            return self.score(self.test, self.test_shard, keep_probabilities=True), val

    def end_epoch(self, test: EvalResult, val: EvalResult | None) -> None:
        run = self.run
        run.epoch += 1
        is_best = val is None or val.accuracy > run.best_val_accuracy
        if is_best:
            run.best_val_accuracy, run.best_epoch = (val or test).accuracy, run.epoch
        self.record = {"epoch": run.epoch, "step": run.step,
                       "train_loss": run.epoch_loss_sum / max(run.batch_in_epoch, 1),
                       "test_loss": test.loss, "test_accuracy": test.accuracy,
                       "images_per_second": self.images_done(run.batch_in_epoch) / max(run.epoch_seconds, 1e-9),
                       "epoch_seconds": run.epoch_seconds, "train_seconds": run.train_seconds}
        if val is not None:
            self.record.update(val_loss=val.loss, val_accuracy=val.accuracy)
        run.history.append(self.record)
        run.batch_in_epoch, run.epoch_loss_sum, run.epoch_seconds = 0, 0.0, 0.0
        self.save_checkpoint(best=is_best)
        with self.phases("checkpoints/logging"):
            self.report.epoch(self.record, test, self.test)

    def finish(self, test: EvalResult, val: EvalResult | None) -> dict[str, Any]:
        with self.phases("checkpoints/logging"):
            fingerprints = dist.all_gather_objects(dist.weights_fingerprint(self.model), self.env)
            metrics = final_metrics(self.cfg, self.env, self.task, self.run, self.amp, test, val, fingerprints,
                                    self.phases.snapshot())
            self.report.finished(metrics, test, self.model, self.test)
            return metrics


def fit(cfg: TrainConfig, env: dist.DistEnv, stop_after_epoch: int | None = None,
        stop: StopRequest | None = None, phases: Phases | None = None) -> dict[str, Any]:
    trainer = Trainer(cfg, env, stop or StopRequest(), phases or Phases())
    try:
        return trainer.fit(stop_after_epoch)
    finally:
        trainer.close()


def main(argv: list[str] | None = None) -> int:
    phases = Phases()  # first: start-up counts from the process's start
    cfg = parse_args(argv)
    stop = StopRequest()
    previous = {signum: signal.signal(signum, stop) for signum in (signal.SIGTERM, signal.SIGINT)}
    env = None
    together = False  # every rank left fit() the same way (finished, or agreed to stop): teardown may wait
    try:
        env = dist.setup(cfg.device)
        metrics = fit(cfg, env, stop=stop, phases=phases)
        together = True
    except Preempted as e:
        together = True
        return fail(str(e), 128 + (stop.signal or signal.SIGTERM), env)
    except Interrupted as e:
        return fail(str(e), 128 + e.signum, env)
    except USER_ERRORS as e:
        return fail(f"error: {e}", 1, env)
    except OSError as e:  # a full disk or a vanished folder while writing: the last checkpoint is intact
        where = f"{e.filename}: " if e.filename else ""
        return fail(f"error: {where}{e.strerror or e}; earlier checkpoints are kept", 1, env)
    except Exception as e:
        if not (cfg.compile and type(e).__module__.startswith(("torch._dynamo", "torch._inductor"))):
            raise
        # The environment, not the run: inductor needs a C++ compiler on the CPU and Triton on CUDA.
        return fail(f"error: --compile failed ({first_line(e)}); run without --compile, or install what "
                    f"torch.compile needs (a C++ compiler for the CPU, Triton for CUDA)", 1, env)
    finally:
        dist.teardown(peers_in_step=together)
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if env.is_main:
        print(done_line(metrics, env.world_size, cfg.run_dir), flush=True)
    return 0


def fail(message: str, code: int, env: dist.DistEnv | None) -> int:
    """One line on stderr, from rank 0 alone (every rank hits the same error, also before the process group).

    The other ranks leave a moment later: torchrun stops every worker as soon as one exits, and rank 0 must
    have said why by then."""
    if (env.rank if env is not None else dist.env_int("RANK", 0)) == 0:
        print(message, file=sys.stderr, flush=True)
    else:
        with suppress(Interrupted):  # torchrun's SIGTERM, once rank 0 has gone
            time.sleep(FAIL_GRACE_SECONDS)
    return code


def exit_now(code: int) -> None:
    """Leave without the interpreter's teardown of torch's modules: 0.8-1.2 s here, after the run is over.

    Everything a user relies on is already on disk (atomic writes, fsynced), the TensorBoard writer is
    closed and the process group destroyed; only stdout/stderr need a flush."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    exit_now(main())
