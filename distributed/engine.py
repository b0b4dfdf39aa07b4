"""One training epoch and one exact, sharded evaluation, with autocast and gradient scaling."""
from __future__ import annotations

import time
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from .data import Split
from .dist import DistEnv, all_reduce_sum

StepHook = Callable[[int, torch.Tensor], bool]  # (global step, detached loss) -> stop now?


def amp_dtype(flag: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for --amp, or None for full fp32."""
    if flag == "bf16":
        return torch.bfloat16
    if flag == "fp16":
        return torch.float16
    if flag == "auto" and device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return None


def autocast(device: torch.device, dtype: torch.dtype | None) -> AbstractContextManager:
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


def make_scaler(device: torch.device, dtype: torch.dtype | None) -> torch.amp.GradScaler:
    # Only fp16 underflows; bf16 has fp32's exponent range and needs no loss scaling.
    return torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass(frozen=True)
class EpochStats:
    loss: float  # mean training loss over this rank's batches
    steps: int
    stopped: bool  # the step hook asked to stop before the epoch's end
    images: int  # this rank's images
    seconds: float  # wall time of the training steps alone


def train_one_epoch(model: nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler | None,
                    scaler: torch.amp.GradScaler, split: Split, batches: Iterable[torch.Tensor],
                    dtype: torch.dtype | None, device: torch.device, first_step: int,
                    on_step: StepHook | None = None, augment: bool = False,
                    label_smoothing: float = 0.0) -> EpochStats:
    model.train()
    loss_sum = torch.zeros((), device=device)
    steps = images = 0
    stopped = False
    synchronize(device)
    start = time.perf_counter()
    for index in batches:
        x, y = split.batch(index, augment)
        with autocast(device, dtype):
            loss = F.cross_entropy(model(x), y, label_smoothing=label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        if scheduler is not None:
            scheduler.step()
        loss_sum += loss.detach()
        steps += 1
        images += len(index)
        if on_step is not None and on_step(first_step + steps, loss.detach()):
            stopped = True
            break
    synchronize(device)
    seconds = time.perf_counter() - start
    return EpochStats(loss_sum.item() / max(steps, 1), steps, stopped, images, seconds)


@dataclass(frozen=True)
class EvalResult:
    loss: float
    accuracy: float
    correct: int
    count: int
    confusion: torch.Tensor  # [true, predicted] counts, on CPU


@torch.inference_mode()
def evaluate(model: nn.Module, split: Split, shard: torch.Tensor, batch_size: int, num_classes: int,
             dtype: torch.dtype | None, env: DistEnv) -> EvalResult:
    """Each rank scores its disjoint shard; sums are all-reduced, so the result is exact at any world size."""
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=env.device)
    confusion = torch.zeros(num_classes * num_classes, dtype=torch.int64, device=env.device)
    for index in shard.split(batch_size):
        x, y = split.batch(index)
        with autocast(env.device, dtype):
            logits = model(x)
        loss_sum += F.cross_entropy(logits.float(), y, reduction="sum").double()
        confusion += torch.bincount(y * num_classes + logits.argmax(1), minlength=num_classes ** 2)
    model.train(was_training)
    all_reduce_sum(loss_sum, env)
    all_reduce_sum(confusion, env)
    confusion = confusion.view(num_classes, num_classes).cpu()
    count = int(confusion.sum())
    correct = int(confusion.diagonal().sum())
    return EvalResult(loss_sum.item() / max(count, 1), correct / max(count, 1), correct, count, confusion)
