"""A dataset as uint8 tensors on the training device: the splits, the task's label map, the normalisation, and
the fingerprint a checkpoint keeps of them.

The whole split lives on the device once; a batch is one gather by index and one normalisation.
That replaces the per-sample PIL -> ToTensor -> Normalize path, which costs ~7x throughput here.
The files behind each --dataset are read in datasets.py; each rank's share of the batches is sampling.py's.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .datasets import DATASETS, DataError, folder_path, read_dataset
from .digest import digest
from .comms import DistEnv, all_ok

if TYPE_CHECKING:
    from .config import TrainConfig

MEAN, STD = 0.1307, 0.3081  # MNIST's (what normalization_of computes for it); the default of older checkpoints


@dataclass(frozen=True)
class Task:
    name: str
    classes: tuple[str, ...]
    # the dataset's own label s (an MNIST digit, a Fashion-MNIST article, a folder's class) is class label_of[s]
    label_of: tuple[int, ...]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def map_labels(self, source_labels: torch.Tensor) -> torch.Tensor:
        """The dataset's labels as this task's classes (binary: digits 0-4 -> 0, 5-9 -> 1)."""
        return torch.tensor(self.label_of, device=source_labels.device)[source_labels]


TASKS = {
    "digits": Task("digits", tuple(str(d) for d in range(10)), tuple(range(10))),
    "binary": Task("binary", ("0-4", "5-9"), (0,) * 5 + (1,) * 5),
}


def task_of(dataset: str, task: str) -> Task:
    """The dataset decides: MNIST's tasks by name; any other dataset learns its own classes (a folder's: its
    sub-folders), whatever its task is called (a folder named "binary" is not MNIST's binary task)."""
    if dataset == "mnist":
        return TASKS[task]
    folder = folder_path(dataset)
    if folder is not None:
        from .folder import FolderError, classes_of
        try:
            classes = classes_of(folder)
        except FolderError as e:
            raise DataError(f"--dataset {e}") from None
        return Task(task, classes, tuple(range(len(classes))))
    ds = DATASETS[dataset]
    return Task(ds.name, ds.classes, tuple(range(len(ds.classes))))


@dataclass(frozen=True)
class Split:
    """Images as uint8 [N, 28, 28] and class labels int64 [N], both on the training device, and the
    normalisation the network sees them with (its dataset's)."""
    images: torch.Tensor
    labels: torch.Tensor
    mean: float = MEAN
    std: float = STD

    def __len__(self) -> int:
        return len(self.labels)

    def batch(self, index: torch.Tensor, augment: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        x = to_unit(self.images[index])
        if augment:  # before normalising, so that the padding is the background's 0
            x = random_affine(x)
        return normalize(x, self.mean, self.std), self.labels[index]

    def subset(self, index: torch.Tensor) -> "Split":
        return Split(self.images[index], self.labels[index], self.mean, self.std)


def split_digest(images: torch.Tensor, labels: torch.Tensor) -> str:
    """The digest of uint8 images and int64 class labels: equal digests are the same images with the same labels."""
    return digest(images, labels.to(torch.int64))


def fingerprint(train: Split, val: Split, test: Split, num_classes: int) -> dict[str, Any]:
    """What a run trains and is scored on, for its checkpoints: a resume on other data is refused, and export
    compares accuracies only on the very test split the run was scored on."""
    counts = lambda labels: torch.bincount(labels.cpu(), minlength=num_classes).tolist()  # noqa: E731
    digests = [split_digest(s.images, s.labels) for s in (train, val, test)]  # each split hashed once
    return {"digest": digest(*digests), "test_digest": digests[-1],
            "train_counts": [a + b for a, b in zip(counts(train.labels), counts(val.labels))],
            "test_counts": counts(test.labels)}


def data_changes(saved: dict[str, Any], now: dict[str, Any], classes: tuple[str, ...]) -> str:
    """In words, how the data `now` differs from the `saved` fingerprint (empty when it is the same)."""
    if saved.get("digest") == now["digest"]:
        return ""
    changes = [f"class {classes[c]!r} {split} images {a:,} -> {b:,}"
               for split in ("train", "test")
               for c, (a, b) in enumerate(zip(saved.get(f"{split}_counts", []), now[f"{split}_counts"])) if a != b]
    if len(saved.get("train_counts", [])) != len(now["train_counts"]):
        changes.insert(0, f"{len(saved.get('train_counts', []))} classes -> {len(now['train_counts'])}")
    shown = "; ".join(changes[:4]) + (f"; {len(changes) - 4} more" if len(changes) > 4 else "")
    return shown or "the same number of images per class, but other images or another split"


def to_unit(images: torch.Tensor) -> torch.Tensor:
    """uint8 [N, 28, 28] -> float32 [N, 1, 28, 28] in [0, 1]: the exported models' input."""
    return images.float().div_(255.0).unsqueeze(1)


def normalize(images: torch.Tensor, mean: float = MEAN, std: float = STD) -> torch.Tensor:
    """[0, 1] images -> mean/std normalised (what the networks see)."""
    return (images - mean) / std


def normalization_of(images: torch.Tensor) -> tuple[float, float]:
    """(mean, std) of uint8 images in [0, 1] units, exact (from a histogram), rounded to 4 decimals:
    MNIST's training images give the well-known 0.1307 and 0.3081."""
    counts = torch.bincount(images.flatten().cpu(), minlength=256).double()
    values = torch.arange(256, dtype=torch.float64) / 255
    n = counts.sum().clamp(min=1)
    mean = float((counts * values).sum() / n)
    std = float(((counts * (values - mean) ** 2).sum() / n).sqrt())
    return round(mean, 4), round(max(std, 1e-4), 4)


def random_affine(x: torch.Tensor, degrees: float = 10.0, scale: float = 0.1, shift: float = 0.1) -> torch.Tensor:
    """Each image rotated, scaled and shifted at random, on the device, in one grid_sample."""
    n = x.shape[0]
    angle = (torch.rand(n, device=x.device) * 2 - 1) * degrees * torch.pi / 180
    zoom = 1 + (torch.rand(n, device=x.device) * 2 - 1) * scale
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    offset = (torch.rand(n, 2, device=x.device) * 2 - 1) * shift * 2  # grid units span [-1, 1]
    theta = torch.stack([torch.stack([cos, -sin, offset[:, 0]], 1), torch.stack([sin, cos, offset[:, 1]], 1)], 1)
    grid = torch.nn.functional.affine_grid(theta, list(x.shape), align_corners=False)
    return torch.nn.functional.grid_sample(x, grid, align_corners=False, padding_mode="zeros")


def split_indices(n: int, val_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(validation, training) indices into a training split of n images: a seeded permutation's first val_size
    images validate, the rest train (export's int8 calibration reads the same training images)."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[:val_size], perm[val_size:]


def load_splits(root: str | Path, task: Task, val_size: int, seed: int, device: torch.device,
                dataset: str = "mnist") -> tuple[Split, Split, Split, list[str]]:
    """(train, val, test, notes) on `device`; val is a seeded slice of the training split, never the test
    set. All three are normalised with the statistics of the whole training split."""
    train_x, train_d, test_x, test_d, notes = read_dataset(root, dataset)
    if not 0 <= val_size < len(train_d):
        raise DataError(f"--val-size {val_size} must be in [0, {len(train_d) - 1}]")
    val_idx, train_idx = split_indices(len(train_d), val_size, seed)
    mean, std = normalization_of(train_x)
    full = Split(train_x.to(device), task.map_labels(train_d.to(device)), mean, std)
    test = Split(test_x.to(device), task.map_labels(test_d.to(device)), mean, std)
    return full.subset(train_idx.to(device)), full.subset(val_idx.to(device)), test, notes


def load_data(cfg: TrainConfig, task: Task, env: DistEnv) -> tuple[Split, Split, Split, list[str]]:
    """Local rank 0 downloads/extracts first; the others wait, then read the same files."""
    splits, error = None, None
    if env.local_rank == 0:
        try:
            splits = load_splits(cfg.data_dir, task, cfg.val_size, cfg.seed, env.device, cfg.dataset)
        except DataError as e:
            error = e
    if not all_ok(error is None, env):
        raise error or DataError(f"{cfg.dataset} could not be prepared in {cfg.data_dir} (see local rank 0's error)")
    if splits is None:
        splits = load_splits(cfg.data_dir, task, cfg.val_size, cfg.seed, env.device, cfg.dataset)
    train, val, test, notes = splits
    if cfg.overfit_batches:
        # The notebook's sanity check: a model that cannot drive these few batches to ~0 loss is broken.
        n = min(len(train), cfg.overfit_batches * cfg.global_batch_size)
        train = train.subset(torch.arange(n, device=env.device))
        val = test = train
    return train, val, test, notes
