"""python -m export: every registry model through all four runtimes, the parity gate, --verify, bad input."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from conftest import resave
from distributed import checkpoint
from distributed.data import TASKS
from distributed.models import build_model
from export.__main__ import main
from serve_cli.base.manifest import read_manifest, seal, sha256_file

RUNTIMES = {"eager", "torchscript", "exported_program", "onnxruntime"}


def make_checkpoint(path: Path, model: str, task: str, data_dir: Path | None, device: str = "cpu") -> Path:
    torch.manual_seed(0)
    net = build_model(model, TASKS[task].num_classes).to(device)
    checkpoint.save(path, {"model": net.state_dict(), "run": {"epoch": 1}, "classes": list(TASKS[task].classes),
                           "config": {"model": model, "task": task, "data_dir": str(data_dir) if data_dir else None},
                           "metrics": {"test_accuracy": 0.5}})
    return path


# One model of each kind (MLP, plain conv, conv + dropout, BatchNorm) and one binary head: the other
# registry entries are the same layer types in other sizes (test_models checks that each one builds and runs).
KINDS = [("mlp", "digits"), ("fastnet", "digits"), ("slimnet", "binary"), ("dropcnn", "digits"), ("recordnet", "digits"),
         ("samnet", "binary")]


@pytest.mark.parametrize("model, task", KINDS)
def test_every_model_kind_exports_and_passes_the_gate(model: str, task: str, synthetic_data, tmp_path: Path) -> None:
    ckpt = make_checkpoint(tmp_path / "m.pt", model, task, synthetic_data)
    out = tmp_path / "export"
    assert main(["--checkpoint", str(ckpt), "--out-dir", str(out), "--batch-sizes", "1,7,64"]) == 0
    manifest = read_manifest(out)
    parity = manifest["parity"]
    assert parity["passed"] and parity["batch_sizes"] == [1, 7, 64] and parity["count"] == 200
    assert set(parity["runtimes"]) == RUNTIMES
    for result in parity["runtimes"].values():
        assert result["max_abs_diff"] <= 1e-4 and result["top1_agreement"] == 1.0
    assert manifest["model"] == {"name": model, "dataset": "mnist", "task": task,
                                 "classes": list(TASKS[task].classes), "num_classes": TASKS[task].num_classes}
    # a checkpoint from before --dataset (no "normalization"): MNIST's statistics are baked in
    assert manifest["input"]["normalization"] == {"mean": 0.1307, "std": 0.3081, "applied": "inside the model"}
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "model.onnx", "model.pt2", "model.ts"]
    assert manifest["artifacts"]["torchscript"]["method"] == "script"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left behind


@pytest.fixture(scope="module")
def exported(exported_run: Path) -> Path:
    return exported_run


def test_torchrun_checkpoint_exports_end_to_end(exported: Path, ddp_run: Path) -> None:
    manifest = read_manifest(exported)
    best = ddp_run / "checkpoints" / "best.pt"
    assert manifest["source"]["sha256"] == sha256_file(best)
    assert manifest["source"]["epoch"] == checkpoint.load(best)["run"]["epoch"]
    training = manifest["source"]["training"]  # how the weights were made: 2 ranks x 64 per optimiser step
    assert (training["global_batch_size"], training["batch_size"], training["world_size"]) == (128, 64, 2)
    assert training["model"] == "slimnet" and "run_dir" not in training and "data_dir" not in training
    assert manifest["input"]["shape"] == ["N", 1, 28, 28] and manifest["output"]["shape"] == ["N", 10]
    assert manifest["input"]["normalization"]["applied"] == "inside the model"
    assert {"torch", "onnx", "onnxruntime"} <= manifest["versions"].keys()
    assert manifest["artifacts"]["onnx"]["opset"] >= 17
    accuracies = {r["accuracy"] for r in manifest["parity"]["runtimes"].values()}
    assert len(accuracies) == 1 and accuracies.pop() > 0.5  # synthetic labels: real, equal accuracy everywhere


def test_onnx_model_is_one_file_with_a_dynamic_batch(exported: Path) -> None:
    import onnxruntime as ort
    model = onnx.load(str(exported / "model.onnx"))
    onnx.checker.check_model(model)
    session = ort.InferenceSession(str(exported / "model.onnx"), providers=["CPUExecutionProvider"])
    for n in (1, 3, 129):
        assert session.run(None, {"images": np.zeros((n, 1, 28, 28), np.float32)})[0].shape == (n, 10)


def test_verify_passes_on_an_intact_export(exported: Path, capsys) -> None:
    assert main(["--verify", str(exported)]) == 0
    out = capsys.readouterr().out
    assert "sha256 ok" in out and "reference logits ok" in out and "verified" in out


def test_verify_catches_a_sha_mismatch(exported: Path, tmp_path: Path, capsys) -> None:
    broken = Path(shutil.copytree(exported, tmp_path / "e"))
    manifest = json.loads((broken / "manifest.json").read_text())
    manifest["artifacts"]["torchscript"]["sha256"] = "0" * 64
    (broken / "manifest.json").write_text(json.dumps(seal(manifest)))  # a tamperer who re-seals
    assert main(["--verify", str(broken)]) == 1
    assert "model.ts does not match its sha256" in capsys.readouterr().err


def test_verify_catches_a_perturbed_onnx_weight(exported: Path, tmp_path: Path, capsys) -> None:
    """Even with the manifest's hash rewritten to match, the changed answers are caught."""
    broken = Path(shutil.copytree(exported, tmp_path / "e"))
    model = onnx.load(str(broken / "model.onnx"))
    weight = max(model.graph.initializer, key=lambda t: np.prod(t.dims))
    values = onnx.numpy_helper.to_array(weight).copy()
    values.flat[0] += 0.5
    weight.CopyFrom(onnx.numpy_helper.from_array(values, weight.name))
    onnx.save(model, str(broken / "model.onnx"))
    manifest = json.loads((broken / "manifest.json").read_text())
    manifest["artifacts"]["onnx"].update(sha256=sha256_file(broken / "model.onnx"),
                                         bytes=(broken / "model.onnx").stat().st_size)
    (broken / "manifest.json").write_text(json.dumps(seal(manifest)))
    assert main(["--verify", str(broken)]) == 1
    err = capsys.readouterr().err
    assert "onnxruntime: max |logit diff|" in err and "torchscript" not in err


def test_failed_gate_leaves_nothing(synthetic_data, tmp_path: Path, capsys) -> None:
    ckpt = make_checkpoint(tmp_path / "m.pt", "fastnet", "digits", synthetic_data)
    out = tmp_path / "export"
    assert main(["--checkpoint", str(ckpt), "--out-dir", str(out), "--atol", "0", "--batch-sizes", "1,64"]) == 1
    err = capsys.readouterr().err
    assert "parity gate failed, nothing exported" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt"]  # no out dir, no staging


def test_reexport_replaces_a_previous_export(synthetic_data, tmp_path: Path) -> None:
    out = tmp_path / "export"
    for model in ("mlp", "samnet"):
        ckpt = make_checkpoint(tmp_path / f"{model}.pt", model, "binary", synthetic_data)
        assert main(["--checkpoint", str(ckpt), "--out-dir", str(out), "--batch-sizes", "1,64"]) == 0
    assert read_manifest(out)["model"]["name"] == "samnet"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export", "mlp.pt", "samnet.pt"]


def test_refuses_to_overwrite_a_folder_that_is_not_an_export(synthetic_data, tmp_path: Path, capsys) -> None:
    ckpt = make_checkpoint(tmp_path / "m.pt", "mlp", "digits", synthetic_data)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    assert main(["--checkpoint", str(ckpt), "--out-dir", str(tmp_path / "mine")]) == 1
    assert "not an export of this tool" in capsys.readouterr().err
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_without_mnist_the_gate_uses_seeded_random_images(tmp_path: Path) -> None:
    ckpt = make_checkpoint(tmp_path / "m.pt", "mlp", "digits", None)
    assert main(["--checkpoint", str(ckpt), "--out-dir", str(tmp_path / "e"), "--batch-sizes", "1,64"]) == 0
    parity = read_manifest(tmp_path / "e")["parity"]
    assert parity["dataset"].startswith("seeded uniform random images") and parity["count"] == 1000
    assert parity["runtimes"]["onnxruntime"]["accuracy"] is None


@pytest.mark.parametrize("content, message", [(None, "checkpoint not found"),
                                               (b"\x00junk", "is not a readable checkpoint")])
def test_bad_checkpoint_files(tmp_path: Path, capsys, content: bytes | None, message: str) -> None:
    path = tmp_path / "c.pt"
    if content is not None:
        path.write_bytes(content)
    assert main(["--checkpoint", str(path), "--out-dir", str(tmp_path / "e")]) == 1
    assert message in capsys.readouterr().err
    assert not (tmp_path / "e").exists()


def test_unknown_model_name_in_config(synthetic_data, tmp_path: Path, capsys) -> None:
    path = make_checkpoint(tmp_path / "c.pt", "mlp", "digits", synthetic_data)
    state = torch.load(path, weights_only=True)
    state["config"]["model"] = "resnet152"
    resave(path, state)
    assert main(["--checkpoint", str(path), "--out-dir", str(tmp_path / "e")]) == 1
    assert "names model 'resnet152'" in capsys.readouterr().err


@pytest.mark.gpu
def test_gpu_checkpoint_exports_on_cpu(synthetic_data, tmp_path: Path) -> None:
    ckpt = make_checkpoint(tmp_path / "m.pt", "fastnet", "digits", synthetic_data, device="cuda")
    assert torch.load(ckpt, weights_only=True)["model"]["0.weight"].is_cuda
    assert main(["--checkpoint", str(ckpt), "--out-dir", str(tmp_path / "e"), "--batch-sizes", "1,64"]) == 0


def test_one_table_of_formats_is_what_export_gates_and_serve_cli_runs(exported_run: Path) -> None:
    """serve_cli.base.manifest.FORMATS is the one list: export writes and gates each row (WRITERS, LOADERS),
    the manifest lists each row's file, and serve_cli offers exactly the served rows' runtimes."""
    from export.formats import WRITERS
    from export.parity import LOADERS
    from serve_cli.base.manifest import FORMATS
    from serve_cli.model import ARTIFACT_OF
    assert list(WRITERS) == [k for k, f in FORMATS.items() if not f.quantized] and list(LOADERS) == list(FORMATS)
    manifest = json.loads((exported_run / "manifest.json").read_text())
    kept = {kind for kind, fmt in FORMATS.items() if not fmt.quantized or manifest["parity"]["int8"]["passed"]}
    assert {kind: entry["file"] for kind, entry in manifest["artifacts"].items()} == \
        {kind: fmt.file for kind, fmt in FORMATS.items() if kind in kept}
    # the parity table is the fp32 gate's; int8's numbers are its own record (tests/test_int8.py)
    assert set(manifest["parity"]["runtimes"]) == {"eager"} | {f.runtime for f in FORMATS.values() if not f.quantized}
    assert set(ARTIFACT_OF) == {f.runtime for f in FORMATS.values() if f.served and not f.quantized} \
        == {"onnxruntime", "torchscript"}
