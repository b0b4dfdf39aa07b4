"""The MNIST-format family (--dataset): class names, computed normalisation, and the names end to end."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT, synthetic_digits, torchrun, write_idx, write_synthetic_mnist
from distributed import checkpoint
from distributed.config import TrainConfig, parse_args
from distributed.data import DATASETS, DataError, normalization_of, read_mnist, task_of

FASHION = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")


@pytest.fixture(scope="module")
def fashion_data(tmp_path_factory) -> Path:
    return write_synthetic_mnist(tmp_path_factory.mktemp("fashion"), folder="FashionMNIST")


@pytest.mark.parametrize("name,folder", [("fashion-mnist", "FashionMNIST"), ("kmnist", "KMNIST")])
def test_each_dataset_reads_its_own_folder_with_its_class_names(name: str, folder: str, tmp_path: Path) -> None:
    root = write_synthetic_mnist(tmp_path, n_train=50, n_test=20, folder=folder)
    images, labels = read_mnist(root, True, name)
    assert images.shape == (50, 28, 28) and labels.shape == (50,)
    assert len(read_mnist(root, False, name)[0]) == 20
    task = task_of(name, parse_args(["--dataset", name]).task)
    assert task.name == name and task.classes == DATASETS[name].classes and len(task.classes) == 10
    assert task.map_labels(torch.arange(10)).tolist() == list(range(10))
    assert task_of("fashion-mnist", "fashion-mnist").classes == FASHION


def test_normalization_is_computed_from_the_training_images() -> None:
    images, _ = synthetic_digits(300, 0)
    mean, std = normalization_of(torch.from_numpy(images))
    unit = images.astype(np.float64) / 255
    assert (mean, std) == (round(unit.mean(), 4), round(unit.std(), 4))


def test_flags() -> None:
    cfg = parse_args(["--dataset", "kmnist"])
    assert (cfg.task, cfg.run_dir, cfg.model) == ("kmnist", str(Path("runs") / "kmnist"), "fastnet")
    assert parse_args([]).task == "digits" and parse_args([]).dataset == "mnist"
    with pytest.raises(SystemExit) as e:
        parse_args(["--dataset", "kmnist", "--task", "binary"])
    assert e.value.code == 2
    # a checkpoint written before --dataset existed is MNIST's, not another experiment
    saved = {k: v for k, v in TrainConfig().to_dict().items() if k != "dataset"}
    assert TrainConfig().resume_conflicts(saved) == []
    assert TrainConfig(dataset="kmnist").resume_conflicts(saved)  # but another dataset is


def test_fashion_run_exports_and_serves_its_class_names(fashion_data: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    proc = subprocess.run(torchrun(2, "--dataset", "fashion-mnist", "--data-dir", str(fashion_data), "--run-dir",
                                   str(run_dir), "--val-size", "64", "--epochs", "2"),
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["dataset"] == "fashion-mnist" and metrics["classes"] == list(FASHION)
    assert metrics["test_accuracy"] > 0.5
    train_images, _ = read_mnist(fashion_data, True, "fashion-mnist")
    mean, std = normalization_of(train_images)
    state = checkpoint.load(run_dir / "checkpoints" / "best.pt")
    assert state["normalization"] == {"mean": mean, "std": std} and state["classes"] == list(FASHION)

    from export.__main__ import main as export
    assert export(["--run-dir", str(run_dir), "--batch-sizes", "1,64"]) == 0
    manifest = json.loads((run_dir / "export" / "manifest.json").read_text())
    assert manifest["model"]["dataset"] == "fashion-mnist" and manifest["model"]["classes"] == list(FASHION)
    assert manifest["input"]["normalization"]["mean"] == mean and manifest["input"]["normalization"]["std"] == std
    assert manifest["parity"]["dataset"].startswith("FashionMNIST test set")  # the gate used the dataset's test set

    images = tmp_path / "images"
    images.mkdir()
    test_images, test_labels = read_mnist(fashion_data, False, "fashion-mnist")
    for i in range(8):
        Image.fromarray(test_images[i].numpy()).save(images / f"{i}.png")
    serve = [sys.executable, "-m", "serve_cli"]
    proc = subprocess.run([*serve, "predict", str(images), "--model", str(run_dir / "export"), "--format", "csv"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    rows = proc.stdout.strip().splitlines()[1:]
    assert len(rows) == 8 and all(row.split(",")[1] in FASHION for row in rows)
    info = subprocess.run([*serve, "info", str(run_dir / "export")], cwd=ROOT, capture_output=True, text=True)
    assert "dataset fashion-mnist" in info.stdout and "Ankle boot" in info.stdout


@pytest.mark.parametrize("name,first,count", [("emnist-digits", 0, 10), ("emnist-letters", 1, 26)])
def test_emnist_is_read_upright_with_labels_from_zero(name: str, first: int, count: int, tmp_path: Path) -> None:
    split = name.split("-")[1]
    raw = tmp_path / "EMNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    stored = rng.integers(0, 256, size=(40, 28, 28)).astype(np.uint8)
    stored[:, :, 0] = 255  # the stored (transposed) images have a bright first column...
    labels = (np.arange(40) % count + first).astype(np.uint8)
    for part in ("train", "test"):
        write_idx(raw / f"emnist-{split}-{part}-images-idx3-ubyte", stored)
        write_idx(raw / f"emnist-{split}-{part}-labels-idx1-ubyte", labels)
    images, read_labels = read_mnist(tmp_path, True, name)
    assert (images[:, 0, :] == 255).all()  # ...which is the first row of the upright image
    assert torch.equal(images, torch.from_numpy(stored).transpose(1, 2))
    assert read_labels.tolist() == (labels - first).tolist() and int(read_labels.max()) == count - 1
    task = task_of(name, parse_args(["--dataset", name]).task)
    assert len(task.classes) == count and task.classes[0] == ("0" if count == 10 else "a")
    write_idx(raw / f"emnist-{split}-test-labels-idx1-ubyte", (labels * 0 + first + count).astype(np.uint8))
    with pytest.raises(DataError, match="labels outside"):
        read_mnist(tmp_path, False, name)
