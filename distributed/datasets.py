"""The files behind each --dataset: torchvision's MNIST-format datasets (IDX files, checked, read directly once
extracted; downloaded through torchvision when absent) and a user's image folder (folder.py).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from serve_cli.base.files import broken_link


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


FOLDER_PREFIX = "folder:"


def folder_path(dataset: str) -> Path | None:
    """The image folder of `--dataset folder:PATH`, None for the torchvision datasets."""
    return Path(dataset[len(FOLDER_PREFIX):]) if dataset.startswith(FOLDER_PREFIX) else None


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
        elif os.path.lexists(path):  # a folder or a broken link: torchvision would try to download over it
            raise DataError(f"{path} is not a file: remove it (it is extracted again from its .gz)")
    if images_file.is_file() and labels_file.is_file():
        images, digits = read_idx(images_file, 3), read_idx(labels_file, 1).long()
    else:
        check_folders(Path(root), raw)
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


def check_folders(root: Path, raw: Path) -> None:
    """Each step from --data-dir down to the raw folder is a folder, or absent (to be made): else say which is
    not, before the download is blamed."""
    below = raw.relative_to(root).parts
    for folder in [root] + [root.joinpath(*below[:i]) for i in range(1, len(below) + 1)]:
        name = f"--data-dir {root}" if folder == root else str(folder)
        broken = broken_link(folder, name)
        if broken:
            raise DataError(f"{broken}: make it lead to a folder, or remove it")
        if folder.exists() and not folder.is_dir():
            fix = "give --data-dir a folder" if folder == root else "move it away"
            raise DataError(f"{name} is a file, not a folder: {fix} (the dataset goes in {raw}/)")


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
