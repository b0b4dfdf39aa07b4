"""Shared fixtures: tiny synthetic MNIST in IDX format, and the real dataset when it is present."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.append(str(ROOT / "launch"))  # the synthetic data is also what launch/container.sh smoke trains on
from synthetic_mnist import synthetic_digits, write_idx, write_synthetic_mnist  # noqa: E402,F401

MNIST_GZ = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
            "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")


def real_mnist_raw() -> Path | None:
    """Where real MNIST's four .gz files are, for the tests that need it: $MNIST_DIR (a --data-dir), else the
    README's --data-dir data, else where CI keeps it beside the checkout; None when none has all four."""
    roots = [os.environ.get("MNIST_DIR"), ROOT / "data", ROOT.parent / "shared" / "data"]
    for raw in (Path(root) / "MNIST" / "raw" for root in roots if root):
        if all((raw / f).is_file() for f in MNIST_GZ):
            return raw
    return None


@pytest.fixture(scope="session")
def synthetic_data(tmp_path_factory) -> Path:
    return write_synthetic_mnist(tmp_path_factory.mktemp("synthetic"))


@pytest.fixture(scope="session")
def real_data(tmp_path_factory) -> Path:
    """A writable copy of the real MNIST gz files (torchvision extracts beside them); skips when absent."""
    raw = real_mnist_raw()
    if raw is None:
        pytest.skip("real MNIST's four .gz files not found in $MNIST_DIR, ./data or ../shared/data (MNIST/raw/)")
    root = tmp_path_factory.mktemp("mnist")
    (root / "MNIST" / "raw").mkdir(parents=True)
    for name in MNIST_GZ:  # only the originals: torchvision md5-checks and extracts them
        shutil.copy(raw / name, root / "MNIST" / "raw" / name)
    return root


def final_weights(run_dir: Path) -> dict:
    """The model weights of RUN_DIR/checkpoints/last.pt."""
    from distributed import checkpoint
    return checkpoint.load(run_dir / "checkpoints" / "last.pt")["model"]


def resave(path: Path, state: dict) -> None:
    """Write an edited checkpoint as the trainer would, with a digest of its new contents (an edit the digest
    cannot catch: what the other checks are for)."""
    from distributed import checkpoint
    checkpoint.save(path, {k: v for k, v in state.items() if k not in ("version", "digest")})


@contextmanager
def preempted_after_epoch(epoch: int) -> Iterator[None]:
    """As if SIGTERM arrived during that epoch's evaluation: the run saves the epoch and raises Preempted."""
    from distributed.train import Trainer
    end_epoch = Trainer.end_epoch

    def signalled(self, test, val) -> None:
        end_epoch(self, test, val)
        if self.parts.run.epoch == epoch:
            self.stop.signal = signal.SIGTERM
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Trainer, "end_epoch", signalled)
        yield


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(nproc: int, *args: str, launcher: tuple[str, ...] = ()) -> list[str]:
    """A torchrun command line for the trainer, pinned to the CPU unless `args` name a --device (which wins:
    argparse keeps the last): on a one-GPU host, 2 ranks on --device auto would be refused."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            *launcher, "-m", "distributed.train", "--device", "cpu", *args]


@pytest.fixture(scope="session")
def ddp_run(synthetic_data, tmp_path_factory) -> Path:
    """A real 2-rank torchrun training run on synthetic data (2 epochs), shared by trainer and export tests."""
    run_dir = tmp_path_factory.mktemp("ddp")
    proc = subprocess.run(torchrun(2, "--data-dir", str(synthetic_data), "--run-dir", str(run_dir),
                                   "--val-size", "64", "--epochs", "2", "--eval-batch-size", "48",
                                   "--test-every-epoch"),
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return run_dir


def pytest_collection_modifyitems(config, items) -> None:
    import torch
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def exported_run(ddp_run) -> Path:
    """The 2-rank synthetic run exported with `python -m export --run-dir` (artifacts in RUN_DIR/export)."""
    from export.__main__ import main
    assert main(["--run-dir", str(ddp_run), "--batch-sizes", "1,64"]) == 0
    return ddp_run / "export"


@pytest.fixture(scope="session")
def mnist_export(real_data, tmp_path_factory) -> Path:
    """A fastnet really trained on MNIST (1 epoch, 1 process) and exported; skips without real MNIST."""
    from distributed.train import main as train
    from export.__main__ import main as export
    run_dir = tmp_path_factory.mktemp("mnist_run")
    assert train(["--data-dir", str(real_data), "--run-dir", str(run_dir), "--epochs", "1", "--device", "cpu"]) == 0
    assert export(["--run-dir", str(run_dir), "--batch-sizes", "7,1000"]) == 0
    return run_dir / "export"


# -- helpers of the hostile-user tests (files snapshots, one-line errors, tiny folders) -------------

def snapshot(folder: Path) -> dict[str, str]:
    """sha256 of every regular file under `folder`, by relative path (but the run-dir lock, which names the
    last trainer that held it)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and not p.is_symlink() and p.name != ".lock"}


def one_error_line(err: str, *needles: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def run(*cmd: str, timeout: float = 180, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *cmd], cwd=ROOT, capture_output=True, text=True, timeout=timeout, **kwargs)


def train_args(data: Path, run_dir: Path, *extra: str) -> list[str]:
    return ["--data-dir", str(data), "--run-dir", str(run_dir), "--val-size", "64", "--epochs", "1",
            "--model", "mlp", "--device", "cpu", *extra]


def pngs(folder: Path, n: int = 6) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    images, _ = synthetic_digits(n, seed=3)
    for i, img in enumerate(images):
        Image.fromarray(img).save(folder / f"{i:03d}.png")
    return folder


def edit_manifest(exported: Path, dest: Path, edit, reseal: bool) -> Path:
    """A copy of an export whose manifest `edit` changed, sealed again with a fresh digest or not."""
    from serve_cli.base.manifest import seal
    out = Path(shutil.copytree(exported, dest))
    manifest = json.loads((out / "manifest.json").read_text())
    edit(manifest)
    (out / "manifest.json").write_text(json.dumps(seal(manifest) if reseal else manifest))
    return out


def predict(model: Path, folder: Path, output: Path | str, *extra: str) -> list[str]:
    return ["predict", str(folder), "--model", str(model), "--format", "csv", "--output", str(output), *extra]


def device_node(path: Path, minor: int) -> Path:
    """A private copy of a memory device (3: null, 7: full), so that broken code replaces it, not /dev's."""
    try:
        os.mknod(path, 0o666 | stat.S_IFCHR, os.makedev(1, minor))
    except PermissionError:
        pytest.skip("making a device node needs root")
    return path


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


def big_digit_folder(root: Path, per_class: int) -> Path:
    """Large pictures (hard links of two files) that take a while to decode."""
    from PIL import Image
    from conftest import synthetic_digits
    for c, name in enumerate(("zero", "one")):
        (root / name).mkdir(parents=True)
        first = root / name / "00000.png"
        Image.fromarray(synthetic_digits(1, c)[0][0]).resize((600, 600)).save(first)
        for i in range(1, per_class):
            os.link(first, root / name / f"{i:05d}.png")
    return root


def decode_workers(root: int) -> bool:
    """Whether a spawned decoding process runs below process `root` (torchrun starts its workers in sessions
    of their own)."""
    parents, commands = {}, {}
    for stat_file in Path("/proc").glob("[0-9]*/stat"):
        try:
            parents[int(stat_file.parent.name)] = int(stat_file.read_text().rsplit(")", 1)[1].split()[1])
            commands[int(stat_file.parent.name)] = (stat_file.parent / "cmdline").read_bytes()
        except (OSError, ValueError, IndexError):
            continue

    def below(pid: int) -> bool:
        while pid > 1:
            pid = parents.get(pid, 0)
            if pid == root:
                return True
        return False
    return any(b"multiprocessing.spawn" in cmd and below(pid) for pid, cmd in commands.items())
