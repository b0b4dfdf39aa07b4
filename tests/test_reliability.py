"""Reliability, round 2: outputs that are not plain files, checkpoints that lie, folders that change, signals.

Each case checks the exit code, one error line without a traceback, and that no user file changed.
"""
from __future__ import annotations

import os
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from conftest import ROOT
from serve_cli.__main__ import main as serve
from test_hostile import one_error_line, pngs, snapshot

pytestmark = pytest.mark.slow


# -- 1. serve_cli --output: a device, FIFO or link is written through, never replaced -----------------------

def predict(model: Path, folder: Path, output: Path | str, *extra: str) -> list[str]:
    return ["predict", str(folder), "--model", str(model), "--format", "csv", "--output", str(output), *extra]


def device_node(path: Path, minor: int) -> Path:
    """A private copy of a memory device (3: null, 7: full), so that broken code replaces it, not /dev's."""
    try:
        os.mknod(path, 0o666 | stat.S_IFCHR, os.makedev(1, minor))
    except PermissionError:
        pytest.skip("making a device node needs root")
    return path


def test_output_link_stays_a_link_and_its_target_gets_the_rows(exported_run: Path, tmp_path: Path) -> None:
    folder = pngs(tmp_path / "imgs", 3)
    (tmp_path / "real").mkdir()
    target = tmp_path / "real" / "rows.csv"
    target.write_text("old\n")
    target.chmod(0o600)
    link = tmp_path / "rows.csv"
    link.symlink_to(target)
    assert serve(predict(exported_run, folder, link)) == 0
    assert link.is_symlink() and os.readlink(link) == str(target)
    lines = target.read_text().splitlines()
    assert lines[0].startswith("path,") and len(lines) == 4
    assert stat.S_IMODE(target.stat().st_mode) == 0o600  # the user's file keeps its permissions
    assert sorted(p.name for p in tmp_path.iterdir()) == ["imgs", "real", "rows.csv"]
    assert sorted(p.name for p in target.parent.iterdir()) == ["rows.csv"]


def test_output_fifo_is_written_through(exported_run: Path, tmp_path: Path) -> None:
    folder = pngs(tmp_path / "imgs", 3)
    fifo = tmp_path / "rows.fifo"
    os.mkfifo(fifo)
    received: list[str] = []
    reader = threading.Thread(target=lambda: received.append(fifo.read_text()))
    reader.start()
    assert serve(predict(exported_run, folder, fifo)) == 0
    reader.join(timeout=30)
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    assert len(received) == 1 and len(received[0].splitlines()) == 4


def test_output_device_is_written_through(exported_run: Path, tmp_path: Path) -> None:
    folder = pngs(tmp_path / "imgs", 3)
    null = device_node(tmp_path / "null", 3)
    assert serve(predict(exported_run, folder, null)) == 0
    assert stat.S_ISCHR(os.lstat(null).st_mode)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["imgs", "null"]


def test_full_device_is_an_error(exported_run: Path, tmp_path: Path, capsys) -> None:
    folder = pngs(tmp_path / "imgs", 3)
    full = device_node(tmp_path / "full", 7)
    assert serve(predict(exported_run, folder, full)) == 1
    one_error_line(capsys.readouterr().err, "--output", "No space left")
    assert stat.S_ISCHR(os.lstat(full).st_mode)


def test_output_to_dev_fd_reaches_the_shells_redirect(exported_run: Path, tmp_path: Path) -> None:
    folder = pngs(tmp_path / "imgs", 3)
    redirect = tmp_path / "stdout.txt"
    with open(redirect, "w") as out:
        proc = subprocess.run([sys.executable, "-m", "serve_cli", *predict(exported_run, folder, "/dev/fd/1")],
                              cwd=ROOT, stdout=out, stderr=subprocess.PIPE, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert len(redirect.read_text().splitlines()) == 4


def test_interrupted_run_keeps_the_previous_regular_output(exported_run: Path, tmp_path: Path) -> None:
    """Regular files are still replaced atomically: a run that fails half-way leaves the old rows whole."""
    folder = pngs(tmp_path / "imgs", 3)
    (folder / "broken.png").write_bytes(b"not a png")
    out = tmp_path / "rows.csv"
    out.write_text("old rows\n")
    inode = out.stat().st_ino
    assert serve(predict(exported_run, folder, out)) == 1  # one error row: the run completes, file replaced
    assert out.stat().st_ino != inode and len(out.read_text().splitlines()) == 5
    out.write_text("old rows\n")
    read_only = tmp_path / "ro.csv"
    read_only.write_text("keep\n")
    read_only.chmod(0o444)
    if os.access(read_only, os.W_OK):
        return  # root may write anything: the refusal below is for ordinary users
    assert serve(predict(exported_run, folder, read_only)) == 2
    assert read_only.read_text() == "keep\n"


# -- 2. a checkpoint carries the digest of what it holds; export compares the recorded accuracy -------------

def flip_weight_bytes(path: Path, count: int = 400) -> None:
    """Flip `count` bytes in the largest tensor record of a torch.save zip file, leaving the zip readable."""
    import struct
    import zipfile
    with zipfile.ZipFile(path) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    data = bytearray(path.read_bytes())
    name_len, extra_len = struct.unpack("<HH", data[info.header_offset + 26:info.header_offset + 30])
    start = info.header_offset + 30 + name_len + extra_len
    for i in range(start, start + min(count, info.file_size)):
        data[i] ^= 0x5A
    path.write_bytes(bytes(data))


def test_flipped_bytes_in_a_checkpoint_are_refused_by_export_and_resume(ddp_run: Path, synthetic_data: Path,
                                                                       tmp_path: Path, capsys) -> None:
    import shutil
    from distributed.train import main as train
    from export.__main__ import main as export
    run_dir = Path(shutil.copytree(ddp_run, tmp_path / "run", ignore=shutil.ignore_patterns("export", ".lock")))
    for name in ("best.pt", "last.pt"):
        flip_weight_bytes(run_dir / "checkpoints" / name)
    before = snapshot(run_dir)
    assert export(["--run-dir", str(run_dir), "--batch-sizes", "1,64"]) == 1
    one_error_line(capsys.readouterr().err, "best.pt is damaged")
    assert train(["--data-dir", str(synthetic_data), "--run-dir", str(run_dir), "--val-size", "64", "--epochs", "3",
                  "--eval-batch-size", "48", "--device", "cpu"]) == 1
    one_error_line(capsys.readouterr().err, "last.pt is damaged")
    assert snapshot(run_dir) == before and not (run_dir / "export").exists()


def test_weights_that_do_not_score_the_recorded_accuracy_are_not_exported(ddp_run: Path, tmp_path: Path,
                                                                          capsys) -> None:
    """A checkpoint whose digest is right but whose weights are not what was scored (damaged before they were
    written): the eager model on the same test split tells."""
    from distributed import checkpoint
    from export.__main__ import main as export
    state = checkpoint.load(ddp_run / "checkpoints" / "best.pt")
    last_weight = [k for k in state["model"] if k.endswith("weight")][-1]
    state["model"][last_weight] = state["model"][last_weight].flip(0)  # classes' rows swapped: wrong answers
    state = {k: v for k, v in state.items() if k not in ("version", "digest")}
    damaged = tmp_path / "damaged.pt"
    checkpoint.save(damaged, state)
    assert export(["--checkpoint", str(damaged), "--out-dir", str(tmp_path / "out"), "--batch-sizes", "1,64"]) == 1
    one_error_line(capsys.readouterr().err, "records test accuracy", "same 200 test images")
    assert not (tmp_path / "out").exists()


def test_a_healthy_checkpoint_exports_on_its_own_test_set(exported_run: Path) -> None:
    """Passes with or without the checks above: they must not refuse a good run."""
    import json
    parity = json.loads((exported_run / "manifest.json").read_text())["parity"]
    assert parity["passed"] and parity["training_test_set"] is True
    from distributed import checkpoint
    recorded = checkpoint.load(exported_run.parent / "checkpoints" / "best.pt")["metrics"]["test_accuracy"]
    assert parity["runtimes"]["eager"]["accuracy"] == pytest.approx(recorded, abs=1e-9)


# -- 3. a folder dataset that changed under a resume -----------------------------------------------------

def digit_folder(root: Path, per_class: int = 30) -> Path:
    """Two classes of synthetic digit PNGs (zero and one)."""
    from PIL import Image
    from conftest import synthetic_digits
    images, labels = synthetic_digits(per_class * 10, seed=7)
    for i, (img, label) in enumerate(zip(images, labels)):
        if label < 2:
            (root / ("zero", "one")[label]).mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(root / ("zero", "one")[label] / f"{i:04d}.png")
    return root


def folder_args(folder: Path, run_dir: Path, epochs: int) -> list[str]:
    return ["--dataset", f"folder:{folder}", "--run-dir", str(run_dir), "--val-size", "5", "--epochs", str(epochs),
            "--model", "mlp", "--batch-size", "16", "--device", "cpu"]


@pytest.mark.parametrize("change", ["added", "removed", "replaced"])
def test_resume_on_a_changed_folder_is_refused(tmp_path: Path, capsys, change: str) -> None:
    from PIL import Image
    from distributed.train import main as train
    folder = digit_folder(tmp_path / "digits")
    run_dir = tmp_path / "run"
    assert train(folder_args(folder, run_dir, 1)) == 0
    capsys.readouterr()
    zero = sorted((folder / "zero").iterdir())
    if change == "added":
        Image.open(zero[0]).save(folder / "zero" / "extra.png")
        Image.open(zero[1]).save(folder / "zero" / "extra2.png")
    elif change == "removed":
        zero[0].unlink()
    else:  # the same count, other pictures
        for path in zero:
            Image.open(path).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(path)
    before = snapshot(run_dir)
    assert train(folder_args(folder, run_dir, 2)) == 1
    line = one_error_line(capsys.readouterr().err, "was trained on other data", "--no-resume")
    if change != "replaced":
        assert "class 'zero'" in line
    assert snapshot(run_dir) == before
    assert train(folder_args(folder, run_dir, 2) + ["--no-resume"]) == 0


# -- 6. export after a folder dataset moved ------------------------------------------------------------

def test_export_after_the_folder_moved_names_what_the_gate_needs(tmp_path: Path, capsys) -> None:
    import json
    from distributed.train import main as train
    from export.__main__ import main as export
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
