"""distributed.checkpoint's files: atomic saves, and every way a file that is not a good checkpoint is refused
(never unpickled)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from distributed import checkpoint
from serve_cli.base.files import atomic_write


def test_atomic_save_and_load(tmp_path: Path) -> None:
    path = tmp_path / "ck" / "last.pt"
    checkpoint.save(path, {"model": {"w": torch.ones(2)}, "config": {"model": "mlp"}, "run": {"epoch": 1}})
    state = checkpoint.load(path)
    assert state["run"]["epoch"] == 1 and torch.equal(state["model"]["w"], torch.ones(2))
    assert state["version"] == checkpoint.CHECKPOINT_VERSION
    assert [p.name for p in path.parent.iterdir()] == ["last.pt"]


def test_failed_save_leaves_old_file_and_no_temp(tmp_path: Path) -> None:
    path = tmp_path / "last.pt"
    path.write_bytes(b"old")

    def explode(p: Path) -> None:
        p.write_bytes(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError):
        atomic_write(path, explode)
    assert path.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["last.pt"]


@pytest.mark.parametrize("content", [b"", b"garbage", b"PK\x03\x04broken zip"])
def test_corrupt_checkpoints_are_named(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "bad.pt"
    path.write_bytes(content)
    with pytest.raises(checkpoint.CheckpointError, match="bad.pt is not a readable checkpoint"):
        checkpoint.load(path)


def test_foreign_tensor_file_is_refused(tmp_path: Path) -> None:
    torch.save({"weights": torch.ones(1)}, tmp_path / "other.pt")
    with pytest.raises(checkpoint.CheckpointError, match="not a checkpoint of this project"):
        checkpoint.load(tmp_path / "other.pt")


def test_pickled_objects_are_never_unpickled(tmp_path: Path) -> None:
    class Evil:
        def __reduce__(self):
            return (exec, ("raise SystemExit('executed')",))

    torch.save({"version": 2, "model": Evil(), "config": {}, "run": {}}, tmp_path / "evil.pt")
    with pytest.raises(checkpoint.CheckpointError):
        checkpoint.load(tmp_path / "evil.pt")


def test_missing_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(checkpoint.CheckpointError, match="checkpoint not found"):
        checkpoint.load(tmp_path / "nope.pt")


@pytest.mark.parametrize("version", [4, "2", None])
def test_future_or_foreign_version_is_refused(tmp_path: Path, version) -> None:
    torch.save({"version": version, "model": {}, "config": {}, "run": {}}, tmp_path / "v.pt")
    with pytest.raises(checkpoint.CheckpointError, match="checkpoint version"):
        checkpoint.load(tmp_path / "v.pt")
