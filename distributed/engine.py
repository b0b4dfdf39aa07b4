"""The pieces of training: one optimiser step and one exact, sharded evaluation, with autocast and scaling.

The loop that strings steps into epochs, checkpoints and stops lives in the trainer (distributed/train.py).
"""
from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .data import Split
from .dist import DistEnv, all_gather_objects, all_reduce_sum


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


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer,
               scheduler: torch.optim.lr_scheduler.LRScheduler | None, scaler: torch.amp.GradScaler,
               x: torch.Tensor, y: torch.Tensor, dtype: torch.dtype | None,
               label_smoothing: float = 0.0) -> torch.Tensor:
    """One optimiser step on one batch; returns the detached loss (still on the device: no host sync)."""
    with autocast(x.device, dtype):
        loss = F.cross_entropy(model(x), y, label_smoothing=label_smoothing)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    if scheduler is not None:
        scheduler.step()
    return loss.detach()


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
