"""distributed.comms: the launch environment, the device choice and its checks, the CPU threads of each local
rank, and the weights' fingerprint that proves the replicas equal."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from distributed import comms


def test_more_ranks_than_gpus_is_a_clear_error(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(comms.LaunchError, match="4 processes on this node but only 2 GPU.*--device cpu"):
        comms.choose_device("auto", local_rank=3, local_world_size=4)
    assert comms.choose_device("cpu", 3, 4) == (torch.device("cpu"), "")
    assert comms.choose_device("auto", 1, 2) == (torch.device("cuda", 1), "")


def test_cuda_asked_without_cuda(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("PATH", "/nonexistent")  # no nvidia-smi either
    with pytest.raises(comms.LaunchError, match="--device cpu"):
        comms.choose_device("cuda", 0, 1)
    assert comms.choose_device("auto", 0, 1) == (torch.device("cpu"), "")


def test_a_gpu_this_torch_cannot_use_is_named_with_the_fix(monkeypatch, tmp_path: Path) -> None:
    """Issue 18, bug 5: a CUDA 13 torch on a driver older than 580 sees no GPU, and trained on the CPU silently."""
    smi = tmp_path / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho 'NVIDIA H200, 550.54.15'\n")
    smi.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:/usr/bin:/bin")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(comms.LaunchError) as e:
        comms.choose_device("cuda", 0, 1)
    assert "nvidia-smi sees 1 GPU(s) (NVIDIA H200, 550.54.15)" in str(e.value)
    assert "--index-url https://download.pytorch.org/whl/cu126" in str(e.value)
    device, warning = comms.choose_device("auto", 0, 1)
    assert device == torch.device("cpu") and warning.startswith("warning: nvidia-smi sees 1 GPU(s)")
    assert warning.endswith("training on the CPU")


def test_bf16_auto_needs_the_hardwares_own_bf16(monkeypatch) -> None:
    """Issue 18, bug 4: is_bf16_supported() counts emulation, so a pre-Ampere GPU got slow emulated bf16."""
    from distributed.engine import amp_dtype
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    assert amp_dtype("auto", torch.device("cuda", 0)) == torch.float16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert amp_dtype("auto", torch.device("cuda", 0)) == torch.bfloat16
    assert amp_dtype("auto", torch.device("cpu")) is None


def test_cpu_threads_are_split_between_local_ranks(monkeypatch) -> None:
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(16)))
    assert [comms.cpu_threads_per_rank(n) for n in (1, 2, 4, 32)] == [16, 8, 4, 1]


def test_fingerprint_sees_any_change() -> None:
    model = torch.nn.Linear(3, 2)
    before = comms.weights_fingerprint(model)
    assert before == comms.weights_fingerprint(model)
    with torch.no_grad():
        model.bias[0] += 1e-7
    assert before != comms.weights_fingerprint(model)
