"""The inference function that every artifact holds: [0, 1] images -> normalise -> network -> logits."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from distributed import checkpoint
from distributed.data import MEAN, STD, TASKS, task_of
from distributed.datasets import DATASETS, folder_path
from distributed.models import MODELS, build_model
from serve_cli.base.cli import first_line


class InferenceModel(nn.Module):
    """Takes float32 [N, 1, 28, 28] in [0, 1], MNIST polarity; its dataset's normalisation is baked in."""

    def __init__(self, net: nn.Module, mean: float = MEAN, std: float = STD) -> None:
        super().__init__()
        self.net = net
        self.mean = mean
        self.std = std

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net((images - self.mean) / self.std)


def load_for_export(path: str | Path) -> tuple[InferenceModel, dict[str, Any]]:
    """Rebuild the network from the checkpoint's own config; CPU, fp32, eval mode (works for GPU checkpoints)."""
    state = checkpoint.load(path, map_location="cpu")
    info = checkpoint.summary(state)
    name, task = info["name"], info["task"]
    if name not in MODELS:
        raise checkpoint.CheckpointError(f"{path} names model {name!r}, which this version does not know "
                                         f"(known: {', '.join(MODELS)})")
    if info["dataset"] not in DATASETS and folder_path(info["dataset"]) is None:
        raise checkpoint.CheckpointError(f"{path} names dataset {info['dataset']!r}; known: {', '.join(DATASETS)}")
    if not info["classes"] and task not in TASKS:
        raise checkpoint.CheckpointError(f"{path} names task {task!r} and no classes: it is not one of ours")
    classes = list(info["classes"] or task_of(info["dataset"], task).classes)
    net = build_model(name, len(classes))
    try:
        net.load_state_dict({k: v.float() for k, v in state["model"].items()})
    except (RuntimeError, AttributeError, TypeError) as e:
        raise checkpoint.CheckpointError(f"{path}: weights do not fit {name} ({first_line(e, 160)})") from None
    return InferenceModel(net, info["mean"], info["std"]).eval(), {**info, "classes": classes}
