"""Scoring and what a score says: one exact, sharded evaluation (every rank scores its shard; the sums are
all-reduced), and the analyses of a scored test split that the dashboard shows (per-class recall and
precision, the most confused classes, the most confident mistakes, the features the last layer classifies)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .comms import DistEnv, all_gather_objects, all_reduce_sum
from .data import Split
from .engine import autocast


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


def per_class(confusion: torch.Tensor) -> tuple[list[float], list[float]]:
    """(recall, precision) per class from a [true, predicted] confusion matrix; 0.0 where a class is absent."""
    m = confusion.to(torch.float64)
    hits = m.diagonal()
    return (hits / m.sum(1).clamp(min=1)).tolist(), (hits / m.sum(0).clamp(min=1)).tolist()


def most_confused(confusion: torch.Tensor, limit: int) -> torch.Tensor:
    """The indices, in class order, of at most `limit` classes: all of them, or those most often mistaken
    for another or mistaken for."""
    n = len(confusion)
    if n <= limit:
        return torch.arange(n)
    errors = confusion.sum(0) + confusion.sum(1) - 2 * confusion.diagonal()
    return torch.argsort(errors, descending=True, stable=True)[:limit].sort().values


def confident_mistakes(probabilities: torch.Tensor, labels: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(index, predicted, confidence) of every misclassified image, the most confident mistake first."""
    confidence, predicted = probabilities.max(1)
    index = (predicted != labels).nonzero().flatten()
    order = confidence[index].argsort(descending=True, stable=True)
    index = index[order]
    return index, predicted[index], confidence[index]


@torch.inference_mode()
def penultimate_features(model: nn.Module, split: Split, index: torch.Tensor, batch_size: int) -> torch.Tensor:
    """The input of the model's last linear layer (what it classifies), for any registry network, on CPU."""
    last = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    captured: list[torch.Tensor] = []
    hook = last.register_forward_hook(lambda module, inputs, output: captured.append(inputs[0].float().cpu()))
    was_training = model.training
    try:
        model.eval()
        for chunk in index.split(batch_size):
            model(split.batch(chunk)[0])
    finally:
        hook.remove()
        model.train(was_training)
    return torch.cat(captured) if captured else torch.zeros(0, last.in_features)
