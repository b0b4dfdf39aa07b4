"""Find and load an exported model: manifest, sha256 check, then a runtime (ONNX Runtime or TorchScript).

Vocabulary: an *artifact* is a file kind in the manifest (onnx, torchscript, exported_program); a
*runtime* is what executes one (onnxruntime runs onnx, torchscript runs torchscript).
Nothing here imports torch unless the TorchScript runtime is asked for.
"""
from __future__ import annotations

import os
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .base.cli import first_line
from .base.manifest import (FORMATS, INPUT_NAME, INT8, ManifestError, probe_images, probe_reference, read_manifest,
                            verify_file)

MODEL_ENV = "SERVE_CLI_MODEL"
# runtime -> artifact key, for --runtime; the int8 model is --precision's (it runs on ONNX Runtime's CPU provider)
ARTIFACT_OF = {fmt.runtime: kind for kind, fmt in FORMATS.items() if fmt.served and not fmt.quantized}
PRECISIONS = ("auto", "fp32", "int8")
# --precision auto takes int8 only when it runs at least this much faster than fp32 here, measured at start-up:
# on the 2-core test machines (AVX-512 VNNI) ONNX Runtime's int8 ran this small network at about half fp32's speed.
AUTO_INT8_SPEEDUP = 1.2
PICKLE_SUFFIXES = {".pt", ".pth", ".ckpt", ".pkl", ".bin"}


class ModelError(RuntimeError):
    """The model directory cannot be used: missing, tampered, or not an export."""


@dataclass(frozen=True)
class Runtime:
    """How to run one verified artifact. Plain data, so each pool worker can build its own session."""
    kind: str  # "onnxruntime" | "torchscript"
    path: Path
    precision: str = "fp32"  # "fp32" | "int8" (model.int8.onnx, on ONNX Runtime)
    providers: tuple[str, ...] = ("CPUExecutionProvider",)  # ONNX Runtime's, in order of preference
    threads: int | None = None  # intra-op threads; None: the runtime's choice
    reference: tuple[int, np.ndarray | None, float] = (0, None, 0.0)  # probe seed, expected logits, tolerance
    note: str = ""  # why this precision, when --precision auto chose it

    @property
    def on_cpu(self) -> bool:
        return self.providers[0] == "CPUExecutionProvider"

    @property
    def name(self) -> str:
        int8 = " int8" if self.precision == "int8" else ""
        return "torchscript (cpu)" if self.kind == "torchscript" else f"onnxruntime{int8} ({self.providers[0]})"

    def with_threads(self, threads: int | None) -> Runtime:
        return replace(self, threads=threads)

    def build(self) -> tuple[str, Callable[[np.ndarray], np.ndarray]]:
        """(what actually runs, e.g. "onnxruntime (CPUExecutionProvider)"; images -> logits)."""
        try:
            if self.kind == "torchscript":
                name, run = _torchscript(self.path, self.threads)
            else:
                name, run = _onnxruntime(self.path, self.providers, self.threads)
                name = name.replace("onnxruntime", "onnxruntime int8", 1) if self.precision == "int8" else name
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


def resolve_model(directory: Path, runtime: str = "auto", threads: int | None = None,
                  precision: str = "fp32") -> tuple[dict[str, Any], Runtime]:
    """The manifest and how to run its checked artifact, without loading it yet (but for --precision auto, which
    times both models here)."""
    manifest = open_manifest(directory)
    kind = "torchscript" if runtime == "torchscript" else "onnxruntime"
    has_int8 = INT8 in manifest["artifacts"]
    if precision == "int8" and not has_int8:
        raise ModelError(no_int8(directory, manifest))
    providers: tuple[str, ...] = ("CPUExecutionProvider",)
    if runtime == "auto" and precision != "int8" and cuda_build():
        providers = ("CUDAExecutionProvider", *providers)
    atol = float((manifest.get("parity") or {}).get("atol", 1e-4))
    fp32 = checked(directory, manifest, kind, ARTIFACT_OF[kind], providers, threads, atol)
    if precision == "fp32" or kind == "torchscript" or (precision == "auto" and (not has_int8 or not fp32.on_cpu)):
        return manifest, fp32
    int8 = checked(directory, manifest, "onnxruntime", INT8, providers, threads, atol)
    if precision == "int8":
        return manifest, int8
    speedup = timed(fp32) / timed(int8)
    if speedup >= AUTO_INT8_SPEEDUP:
        return manifest, replace(int8, note=f"--precision auto: int8 ran {speedup:.1f}x as fast as fp32 here")
    return manifest, replace(fp32, note=f"--precision auto: int8 ran {speedup:.2f}x as fast as fp32 here, so fp32")


def cuda_build() -> bool:
    """Whether the installed ONNX Runtime has its CUDA provider, from its files: importing onnxruntime to ask
    (get_available_providers) costs 0.08 s here before the workers may start, and each imports it anyway."""
    import importlib.util

    spec = importlib.util.find_spec("onnxruntime")
    folders = spec.submodule_search_locations if spec else None
    return any(any((Path(folder) / "capi").glob("*onnxruntime_providers_cuda*")) for folder in folders or ())


def checked(directory: Path, manifest: dict[str, Any], kind: str, artifact: str, providers: tuple[str, ...],
            threads: int | None, atol: float) -> Runtime:
    try:
        path = verify_file(directory, manifest, artifact)
    except ManifestError as e:
        raise ModelError(str(e)) from None
    expected, tolerance = probe_reference(manifest, artifact, atol)
    # The gate's tolerance; a CUDA provider's kernels differ from the CPU reference by more than that.
    tolerance *= 1 if providers[0].startswith("CPU") else 100
    precision = "int8" if FORMATS[artifact].quantized else "fp32"
    return Runtime(kind, path, precision, providers, threads, (manifest["reference"]["seed"], expected, tolerance))


def timed(runtime: Runtime, batch: int = 256, repeats: int = 3) -> float:
    """Seconds per batch of one thread's model copy (as each CPU worker runs it), the best of a few calls."""
    _, run = runtime.with_threads(1).build()
    images = probe_images(1, batch)
    run(images)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run(images)
        best = min(best, time.perf_counter() - start)
    return best


def no_int8(directory: Path, manifest: dict[str, Any]) -> str:
    why = ((manifest.get("parity") or {}).get("int8") or {}).get("why")
    reason = f"its int8 model failed its gate at export ({why})" if why else "it was exported without an int8 model"
    return (f"--precision int8: {directory} has no {FORMATS[INT8].file}: {reason}; export again with python -m "
            f"export (int8 is kept when it is as accurate as fp32), or use --precision fp32")


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
