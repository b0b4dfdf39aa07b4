"""Find and load an exported model: manifest, sha256 check, then an ONNX Runtime or TorchScript backend.

Nothing here imports torch unless the TorchScript backend is asked for.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from export.manifest import INPUT_NAME, ManifestError, read_manifest, verify_file

MODEL_ENV = "SERVE_CLI_MODEL"
PICKLE_SUFFIXES = {".pt", ".pth", ".ckpt", ".pkl", ".bin"}


class ModelError(RuntimeError):
    """The model directory cannot be used: missing, tampered, or not an export."""


@dataclass(frozen=True)
class LoadedModel:
    directory: Path
    manifest: dict[str, Any]
    backend: str  # what actually runs, e.g. "onnxruntime (CPUExecutionProvider)"
    run: Callable[[np.ndarray], np.ndarray]  # float32 [N, 1, 28, 28] -> logits [N, C]

    @property
    def classes(self) -> list[str]:
        return self.manifest["model"]["classes"]


def default_model_dir(runs: Path = Path("runs")) -> Path:
    """$SERVE_CLI_MODEL, else the most recently exported runs/*/export."""
    if os.environ.get(MODEL_ENV):
        return Path(os.environ[MODEL_ENV])
    exports = sorted(runs.glob("*/export/manifest.json"), key=lambda p: p.stat().st_mtime)
    if not exports:
        raise ModelError(f"no --model given, ${MODEL_ENV} unset and no export under {runs}/*/export: "
                         f"pass --model DIR (made by python -m export)")
    return exports[-1].parent


def open_manifest(directory: Path) -> dict[str, Any]:
    if directory.is_file() and directory.suffix in PICKLE_SUFFIXES:
        raise ModelError(f"{directory} is a training checkpoint, which serve_cli never unpickles: export it "
                         f"with python -m export --checkpoint {directory} --out-dir DIR, then pass --model DIR")
    if not directory.exists():
        raise ModelError(f"model dir {directory} does not exist")
    try:
        return read_manifest(directory)
    except ManifestError as e:
        raise ModelError(str(e)) from None


def load_model(directory: Path, backend: str = "auto", threads: int | None = None) -> LoadedModel:
    manifest = open_manifest(directory)
    kind = "torchscript" if backend == "torchscript" else "onnx"
    try:
        path = verify_file(directory, manifest, kind)
    except ManifestError as e:
        raise ModelError(str(e)) from None
    if kind == "torchscript":
        name, run = _torchscript(path, threads)
    else:
        name, run = _onnxruntime(path, prefer_cuda=backend == "auto", threads=threads)
    return LoadedModel(directory, manifest, name, run)


def _onnxruntime(path: Path, prefer_cuda: bool, threads: int | None) -> tuple[str, Callable]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL  # one small graph: no inter-op parallelism
    options.inter_op_num_threads = 1
    options.intra_op_num_threads = threads or 0  # 0: ORT picks one per physical core
    providers = ["CPUExecutionProvider"]
    if prefer_cuda and "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    session = ort.InferenceSession(str(path), options, providers=providers)
    used = session.get_providers()[0]
    return f"onnxruntime ({used})", lambda images: session.run(None, {INPUT_NAME: images})[0]


def _torchscript(path: Path, threads: int | None) -> tuple[str, Callable]:
    import warnings

    import torch  # only this backend pays for importing torch

    if threads:
        torch.set_num_threads(threads)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module = torch.jit.load(str(path), map_location="cpu").eval()

    def run(images: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return module(torch.from_numpy(images)).numpy()
    return "torchscript (cpu)", run


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)
