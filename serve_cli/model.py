"""Find and load an exported model: manifest, sha256 check, then a runtime (ONNX Runtime or TorchScript).

Vocabulary: an *artifact* is a file kind in the manifest (onnx, torchscript, exported_program); a
*runtime* is what executes one (onnxruntime runs onnx, torchscript runs torchscript).
Nothing here imports torch unless the TorchScript runtime is asked for.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .base.cli import first_line
from .base.manifest import FORMATS, INPUT_NAME, ManifestError, probe_images, read_manifest, verify_file

MODEL_ENV = "SERVE_CLI_MODEL"
ARTIFACT_OF = {fmt.runtime: kind for kind, fmt in FORMATS.items() if fmt.served}  # runtime -> artifact key
PICKLE_SUFFIXES = {".pt", ".pth", ".ckpt", ".pkl", ".bin"}


class ModelError(RuntimeError):
    """The model directory cannot be used: missing, tampered, or not an export."""


@dataclass(frozen=True)
class Runtime:
    """How to run one verified artifact. Plain data, so each pool worker can build its own session."""
    kind: str  # "onnxruntime" | "torchscript"
    path: Path
    providers: tuple[str, ...] = ("CPUExecutionProvider",)  # ONNX Runtime's, in order of preference
    threads: int | None = None  # intra-op threads; None: the runtime's choice
    reference: tuple[int, np.ndarray | None, float] = (0, None, 0.0)  # probe seed, expected logits, tolerance

    @property
    def on_cpu(self) -> bool:
        return self.providers[0] == "CPUExecutionProvider"

    @property
    def name(self) -> str:
        return "torchscript (cpu)" if self.kind == "torchscript" else f"onnxruntime ({self.providers[0]})"

    def with_threads(self, threads: int | None) -> Runtime:
        return replace(self, threads=threads)

    def build(self) -> tuple[str, Callable[[np.ndarray], np.ndarray]]:
        """(what actually runs, e.g. "onnxruntime (CPUExecutionProvider)"; images -> logits)."""
        try:
            if self.kind == "torchscript":
                name, run = _torchscript(self.path, self.threads)
            else:
                name, run = _onnxruntime(self.path, self.providers, self.threads)
            answers = self._probe(run)
        except Exception as e:  # the runtime's own errors are many and multi-line; the user needs one line
            raise ModelError(f"{self.path} cannot be loaded by {self.kind} ({first_line(e)}): re-export it") from None
        if answers is not None:
            raise ModelError(f"{self.path} {answers}: the export dir was tampered with; re-export it")
        return name, run

    def _probe(self, run: Callable[[np.ndarray], np.ndarray]) -> str | None:
        """Run the manifest's probe images: what is wrong with the answers, or None when they are the recorded
        ones (same class count, logits within the export's parity tolerance)."""
        seed, expected, tolerance = self.reference
        if expected is None:
            return None
        logits = run(probe_images(seed, len(expected)))
        if logits.shape != expected.shape:
            return f"answers {logits.shape[-1]} classes, but the manifest lists {expected.shape[-1]}"
        if not np.abs(logits - expected).max() <= tolerance:
            return "does not give the answers its manifest recorded at export"
        return None


@dataclass(frozen=True)
class LoadedModel:
    runtime: str  # what actually runs, e.g. "onnxruntime (CPUExecutionProvider)"
    run: Callable[[np.ndarray], np.ndarray]  # float32 [N, 1, 28, 28] -> logits [N, C]


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


def resolve_model(directory: Path, runtime: str = "auto",
                  threads: int | None = None) -> tuple[dict[str, Any], Runtime]:
    """The manifest and how to run its checked artifact, without loading it yet."""
    manifest = open_manifest(directory)
    kind = "torchscript" if runtime == "torchscript" else "onnxruntime"
    try:
        path = verify_file(directory, manifest, ARTIFACT_OF[kind])
    except ManifestError as e:
        raise ModelError(str(e)) from None
    providers: tuple[str, ...] = ("CPUExecutionProvider",)
    if runtime == "auto":
        import onnxruntime as ort  # here, not at the top: `serve_cli info` and --runtime torchscript skip it

        if "CUDAExecutionProvider" in ort.get_available_providers():
            providers = ("CUDAExecutionProvider", *providers)
    ref = manifest["reference"]
    # The gate's tolerance; a CUDA provider's kernels differ from the CPU reference by more than that.
    tolerance = float((manifest.get("parity") or {}).get("atol", 1e-4)) * (1 if providers[0].startswith("CPU") else 100)
    reference = (ref["seed"], np.asarray(ref["logits"], dtype=np.float32), tolerance)
    return manifest, Runtime(kind, path, providers, threads, reference)


def load_model(directory: Path, runtime: str = "auto", threads: int | None = None) -> LoadedModel:
    _, recipe = resolve_model(directory, runtime, threads)
    return LoadedModel(*recipe.build())


def _onnxruntime(path: Path, providers: tuple[str, ...], threads: int | None) -> tuple[str, Callable]:
    import onnxruntime as ort  # only the runtime in use is imported (about 0.2 s)

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL  # one small graph: no inter-op parallelism
    options.inter_op_num_threads = 1
    options.intra_op_num_threads = threads or 0  # 0: ORT picks one per physical core
    # Idle ORT threads otherwise spin for the next call and take the cores image decoding needs
    # (measured: a third more CPU time for 10,000 PNGs and 0.15-0.2 s more wall time on 2 cores).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(path), options, providers=list(providers))
    used = session.get_providers()[0]
    return f"onnxruntime ({used})", lambda images: session.run(None, {INPUT_NAME: images})[0]


def _torchscript(path: Path, threads: int | None) -> tuple[str, Callable]:
    import torch  # only this runtime pays for importing torch (about 2 s)

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
