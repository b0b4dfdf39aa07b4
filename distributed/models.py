"""The networks of the source documents, and one registry: name -> constructor(num_classes).

Every network takes normalised float images [N, 1, 28, 28] and returns logits [N, num_classes].
They are plain nn.Sequential stacks so that TorchScript, ONNX and torch.export take them as they are.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn


def samnet(num_classes: int) -> nn.Module:
    """The seed's binary network."""
    return nn.Sequential(
        nn.Conv2d(1, 10, 5), nn.MaxPool2d(2), nn.ReLU(),
        nn.Conv2d(10, 10, 5), nn.Dropout2d(), nn.MaxPool2d(2), nn.ReLU(),
        nn.Flatten(), nn.Linear(160, num_classes),
    )


def alexnet(num_classes: int) -> nn.Module:
    """The seed's "AlexNet" MNIST network (the classic PyTorch MNIST example)."""
    return nn.Sequential(
        nn.Conv2d(1, 10, 5), nn.MaxPool2d(2), nn.ReLU(),
        nn.Conv2d(10, 20, 5), nn.Dropout2d(), nn.MaxPool2d(2), nn.ReLU(),
        nn.Flatten(), nn.Linear(320, 50), nn.ReLU(), nn.Dropout(),
        nn.Linear(50, num_classes),
    )


def jumpnet(num_classes: int) -> nn.Module:
    """The tutorial CNN."""
    return nn.Sequential(
        nn.Conv2d(1, 32, 5), nn.MaxPool2d(2), nn.ReLU(),
        nn.Conv2d(32, 16, 3), nn.MaxPool2d(2), nn.ReLU(),
        nn.Flatten(), nn.Linear(400, 100), nn.ReLU(), nn.Dropout(),
        nn.Linear(100, num_classes),
    )


def mlp(num_classes: int) -> nn.Module:
    """The notebook's MNISTClassifier."""
    return nn.Sequential(
        nn.Flatten(), nn.Linear(784, 50), nn.ReLU(), nn.Linear(50, 20), nn.ReLU(),
        nn.Linear(20, num_classes),
    )


def mlp4(num_classes: int) -> nn.Module:
    return nn.Sequential(
        nn.Flatten(), nn.Linear(784, 100), nn.ReLU(), nn.Linear(100, 50), nn.ReLU(),
        nn.Linear(50, 20), nn.ReLU(), nn.Linear(20, num_classes),
    )


def tinyconv(num_classes: int) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 1, 3), nn.ReLU(), nn.Conv2d(1, 1, 3), nn.ReLU(),
        nn.Flatten(), nn.Linear(576, 100), nn.ReLU(), nn.Dropout(),
        nn.Linear(100, num_classes),
    )


def dropcnn(num_classes: int) -> nn.Module:
    """Reported at 99.37% digits in the source documents."""
    return nn.Sequential(
        nn.Conv2d(1, 20, 5), nn.MaxPool2d(2), nn.ReLU(),
        nn.Conv2d(20, 30, 5), nn.Dropout2d(), nn.MaxPool2d(2), nn.ReLU(),
        nn.Flatten(), nn.Linear(480, 60), nn.ReLU(), nn.Dropout(),
        nn.Linear(60, num_classes),
    )


def fastnet(num_classes: int) -> nn.Module:
    """Tuned for time-to-accuracy on CPU: wide enough for 99% in one or two epochs, no dropout."""
    return nn.Sequential(
        nn.Conv2d(1, 24, 5), nn.MaxPool2d(2), nn.ReLU(),
        nn.Conv2d(24, 32, 3), nn.MaxPool2d(2), nn.ReLU(),
        nn.Flatten(), nn.Linear(800, 256), nn.ReLU(),
        nn.Linear(256, num_classes),
    )


def slimnet(num_classes: int) -> nn.Module:
    """fastnet at two-thirds of its filters and half its hidden layer (4.3 MFLOP per training image against
    6.8): for one epoch with label smoothing 0.1 and --lr 1e-2 (issue 22's first probes, docs/PERFORMANCE.md)."""
    return nn.Sequential(
        nn.Conv2d(1, 16, 5), nn.MaxPool2d(2), nn.ReLU(),
        nn.Conv2d(16, 32, 3), nn.MaxPool2d(2), nn.ReLU(),
        nn.Flatten(), nn.Linear(800, 128), nn.ReLU(),
        nn.Linear(128, num_classes),
    )


def recordnet(num_classes: int) -> nn.Module:
    """For the accuracy records (with --augment): batch norm after every layer, more filters."""
    return nn.Sequential(
        nn.Conv2d(1, 32, 5, bias=False), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 5, bias=False), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(1024, 256, bias=False), nn.BatchNorm1d(256), nn.ReLU(), nn.Dropout(0.3),
        nn.Linear(256, num_classes),
    )


MODELS: dict[str, Callable[[int], nn.Module]] = {
    "samnet": samnet,
    "alexnet": alexnet,
    "jumpnet": jumpnet,
    "mlp": mlp,
    "mlp4": mlp4,
    "tinyconv": tinyconv,
    "dropcnn": dropcnn,
    "fastnet": fastnet,
    "slimnet": slimnet,
    "recordnet": recordnet,
}


def has_batchnorm(model: nn.Module) -> bool:
    """BatchNorm in training mode needs at least two values per channel: no batch of one image."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def build_model(name: str, num_classes: int) -> nn.Module:
    try:
        constructor = MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}: choose one of {', '.join(MODELS)}") from None
    return constructor(num_classes)


def to_device(model: nn.Module, device: torch.device, channels_last: bool) -> nn.Module:
    """Place the model; channels-last conv weights make oneDNN (CPU) and cuDNN pick their fastest kernels."""
    return model.to(device, memory_format=torch.channels_last if channels_last else torch.preserve_format)
