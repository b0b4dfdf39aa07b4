"""The pieces of training: one optimiser step and one exact, sharded evaluation, with autocast and scaling.

The loop that strings steps into epochs, checkpoints and stops lives in the trainer (distributed/train.py).
"""
from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from .data import Split
from .comms import DistEnv, all_gather_objects, all_reduce_sum


def amp_dtype(flag: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for --amp, or None for full fp32."""
    if flag == "bf16":
        return torch.bfloat16
    if flag == "fp16":
        return torch.float16
    if flag == "auto" and device.type == "cuda":
        # Emulated bf16 (pre-Ampere) is slower than fp16 with a scaler: count only the hardware's own.
        return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
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
class StepSetup:
    """What every optimiser step runs with and no step changes."""
    net: nn.Module  # the training forward: the model, compiled and/or wrapped in DDP
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler | None
    scaler: torch.amp.GradScaler
    dtype: torch.dtype | None  # autocast's; None: fp32
    label_smoothing: float


def train_step(setup: StepSetup, batches: Sequence[tuple[torch.Tensor, torch.Tensor]], weight: float, idle: int = 0,
               idle_input: torch.Tensor | None = None) -> torch.Tensor:
    """One optimiser step over micro-batches (sampling.py): the gradient of the sum over `batches` of
    `weight` x their summed loss, all-reduced once, in the last backward (DDP's no_sync before it). `idle`
    zero-weight passes on `idle_input` come first, in eval mode (no BatchNorm statistics, no dropout): they
    keep every rank's forwards and backwards in step. Returns the weighted loss, on the device (no host sync)."""
    net, optimizer, scaler = setup.net, setup.optimizer, setup.scaler
    passes: list[tuple[torch.Tensor, torch.Tensor | None]] = [(idle_input, None)] * idle + list(batches)
    optimizer.zero_grad(set_to_none=True)
    losses = []
    for i, (x, y) in enumerate(passes):
        with no_sync(net, i < len(passes) - 1):  # DDP all-reduces in the last backward only
            with autocast(x.device, setup.dtype):
                if y is None:
                    net.eval()
                    loss = net(x).float().sum() * 0.0
                    net.train()
                else:
                    loss = F.cross_entropy(net(x), y, reduction="sum", label_smoothing=setup.label_smoothing) * weight
                    losses.append(loss.detach())
            scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    if setup.scheduler is not None:
        setup.scheduler.step()
    if len(losses) == 1:
        return losses[0]
    return torch.stack(losses).sum() if losses else torch.zeros((), device=passes[0][0].device)


def no_sync(net: nn.Module, skip: bool) -> AbstractContextManager:
    """DDP's no_sync when `skip`: this backward accumulates gradients without all-reducing them."""
    return net.no_sync() if skip and isinstance(net, DDP) else nullcontext()


@dataclass(frozen=True)
class EvalResult:
    loss: float
    accuracy: float
    count: int
    confusion: torch.Tensor  # [true, predicted] counts, on CPU
    probabilities: torch.Tensor | None = None  # [N, classes] softmax of every image, in split order, on CPU


@torch.inference_mode()
def evaluate(model: nn.Module, split: Split, shard: torch.Tensor, batch_size: int, num_classes: int,
             dtype: torch.dtype | None, env: DistEnv, keep_probabilities: bool = False) -> EvalResult:
    """Each rank scores its disjoint shard; sums are all-reduced, so the result is exact at any world size.

    keep_probabilities gathers every image's class probabilities onto every rank (for the error analysis
    in TensorBoard); all ranks must pass the same value, as it adds a collective."""
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=env.device)
    confusion = torch.zeros(num_classes * num_classes, dtype=torch.int64, device=env.device)
    parts = []
    for index in shard.split(batch_size):
        x, y = split.batch(index)
        with autocast(env.device, dtype):
            logits = model(x).float()
        loss_sum += F.cross_entropy(logits, y, reduction="sum").double()
        confusion += torch.bincount(y * num_classes + logits.argmax(1), minlength=num_classes ** 2)
        if keep_probabilities:
            parts.append(logits.softmax(1).cpu())
    model.train(was_training)
    all_reduce_sum(loss_sum, env)
    all_reduce_sum(confusion, env)
    confusion = confusion.view(num_classes, num_classes).cpu()
    count = int(confusion.sum())
    correct = int(confusion.diagonal().sum())
    probabilities = None
    if keep_probabilities:
        mine = torch.cat(parts) if parts else torch.zeros(0, num_classes)
        probabilities = torch.zeros(len(split), num_classes)
        for index, probs in all_gather_objects((shard.cpu(), mine), env):
            probabilities[index] = probs
    return EvalResult(loss_sum.item() / max(count, 1), correct / max(count, 1), count, confusion, probabilities)
