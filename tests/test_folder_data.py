"""--dataset folder:PATH: layouts used by a documented rule or refused in one line, odd entries skipped and
named, the cache's messages and repairs, an export after the folder moved."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from conftest import digit_folder, folder_args, one_error_line, snapshot
from distributed.train import main as train
from export.__main__ import main as export

pytestmark = pytest.mark.slow


def test_export_after_the_folder_moved_names_what_the_gate_needs(tmp_path: Path, capsys) -> None:
    from distributed.train import main as train
    folder = digit_folder(tmp_path / "digits")
    run_dir = tmp_path / "run"
    assert train(folder_args(folder, run_dir, 1)) == 0
    moved = tmp_path / "elsewhere"
    (folder / "zero").rename(tmp_path / "zero-moved")  # class folders moved away: the cache stays behind
    capsys.readouterr()
    assert export(["--run-dir", str(run_dir), "--batch-sizes", "1,16"]) == 0
    out = capsys.readouterr().out
    assert "Traceback" not in out and "--dataset" not in out
    assert f"image folder {folder.resolve()} is not usable" in out and "--data-dir FOLDER" in out
    folder.rename(moved)
    (tmp_path / "zero-moved").rename(moved / "zero")
    assert export(["--run-dir", str(run_dir), "--batch-sizes", "1,16", "--data-dir", str(moved)]) == 0
    parity = json.loads((run_dir / "export" / "manifest.json").read_text())["parity"]
    assert parity["dataset"].startswith(f"the test split of {moved}") and parity["training_test_set"]


@pytest.mark.parametrize("name", ["binary", "digits"])
def test_a_folder_named_like_an_mnist_task_learns_its_own_classes(tmp_path: Path, name: str) -> None:
    """Issue 20's name collision: folder:/data/binary was MNIST's binary task with every class mapped to 0."""
    from distributed.config import parse_args
    from distributed.data import task_of
    folder = digit_folder(tmp_path / name, per_class=3)
    cfg = parse_args(["--dataset", f"folder:{folder}"])
    task = task_of(cfg.dataset, cfg.task)
    assert task.classes == ("one", "zero") and task.map_labels(torch.tensor([0, 1])).tolist() == [0, 1]


def test_odd_entries_in_a_class_folder_are_skipped_and_named(tmp_path: Path, capsys) -> None:
    from distributed.train import main as train
    folder = digit_folder(tmp_path / "pics")
    zero = folder / "zero"
    (zero / "a.png").symlink_to(zero / "a.png")
    (zero / "gone.png").symlink_to(tmp_path / "nowhere.png")
    os.mkfifo(zero / "pipe.png")
    (zero / "dir.png").mkdir()  # a folder with an image's name: not an image, not listed
    run_dir = tmp_path / "run"
    assert train(folder_args(folder, run_dir, 1)) == 0
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if "skipped" in line)
    assert "skipped 3 file(s)" in line
    assert "zero/a.png (cannot read (Too many levels of symbolic links))" in line
    assert "zero/gone.png (no such file (or a link to nothing))" in line
    assert "zero/pipe.png (not a regular file" in line
    assert json.loads((run_dir / "metrics.json").read_text())["test_accuracy"] >= 0


@pytest.mark.parametrize("layout,needle", [
    ("empty_class", "class folder(s) two hold no image files"),
    ("different_classes", "train/ and test/ hold different classes (only in train/: one; only in test/: none)"),
    ("beside", "has train/ and test/ and also extra/ beside them"),
    ("no_training_image", "class(es) one have no usable training images"),
])
def test_folder_layouts_that_cannot_train_are_refused(tmp_path: Path, capsys, layout: str, needle: str) -> None:
    if layout == "empty_class":
        folder = digit_folder(tmp_path / "pics")
        (folder / "two").mkdir()
    else:
        folder = tmp_path / "pics"
        digit_folder(folder / "train")
        digit_folder(folder / "test")
        if layout == "different_classes":
            for path in (folder / "test" / "one").iterdir():
                path.unlink()
            (folder / "test" / "one").rmdir()
        elif layout == "beside":
            digit_folder(folder / "extra" / "x", per_class=2)
        else:
            for path in (folder / "train" / "one").iterdir():
                path.write_bytes(b"not a picture")
    before = snapshot(folder)
    assert train(folder_args(folder, tmp_path / "run", 1)) == 1
    one_error_line(capsys.readouterr().err, needle)
    assert snapshot(folder) == before


def test_nested_folders_in_a_class_folder_are_named(tmp_path: Path, capsys) -> None:
    folder = digit_folder(tmp_path / "pics")
    digit_folder(folder / "zero" / "more", per_class=2)
    assert train(folder_args(folder, tmp_path / "run", 1)) == 0
    out = capsys.readouterr().out
    assert "not read: 1 sub-folder(s) inside class folders (zero/more)" in out


def test_cache_messages_say_what_happened(tmp_path: Path, monkeypatch) -> None:
    import distributed.folder as folder_module
    from distributed.folder import CACHE_NAME, load_folder
    folder = digit_folder(tmp_path / "pics", per_class=5)
    cache = folder / CACHE_NAME

    def read_only(path, write):
        raise PermissionError(30, "Read-only file system", str(path))
    with monkeypatch.context() as m:
        m.setattr(folder_module, "atomic_write", read_only)
        data = load_folder(folder)
    assert not cache.exists() and data.cache_note.startswith(f"decoded; not cached: cannot write {cache.resolve()}")
    assert load_folder(folder).cache_note == "decoded and cached" and load_folder(folder).from_cache
    cache.write_bytes(cache.read_bytes()[:300])  # ours, damaged: repaired
    assert load_folder(folder).cache_note == "decoded and cached"
    assert load_folder(folder).cache_note == "from its cache"
    cache.write_bytes(b"the user's own file")  # not ours: never replaced, and said so
    assert "is a file this tool did not write" in load_folder(folder).cache_note
    assert cache.read_bytes() == b"the user's own file"


def test_damaged_bytes_inside_a_readable_cache_are_caught_and_repaired(tmp_path: Path) -> None:
    from distributed.folder import CACHE_NAME, load_folder
    folder = digit_folder(tmp_path / "pics", per_class=5)
    first = load_folder(folder)
    cache = folder / CACHE_NAME
    data = bytearray(cache.read_bytes())
    data[-3000:-2800] = bytes(200)  # inside the tensors; the zip and the pickle still read
    cache.write_bytes(bytes(data))
    again = load_folder(folder)
    assert not again.from_cache and again.cache_note == "decoded and cached"
    assert torch.equal(again.train_images, first.train_images) and load_folder(folder).from_cache


def test_names_that_are_not_utf8(tmp_path: Path, capsys) -> None:
    folder = digit_folder(tmp_path / "pics")
    first = sorted((folder / "zero").iterdir())[0]
    os.rename(first, os.fsencode(first.parent) + b"/caf\xe9.png")  # a file name: trained, like any other
    assert train(folder_args(folder, tmp_path / "run", 1)) == 0
    capsys.readouterr()
    os.rename(folder / "one", os.fsencode(folder) + b"/\xffone")  # a class name: refused in one line
    assert train(folder_args(folder, tmp_path / "run2", 1)) == 1
    one_error_line(capsys.readouterr().err, "is not a printable UTF-8 name: rename it")
