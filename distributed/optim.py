"""The optimiser and the learning-rate schedule a TrainConfig names."""
from __future__ import annotations

from typing import Any

import torch

from .config import TrainConfig


def build_optimizer(cfg: TrainConfig, params: Any) -> torch.optim.Optimizer:
    params = list(params)
    # On CUDA the fused kernels take GradScaler's inf check and scale as tensors: no host sync per fp16 step.
    fused = {"fused": True} if params and params[0].is_cuda else {}
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, **fused)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, **fused)
    return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay, **fused)


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
