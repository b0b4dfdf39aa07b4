"""One optimiser step (train_step over a StepSetup), with autocast, loss scaling and DDP's no_sync.

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
               idle_input: torch.Tensor | None = None,
               grad_norm: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One optimiser step over micro-batches (sampling.py): the gradient of the sum over `batches` of
    `weight` x their summed loss, all-reduced once, in the last backward (DDP's no_sync before it). `idle`
    zero-weight passes on `idle_input` come first, in eval mode (no BatchNorm statistics, no dropout): they
    keep every rank's forwards and backwards in step. Returns the weighted loss, on the device (no host sync),
    and with `grad_norm` the total 2-norm of the gradient the optimiser steps with: after the all-reduce (the
    same on every rank) and unscaled under fp16, also on the device."""
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
    norm = None
    if grad_norm:
        scaler.unscale_(optimizer)  # the step then uses these unscaled gradients as they are (a no-op off fp16)
        norm = torch.nn.utils.get_total_norm([p.grad for group in optimizer.param_groups for p in group["params"]
                                              if p.grad is not None])
    scaler.step(optimizer)
    scaler.update()
    if setup.scheduler is not None:
        setup.scheduler.step()
    if len(losses) == 1:
        return losses[0], norm
    return (torch.stack(losses).sum() if losses else torch.zeros((), device=passes[0][0].device)), norm


def no_sync(net: nn.Module, skip: bool) -> AbstractContextManager:
    """DDP's no_sync when `skip`: this backward accumulates gradients without all-reducing them."""
    return net.no_sync() if skip and isinstance(net, DDP) else nullcontext()
