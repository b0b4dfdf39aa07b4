"""The artifact directory's contract: manifest.json's schema, file hashes and their verification.

Imports no torch: serve_cli reads artifacts through this module alone.

manifest.json (format_version 2):
  model      {name, dataset (absent before format 2 had it: mnist), task, classes (output order), num_classes}
  input      {name, dtype, shape (["N", 1, 28, 28]), range, polarity, preprocessing, normalization {mean, std, applied}}
  output     {name, dtype, shape (["N", C]), meaning}
  artifacts  {artifact kind: {file, bytes, sha256, ...}} for onnx, torchscript, exported_program, and onnx_int8
             when it passed its gate (with calibration, quantization)
  source     {checkpoint, sha256, epoch, test_accuracy, val_accuracy, training (the run's flags but paths and
              logging, global_batch_size included, and world_size; absent in manifests written before it)}
  versions   {torch, onnx, onnxruntime, python}
  parity     {dataset, training_test_set, count, batch_sizes, atol, passed,
              runtimes {name: {finite, max_abs_diff, top1_agreement, accuracy}},
              int8 {max_accuracy_drop, min_top1_agreement, passed, why (when not), onnxruntime_int8 (its results)}}
  reference  {seed, count, logits, int8_logits (with onnx_int8)}: eager logits (and the int8 model's) on a seeded
             probe set, for `--verify` without the checkpoint
  triton     {name, max_batch_size, files {path: {bytes, sha256}}}: the Triton model repository in triton/
             (export/triton.py), present only when exported with --triton
  created    ISO 8601 time
  digest     sha256 of the canonical JSON of every other field: an edited manifest (class names, their count,
             a file name) is refused like an edited artifact

Every field that changes an answer is checked on read: the digest, class count = output width, artifact
files named inside the dir. serve_cli also runs the probe images at load and compares with `reference`.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

FORMAT_VERSION = 2
MANIFEST = "manifest.json"
REQUIRED = ("format_version", "model", "input", "output", "artifacts", "reference", "digest")
INPUT_NAME, OUTPUT_NAME = "images", "logits"


@dataclass(frozen=True)
class ArtifactFormat:
    """One kind of artifact an export holds (keyed in FORMATS by its manifest key)."""
    file: str  # its file in the export dir
    runtime: str  # what runs it, in the parity gate and --verify and, where served, in serve_cli
    served: bool  # whether serve_cli --runtime can run it
    # int8: made from the gated onnx artifact, held to an accuracy gate instead of --atol (export/quantize.py),
    # and present only when it passed that gate
    quantized: bool = False


# The one table of artifact formats, in the order they are written and gated. A new format is a row here, its
# writer in export/formats.py's WRITERS, its loader in export/parity.py's LOADERS and, when served, a branch in
# serve_cli/model.py's Runtime.build (export's tests check that the three tables agree).
FORMATS = {
    "torchscript": ArtifactFormat("model.ts", "torchscript", served=True),
    "exported_program": ArtifactFormat("model.pt2", "exported_program", served=False),
    "onnx": ArtifactFormat("model.onnx", "onnxruntime", served=True),
    "onnx_int8": ArtifactFormat("model.int8.onnx", "onnxruntime_int8", served=True, quantized=True),
}
INT8 = next(kind for kind, fmt in FORMATS.items() if fmt.quantized)  # the int8 model's artifact key
# How far an int8 model's probe logits may be from those recorded at export, as a fraction of their largest
# magnitude: another CPU's int8 kernels may round an activation to the next step, which fp32's --atol forbids.
INT8_PROBE_TOLERANCE = 0.02


def probe_reference(manifest: dict[str, Any], kind: str, atol: float) -> tuple[np.ndarray, float]:
    """The probe logits an artifact must give (eager fp32's, or an int8 model's own) and the tolerance."""
    ref = manifest["reference"]
    if FORMATS[kind].quantized:
        recorded = np.asarray(ref["int8_logits"], dtype=np.float32)
        return recorded, INT8_PROBE_TOLERANCE * float(np.abs(recorded).max())
    return np.asarray(ref["logits"], dtype=np.float32), atol



class ManifestError(RuntimeError):
    """The artifact directory is missing, malformed, or its files do not match the manifest."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def file_entry(path: Path, **extra: Any) -> dict[str, Any]:
    return {"file": path.name, "bytes": path.stat().st_size, "sha256": sha256_file(path), **extra}


def digest(manifest: dict[str, Any]) -> str:
    body = {k: v for k, v in manifest.items() if k != "digest"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def seal(manifest: dict[str, Any]) -> dict[str, Any]:
    return {**manifest, "digest": digest(manifest)}


def load_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ManifestError(f"{path} is not valid JSON ({e})") from None


def is_ours(m: Any) -> bool:
    """Whether parsed JSON is a manifest of this tool (any format version), damaged or not."""
    return (isinstance(m, dict) and isinstance(m.get("format_version"), int) and isinstance(m.get("artifacts"), dict)
            and all(k in m for k in ("model", "input", "output")))


def is_plain_name(name: Any) -> bool:
    """A file name that stays inside the export dir: no folders, no `..`, not absolute."""
    return isinstance(name, str) and Path(name).name == name and name not in ("", ".", "..")


def is_inside(name: Any) -> bool:
    """A relative path that stays inside the export dir: no `..`, not absolute (the Triton repository's files)."""
    return (isinstance(name, str) and name not in ("", ".") and not Path(name).is_absolute()
            and ".." not in Path(name).parts)


def read_manifest(directory: str | Path) -> dict[str, Any]:
    directory = Path(directory)
    path = directory / MANIFEST
    if not path.is_file():
        hint = " (a checkpoint? export it first: python -m export --checkpoint FILE)" \
            if directory.is_file() else " (run python -m export first)"
        raise ManifestError(f"no {MANIFEST} in {directory}{hint}")
    manifest = load_json(path)
    if isinstance(manifest, dict) and manifest.get("format_version") not in (None, FORMAT_VERSION):
        raise ManifestError(f"{path} has format_version {manifest['format_version']}, this tool reads "
                            f"{FORMAT_VERSION}: re-export with python -m export")
    missing = [k for k in REQUIRED if k not in manifest] if isinstance(manifest, dict) else list(REQUIRED)
    if missing:
        raise ManifestError(f"{path} lacks {', '.join(missing)}: re-export with python -m export")
    if manifest["digest"] != digest(manifest):
        raise ManifestError(f"{path} was changed after export (its digest does not match its content): "
                            f"re-export with python -m export")
    check_consistent(manifest, path)
    return manifest


def check_consistent(manifest: dict[str, Any], path: Path) -> None:
    """What the digest cannot catch in a manifest built wrongly: classes vs outputs, files outside the dir."""
    model, classes = manifest["model"], manifest["model"].get("classes")
    width = len(classes) if isinstance(classes, list) else -1
    if (width < 1 or model.get("num_classes") != width or manifest["output"].get("shape") != ["N", width]
            or any(len(row) != width for row in manifest["reference"]["logits"])
            or any(len(row) != width for row in manifest["reference"].get("int8_logits", []))
            or any(fmt.quantized and kind in manifest["artifacts"] and "int8_logits" not in manifest["reference"]
                   for kind, fmt in FORMATS.items())):
        raise ManifestError(f"{path}: the class list, num_classes, the output shape and the reference logits "
                            f"disagree: re-export with python -m export")
    for kind, entry in manifest["artifacts"].items():
        name = entry.get("file") if isinstance(entry, dict) else None
        if not is_plain_name(name):
            raise ManifestError(f"{path}: artifact {kind} names {name!r}, which is not a file inside the export dir")
    triton = manifest.get("triton", {})
    names = triton.get("files", {}) if isinstance(triton, dict) else None
    if not isinstance(names, dict) or not all(is_inside(n) and n.startswith("triton/") for n in names):
        raise ManifestError(f"{path}: its Triton files are not all inside the export dir's triton/")


def artifact_path(directory: str | Path, manifest: dict[str, Any], kind: str) -> Path:
    try:
        return Path(directory) / manifest["artifacts"][kind]["file"]
    except KeyError:
        raise ManifestError(f"{Path(directory) / MANIFEST} lists no {kind} artifact "
                            f"(it has: {', '.join(manifest['artifacts'])})") from None


def verify_file(directory: str | Path, manifest: dict[str, Any], kind: str) -> Path:
    """The artifact's path once its size and sha256 match the manifest; ManifestError naming it otherwise."""
    path = artifact_path(directory, manifest, kind)
    entry = manifest["artifacts"][kind]
    if not path.is_file():
        raise ManifestError(f"{path} is listed in the manifest but missing")
    if path.stat().st_size != entry["bytes"] or sha256_file(path) != entry["sha256"]:
        raise ManifestError(f"{path} does not match its sha256 in the manifest: the file was changed or "
                            f"damaged; re-export it")
    return path


def probe_images(seed: int, count: int) -> np.ndarray:
    """Seeded float32 [count, 1, 28, 28] images in [0, 1]: the same on any machine, without torch."""
    return np.random.default_rng(seed).random((count, 1, 28, 28), dtype=np.float32)
