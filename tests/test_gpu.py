"""The CUDA path: NCCL under torchrun, bf16/fp16 autocast with the scaler through a resume, torch.compile,
CUDA checkpoints served on the CPU, ONNX Runtime's CUDA provider, and the "more ranks than GPUs" error;
no host sync between agreement checks; a SIGTERM resume bit for bit. The fp16 overflow test is in test_train.py
(CPU and CUDA).

Every test here is marked gpu and skipped without CUDA (CI has none); they are written to run unchanged
the first time a GPU is there: `pytest -m gpu`.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT, preempted_after_epoch, torchrun

pytestmark = pytest.mark.gpu


def train_args(data: Path, run_dir: Path, *extra: str) -> list[str]:
    return ["--data-dir", str(data), "--run-dir", str(run_dir), "--val-size", "64", "--epochs", "2",
            "--device", "cuda", *extra]


def run(cmd: list[str], **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env={**os.environ, **env})


def metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


@pytest.mark.parametrize("model", ["fastnet", "recordnet"])
def test_one_gpu_torchrun_nccl(model: str, synthetic_data, tmp_path: Path) -> None:
    """One rank under torchrun is still DDP (device_ids, NCCL all-reduces, rank 0's BatchNorm buffers broadcast
    for recordnet, the exact evaluation's all-reduce and the gathered probabilities on CUDA tensors)."""
    proc = run(torchrun(1, *train_args(synthetic_data, tmp_path, "--model", model)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = metrics(tmp_path)
    assert m["device"] == "cuda" and m["world_size"] == 1 and m["test_accuracy"] > 0.5
    # --amp auto on CUDA: bf16 where the hardware has it
    assert m["amp"] == ("bfloat16" if torch.cuda.is_bf16_supported(including_emulation=False) else "float16")


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_amp_runs_and_resumes(amp: str, synthetic_data, tmp_path: Path) -> None:
    from distributed import checkpoint, comms
    from distributed.config import parse_args
    from distributed.timing import Phases
    from distributed.train import Preempted, StopRequest, Trainer, run

    cfg = parse_args(train_args(synthetic_data, tmp_path, "--amp", amp))
    env = comms.setup("cuda")
    with preempted_after_epoch(1), pytest.raises(Preempted):
        run(cfg, env)
    saved = checkpoint.load(tmp_path / "checkpoints" / "last.pt")
    assert saved["amp"] == {"bf16": "bfloat16", "fp16": "float16"}[amp]
    trainer = Trainer.build(cfg, env, StopRequest(), Phases())  # what a restarted worker builds
    try:
        assert trainer.parts.scaler.is_enabled() == (amp == "fp16")  # bf16 needs no loss scaling
        m = trainer.fit()
    finally:
        trainer.close()
    assert m["epochs"] == 2 and m["test_accuracy"] > 0.5


def test_compile_compiles_and_checkpoints_plain_weights(synthetic_data, tmp_path: Path) -> None:
    """The compiled module trains (dynamo captured a graph), and the checkpoint holds the plain module's keys."""
    from torch._dynamo.eval_frame import OptimizedModule
    from torch._dynamo.utils import counters
    from distributed import checkpoint, comms
    from distributed.config import parse_args
    from distributed.models import build_model
    from distributed.timing import Phases
    from distributed.train import StopRequest, Trainer
    counters.clear()
    cfg = parse_args(train_args(synthetic_data, tmp_path, "--compile", "--epochs", "1"))
    trainer = Trainer.build(cfg, comms.setup("cuda"), StopRequest(), Phases())
    try:
        assert isinstance(trainer.parts.net, OptimizedModule)
        m = trainer.fit()
    finally:
        trainer.close()
    assert counters["stats"]["unique_graphs"] >= 1 and m["test_accuracy"] > 0.5
    weights = checkpoint.load(tmp_path / "checkpoints" / "last.pt")["model"]
    assert set(weights) == set(build_model(cfg.model, 10).state_dict())


@pytest.mark.parametrize("amp", ["bf16", "off", "fp16"])
def test_no_host_sync_between_two_agreement_checks(amp: str, synthetic_data, tmp_path: Path) -> None:
    """The steps between two stop/finite checks never wait for the GPU (fp16: fused optimisers take the
    scaler's inf check as a tensor)."""
    from distributed import comms
    from distributed.config import parse_args
    from distributed.timing import Phases
    from distributed.train import STOP_CHECK_EVERY, StopRequest, Trainer
    cfg = parse_args(train_args(synthetic_data, tmp_path, "--amp", amp, "--epochs", "1", "--batch-size", "16",
                                "--augment"))
    trainer = Trainer.build(cfg, comms.setup("cuda"), StopRequest(), Phases())
    try:
        order = trainer.parts.plan.order(0, trainer.env.device)
        total = trainer.step(order, 0)[0]  # the first step initialises cuBLAS/cuDNN and the optimiser state
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for k in range(1, STOP_CHECK_EVERY):
                total = total + trainer.step(order, k)[0]
        finally:
            torch.cuda.set_sync_debug_mode(0)
        assert torch.isfinite(total).item()
    finally:
        trainer.close()


def test_sigterm_mid_epoch_and_resume_on_cuda_is_bit_identical(synthetic_data, tmp_path: Path) -> None:
    """The CUDA RNG (augmentation draws on the device) comes back with the checkpoint."""
    import test_train
    test_train.stop_mid_epoch_then_resume(synthetic_data, tmp_path, "cuda")


def test_cuda_run_exported_and_verified_on_the_cpu(synthetic_data, tmp_path: Path) -> None:
    proc = run(torchrun(1, *train_args(synthetic_data, tmp_path / "run")))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert torch.load(tmp_path / "run" / "checkpoints" / "best.pt", weights_only=True)["model"]["0.weight"].is_cuda
    cpu_only = {"CUDA_VISIBLE_DEVICES": ""}
    proc = run([sys.executable, "-m", "export", "--run-dir", str(tmp_path / "run"), "--batch-sizes", "1,64"],
               **cpu_only)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = run([sys.executable, "-m", "export", "--verify", str(tmp_path / "run" / "export")], **cpu_only)
    assert proc.returncode == 0 and "verified" in proc.stdout, proc.stderr[-3000:]


def test_serve_cli_on_the_onnxruntime_cuda_provider(synthetic_data, tmp_path: Path) -> None:
    ort = pytest.importorskip("onnxruntime")
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("onnxruntime here has no CUDA provider (pip install onnxruntime-gpu)")
    import numpy as np
    from PIL import Image
    proc = run(torchrun(1, *train_args(synthetic_data, tmp_path / "run")))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert run([sys.executable, "-m", "export", "--run-dir", str(tmp_path / "run")]).returncode == 0
    images = tmp_path / "images"
    images.mkdir()
    for i in range(4):
        Image.fromarray(np.full((28, 28), 40 * i, dtype=np.uint8)).save(images / f"{i}.png")
    proc = run([sys.executable, "-m", "serve_cli", "predict", str(images), "--model", str(tmp_path / "run" / "export"),
                "--runtime", "auto"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    # the summary names the provider the session really uses (ONNX Runtime's fallback warning names CUDA too)
    assert "[onnxruntime (CUDAExecutionProvider)" in proc.stderr, proc.stderr[-3000:]


def test_more_ranks_than_gpus_is_one_line(synthetic_data, tmp_path: Path) -> None:
    proc = run(torchrun(torch.cuda.device_count() + 1, *train_args(synthetic_data, tmp_path)))
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors and f"only {torch.cuda.device_count()} GPU(s) visible" in errors[0]
    assert "LaunchError" not in proc.stderr  # no worker traceback: the exception class would be in it


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_step_metrics_on_cuda(amp: str, synthetic_data, tmp_path: Path) -> None:
    """CUDA's peak allocated and reserved memory per window, the MFU from the datasheet table (a GPU the table
    knows) or FLOP/s alone, and fp16's loss scale."""
    from distributed.metrics import device_peak_flops
    from distributed.train import main
    assert main(train_args(synthetic_data, tmp_path, "--amp", amp, "--log-every", "2")) == 0
    history = metrics(tmp_path)["history"]
    for record in history:
        summary = record["steps_logged"]
        assert 0 < summary["memory_gib"] <= summary["memory_reserved_gib"] < torch.cuda.get_device_properties(
            0).total_memory / 2 ** 30
        assert summary["flops_per_second"] > 0 and summary["grad_norm"] > 0
        known = device_peak_flops(torch.device("cuda"), {"bf16": torch.bfloat16, "fp16": torch.float16}[amp])
        assert ("mfu" in summary) == (known is not None)
        if known:
            assert 0 < summary["mfu"] <= 1
        assert ("loss_scale" in summary) == (amp == "fp16")
