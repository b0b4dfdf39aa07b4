"""Run every runtime on the same images at several batch sizes, compare with eager PyTorch, gate on the result."""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from distributed.data import split_digest, task_of, to_unit
from distributed.datasets import DATASETS, DataError, folder_path, read_mnist
from distributed.folder import FolderError, load_folder
from serve_cli.base.cli import first_line
from serve_cli.base.manifest import FORMATS, INPUT_NAME, probe_images

Runner = Callable[[np.ndarray], np.ndarray]  # float32 [N, 1, 28, 28] -> logits [N, C]


class ParityError(RuntimeError):
    """An artifact does not answer like the eager model."""


def torch_runtime(module: Callable[[torch.Tensor], torch.Tensor]) -> Runner:
    def run(images: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return module(torch.from_numpy(images)).numpy()
    return run


def eager_runtime(model: nn.Module) -> Runner:
    return torch_runtime(model.eval())


def load_torchscript(path: Path) -> Runner:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.jit.*deprecated")
        return torch_runtime(torch.jit.load(str(path), map_location="cpu").eval())


def load_exported_program(path: Path) -> Runner:
    return torch_runtime(torch.export.load(str(path)).module())


def load_onnx(path: Path) -> Runner:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return lambda images: session.run(None, {INPUT_NAME: images})[0]


# serve_cli.base.manifest.FORMATS' loaders for the gate and --verify: path -> images-to-logits
LOADERS: dict[str, Callable[[Path], Runner]] = {
    "torchscript": load_torchscript, "exported_program": load_exported_program, "onnx": load_onnx,
    "onnx_int8": load_onnx}


def load_runtimes(files: dict[str, Path]) -> dict[str, Runner]:
    """A runtime for each artifact file (keyed by artifact kind), under its runtime's name; ParityError when
    one cannot be loaded."""
    runtimes = {}
    for kind, path in files.items():
        try:
            runtimes[FORMATS[kind].runtime] = LOADERS[kind](path)
        except Exception as e:  # each runtime has its own many error types; the user needs the first line
            raise ParityError(f"{path} cannot be loaded by {FORMATS[kind].runtime} ({first_line(e)}): "
                              f"re-export") from None
    return runtimes


def run_batched(runtime: Runner, images: np.ndarray, batch_size: int) -> np.ndarray:
    return np.concatenate([runtime(images[i:i + batch_size]) for i in range(0, len(images), batch_size)])


@dataclass(frozen=True)
class ParitySet:
    images: np.ndarray  # float32 [N, 1, 28, 28] in [0, 1]
    labels: np.ndarray | None  # class labels, when these are a dataset's test images
    described: str  # for the user and the manifest
    digest: str | None = None  # data.split_digest of the test split: equal to the run's when it was scored on it


def random_set(why: str, count: int = 1000) -> ParitySet:
    return ParitySet(probe_images(0, count), None, f"seeded uniform random images ({count}), {why}")


def labelled_set(images: torch.Tensor, labels: torch.Tensor, where: str) -> ParitySet:
    """A dataset's uint8 test images and class labels, with the digest the trainer kept of the same split."""
    return ParitySet(to_unit(images).numpy(), labels.numpy(), f"{where} ({len(images)} images)",
                     split_digest(images, labels))


def parity_set(data_dir: str | None, dataset: str, task: str, classes: list[str]) -> ParitySet:
    """The dataset's test split in [0, 1] with its labels when `data_dir` (the MNIST-format root, or the image
    folder of a folder dataset) holds it; else seeded random images, saying why and how to point at the data."""
    if folder_path(dataset) is not None:
        return folder_set(Path(data_dir) if data_dir else folder_path(dataset), classes)
    folder = DATASETS[dataset].folder
    raw = Path(data_dir) / folder / "raw" if data_dir else None
    if raw is None or not any(raw.glob(DATASETS[dataset].file(False, "images") + "*")):
        return random_set(f"no {folder} in {data_dir} (--data-dir DIR points at the dataset root)")
    try:
        images, digits = read_mnist(data_dir, False, dataset)
    except DataError as e:
        return random_set(f"the test set in {data_dir} cannot be read ({e})")
    labels = task_of(dataset, task).map_labels(digits)
    return labelled_set(images, labels, f"{'MNIST' if dataset == 'mnist' else folder} test set in {data_dir}")


def folder_set(folder: Path, classes: list[str]) -> ParitySet:
    """A folder dataset's test split, decoded as the trainer did; random images when the folder is gone or
    no longer holds the classes the model was trained on."""
    point = "--data-dir FOLDER points at the image folder"
    if not folder.is_dir():
        return random_set(f"image folder {folder} not found ({point})")
    try:
        data = load_folder(folder)
    except FolderError as e:
        return random_set(f"image folder {folder} is not usable ({e}; {point})")
    if list(data.classes) != list(classes):
        return random_set(f"image folder {folder} holds classes {', '.join(data.classes)[:80]}, not the model's "
                          f"({point})")
    return labelled_set(data.test_images, data.test_labels, f"the test split of {folder}")


def compare(reference: np.ndarray, logits: np.ndarray, labels: np.ndarray | None) -> dict[str, Any]:
    return {
        "finite": bool(np.isfinite(logits).all()),
        "max_abs_diff": float(np.abs(reference - logits).max()),
        "top1_agreement": float((reference.argmax(1) == logits.argmax(1)).mean()),
        "accuracy": float((logits.argmax(1) == labels).mean()) if labels is not None else None,
    }


def parity_report(reference: Runner, runtimes: dict[str, Runner], images: np.ndarray,
                  labels: np.ndarray | None, batch_sizes: list[int], atol: float) -> tuple[dict[str, Any], np.ndarray]:
    """Each runtime's worst case over all batch sizes against the reference's logits at the largest one; the
    report, and those logits (what an int8 model is then gated against)."""
    largest = max(batch_sizes)
    ref = run_batched(reference, images, largest)
    results = {name: runtime_result(ref, runtime, images, labels, batch_sizes,
                                    known={largest: ref} if runtime is reference else None)
               for name, runtime in {"eager": reference, **runtimes}.items()}
    report = {"count": len(images), "batch_sizes": batch_sizes, "atol": atol, "runtimes": results}
    return {**report, "passed": not failures(report)}, ref


def runtime_result(ref: np.ndarray, runtime: Runner, images: np.ndarray, labels: np.ndarray | None,
                   batch_sizes: list[int], known: dict[int, np.ndarray] | None = None) -> dict[str, Any]:
    """One runtime against the reference logits `ref`: its worst case over the batch sizes (`known`: its logits
    at some of them, already computed)."""
    known = known or {}
    per_size = [compare(ref, known[bs] if bs in known else run_batched(runtime, images, bs), labels)
                for bs in batch_sizes]
    return {
        "finite": all(r["finite"] for r in per_size),
        "max_abs_diff": max((r["max_abs_diff"] for r in per_size), key=lambda d: np.inf if np.isnan(d) else d),
        "top1_agreement": min(r["top1_agreement"] for r in per_size),
        "accuracy": per_size[-1]["accuracy"],
    }


def failures(report: dict[str, Any]) -> list[str]:
    """Every runtime that is off, in words. NaN never passes: `not diff <= atol` is true for it."""
    return [f"{name}: " + ("NaN or infinite logits" if not r["finite"] else
                           f"max |logit diff| {r['max_abs_diff']:.3g} (atol {report['atol']:g}), "
                           f"top-1 agreement {r['top1_agreement']:.4%}")
            for name, r in report["runtimes"].items()
            if not r["finite"] or not r["max_abs_diff"] <= report["atol"] or r["top1_agreement"] < 1.0]


def format_report(report: dict[str, Any]) -> str:
    lines = [f"{'runtime':<18}{'max |diff|':>12}{'top-1 agree':>14}{'accuracy':>11}"]
    for name, r in report["runtimes"].items():
        acc = f"{r['accuracy']:.2%}" if r["accuracy"] is not None else "-"
        lines.append(f"{name:<18}{r['max_abs_diff']:>12.2e}{r['top1_agreement']:>14.2%}{acc:>11}")
    return "\n".join(lines)
