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
from distributed.data import normalization_of, task_of
from distributed.datasets import DATASETS, DataError, read_mnist

FASHION = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")


def write_dataset(root: Path, name: str, n_train: int = 640, n_test: int = 200) -> Path:
    """Synthetic IDX files in the layout torchvision's class for `name` expects (EMNIST: its own names)."""
    ds = DATASETS[name]
    if not ds.split:
        return write_synthetic_mnist(root, n_train, n_test, folder=ds.folder)
    raw = root / ds.folder / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for train, n, seed in ((True, n_train, 0), (False, n_test, 1)):
        images, labels = synthetic_digits(n, seed)
        write_idx(raw / ds.file(train, "images"), images.transpose(0, 2, 1))  # EMNIST stores them transposed
        write_idx(raw / ds.file(train, "labels"), labels + ds.first_label)
    return root


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
    assert (cfg.task, cfg.run_dir, cfg.model) == ("kmnist", str(Path("runs") / "kmnist"), "slimnet")
    assert parse_args([]).task == "digits" and parse_args([]).dataset == "mnist"
    with pytest.raises(SystemExit) as e:
        parse_args(["--dataset", "kmnist", "--task", "binary"])
    assert e.value.code == 2
    # a checkpoint written before --dataset existed is MNIST's, not another experiment
    saved = {k: v for k, v in TrainConfig().to_dict().items() if k != "dataset"}
    assert TrainConfig().resume_conflicts(saved) == []
    assert TrainConfig(dataset="kmnist").resume_conflicts(saved)  # but another dataset is


@pytest.mark.parametrize("name", ["fashion-mnist", "kmnist", "emnist-digits", "emnist-letters"])
def test_run_exports_and_serves_the_datasets_class_names(name: str, tmp_path: Path) -> None:
    data = write_dataset(tmp_path / "data", name)
    classes = list(DATASETS[name].classes)
    run_dir = tmp_path / "run"
    proc = subprocess.run(torchrun(2, "--dataset", name, "--data-dir", str(data), "--run-dir",
                                   str(run_dir), "--val-size", "64", "--epochs", "2", "--test-every-epoch"),
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["dataset"] == name and metrics["classes"] == classes
    assert metrics["test_accuracy"] > 0.5
    train_images, _ = read_mnist(data, True, name)
    mean, std = normalization_of(train_images)
    state = checkpoint.load(run_dir / "checkpoints" / "best.pt")
    assert state["normalization"] == {"mean": mean, "std": std} and state["classes"] == classes

    from export.__main__ import main as export
    assert export(["--run-dir", str(run_dir), "--batch-sizes", "1,64"]) == 0
    manifest = json.loads((run_dir / "export" / "manifest.json").read_text())
    assert manifest["model"]["dataset"] == name and manifest["model"]["classes"] == classes
    assert manifest["input"]["normalization"]["mean"] == mean and manifest["input"]["normalization"]["std"] == std
    # the gate used the dataset's own test set, with its labels
    assert manifest["parity"]["dataset"].startswith(f"{DATASETS[name].folder} test set")
    exported = state["metrics"]["test_accuracy"]  # best.pt's epoch, which the export took
    assert manifest["parity"]["runtimes"]["onnxruntime"]["accuracy"] == pytest.approx(exported)

    images = tmp_path / "images"
    images.mkdir()
    test_images, test_labels = read_mnist(data, False, name)
    for i in range(8):
        Image.fromarray(test_images[i].numpy()).save(images / f"{i}.png")
    serve = [sys.executable, "-m", "serve_cli"]
    proc = subprocess.run([*serve, "predict", str(images), "--model", str(run_dir / "export"), "--format", "csv"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    rows = proc.stdout.strip().splitlines()[1:]
    said = [row.split(",")[1] for row in rows]
    assert len(rows) == 8 and all(c in classes for c in said)
    assert sum(c == classes[int(t)] for c, t in zip(said, test_labels[:8])) >= 6  # the names mean the right classes
    info = subprocess.run([*serve, "info", str(run_dir / "export")], cwd=ROOT, capture_output=True, text=True)
    assert f"dataset {name}" in info.stdout and f"{classes[-2]}, {classes[-1]})" in info.stdout


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


DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def write_folder(root: Path, n: int = 700) -> Path:
    """Synthetic digits as PNG and JPEG files in class sub-folders named after the digit, plus one broken file."""
    images, labels = synthetic_digits(n, 0)
    for i, (img, label) in enumerate(zip(images, labels)):
        folder = root / DIGIT_NAMES[label]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(folder / f"{i:04d}.{'jpg' if i % 5 == 0 else 'png'}", quality=95)
    (root / "three" / "broken.png").write_bytes(b"not a png")
    return root


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    return write_folder(tmp_path_factory.mktemp("folder") / "meters")


def test_folder_run_trains_exports_and_serves_the_folders_names(image_folder: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    proc = subprocess.run(torchrun(2, "--dataset", f"folder:{image_folder}", "--run-dir", str(run_dir),
                                   "--val-size", "50", "--epochs", "2"),
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "skipped 1 file(s) that are not usable images: three/broken.png" in proc.stdout
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["classes"] == sorted(DIGIT_NAMES) and metrics["task"] == "meters"
    assert metrics["test_accuracy"] > 0.8
    from export.__main__ import main as export
    assert export(["--run-dir", str(run_dir), "--batch-sizes", "1,64"]) == 0
    manifest = json.loads((run_dir / "export" / "manifest.json").read_text())
    assert manifest["model"]["classes"] == sorted(DIGIT_NAMES) and "digit_bytes" in manifest["input"]["preprocessing"]
    assert manifest["parity"]["dataset"].startswith(f"the test split of {image_folder}")
    proc = subprocess.run([sys.executable, "-m", "serve_cli", "predict", str(image_folder / "seven"), "--model",
                           str(run_dir / "export"), "--format", "csv"], cwd=ROOT, capture_output=True, text=True)
    rows = [r.split(",") for r in proc.stdout.strip().splitlines()[1:]]
    assert len(rows) > 50 and sum(r[1] == "seven" for r in rows) / len(rows) > 0.8


def test_folder_cache_is_used_and_rebuilt_when_a_file_changes(tmp_path: Path) -> None:
    from distributed.folder import CACHE_NAME, load_folder
    root = write_folder(tmp_path / "f", n=60)
    first = load_folder(root)
    assert not first.from_cache and [p for p, _ in first.skipped] == ["three/broken.png"]
    assert len(first.train_labels) + len(first.test_labels) == 60
    again = load_folder(root)
    assert again.from_cache and torch.equal(again.train_images, first.train_images)
    changed = sorted((root / "one").iterdir())[0]
    Image.fromarray(np.zeros((28, 28), dtype=np.uint8) + 9).save(changed)  # another picture, same name
    rebuilt = load_folder(root)
    assert not rebuilt.from_cache
    assert load_folder(root).from_cache
    (root / CACHE_NAME).write_bytes(b"a file of the user's")  # not ours: neither trusted nor replaced
    assert not load_folder(root).from_cache and not load_folder(root).from_cache
    assert (root / CACHE_NAME).read_bytes() == b"a file of the user's"


def test_folder_split_is_stable_and_disjoint(tmp_path: Path) -> None:
    from distributed.folder import classes_of, listing
    root = write_folder(tmp_path / "f", n=300)
    files = listing(root, classes_of(root))
    test = {f.path for f in files if f.test}
    train = {f.path for f in files if not f.test}
    assert not test & train and len(test) + len(train) == len(files)
    assert 0.1 < len(test) / len(files) < 0.25  # about a sixth
    Image.fromarray(np.zeros((28, 28), dtype=np.uint8)).save(root / "two" / "new.png")
    after = {f.path for f in listing(root, classes_of(root)) if f.test}
    assert after - {"two/new.png"} == test  # adding a file moves no other file between splits
    # train/ and test/ sub-folders, when both exist, are the split
    split_root = tmp_path / "split"
    for part, n in (("train", 40), ("test", 20)):
        write_folder(split_root / part, n=n)
    files = listing(split_root, classes_of(split_root))
    assert all(f.test == f.path.startswith("test/") for f in files) and classes_of(split_root) == tuple(sorted(DIGIT_NAMES))


def test_trainer_and_serve_cli_see_the_same_pixels(tmp_path: Path) -> None:
    """Real-world-style pictures through the folder dataset and through serve_cli's decoder: bit for bit."""
    from distributed.data import to_unit
    from distributed.folder import load_folder
    from serve_cli.pool import process_batch
    root = tmp_path / "styles"
    rng = np.random.default_rng(1)
    pictures = {
        "inverted": 255 - synthetic_digits(1, 3)[0][0],  # dark ink on white paper
        "large": np.kron(255 - synthetic_digits(1, 4)[0][0], np.ones((9, 9), dtype=np.uint8)),  # 252x252
        "offcentre": np.pad(synthetic_digits(1, 5)[0][0], ((0, 40), (30, 0))),
    }
    paths = []
    for i, (name, array) in enumerate(pictures.items()):
        (root / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        paths.append(root / f"c{i % 2}" / f"{name}.png")
        Image.fromarray(array.astype(np.uint8)).save(paths[-1])
    rgba = np.zeros((60, 40, 4), dtype=np.uint8)  # a transparent PNG with black strokes
    rgba[10:50, 15:22] = (0, 0, 0, 255)
    paths.append(root / "c1" / "rgba.png")
    Image.fromarray(rgba, mode="RGBA").save(paths[-1])
    jpeg = rng.integers(0, 30, size=(80, 80, 3)).astype(np.uint8)
    jpeg[20:60, 35:45] = 230
    paths.append(root / "c0" / "photo.jpg")
    Image.fromarray(jpeg).save(paths[-1], quality=80)
    data = load_folder(root)
    assert not data.skipped
    trained = torch.cat([data.train_images, data.test_images])
    labels = torch.cat([data.train_labels, data.test_labels])
    chunk = process_batch([str(p) for p in paths])  # what a serve_cli worker hands its model
    assert chunk.errors == [None] * len(paths)
    served = chunk.images[:, 0]
    # match by content order: the folder lists c0 then c1, each sorted by name
    order = sorted(range(len(paths)), key=lambda i: (paths[i].parent.name, paths[i].name))
    from distributed.folder import classes_of, listing
    listed = [f[0] for f in listing(root.resolve(), classes_of(root))]
    assert listed == [str(paths[i].relative_to(root)) for i in order]
    by_listing = {name: i for i, name in enumerate(listed)}
    train_first = [f for f in listing(root.resolve(), classes_of(root)) if not f[2]] + \
        [f for f in listing(root.resolve(), classes_of(root)) if f[2]]
    for position, entry in enumerate(train_first):
        i = order[by_listing[entry[0]]]
        assert torch.equal(to_unit(trained[position:position + 1])[0, 0], torch.from_numpy(served[i]))
        assert int(labels[position]) == int(paths[i].parent.name[1])


def test_folder_errors_are_one_line(tmp_path: Path, capsys) -> None:
    from distributed.train import main
    assert main(["--dataset", f"folder:{tmp_path / 'nowhere'}", "--run-dir", str(tmp_path / "r"), "--device", "cpu"]) == 1
    assert capsys.readouterr().err.strip().endswith("nowhere: no such folder")
    (tmp_path / "one_class" / "a").mkdir(parents=True)
    assert main(["--dataset", f"folder:{tmp_path / 'one_class'}", "--run-dir", str(tmp_path / "r2"),
                 "--device", "cpu"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "one sub-folder per class (at least 2), found 1" in err
