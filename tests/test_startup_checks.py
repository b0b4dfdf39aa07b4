"""What the trainer checks before any work: the run dir's parts and the --data-dir path, each named in one line
that says what is wrong with it (not a full disk, not the network)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT, one_error_line, train_args, write_synthetic_mnist
from distributed import checkpoint
from distributed.checkpoint import CheckpointError
from distributed.train import main as train


def error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize("part", ["dangling link", "file"])
def test_a_checkpoints_folder_that_cannot_be_one_is_named_before_training(synthetic_data: Path, tmp_path: Path,
                                                                         capsys, part: str) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    checkpoints = run_dir / "checkpoints"
    if part == "file":
        checkpoints.write_text("keep")
    else:
        checkpoints.symlink_to(tmp_path / "elsewhere")
    assert train(train_args(synthetic_data, run_dir)) == 1
    line = error_line(capsys)
    assert line.startswith(f"error: {checkpoints} is a ")
    if part == "file":
        assert "is a file, not a folder" in line and checkpoints.read_text() == "keep"
    else:
        assert f"a link to {tmp_path / 'elsewhere'}, which does not exist" in line and checkpoints.is_symlink()
    assert "disk" not in line and "previous checkpoint" not in line
    assert not (run_dir / "events.out.tfevents").exists() and not list(run_dir.glob("events*"))  # before any work


def test_a_checkpoints_link_to_a_folder_is_used(synthetic_data: Path, tmp_path: Path) -> None:
    (tmp_path / "big_disk").mkdir()
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "checkpoints").symlink_to(tmp_path / "big_disk")
    assert train(train_args(synthetic_data, run_dir)) == 0
    assert (tmp_path / "big_disk" / "last.pt").is_file() and (run_dir / "checkpoints").is_symlink()


def test_a_failed_first_save_does_not_claim_a_previous_checkpoint(tmp_path: Path) -> None:
    (tmp_path / "not_a_folder").write_text("")
    with pytest.raises(CheckpointError) as e:
        checkpoint.save(tmp_path / "not_a_folder" / "last.pt", {"model": {"w": torch.zeros(1)}})
    assert "no last.pt was written" in str(e.value) and "disk" not in str(e.value), e.value


@pytest.mark.parametrize("layout", ["file", "inner file", "dangling link", "link loop", "raw file a folder"])
def test_a_data_dir_that_is_not_a_folder_says_so(tmp_path: Path, capsys, layout: str) -> None:
    data = tmp_path / "data"
    if layout == "file":
        data.write_text("keep")
        named, needle = f"--data-dir {data}", "is a file, not a folder: give --data-dir a folder"
    elif layout == "inner file":
        data.mkdir()
        (data / "MNIST").write_text("keep")
        named, needle = str(data / "MNIST"), "is a file, not a folder: move it away"
    elif layout == "dangling link":
        data.symlink_to(tmp_path / "gone")
        named, needle = f"--data-dir {data}", "which does not exist"
    elif layout == "link loop":
        data.symlink_to(data)
        named, needle = f"--data-dir {data}", "is a link in a circle"
    else:
        (data / "MNIST" / "raw" / "train-images-idx3-ubyte").mkdir(parents=True)
        named, needle = str(data / "MNIST" / "raw" / "train-images-idx3-ubyte"), "is not a file: remove it"
    assert train(train_args(data, tmp_path / "run")) == 1
    line = error_line(capsys)
    assert line.startswith(f"error: {named} ") and needle in line, line
    assert "download" not in line and "network" not in line, line


def test_run_dir_that_is_a_file(synthetic_data, tmp_path: Path, capsys) -> None:
    (tmp_path / "f").write_text("keep")
    assert train(train_args(synthetic_data, tmp_path / "f")) == 1
    one_error_line(capsys.readouterr().err, "is a file, not a folder")
    assert (tmp_path / "f").read_text() == "keep"


def test_second_trainer_on_the_same_run_dir_is_refused(synthetic_data, tmp_path: Path, capsys) -> None:
    holder = subprocess.Popen([sys.executable, "-c",
                               "import sys, time; from pathlib import Path; from distributed.run_dir import RunDirLock; "
                               f"lock = RunDirLock(Path({str(tmp_path)!r})); lock.acquire(); print('locked', flush=True); "
                               "time.sleep(60)"], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert train(train_args(synthetic_data, tmp_path)) == 1
        one_error_line(capsys.readouterr().err, "is in use by pid", str(holder.pid))
        assert not (tmp_path / "checkpoints").exists()
    finally:
        holder.kill()
        holder.wait()
    assert train(train_args(synthetic_data, tmp_path)) == 0  # the dead holder's lock is gone with it


@pytest.mark.parametrize("damage, needle", [("truncate", "is damaged"), ("header", "bad header"),
                                            ("labels", "labels outside 0-9")])
def test_damaged_extracted_mnist_is_named(tmp_path: Path, capsys, damage: str, needle: str) -> None:
    data = write_synthetic_mnist(tmp_path / "data", n_train=200, n_test=50)
    raw = data / "MNIST" / "raw"
    if damage == "truncate":
        path = raw / "train-images-idx3-ubyte"
        path.write_bytes(path.read_bytes()[:-100])
    elif damage == "header":
        path = raw / "t10k-images-idx3-ubyte"
        path.write_bytes(b"\x00\x00\x08\x01" + path.read_bytes()[4:])
    else:
        path = raw / "train-labels-idx1-ubyte"
        content = bytearray(path.read_bytes())
        content[20] = 42
        path.write_bytes(bytes(content))
    assert train(["--data-dir", str(data), "--run-dir", str(tmp_path / "r"), "--val-size", "10", "--device", "cpu"]) == 1
    one_error_line(capsys.readouterr().err, str(path.name), needle)
