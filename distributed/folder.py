"""A user's labelled image folder as a dataset: one sub-folder per class, decoded once into a uint8 cache.

Layout: PATH/CLASS/*.png (any image serve_cli reads). If PATH/train/CLASS/ and PATH/test/CLASS/ both exist,
they are the splits; otherwise a file is a test image when the sha256 of its path relative to PATH, read
as a number, is divisible by 6 (a sixth of each class, stable when files are added or removed, the same
for every --seed). The validation split is then cut from the training images by --val-size as for MNIST.

Every image goes through serve_cli's own preprocessing (`serve_cli.base.images.digit_bytes`), so training and
serving see the same pixels by construction. The decoded images live in PATH/.mnist-ddp-cache.pt, valid
while every file's relative path, size and mtime are unchanged; files that cannot be read (not images,
links to nothing or to themselves, pipes) are skipped and listed in it too.

Refused, in one line: a class folder without images, a class without training images, train/ and test/
with different classes, folders beside train/ and test/. Sub-folders inside a class folder are not read;
they are named in a note.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from serve_cli.base.files import atomic_write
from serve_cli.base.images import IMAGE_SUFFIXES

from .decoding import decode_all
from .digest import digest

CACHE_NAME = ".mnist-ddp-cache.pt"
CACHE_VERSION = 3  # 3: pixel modes read on a stated scale or refused (float and 32-bit gray, LAB, La)
CACHE_MAGIC = b"mnist-ddp folder cache\n"  # the first bytes of every cache we write: ours even when damaged
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
    cache_note: str = ""  # what became of the cache, in words ("from its cache", "decoded and cached", ...)
    nested: tuple[str, ...] = ()  # sub-folders inside class folders, whose images are not read


def class_folders(folder: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(folder) if _is_dir(e) and not e.name.startswith("."))


def _is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()
    except OSError:  # a link loop: not a folder
        return False


def _not_utf8(name: str) -> bool:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:  # a byte that is not UTF-8, kept by os as a surrogate
        return True
    return False


def classes_of(root: Path) -> tuple[str, ...]:
    """The class names: the sub-folders (of train/ when the folder has train/ and test/, which must agree)."""
    if not root.is_dir():
        raise FolderError(f"folder:{root}: no such folder")
    split = split_folders(root)
    base = root / "train" if split else root
    classes = class_folders(base)
    unreadable = [name for name in classes if not name.isprintable() or _not_utf8(name)]
    if unreadable:  # class names go into TensorBoard, the checkpoint and the manifest as text
        raise FolderError(f"folder:{root}: class folder {unreadable[0]!r} is not a printable UTF-8 name: rename it")
    if len(classes) < 2:
        raise FolderError(f"folder:{root} needs one sub-folder per class (at least 2), "
                          f"found {len(classes)}: put each class's images in {base}/CLASS_NAME/")
    if split:
        test, beside = class_folders(root / "test"), sorted(set(class_folders(root)) - {"train", "test"})
        if test != classes:
            only = lambda a, b: ", ".join(sorted(set(a) - set(b))[:5]) or "none"  # noqa: E731
            raise FolderError(f"folder:{root}: train/ and test/ hold different classes (only in train/: "
                              f"{only(classes, test)}; only in test/: {only(test, classes)}): give both the same "
                              f"class folders")
        if beside:
            raise FolderError(f"folder:{root} has train/ and test/ and also {', '.join(beside[:5])}/ beside them: "
                              f"move those into train/ and test/, or remove train/ and test/ to split by path hash")
    return tuple(classes)


def split_folders(root: Path) -> bool:
    return (root / "train").is_dir() and (root / "test").is_dir()


def is_test(relative: str) -> bool:
    # os.fsencode: a file name that is not UTF-8 hashes as its bytes
    return int.from_bytes(hashlib.sha256(os.fsencode(relative)).digest()[:8], "big") % TEST_EVERY == 0


def class_dirs(root: Path, classes: tuple[str, ...]) -> list[tuple[Path, int, bool | None]]:
    """(folder, label, is test: None for the path-hash rule) of every class folder."""
    parts = [("train", False), ("test", True)] if split_folders(root) else [(None, None)]
    return [((root / sub if sub else root) / name, label, test)
            for sub, test in parts for label, name in enumerate(classes)]


class ListedFile(NamedTuple):
    """One image file of a folder dataset (size and mtime_ns -1 when they cannot be read)."""
    path: str  # relative to the dataset's root
    label: int
    test: bool
    size: int
    mtime_ns: int


def listing(root: Path, classes: tuple[str, ...]) -> list[ListedFile]:
    """Every image file, sorted.

    Every entry with an image suffix that is not a folder is listed, links to nothing, link loops and pipes
    included (size and mtime -1 when they cannot be read): decoding skips them, and says why, by name."""
    files = []
    for folder, label, test in class_dirs(root, classes):
        for entry in sorted(os.scandir(folder), key=lambda e: e.name):
            if Path(entry.name).suffix.lower() not in IMAGE_SUFFIXES or _is_dir(entry):
                continue
            relative = os.path.relpath(entry.path, root)
            try:
                info = entry.stat()
                size, mtime = info.st_size, info.st_mtime_ns
            except OSError:
                size = mtime = -1
            files.append(ListedFile(relative, label, is_test(relative) if test is None else test, size, mtime))
    return files


def nested_folders(root: Path, classes: tuple[str, ...]) -> list[str]:
    """Sub-folders inside class folders (relative paths): their images are not read."""
    return sorted(os.path.relpath(e.path, root) for folder, _, _ in class_dirs(root, classes)
                  for e in os.scandir(folder) if _is_dir(e) and not e.name.startswith("."))


def check_classes(root: Path, classes: tuple[str, ...], files: list[ListedFile]) -> None:
    """Every class folder must hold images: a class without them could never be predicted."""
    listed = {f.label for f in files}
    empty = [name for label, name in enumerate(classes) if label not in listed]
    if empty:
        raise FolderError(f"folder:{root}: class folder(s) {', '.join(empty[:5])} hold no image files: add images "
                          f"or remove the folder(s)")


def load_folder(root: Path) -> FolderData:
    """The folder's splits, from the cache when it matches the folder's files, else decoded and cached."""
    root = root.resolve()
    classes = classes_of(root)
    files = listing(root, classes)
    check_classes(root, classes, files)
    return dataclasses.replace(decoded(root, classes, files), nested=tuple(nested_folders(root, classes)))


def decoded(root: Path, classes: tuple[str, ...], files: list[ListedFile]) -> FolderData:
    # One digest of every file's path, label, split, size and mtime: loading a cache of 70,000 files stays fast.
    key = hashlib.sha256(json.dumps(files).encode()).hexdigest()
    cache = root / CACHE_NAME
    saved, ours = read_cache(cache)
    if saved is not None and saved.get("version") == CACHE_VERSION and saved.get("files") == key \
            and saved.get("classes") == list(classes) and saved.get("digest") == tensors_digest(saved):
        try:
            return check_trainable(root, unpack(saved, classes, from_cache=True, note="from its cache"))
        except (ValueError, KeyError, TypeError):  # damaged inside: decode again, and repair it below
            pass
    images, labels, tests, skipped = [], [], [], []
    for f, result in zip(files, decode_all([root / f.path for f in files], label=f"decoding folder:{root}")):
        if isinstance(result, str):
            skipped.append((f.path, result))
            continue
        images.append(result)
        labels.append(f.label)
        tests.append(f.test)
    if not images:
        raise FolderError(f"folder:{root}: none of its {len(files)} image files could be read "
                          f"(first: {skipped[0][0]}: {skipped[0][1]})")
    saved = {"version": CACHE_VERSION, "files": key, "classes": list(classes),
             "images": torch.from_numpy(np.stack(images)), "labels": torch.tensor(labels, dtype=torch.int64),
             "test": torch.tensor(tests, dtype=torch.bool), "skipped": [list(s) for s in skipped]}
    saved["digest"] = tensors_digest(saved)
    data = check_trainable(root, unpack(saved, classes, from_cache=False, note=""))  # before caching what fails
    note = write_cache(cache, saved) if ours else f"decoded; not cached: {cache} is a file this tool did not write"
    return dataclasses.replace(data, cache_note=note)


def tensors_digest(saved: dict) -> str | None:
    """The digest of the cache's decoded images, labels and split: bytes damaged inside a readable file are
    caught (None when the cache lacks them)."""
    if not all(isinstance(saved.get(name), torch.Tensor) for name in ("images", "labels", "test")):
        return None
    return digest(saved["images"], saved["labels"], saved["test"])


def read_cache(cache: Path) -> tuple[dict | None, bool]:
    """(the cache's contents or None, whether the file may be replaced: absent, or written by us)."""
    if not cache.exists() and not cache.is_symlink():
        return None, True
    if not cache.is_file() or cache.is_symlink():
        return None, False  # a folder, a link, a pipe of that name: not ours
    try:
        data = cache.read_bytes()
    except OSError:
        return None, False
    if data.startswith(CACHE_MAGIC):
        try:
            saved = torch.load(io.BytesIO(data[len(CACHE_MAGIC):]), weights_only=True)
        except Exception:  # damaged: ours all the same, repaired by the next write
            return None, True
        return (saved if isinstance(saved, dict) else None), True
    try:  # version 1 wrote the torch file alone
        saved = torch.load(io.BytesIO(data), weights_only=True)
    except Exception:
        return None, False
    ours = isinstance(saved, dict) and "version" in saved and "files" in saved
    return (saved if ours else None), ours


def write_cache(cache: Path, saved: dict) -> str:
    """Write the cache atomically; says what happened, for the user (a read-only folder is not an error)."""
    buffer = io.BytesIO()
    torch.save(saved, buffer)
    try:
        atomic_write(cache, lambda tmp: tmp.write_bytes(CACHE_MAGIC + buffer.getvalue()))
    except OSError as e:
        return f"decoded; not cached: cannot write {cache} ({e.strerror})"
    return "decoded and cached"


def unpack(saved: dict, classes: tuple[str, ...], from_cache: bool, note: str) -> FolderData:
    test, images, labels = saved["test"], saved["images"], saved["labels"]
    n = len(labels)
    if not (images.dtype == torch.uint8 and images.shape[1:] == (28, 28) and len(images) == n == len(test)
            and test.dtype == torch.bool and (n == 0 or 0 <= int(labels.min()) <= int(labels.max()) < len(classes))):
        raise ValueError("cache does not match its own schema")
    return FolderData(classes, images[~test], labels[~test], images[test], labels[test],
                      tuple((a, b) for a, b in saved["skipped"]), from_cache, note)


def check_trainable(root: Path, data: FolderData) -> FolderData:
    """Every class needs a training image, or the network could never learn to predict it."""
    trained = torch.bincount(data.train_labels, minlength=len(data.classes))
    missing = [data.classes[c] for c in torch.nonzero(trained == 0).flatten().tolist()]
    if missing:
        raise FolderError(f"folder:{root}: class(es) {', '.join(missing[:5])} have no usable training images "
                          f"(unreadable, or all in the test split): add images")
    return data
