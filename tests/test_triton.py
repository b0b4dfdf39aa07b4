"""`python -m export --triton`: a Triton model repository that Triton's own config schema accepts and that
describes the gated ONNX artifact exactly (there is no Triton server here: the config is parsed with
tritonclient's model_config_pb2, the schema tritonserver reads it with)."""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import onnx
import pytest

from conftest import edit_manifest, one_error_line, run, snapshot
from serve_cli.base.manifest import read_manifest, sha256_file

text_format = pytest.importorskip("google.protobuf.text_format")
model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2")

NAME = "mnist_digits"


@pytest.fixture(scope="module")
def triton_export(ddp_run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("triton") / "export"
    proc = run("-m", "export", "--checkpoint", str(ddp_run / "checkpoints" / "best.pt"), "--out-dir", str(out),
               "--triton", "--batch-sizes", "1,64")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert f"triton/{NAME}/" in proc.stdout.splitlines()[-1]
    return out


def config_problems(config_text: str, manifest: dict[str, Any], model_dir: Path) -> list[str]:
    """Every way the config disagrees with the manifest and the ONNX file it serves; ParseError when Triton's
    schema refuses the text itself (an unknown field, a wrong type)."""
    config = text_format.Parse(config_text, model_config_pb2.ModelConfig())
    dtype = model_config_pb2.DataType.Value("TYPE_FP32")
    graph = onnx.load(str(model_dir / "1" / "model.onnx")).graph
    onnx_dims = {v.name: [d.dim_value or d.dim_param for d in v.type.tensor_type.shape.dim]
                 for v in [*graph.input, *graph.output]}
    found = []
    expect = {
        "name": (config.name, model_dir.name),
        "platform": (config.platform, "onnxruntime_onnx"),
        # the largest batch the gate really ran: a size above the parity set's count ran it in one batch
        "max_batch_size": (config.max_batch_size, min(max(manifest["parity"]["batch_sizes"]),
                                                      manifest["parity"]["count"])),
        "a dynamic batch axis in the onnx file": (isinstance(onnx_dims[config.input[0].name][0], str), True),
        "one input, one output": ((len(config.input), len(config.output)), (1, 1)),
        "dynamic_batching": (config.HasField("dynamic_batching"), True),
    }
    for (tensor, spec) in ((config.input[0], manifest["input"]), (config.output[0], manifest["output"])):
        expect[f"{spec['name']} name"] = (tensor.name, spec["name"])
        expect[f"{spec['name']} type"] = (tensor.data_type, dtype)
        expect[f"{spec['name']} dims"] = (list(tensor.dims), spec["shape"][1:])
        expect[f"{spec['name']} dims in the onnx file"] = (list(tensor.dims), onnx_dims.get(tensor.name, [None])[1:])
    labels = model_dir / config.output[0].label_filename
    expect["labels"] = (labels.read_text().splitlines() if labels.is_file() else None, manifest["model"]["classes"])
    for what, (got, want) in expect.items():
        if got != want:
            found.append(f"{what}: {got!r} != {want!r}")
    return found


def test_the_repository_is_what_triton_reads_and_describes_the_gated_model(triton_export: Path) -> None:
    manifest = read_manifest(triton_export)
    model_dir = triton_export / "triton" / NAME
    assert config_problems((model_dir / "config.pbtxt").read_text(), manifest, model_dir) == []
    assert sha256_file(model_dir / "1" / "model.onnx") == manifest["artifacts"]["onnx"]["sha256"]
    assert sorted(manifest["triton"]["files"]) == sorted(
        f"triton/{NAME}/{f}" for f in ("config.pbtxt", "labels.txt", "1/model.onnx"))


@pytest.mark.parametrize("edit,expect", [
    (lambda t: t.replace("dims: [ 10 ]", "dims: [ 11 ]"), "logits dims"),
    (lambda t: t.replace("dims: [ 1, 28, 28 ]", "dims: [ 28, 28 ]"), "images dims"),
    (lambda t: t.replace("max_batch_size: 64", "max_batch_size: 65"), "max_batch_size"),
    (lambda t: t.replace("TYPE_FP32", "TYPE_FP16", 1), "images type"),
    (lambda t: t.replace('name: "logits"', 'name: "scores"'), "logits name"),
    (lambda t: t.replace('label_filename: "labels.txt"', 'label_filename: "classes.txt"'), "labels"),
])
def test_a_config_that_disagrees_is_caught(triton_export: Path, edit, expect: str) -> None:
    model_dir = triton_export / "triton" / NAME
    text = (model_dir / "config.pbtxt").read_text()
    assert edit(text) != text
    problems = config_problems(edit(text), read_manifest(triton_export), model_dir)
    assert any(p.startswith(expect) for p in problems), problems


def test_a_field_triton_does_not_know_is_refused_by_its_schema(triton_export: Path) -> None:
    model_dir = triton_export / "triton" / NAME
    text = (model_dir / "config.pbtxt").read_text()
    with pytest.raises(text_format.ParseError):
        config_problems(text + "max_batch: 8\n", read_manifest(triton_export), model_dir)


def test_verify_checks_the_repository(triton_export: Path, tmp_path: Path) -> None:
    proc = run("-m", "export", "--verify", str(triton_export))
    assert proc.returncode == 0 and f"triton repository ok: {triton_export / 'triton'} (model {NAME}" in proc.stdout
    copy = Path(shutil.copytree(triton_export, tmp_path / "copy"))
    config = copy / "triton" / NAME / "config.pbtxt"
    config.write_text(config.read_text().replace("max_batch_size: 64", "max_batch_size: 4096"))
    proc = run("-m", "export", "--verify", str(copy))
    assert proc.returncode == 1
    one_error_line(proc.stderr, f"{config} does not match its sha256", "re-export with --triton")


def test_a_manifest_naming_triton_files_outside_the_repository_is_refused(triton_export: Path, tmp_path: Path) -> None:
    def outside(m: dict) -> None:
        m["triton"]["files"]["../../elsewhere"] = m["triton"]["files"].pop(f"triton/{NAME}/labels.txt")
    copy = edit_manifest(triton_export, tmp_path / "copy", outside, reseal=True)
    proc = run("-m", "export", "--verify", str(copy))
    assert proc.returncode == 1
    one_error_line(proc.stderr, "Triton files are not all inside the export dir's triton/")


@pytest.mark.parametrize("inside_an_export", [False, True])
def test_a_folder_of_another_model_of_that_name_is_refused(ddp_run, exported_run: Path, tmp_path: Path,
                                                           inside_an_export: bool) -> None:
    """A Triton repository of someone else's is a foreign out dir; inside an export of ours, a model folder of
    that name that the export did not write is refused just the same."""
    out = Path(shutil.copytree(exported_run, tmp_path / "export")) if inside_an_export else tmp_path / "export"
    foreign = out / "triton" / NAME
    (foreign / "1").mkdir(parents=True)
    (foreign / "config.pbtxt").write_text('name: "mnist_digits"\nplatform: "tensorrt_plan"\n')
    (foreign / "1" / "model.plan").write_bytes(b"someone else's engine")
    before = snapshot(out)
    proc = run("-m", "export", "--checkpoint", str(ddp_run / "checkpoints" / "best.pt"), "--out-dir", str(out),
               "--triton", "--batch-sizes", "1")
    assert proc.returncode == 1
    if inside_an_export:
        one_error_line(proc.stderr, f"holds {foreign}, which no export of this tool wrote", "--triton NAME")
    else:
        one_error_line(proc.stderr, f"--out-dir {out} holds files that are not an export of this tool")
    assert snapshot(out) == before


def test_reexporting_without_triton_removes_only_the_files_it_wrote(triton_export: Path, tmp_path: Path) -> None:
    out = Path(shutil.copytree(triton_export, tmp_path / "export"))
    users = out / "triton" / NAME / "2" / "model.onnx"  # a version the user added beside ours
    users.parent.mkdir()
    users.write_bytes(b"the user's own")
    checkpoint = read_manifest(out)["source"]["checkpoint"]
    proc = run("-m", "export", "--checkpoint", checkpoint, "--out-dir", str(out), "--batch-sizes", "1")
    assert proc.returncode == 0, proc.stderr
    assert "triton" not in read_manifest(out)
    left = sorted(str(p.relative_to(out)) for p in (out / "triton").rglob("*"))
    assert left == [f"triton/{NAME}", f"triton/{NAME}/2", f"triton/{NAME}/2/model.onnx"]


def test_a_bad_model_name_is_a_usage_error(ddp_run, tmp_path: Path) -> None:
    proc = run("-m", "export", "--checkpoint", str(ddp_run / "checkpoints" / "best.pt"), "--out-dir",
               str(tmp_path / "x"), "--triton", "../up")
    assert proc.returncode == 2 and "argument --triton: a Triton model name is" in proc.stderr
    assert not (tmp_path / "x").exists()


def test_verify_refuses_labels_that_are_not_the_classes(triton_export: Path, tmp_path: Path) -> None:
    """A tamperer who rewrites labels.txt and reseals the manifest with its new sha256."""
    import hashlib
    rel = f"triton/{NAME}/labels.txt"
    swapped = "".join(f"{c}\n" for c in ["1", "0", *map(str, range(2, 10))]).encode()

    def relabel(m: dict) -> None:
        m["triton"]["files"][rel] = {"bytes": len(swapped), "sha256": hashlib.sha256(swapped).hexdigest()}
    copy = edit_manifest(triton_export, tmp_path / "copy", relabel, reseal=True)
    (copy / rel).unlink()  # a hard link to the original's: replace it, do not write through it
    (copy / rel).write_bytes(swapped)
    proc = run("-m", "export", "--verify", str(copy))
    assert proc.returncode == 1
    one_error_line(proc.stderr, "does not list the model's classes in output order")


def test_a_config_edited_after_export_is_not_overwritten(triton_export: Path, tmp_path: Path) -> None:
    out = Path(shutil.copytree(triton_export, tmp_path / "export"))
    config = out / "triton" / NAME / "config.pbtxt"
    config.write_text(config.read_text() + "instance_group [ { kind: KIND_GPU } ]\n")
    before = snapshot(out)
    checkpoint = read_manifest(out)["source"]["checkpoint"]
    proc = run("-m", "export", "--checkpoint", checkpoint, "--out-dir", str(out), "--triton", "--batch-sizes", "1")
    assert proc.returncode == 1
    one_error_line(proc.stderr, f"{config} was changed after the export that wrote it")
    assert snapshot(out) == before


def test_an_old_manifest_never_makes_the_install_remove_what_is_not_its_own(triton_export: Path,
                                                                             tmp_path: Path) -> None:
    """The previous manifest is read as found (it may be damaged): names that are not an artifact's plain file
    or a file of the Triton layout are never removed, nor is the new manifest."""
    import json
    out = Path(shutil.copytree(triton_export, tmp_path / "export"))
    (out / "notes").mkdir()
    (out / "notes" / "mine.txt").write_text("mine")
    old = json.loads((out / "manifest.json").read_text())
    old["artifacts"]["extra"] = {"file": "manifest.json"}
    old["triton"]["files"]["notes/mine.txt"] = {"bytes": 4, "sha256": "0"}
    (out / "manifest.json").write_text(json.dumps(old))  # no longer sealed: a damaged manifest of ours
    checkpoint = old["source"]["checkpoint"]
    proc = run("-m", "export", "--checkpoint", checkpoint, "--out-dir", str(out), "--batch-sizes", "1")
    assert proc.returncode == 0, proc.stderr
    assert (out / "notes" / "mine.txt").read_text() == "mine" and read_manifest(out)["parity"]["passed"]
