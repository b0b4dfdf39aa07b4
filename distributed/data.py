"""MNIST as uint8 tensors on the training device, task label maps, and each rank's share of the batches.

The whole split lives on the device once; a batch is one gather by index and one normalisation.
That replaces the per-sample PIL -> ToTensor -> Normalize path, which costs ~7x throughput here.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import torch
from torch.utils.data.distributed import DistributedSampler

from .dist import DistEnv, all_ok

if TYPE_CHECKING:
    from .config import TrainConfig

MEAN, STD = 0.1307, 0.3081  # MNIST's (what normalization_of computes for it); the default of older checkpoints


@dataclass(frozen=True)
class Dataset:
    """An MNIST-format dataset: torchvision's class of the same name keeps its IDX files in DATA_DIR/folder/raw/."""
    name: str  # the --dataset value
    folder: str  # torchvision's class name and folder
    classes: tuple[str, ...]
    split: str | None = None  # EMNIST's split; its images are stored transposed
    first_label: int = 0  # EMNIST letters number a-z from 1

    def file(self, train: bool, kind: str) -> str:
        """The extracted IDX file name of the images or labels of one split."""
        ndim = 3 if kind == "images" else 1
        if self.split:
            return f"emnist-{self.split}-{'train' if train else 'test'}-{kind}-idx{ndim}-ubyte"
        return f"{'train' if train else 't10k'}-{kind}-idx{ndim}-ubyte"

    def offline_files(self) -> str:
        """What a user without network access puts in raw/."""
        names = [self.file(t, k) for t in (True, False) for k in ("images", "labels")]
        if self.split:
            return ", ".join(names) + " (extracted from EMNIST's gzip.zip)"
        return ", ".join(n + ".gz" for n in names)


DATASETS = {d.name: d for d in (
    Dataset("mnist", "MNIST", tuple(str(d) for d in range(10))),
    Dataset("fashion-mnist", "FashionMNIST", ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal",
                                               "Shirt", "Sneaker", "Bag", "Ankle boot")),
    Dataset("kmnist", "KMNIST", ("o", "ki", "su", "tsu", "na", "ha", "ma", "ya", "re", "wo")),
    Dataset("emnist-digits", "EMNIST", tuple(str(d) for d in range(10)), split="digits"),
    # upper and lower case merged into one class per letter
    Dataset("emnist-letters", "EMNIST", tuple("abcdefghijklmnopqrstuvwxyz"), split="letters", first_label=1),
)}


class DataError(RuntimeError):
    """The dataset cannot be found, downloaded or read."""


@dataclass(frozen=True)
class Task:
    name: str
    classes: tuple[str, ...]
    label_of_digit: tuple[int, ...]  # digit d belongs to class label_of_digit[d]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def map_labels(self, digits: torch.Tensor) -> torch.Tensor:
        return torch.tensor(self.label_of_digit, device=digits.device)[digits]


TASKS = {
    "digits": Task("digits", tuple(str(d) for d in range(10)), tuple(range(10))),
    "binary": Task("binary", ("0-4", "5-9"), (0,) * 5 + (1,) * 5),
}


FOLDER_PREFIX = "folder:"


def folder_path(dataset: str) -> Path | None:
    """The image folder of `--dataset folder:PATH`, None for the torchvision datasets."""
    return Path(dataset[len(FOLDER_PREFIX):]) if dataset.startswith(FOLDER_PREFIX) else None


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
    """sha256 of uint8 images and int64 class labels: equal digests are the same images with the same labels."""
    h = hashlib.sha256()
    for t in (images, labels.to(torch.int64)):
        t = t.detach().cpu().contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)}:".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def fingerprint(train: Split, val: Split, test: Split, num_classes: int) -> dict[str, Any]:
    """What a run trains and is scored on, for its checkpoints: a resume on other data is refused, and export
    compares accuracies only on the very test split the run was scored on."""
    counts = lambda labels: torch.bincount(labels.cpu(), minlength=num_classes).tolist()  # noqa: E731
    return {"digest": hashlib.sha256("".join(split_digest(s.images, s.labels) for s in (train, val, test))
                                     .encode()).hexdigest(),
            "test_digest": split_digest(test.images, test.labels),
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


IDX_MAGIC = {3: 0x0803, 1: 0x0801}  # unsigned bytes, 3 dims (images) or 1 (labels)


def check_idx(path: Path, ndim: int) -> None:
    """An extracted IDX file must be what its header says (the .gz md5 says nothing about it)."""
    fix = (f"delete it and it is extracted again from {path.name}.gz" if path.with_name(path.name + ".gz").exists()
           else "replace it with a good copy")
    with open(path, "rb") as f:
        header = f.read(4 + 4 * ndim)
    fields = [int.from_bytes(header[i:i + 4], "big") for i in range(0, len(header), 4)]
    expected = 4 + 4 * ndim + (math.prod(fields[1:]) if len(fields) == ndim + 1 else 0)
    if len(fields) != ndim + 1 or fields[0] != IDX_MAGIC[ndim] or (ndim == 3 and fields[2:] != [28, 28]):
        raise DataError(f"{path} is not an MNIST IDX file (bad header): {fix}")
    if path.stat().st_size != expected:
        raise DataError(f"{path} is damaged ({path.stat().st_size} bytes, its header says {expected}): {fix}")


def read_idx(path: Path, ndim: int) -> torch.Tensor:
    """A checked IDX file (check_idx) as a uint8 tensor shaped as its header says."""
    data = bytearray(path.read_bytes())  # writable, so torch.frombuffer shares it without a warning
    header = 4 + 4 * ndim
    shape = [int.from_bytes(data[i:i + 4], "big") for i in range(4, header, 4)]
    return torch.frombuffer(data, dtype=torch.uint8, offset=header).view(shape)


def read_mnist(root: str | Path, train: bool, dataset: str = "mnist") -> tuple[torch.Tensor, torch.Tensor]:
    """One split of an MNIST-format dataset as CPU tensors (uint8 images, int64 labels); downloads when absent.

    Once torchvision has extracted the IDX files, they are read directly: they are already the decoded
    uint8 tensors, checked by check_idx, and importing torchvision would cost ~2 s per process."""
    ds = DATASETS[dataset]
    raw = Path(root) / ds.folder / "raw"
    images_file, labels_file = raw / ds.file(train, "images"), raw / ds.file(train, "labels")
    for path, ndim in ((images_file, 3), (labels_file, 1)):
        if path.is_file():
            check_idx(path, ndim)
    if images_file.is_file() and labels_file.is_file():
        images, digits = read_idx(images_file, 3), read_idx(labels_file, 1).long()
    else:
        images, digits = download_mnist(root, train, ds)
    if ds.split:  # EMNIST's images are stored transposed: make them upright, as users' images are
        images, digits = images.transpose(1, 2).contiguous(), digits - ds.first_label
    if len(images) != len(digits):
        raise DataError(f"{images_file} holds {len(images)} images but {labels_file} {len(digits)} labels: "
                        f"replace both with good copies")
    last = len(ds.classes) - 1
    if len(digits) and not 0 <= int(digits.min()) <= int(digits.max()) <= last:
        raise DataError(f"{labels_file} has labels outside {ds.first_label}-{last + ds.first_label}: "
                        f"replace it with a good copy")
    return images, digits


def download_mnist(root: str | Path, train: bool, dataset: Dataset) -> tuple[torch.Tensor, torch.Tensor]:
    """torchvision's class for the dataset: finds (md5-checked) or downloads the .gz files, extracts them."""
    import torchvision.datasets  # deferred: only the first run of a --data-dir needs it

    raw = Path(root) / dataset.folder / "raw"
    try:
        split = {"split": dataset.split} if dataset.split else {}
        ds = getattr(torchvision.datasets, dataset.folder)(root=str(root), train=train, download=True, **split)
    except PermissionError as e:
        raise DataError(f"cannot extract {dataset.folder} into {raw} ({e.strerror}): "
                        f"copy the folder to a writable --data-dir") from None
    except Exception as e:  # torchvision raises bare RuntimeError/URLError when offline
        raise DataError(
            f"{dataset.folder} not found in {raw} and the download failed ({type(e).__name__}): "
            f"put {dataset.offline_files()} in {raw}/ or allow network access") from None
    return ds.data, ds.targets.long()


def read_dataset(root: str | Path, dataset: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                                         list[str]]:
    """(train images, train labels, test images, test labels, notes for the user) of any --dataset."""
    folder = folder_path(dataset)
    if folder is None:
        return (*read_mnist(root, True, dataset), *read_mnist(root, False, dataset), [])
    from .folder import FolderError, load_folder
    try:
        data = load_folder(folder)
    except FolderError as e:
        raise DataError(f"--dataset {e}") from None
    n = len(data.train_labels) + len(data.test_labels)
    notes = [f"{folder}: {n:,} images ({len(data.train_labels):,} train, {len(data.test_labels):,} test), "
             + data.cache_note]
    if data.skipped:
        shown = "; ".join(f"{path} ({reason})" for path, reason in data.skipped[:5])
        notes.append(f"{folder}: skipped {len(data.skipped)} file(s) that are not usable images: {shown}"
                     + (" ..." if len(data.skipped) > 5 else ""))
    if data.nested:
        notes.append(f"{folder}: not read: {len(data.nested)} sub-folder(s) inside class folders ("
                     + ", ".join(data.nested[:5]) + (" ..." if len(data.nested) > 5 else "")
                     + "): a class's images sit directly in its folder")
    return data.train_images, data.train_labels, data.test_images, data.test_labels, notes


def load_splits(root: str | Path, task: Task, val_size: int, seed: int, device: torch.device,
                dataset: str = "mnist") -> tuple[Split, Split, Split, list[str]]:
    """(train, val, test, notes) on `device`; val is a seeded slice of the training split, never the test
    set. All three are normalised with the statistics of the whole training split."""
    train_x, train_d, test_x, test_d, notes = read_dataset(root, dataset)
    if not 0 <= val_size < len(train_d):
        raise DataError(f"--val-size {val_size} must be in [0, {len(train_d) - 1}]")
    perm = torch.randperm(len(train_d), generator=torch.Generator().manual_seed(seed))
    val_idx, train_idx = perm[:val_size], perm[val_size:]
    mean, std = normalization_of(train_x)
    full = Split(train_x.to(device), task.map_labels(train_d.to(device)), mean, std)
    test = Split(test_x.to(device), task.map_labels(test_d.to(device)), mean, std)
    return full.subset(train_idx.to(device)), full.subset(val_idx.to(device)), test, notes


def make_sampler(n: int, rank: int, world_size: int, seed: int, shuffle: bool = True) -> DistributedSampler:
    # DistributedSampler only needs len(); explicit rank/replicas keep it usable without a process group.
    return DistributedSampler(range(n), num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed)


def epoch_batches(sampler: DistributedSampler, epoch: int, batch_size: int,
                  device: torch.device) -> Iterator[torch.Tensor]:
    """This rank's batches of indices for one epoch: every rank gets the same number of batches."""
    sampler.set_epoch(epoch)
    index = torch.tensor(list(sampler), dtype=torch.long, device=device)
    yield from index.split(batch_size)


def steps_per_epoch(sampler: DistributedSampler, batch_size: int, drop_single: bool = False) -> int:
    """Batches per rank per epoch; with `drop_single` (BatchNorm models) a last batch of one image is left out:
    BatchNorm cannot normalise a batch of one."""
    return -(-len(sampler) // batch_size) - (drop_single and len(sampler) % batch_size == 1 and len(sampler) > 1)


def images_seen(sampler: DistributedSampler, batch_size: int, batches: int, drop_single: bool = False) -> int:
    """Distinct images all ranks trained on in an epoch's first `batches` batches.

    The sampler pads the split to a multiple of the world size by repeating its first indices; the
    repeats are the last item of some ranks' shards, so they fall in the epoch's last batch (which is the
    one a BatchNorm model leaves out when it holds one image: then every image it trained on is distinct).
    """
    steps = steps_per_epoch(sampler, batch_size, drop_single)
    per_rank = min(batches * batch_size, sampler.num_samples)
    padding = sampler.total_size - len(sampler.dataset)
    if batches >= steps and steps < steps_per_epoch(sampler, batch_size):  # the single last batch left out
        return (sampler.num_samples - 1) * sampler.num_replicas
    return per_rank * sampler.num_replicas - (padding if batches >= steps else 0)


def eval_shard(n: int, rank: int, world_size: int, device: torch.device) -> torch.Tensor:
    """A disjoint, unpadded shard: the union over ranks is every index exactly once (empty when rank >= n)."""
    return torch.arange(min(rank, n), n, world_size, device=device)


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
        n = min(len(train), cfg.overfit_batches * cfg.batch_size * env.world_size)
        train = train.subset(torch.arange(n, device=env.device))
        val = test = train
    return train, val, test, notes
