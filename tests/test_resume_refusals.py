"""A resume is refused, in one line and touching nothing, when it would be another experiment: other flags,
another network's checkpoint, a folder dataset that changed."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import digit_folder, folder_args, one_error_line, resave, snapshot, train_args
from distributed.train import main as train

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("flags, named", [(["--seed", "1"], "--seed 0 -> 1"), (["--val-size", "0"], "--val-size 64 -> 0"),
                                          (["--model", "samnet"], "--model mlp -> samnet")])
def test_resume_refuses_another_experiment(synthetic_data, tmp_path: Path, capsys, flags, named: str) -> None:
    assert train(train_args(synthetic_data, tmp_path)) == 0
    before = snapshot(tmp_path)
    capsys.readouterr()
    assert train(train_args(synthetic_data, tmp_path, *flags, "--epochs", "2")) == 1
    one_error_line(capsys.readouterr().err, named, "--no-resume")
    assert snapshot(tmp_path) == before


def test_checkpoint_of_another_network_is_one_line(synthetic_data, tmp_path: Path, capsys) -> None:
    assert train(train_args(synthetic_data, tmp_path)) == 0
    last = tmp_path / "checkpoints" / "last.pt"
    state = torch.load(last, weights_only=True)
    state["model"] = {"0.weight": torch.zeros(3, 3)}
    resave(last, state)
    capsys.readouterr()
    assert train(train_args(synthetic_data, tmp_path, "--epochs", "2")) == 1
    one_error_line(capsys.readouterr().err, "does not fit this run")


@pytest.mark.parametrize("change", ["added", "removed", "replaced"])
def test_resume_on_a_changed_folder_is_refused(tmp_path: Path, capsys, change: str) -> None:
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
