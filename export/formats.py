"""Writers for each artifact format; every file lands atomically (temp file, then os.replace).

Each format is serialised in memory first and written by Python: torch's C++ file writers abort the whole
process when a write fails (seen with torch 2.14 on a full disk), where Python raises an OSError we report.
"""
from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import Any, Callable

import onnx
import torch
from torch import nn

from serve_cli.base.files import atomic_write
from serve_cli.base.manifest import INPUT_NAME, OUTPUT_NAME

MAX_BATCH = 1 << 16  # the artifacts' batch axis, and so the largest --batch-sizes the gate can run


def example_input(batch: int = 2) -> torch.Tensor:
    return torch.rand(batch, 1, 28, 28)


def _batch_dim() -> torch.export.Dim:
    return torch.export.Dim("batch", min=1, max=MAX_BATCH)


def write_torchscript(model: nn.Module, path: Path, opset: int) -> dict[str, Any]:
    """torch.jit.script, or trace where scripting fails (said on stdout). The manifest notes the method used."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.jit.*deprecated")
        try:
            module, method = torch.jit.script(model), "script"
        except Exception as e:  # scripting rejects some Python; tracing records one path through it
            print(f"torchscript: scripting failed ({type(e).__name__}); traced instead")
            module, method = torch.jit.trace(model, example_input()), "trace"
        buffer = io.BytesIO()
        torch.jit.save(module, buffer)
    atomic_write(path, lambda p: p.write_bytes(buffer.getvalue()))
    return {"method": method}


def write_exported_program(model: nn.Module, path: Path, opset: int) -> dict[str, Any]:
    program = torch.export.export(model, (example_input(),), dynamic_shapes=({0: _batch_dim()},))
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    atomic_write(path, lambda p: p.write_bytes(buffer.getvalue()))
    return {}


def write_onnx(model: nn.Module, path: Path, opset: int) -> dict[str, Any]:
    """One self-contained .onnx file: the weights are kept inline, not in a side .data file."""
    program = torch.onnx.export(model, (example_input(),), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                                dynamic_shapes=({0: _batch_dim()},), opset_version=opset, dynamo=True,
                                external_data=False, verbose=False)
    proto = program.model_proto
    onnx.checker.check_model(proto, full_check=True)
    atomic_write(path, lambda p: p.write_bytes(proto.SerializeToString()))
    return {"opset": opset}


# serve_cli.base.manifest.FORMATS' writers: (model, path, opset) -> what the manifest notes of the file
WRITERS: dict[str, Callable[[nn.Module, Path, int], dict[str, Any]]] = {
    "torchscript": write_torchscript, "exported_program": write_exported_program, "onnx": write_onnx}
