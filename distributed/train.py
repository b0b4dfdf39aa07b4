"""Entry point: `torchrun --nproc_per_node=N -m distributed.train` (or plain `python -m distributed.train`).

args -> process group -> the run's parts (build.py: data on the device, model, DDP, a checkpoint restored)
-> `Trainer.fit`: epochs of `train_epoch` and evaluation -> checkpoints (checkpoint.py) and metrics. What the
user sees is `report.Reporter` (rank 0). A restarted worker (torchrun --max-restarts) finds
RUN_DIR/checkpoints/last.pt and carries on from it. `main` maps every user error to one line and an exit code.
"""
from __future__ import annotations

import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from serve_cli.base.cli import STOP_SIGNALS, Stopped, first_line

from . import checkpoint, comms
from .build import Parts, build_parts
from .checkpoint import CheckpointError
from .config import ConfigError, TrainConfig, parse_args
from .data import Split
from .datasets import DataError
from .engine import StepSetup, synchronize, train_step
from .evaluation import EvalResult, evaluate
from .metrics import epoch_summary
from .run_dir import CHECKPOINT_DIR, RunDirError
from .report import done_line, final_metrics
from .stopping import Diverged, Preempted, StopRequest, exit_now, fail
from .timing import Phases

STOP_CHECK_EVERY = 10  # steps between the ranks' agreement on a stop signal and a finite loss (a collective)


USER_ERRORS = (DataError, CheckpointError, RunDirError, Diverged, ConfigError, comms.LaunchError)


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
    """The loop of one run over its parts (build.py): epochs of steps, agreement between ranks, evaluation,
    checkpoints and the final metrics."""

    def __init__(self, env: comms.DistEnv, parts: Parts, stop: StopRequest, phases: Phases) -> None:
        self.env, self.parts, self.stop, self.phases, self.cfg = env, parts, stop, phases, parts.cfg
        self.ckpt_dir = Path(self.cfg.run_dir) / CHECKPOINT_DIR
        self.amp = str(parts.dtype or "off").replace("torch.", "")  # as the checkpoint and metrics name it
        self.setup = StepSetup(parts.net, parts.optimizer, parts.scheduler, parts.scaler, parts.dtype,
                               self.cfg.label_smoothing)
        self.windows: list[dict[str, Any]] = []  # the current epoch's step-metric windows

    @classmethod
    def build(cls, cfg: TrainConfig, env: comms.DistEnv, stop: StopRequest, phases: Phases) -> Trainer:
        return cls(env, build_parts(cfg, env, phases), stop, phases)

    def close(self) -> None:
        try:
            if self.parts.profiler is not None:  # a run that ended (or stopped) inside --profile-steps
                self.parts.profiler.stop()
        finally:
            self.parts.closing.close()

    def save_checkpoint(self, best: bool = False) -> None:
        """Collective (buffers and RNG states of every rank), then rank 0 writes atomically; every rank learns
        whether it could (a full disk on rank 0 would otherwise leave the others waiting in a collective)."""
        with self.phases("checkpoints/logging"):
            comms.sync_buffers(self.parts.model, self.env)
            rng = comms.all_gather_objects(checkpoint.rng_state(self.env.device), self.env)
            error = None
            if self.env.is_main:
                p = self.parts
                state = checkpoint.capture(
                    model=p.model, optimizer=p.optimizer, scheduler=p.scheduler, scaler=p.scaler, cfg=self.cfg,
                    classes=p.task.classes, world_size=self.env.world_size, rng=rng,
                    normalization=(p.train.mean, p.train.std), run=p.run, metrics=p.record, amp=self.amp, data=p.data)
                try:
                    checkpoint.save(self.ckpt_dir / "last.pt", state)
                    if best:
                        checkpoint.save(self.ckpt_dir / "best.pt", state)
                except CheckpointError as e:
                    error = e
            if not comms.all_ok(error is None, self.env):
                raise error or CheckpointError(f"rank 0 could not write to {self.ckpt_dir} (see its error); "
                                               f"earlier checkpoints are kept")

    # -- the loop ----------------------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        """Train to cfg.epochs; returns the final metrics. A stop signal raises Preempted once saved."""
        test = val = None
        self.stop.training = True
        while self.parts.run.epoch < self.cfg.epochs:
            with self.phases("training"):
                stopping = self.train_epoch()
            # the test split is read by the final metrics and the dashboard: scored after the last epoch (after
            # every epoch with --test-every-epoch, for the per-epoch curves)
            test, val = self.score_all(test=self.cfg.test_every_epoch or self.parts.run.epoch + 1 == self.cfg.epochs)
            self.end_epoch(test, val)
            # a signal during the evaluation: the epoch's checkpoint is saved, stop there
            if stopping or comms.any_rank([self.stop.signal is not None], self.env)[0]:
                raise Preempted(self.preempted_message())
        if test is None:  # resumed a finished run: score the weights we have
            test, val = self.score_all()
        return self.finish(test, val)

    def train_epoch(self) -> bool:
        """The rest of the current epoch; True when the ranks agreed to stop at its end."""
        run, cfg, plan = self.parts.run, self.cfg, self.parts.plan
        meter, profiler = self.parts.meter, self.parts.profiler
        order = plan.order(run.epoch, self.env.device)
        segment = Segment(run.step_in_epoch)
        self.windows = []
        self.setup.net.train()
        synchronize(self.env.device)
        if meter is not None:
            meter.open(run.step, plan.images_done(run.step_in_epoch))
        while run.step_in_epoch < plan.steps:  # resuming mid-epoch starts at the next step, at any world size
            logged = meter is not None and (run.step + 1) % cfg.log_every == 0
            if profiler is not None:
                profiler.before_step(run.step + 1)
            loss, per_image, norm = self.step(order, run.step_in_epoch, grad_norm=logged)
            segment.add(loss)
            run.step += 1
            run.step_in_epoch += 1
            if profiler is not None:
                profiler.after_step(run.step)
            if logged:
                self.windows.append(self.log_window(loss * per_image, norm))
            self.parts.report.step(run.epoch, run.step_in_epoch, plan.steps)
            if run.step_in_epoch == plan.steps:
                break
            save = cfg.checkpoint_every_steps and run.step % cfg.checkpoint_every_steps == 0
            if save or run.step % STOP_CHECK_EVERY == 0:
                stopping = self.agree(segment)
                if save or stopping:
                    self.account(segment)
                    self.save_checkpoint()
                    segment = Segment(run.step_in_epoch)
                    if meter is not None:  # the save is not a step's time
                        meter.open(run.step, plan.images_done(run.step_in_epoch))
                if stopping:
                    raise Preempted(self.preempted_message())
        stopping = self.agree(segment)
        self.account(segment)
        return stopping

    def step(self, order: torch.Tensor, step: int,
             grad_norm: bool = False) -> tuple[torch.Tensor, float, torch.Tensor | None]:
        """Optimiser step `step` of the epoch whose permutation is `order`: this rank's micro-batches. Returns
        the weighted loss (summed over ranks: the step's mean), what turns it into this rank's mean, and with
        `grad_norm` the gradient's norm (engine.train_step)."""
        train, share = self.parts.train, self.parts.plan.share(order, step)
        began = time.perf_counter()
        batches = [train.batch(index, self.cfg.augment) for index in share.micro_batches]
        idle_input = train.batch(share.block[:1])[0] if share.idle else None
        if self.parts.meter is not None:
            self.parts.meter.data_time(time.perf_counter() - began)
        loss, norm = train_step(self.setup, batches, share.weight, share.idle, idle_input, grad_norm=grad_norm)
        images = sum(len(index) for index in share.micro_batches)
        return loss, 1 / (share.weight * images) if images else 1.0, norm

    def log_window(self, loss: torch.Tensor, norm: torch.Tensor | None) -> dict[str, Any]:
        """A logged step (every rank, the same step): the window's metrics, with rank 0's mean loss, the lr, the
        gradient norm and the fp16 loss scale; handed to the Reporter."""
        run, plan, scaler = self.parts.run, self.parts.plan, self.parts.scaler
        m = self.parts.meter.close(run.step, plan.images_done(run.step_in_epoch),
                                   lambda values: comms.all_gather_floats(values, self.env))
        m["loss"] = loss.item()
        m["lr"] = self.setup.optimizer.param_groups[0]["lr"]
        if norm is not None:
            m["grad_norm"] = norm.item()
        if scaler.is_enabled():
            m["loss_scale"] = scaler.get_scale()
        self.parts.report.window(run.step, m)
        return m

    def agree(self, segment: Segment) -> bool:
        """One collective: whether any rank got a stop signal (stop together, or the others would wait forever
        in the next all-reduce), and whether any rank's loss stopped being finite (raises Diverged)."""
        stop, diverged = comms.any_rank([self.stop.signal is not None, not segment.finite()], self.env)
        if diverged:
            raise Diverged(f"the training loss became NaN or infinite in epoch {self.parts.run.epoch + 1} before step "
                           f"{self.parts.run.step}; no checkpoint was written since (those in {self.ckpt_dir} are from "
                           f"before): lower --lr, or try --amp off or another --seed")
        return stop

    def account(self, segment: Segment) -> None:
        """Add the segment's work to RunState (every rank; the loss is all-reduced), so a checkpoint holds it."""
        synchronize(self.env.device)
        seconds = time.perf_counter() - segment.start
        loss = segment.loss_sum if segment.loss_sum is not None else torch.zeros((), device=self.env.device)
        loss_sum = comms.all_reduce_sum(loss.float().reshape(1).clone(), self.env).item() / self.env.world_size
        run, plan = self.parts.run, self.parts.plan
        images = plan.images_done(run.step_in_epoch) - plan.images_done(segment.first_batch)
        run.epoch_loss_sum += loss_sum
        run.epoch_seconds += seconds
        run.train_seconds += seconds
        run.train_images += images

    def preempted_message(self) -> str:
        run = self.parts.run
        return (f"stopped by signal {self.stop.signal} at epoch {run.epoch + (run.step_in_epoch > 0)}, step "
                f"{run.step}; checkpoint saved in {self.ckpt_dir}: run the same command again to resume")

    def score(self, split: Split, shard: torch.Tensor, keep_probabilities: bool = False) -> EvalResult:
        return evaluate(self.parts.model, split, shard, self.cfg.eval_batch_size, self.parts.task.num_classes,
                        self.parts.dtype, self.env, keep_probabilities)

    def score_all(self, test: bool = True) -> tuple[EvalResult | None, EvalResult | None]:
        """(test, val); each None when not scored (val: --val-size 0). Every rank scores rank 0's BatchNorm
        statistics; all ranks pass the same `test`."""
        with self.phases("evaluation"):
            comms.sync_buffers(self.parts.model, self.env)
            val = self.score(self.parts.val, self.parts.val_shard) if len(self.parts.val) else None
            return (self.score(self.parts.test, self.parts.test_shard, keep_probabilities=True) if test else None), val

    def end_epoch(self, test: EvalResult | None, val: EvalResult | None) -> None:
        run = self.parts.run
        run.epoch += 1
        is_best = val is None or val.accuracy > run.best_val_accuracy
        if is_best:
            run.best_epoch = run.epoch
            run.best_val_accuracy = val.accuracy if val is not None else run.best_val_accuracy
        record = {"epoch": run.epoch, "step": run.step, "train_loss": run.epoch_loss_sum / max(run.step_in_epoch, 1),
                  "images_per_second": self.parts.plan.images_done(run.step_in_epoch) / max(run.epoch_seconds, 1e-9),
                  "epoch_seconds": run.epoch_seconds, "train_seconds": run.train_seconds}
        if self.windows:
            record["steps_logged"] = epoch_summary(self.windows)
        if test is not None:
            record.update(test_loss=test.loss, test_accuracy=test.accuracy)
        if val is not None:
            record.update(val_loss=val.loss, val_accuracy=val.accuracy)
        self.parts.record = record
        run.history.append(record)
        run.step_in_epoch, run.epoch_loss_sum, run.epoch_seconds = 0, 0.0, 0.0
        self.save_checkpoint(best=is_best)
        with self.phases("checkpoints/logging"):
            self.parts.report.epoch(record, test, self.parts.test)

    def finish(self, test: EvalResult, val: EvalResult | None) -> dict[str, Any]:
        with self.phases("checkpoints/logging"):
            p = self.parts
            fingerprints = comms.all_gather_objects(comms.weights_fingerprint(p.model), self.env)
            metrics = final_metrics(self.cfg, self.env, p.task, p.run, self.amp, test, val, fingerprints,
                                    self.phases.snapshot())
            p.report.finished(metrics, test, p.model, p.test)
            return metrics


def run(cfg: TrainConfig, env: comms.DistEnv, stop: StopRequest | None = None,
        phases: Phases | None = None) -> dict[str, Any]:
    """Build the run's parts, train, release the run dir and the writer; the final metrics."""
    trainer = Trainer.build(cfg, env, stop or StopRequest(), phases or Phases())
    try:
        return trainer.fit()
    finally:
        trainer.close()


def main(argv: list[str] | None = None) -> int:
    phases = Phases()  # first: start-up counts from the process's start
    if hasattr(sys.stdout, "reconfigure"):  # a file name that is not UTF-8, in a note, prints as its escapes
        sys.stdout.reconfigure(errors="backslashreplace")
    cfg = parse_args(argv)
    stop = StopRequest()
    previous = {signum: signal.signal(signum, stop) for signum in STOP_SIGNALS}
    env = None
    together = False  # every rank left fit() the same way (finished, or agreed to stop): teardown may wait
    try:
        env = comms.setup(cfg.device)
        metrics = run(cfg, env, stop=stop, phases=phases)
        together = True
    except Preempted as e:
        together = True
        return fail(str(e), 128 + (stop.signal or signal.SIGTERM), env)
    except Stopped as e:  # before training began: nothing new to save
        return fail(f"stopped by signal {e.signum} before training began; nothing new was saved: run the same "
                    f"command again to start", 128 + e.signum, env)
    except USER_ERRORS as e:
        return fail(f"error: {e}", 1, env)
    except OSError as e:  # a full disk or a vanished folder while writing: the last checkpoint is intact
        where = f"{e.filename}: " if e.filename else ""
        return fail(f"error: {where}{e.strerror or e}; earlier checkpoints are kept", 1, env)
    except Exception as e:
        reason = comms.peer_gone(e) if env is not None and env.is_distributed else None
        if reason:  # every surviving rank says so
            print(f"error: another rank stopped during a collective ({reason}); the checkpoints in "
                  f"{Path(cfg.run_dir) / CHECKPOINT_DIR} are intact: torchrun --max-restarts restarts the workers "
                  f"from the last one, or run the same command again", file=sys.stderr, flush=True)
            return 1
        if not (cfg.compile and type(e).__module__.startswith(("torch._dynamo", "torch._inductor"))):
            raise
        # The environment, not the run: inductor needs a C++ compiler on the CPU and Triton on CUDA.
        return fail(f"error: --compile failed ({first_line(e)}); run without --compile, or install what "
                    f"torch.compile needs (a C++ compiler for the CPU, Triton for CUDA)", 1, env)
    finally:
        comms.teardown(peers_in_step=together)
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if env.is_main:
        print(done_line(metrics, env.world_size, cfg.run_dir), flush=True)
    return 0


if __name__ == "__main__":
    exit_now(main())
