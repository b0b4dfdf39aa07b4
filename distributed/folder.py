"""A user's labelled image folder as a dataset: one sub-folder per class, decoded once into a uint8 cache.

Layout: PATH/CLASS/*.png (any image serve_cli reads). If PATH/train/CLASS/ and PATH/test/CLASS/ both exist,
they are the splits; otherwise a file is a test image when the sha256 of its path relative to PATH, read
as a number, is divisible by 6 (a sixth of each class, stable when files are added or removed, the same
for every --seed). The validation split is then cut from the training images by --val-size as for MNIST.

Every image goes through serve_cli's own preprocessing (`serve_cli.images.digit_bytes`), so training and
serving see the same pixels by construction. The decoded images live in PATH/.mnist-ddp-cache.pt, valid
while every file's relative path, size and mtime are unchanged; files that cannot be read are skipped and
listed in it too.
"""
from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from serve_cli.images import IMAGE_SUFFIXES, digits_or_reasons

from .files import atomic_write

CACHE_NAME = ".mnist-ddp-cache.pt"
CACHE_VERSION = 1
TEST_EVERY = 6


class FolderError(ValueError):
    """The folder is not a labelled image folder."""


@dataclass(frozen=True)
class FolderData:
    classes: tuple[str, ...]
    train_images: torch.Tensor  # uint8 [N, 28, 28]
    train_labels: torch.Tensor  # int64 [N]
    test_images: torch.Tensor
    test_labels: torch.Tensor
    skipped: tuple[tuple[str, str], ...]  # (relative path, reason) of files that are not usable images
    from_cache: bool


def class_folders(folder: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))


def classes_of(root: Path) -> tuple[str, ...]:
    """The class names: the sub-folders (of train/ when the folder has train/ and test/)."""
    if not root.is_dir():
        raise FolderError(f"folder:{root}: no such folder")
    base = root / "train" if split_folders(root) else root
    classes = class_folders(base)
    if len(classes) < 2:
        raise FolderError(f"folder:{root} needs one sub-folder per class (at least 2), "
                          f"found {len(classes)}: put each class's images in {base}/CLASS_NAME/")
    return tuple(classes)


def split_folders(root: Path) -> bool:
    return (root / "train").is_dir() and (root / "test").is_dir()


def is_test(relative: str) -> bool:
    return int.from_bytes(hashlib.sha256(relative.encode()).digest()[:8], "big") % TEST_EVERY == 0


def listing(root: Path, classes: tuple[str, ...]) -> list[tuple[str, int, bool, int, int]]:
    """(relative path, label, is test, size, mtime_ns) of every image file, sorted."""
    parts = [("train", False), ("test", True)] if split_folders(root) else [(None, None)]
    files = []
    for sub, test in parts:
        base = root / sub if sub else root
        for label, name in enumerate(classes):
            folder = base / name
            if not folder.is_dir():
                continue
            for entry in sorted(os.scandir(folder), key=lambda e: e.name):
                if entry.is_file() and Path(entry.name).suffix.lower() in IMAGE_SUFFIXES:
                    relative = os.path.relpath(entry.path, root)
                    info = entry.stat()
                    files.append((relative, label, is_test(relative) if test is None else test,
                                  info.st_size, info.st_mtime_ns))
    return files


def load_folder(root: Path) -> FolderData:
    """The folder's splits, from the cache when it matches the folder's files, else decoded and cached."""
    root = root.resolve()
    classes = classes_of(root)
    files = listing(root, classes)
    if not files:
        raise FolderError(f"folder:{root} holds no image files in its class folders")
    # One digest of every file's path, label, split, size and mtime: loading a cache of 70,000 files stays fast.
    key = hashlib.sha256(json.dumps(files).encode()).hexdigest()
    cache = root / CACHE_NAME
    ours = not cache.exists()  # a file of that name we did not write is never replaced
    if cache.is_file():
        try:
            saved = torch.load(cache, weights_only=True)
            ours = isinstance(saved, dict) and "version" in saved and "files" in saved
            if saved.get("version") == CACHE_VERSION and saved["files"] == key and saved["classes"] == list(classes):
                return unpack(saved, classes, from_cache=True)
        except Exception:  # unreadable, damaged or foreign: not trusted (and, if foreign, not replaced)
            pass
    images, labels, tests, skipped = [], [], [], []
    for (relative, label, test, _, _), result in zip(files, decode_all([root / f[0] for f in files])):
        if isinstance(result, str):
            skipped.append((relative, result))
            continue
        images.append(result)
        labels.append(label)
        tests.append(test)
    if not images:
        raise FolderError(f"folder:{root}: none of its {len(files)} image files could be read "
                          f"(first: {skipped[0][0]}: {skipped[0][1]})")
    saved = {"version": CACHE_VERSION, "files": key, "classes": list(classes),
             "images": torch.from_numpy(np.stack(images)), "labels": torch.tensor(labels, dtype=torch.int64),
             "test": torch.tensor(tests, dtype=torch.bool), "skipped": [list(s) for s in skipped]}
    if ours:
        try:
            atomic_write(cache, lambda tmp: torch.save(saved, tmp))
        except OSError:  # a read-only folder: train anyway, decoding again next time
            pass
    return unpack(saved, classes, from_cache=False)


def decode_all(paths: list[Path], chunk: int = 500) -> list[np.ndarray | str]:
    """Every file through serve_cli's preprocessing, in a pool of torch-free processes (one per core).

    "spawn": a fork of a process that holds torch's thread pools can deadlock; the children import only
    serve_cli.images (numpy and Pillow)."""
    workers = min(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1,
                  -(-len(paths) // chunk))
    chunks = [paths[i:i + chunk] for i in range(0, len(paths), chunk)]
    if workers <= 1:
        return [r for c in chunks for r in digits_or_reasons(c)]
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        return [r for part in pool.map(digits_or_reasons, chunks) for r in part]


def unpack(saved: dict, classes: tuple[str, ...], from_cache: bool) -> FolderData:
    test, images, labels = saved["test"], saved["images"], saved["labels"]
    n = len(labels)
    if not (images.dtype == torch.uint8 and images.shape[1:] == (28, 28) and len(images) == n == len(test)
            and test.dtype == torch.bool and (n == 0 or 0 <= int(labels.min()) <= int(labels.max()) < len(classes))):
        raise ValueError("cache does not match its own schema")
    return FolderData(classes, images[~test], labels[~test], images[test], labels[test],
                      tuple((a, b) for a, b in saved["skipped"]), from_cache)
