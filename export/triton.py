"""A Triton Inference Server model repository inside the export: EXPORT/triton/NAME/{config.pbtxt, labels.txt,
1/model.onnx}, which Triton (alone, or as KServe's Triton runtime) loads as it is:

  tritonserver --model-repository=EXPORT/triton

1/model.onnx is the gated ONNX artifact itself (a hard link where the file system allows, else a copy), so what
Triton serves is what passed the parity gate. The config comes from the manifest alone: input and output names,
types and dims without the batch axis, the class names as the output's labels (Triton's classification
extension then answers with them), and as max_batch_size the largest batch size the gate ran.
"""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any

from serve_cli.base.files import atomic_write
from serve_cli.base.manifest import sha256_file

REPOSITORY = "triton"
CONFIG, LABELS, VERSION = "config.pbtxt", "labels.txt", "1"
TRITON_TYPES = {"float32": "TYPE_FP32"}


def default_name(dataset: str, task: str) -> str:
    """A Triton model name from the dataset and task: letters, digits, `_` and `-` only (a folder dataset is
    named by its folder)."""
    base = Path(dataset.split(":", 1)[1]).name if dataset.startswith("folder:") else dataset
    name = re.sub(r"[^A-Za-z0-9_-]+", "_", f"{base}_{task}").strip("_-")[:128]
    return name if name and name[0].isalnum() else f"model_{name}"[:128]


def check_name(name: str) -> str:
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}", name) or name in (".", ".."):
        raise ValueError(f"--triton {name!r}: a Triton model name is 1-128 letters, digits, '_', '-' or '.', "
                         f"starting with a letter or digit")
    return name


def paths(name: str) -> dict[str, str]:
    """The repository's files, relative to the export dir, by role."""
    model = f"{REPOSITORY}/{name}"
    return {"config": f"{model}/{CONFIG}", "labels": f"{model}/{LABELS}", "model": f"{model}/{VERSION}/model.onnx"}


def _tensor(spec: dict[str, Any], extra: str = "") -> str:
    dims = ", ".join(str(d) for d in spec["shape"][1:])  # Triton's dims leave out the batch axis
    return (f"  {{\n    name: \"{spec['name']}\"\n    data_type: {TRITON_TYPES[spec['dtype']]}\n"
            f"    dims: [ {dims} ]\n{extra}  }}")


def config_text(name: str, input_spec: dict[str, Any], output_spec: dict[str, Any], max_batch_size: int) -> str:
    """config.pbtxt in Triton's protobuf text format (ModelConfig, tritonclient's model_config.proto)."""
    labels = f"    label_filename: \"{LABELS}\"\n"
    return (f"name: \"{name}\"\nplatform: \"onnxruntime_onnx\"\nmax_batch_size: {max_batch_size}\n"
            f"input [\n{_tensor(input_spec)}\n]\noutput [\n{_tensor(output_spec, labels)}\n]\n"
            f"dynamic_batching {{ }}\n")


def labels_text(classes: list[str]) -> str:
    """One class name a line, in output order (a name holding a line break would shift every label after it)."""
    if any("\n" in c or "\r" in c for c in classes):
        raise ValueError("a class name holds a line break, which Triton's label file cannot hold")
    return "".join(f"{c}\n" for c in classes)


def write_repository(staging: Path, name: str, onnx_file: Path, input_spec: dict[str, Any],
                     output_spec: dict[str, Any], classes: list[str], max_batch_size: int) -> dict[str, Any]:
    """The repository in the staging dir; its manifest entry (name, max_batch_size, each file's size and sha256)."""
    files = paths(name)
    for rel in files.values():
        (staging / rel).parent.mkdir(parents=True, exist_ok=True)
    config = config_text(name, input_spec, output_spec, max_batch_size)
    atomic_write(staging / files["config"], lambda p: p.write_text(config))
    atomic_write(staging / files["labels"], lambda p: p.write_text(labels_text(classes)))
    try:
        os.link(onnx_file, staging / files["model"])
    except OSError:  # no hard links here (another file system, FAT, some network mounts): the same bytes
        shutil.copyfile(onnx_file, staging / files["model"])
    entries = {rel: {"bytes": (staging / rel).stat().st_size, "sha256": sha256_file(staging / rel)}
               for rel in files.values()}
    return {"name": name, "max_batch_size": max_batch_size, "files": entries}


def problems(directory: Path, manifest: dict[str, Any]) -> list[str]:
    """What is wrong with the export's Triton repository, in words (empty when it is as exported)."""
    entry = manifest["triton"]
    files = paths(entry["name"])
    found = []
    for rel, expected in entry["files"].items():
        path = directory / rel
        if not path.is_file():
            found.append(f"{path} is missing")
        elif path.stat().st_size != expected["bytes"] or sha256_file(path) != expected["sha256"]:
            found.append(f"{path} does not match its sha256 in the manifest")
    if set(entry["files"]) != set(files.values()):
        found.append(f"the manifest's Triton files are not those of model {entry['name']}")
    elif entry["files"][files["model"]]["sha256"] != manifest["artifacts"]["onnx"]["sha256"]:
        found.append(f"{directory / files['model']} is not the gated model.onnx")
    else:
        expected_config = config_text(entry["name"], manifest["input"], manifest["output"], entry["max_batch_size"])
        path = directory / files["config"]
        if path.is_file() and path.read_text() != expected_config:
            found.append(f"{path} is not the config of this manifest's model")
        labels = directory / files["labels"]
        try:
            expected_labels = labels_text(manifest["model"]["classes"])
        except ValueError as e:
            expected_labels = None
            found.append(str(e))
        if labels.is_file() and expected_labels is not None and labels.read_text() != expected_labels:
            found.append(f"{labels} does not list the model's classes in output order")
    return found
