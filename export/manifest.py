"""The artifact directory's contract: manifest.json's schema, file hashes and their verification.

Imports no torch: serve_cli reads artifacts through this module alone.

manifest.json (format_version 1):
  model      {name, task, classes (output order), num_classes}
  input      {name, dtype, shape (["N", 1, 28, 28]), range, polarity, normalization {mean, std, applied}}
  output     {name, dtype, shape (["N", C])}
  artifacts  {backend: {file, bytes, sha256, ...}} for onnx, torchscript, exported_program
  source     {checkpoint, sha256, epoch, test_accuracy, val_accuracy}
  versions   {torch, onnx, onnxruntime, python}
  parity     {dataset, count, batch_sizes, atol, passed, backends {name: {max_abs_diff, top1_agreement, accuracy}}}
  reference  {seed, count, logits}: eager logits on a seeded probe set, for `--verify` without the checkpoint
  created    ISO 8601 time
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
REQUIRED = ("format_version", "model", "input", "output", "artifacts")
INPUT_NAME, OUTPUT_NAME = "images", "logits"


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


def read_manifest(directory: str | Path) -> dict[str, Any]:
    directory = Path(directory)
    path = directory / MANIFEST
    if not path.is_file():
        hint = " (a checkpoint? export it first: python -m export --checkpoint FILE)" \
            if directory.is_file() else " (run python -m export first)"
        raise ManifestError(f"no {MANIFEST} in {directory}{hint}")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ManifestError(f"{path} is not valid JSON ({e})") from None
    missing = [k for k in REQUIRED if k not in manifest] if isinstance(manifest, dict) else list(REQUIRED)
    if missing:
        raise ManifestError(f"{path} lacks {', '.join(missing)}: re-export with python -m export")
    if manifest["format_version"] != FORMAT_VERSION:
        raise ManifestError(f"{path} has format_version {manifest['format_version']}, this tool reads "
                            f"{FORMAT_VERSION}: re-export with this version")
    return manifest


def artifact_path(directory: str | Path, manifest: dict[str, Any], backend: str) -> Path:
    try:
        return Path(directory) / manifest["artifacts"][backend]["file"]
    except KeyError:
        raise ManifestError(f"{Path(directory) / MANIFEST} lists no {backend} artifact "
                            f"(it has: {', '.join(manifest['artifacts'])})") from None


def verify_file(directory: str | Path, manifest: dict[str, Any], backend: str) -> Path:
    """The artifact's path once its size and sha256 match the manifest; ManifestError naming it otherwise."""
    path = artifact_path(directory, manifest, backend)
    entry = manifest["artifacts"][backend]
    if not path.is_file():
        raise ManifestError(f"{path} is listed in the manifest but missing")
    if path.stat().st_size != entry["bytes"] or sha256_file(path) != entry["sha256"]:
        raise ManifestError(f"{path} does not match its sha256 in the manifest: the file was changed or "
                            f"damaged; re-export it")
    return path


def probe_images(seed: int, count: int) -> np.ndarray:
    """Seeded float32 [count, 1, 28, 28] images in [0, 1]: the same on any machine, without torch."""
    return np.random.default_rng(seed).random((count, 1, 28, 28), dtype=np.float32)
