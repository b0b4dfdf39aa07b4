"""model.int8.onnx: calibrated on training images only, kept only when it passes its accuracy gate, checked by
--verify, and served by `serve_cli --precision`."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from conftest import edit_manifest, one_error_line, pngs, run, write_synthetic_mnist
from serve_cli.base.manifest import read_manifest

GATE_FIELDS = {"max_accuracy_drop": 0.003, "min_top1_agreement": 0.99}


@pytest.fixture(scope="module")
def int8_run(tmp_path_factory) -> Path:
    """A 1-epoch slimnet on 2,000 synthetic training and 2,000 test images: enough test images that one flipped
    answer (0.05 points) is inside the gate's 0.3."""
    root = tmp_path_factory.mktemp("int8")
    data = write_synthetic_mnist(root / "data", n_train=2000, n_test=2000)
    proc = run("-m", "distributed.train", "--data-dir", str(data), "--run-dir", str(root / "run"), "--epochs", "1",
               "--val-size", "64", "--device", "cpu", timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return root / "run"


@pytest.fixture(scope="module")
def int8_export(int8_run: Path) -> Path:
    proc = run("-m", "export", "--run-dir", str(int8_run), "--batch-sizes", "1,256")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "int8: passed its gate (accuracy" in proc.stdout and "which is not its gate" in proc.stdout
    return int8_run / "export"


def test_the_int8_model_is_kept_with_its_numbers(int8_export: Path) -> None:
    manifest = read_manifest(int8_export)
    entry, record = manifest["artifacts"]["onnx_int8"], manifest["parity"]["int8"]
    assert (int8_export / entry["file"]).stat().st_size < 0.5 * manifest["artifacts"]["onnx"]["bytes"]
    assert {k: record[k] for k in GATE_FIELDS} == GATE_FIELDS and record["passed"] is True
    result, fp32 = record["onnxruntime_int8"], manifest["parity"]["runtimes"]["eager"]
    assert fp32["accuracy"] - result["accuracy"] <= 0.003 and result["top1_agreement"] >= 0.99
    assert "training images" in entry["calibration"] and "QDQ" in entry["quantization"]
    assert np.asarray(manifest["reference"]["int8_logits"]).shape == np.asarray(manifest["reference"]["logits"]).shape


def test_a_model_whose_int8_fails_its_gate_exports_without_it(int8_run: Path, tmp_path: Path, monkeypatch,
                                                             capsys) -> None:
    """Calibrated on images 50 times too dark, the int8 model clips every real activation: its accuracy falls
    far outside the gate, so the export goes on without it and says why in one line."""
    from export import quantize
    from export.__main__ import main
    calibration_set = quantize.calibration_set
    monkeypatch.setattr(quantize, "calibration_set", lambda *a: (calibration_set(*a)[0] * 0.02, "too dark"))
    out = tmp_path / "export"
    assert main(["--checkpoint", str(int8_run / "checkpoints" / "best.pt"), "--out-dir", str(out),
                 "--batch-sizes", "256"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("int8")]
    assert len(lines) == 1 and lines[0].startswith("int8: not exported: accuracy ") and "points (at most 0.3)" in lines[0]
    manifest = read_manifest(out)
    assert "onnx_int8" not in manifest["artifacts"] and not (out / "model.int8.onnx").exists()
    assert manifest["parity"]["int8"]["passed"] is False and "int8_logits" not in manifest["reference"]
    proc = run("-m", "serve_cli", "predict", str(pngs(tmp_path / "imgs", 2)), "--model", str(out), "--precision", "int8")
    assert proc.returncode == 2
    one_error_line(proc.stderr, f"{out} has no model.int8.onnx: its int8 model failed its gate at export (accuracy ",
                   "export again with python -m export")


@pytest.mark.parametrize("accuracy,agreement,finite,passes", [
    (0.9908 - 0.0029, 0.995, True, True),
    (0.9908 - 0.0031, 0.995, True, False),
    (0.9908, 0.9899, True, False),
    (0.9908, 0.99, True, True),
    (0.9908, 1.0, False, False),
])
def test_the_gate_is_accuracy_and_agreement(accuracy: float, agreement: float, finite: bool, passes: bool) -> None:
    from export.quantize import gate
    result = {"accuracy": accuracy, "top1_agreement": agreement, "finite": finite, "max_abs_diff": 0.5}
    assert (gate(result, 0.9908) is None) == passes
    assert gate({**result, "accuracy": None}, None).startswith("the parity set has no labels")


def test_calibration_reads_training_images_only(tmp_path: Path) -> None:
    """Never a test image, nor one of the run's validation images: the training split as the run saw it."""
    from distributed.data import split_indices
    from distributed.datasets import read_dataset
    from export.quantize import CALIBRATION_COUNT, calibration_set
    data = write_synthetic_mnist(tmp_path, n_train=900, n_test=300)
    info = {"dataset": "mnist", "data_dir": str(data), "training": {"val_size": 100, "seed": 3}}
    images, where = calibration_set(info, None)
    train_x, train_y, test_x, _, _ = read_dataset(str(data), "mnist")
    val, train = split_indices(len(train_y), 100, 3)
    as_bytes = {bytes(np.asarray(img).tobytes()) for img in (images[:, 0] * 255).round().astype(np.uint8)}
    assert len(images) == min(CALIBRATION_COUNT, 800) == len(as_bytes)
    assert as_bytes <= {train_x[i].numpy().tobytes() for i in train}
    assert not as_bytes & {train_x[i].numpy().tobytes() for i in val}
    assert not as_bytes & {img.numpy().tobytes() for img in test_x}
    assert where.startswith(f"{len(images)} training images of {data}")


def test_verify_reruns_its_gate_and_checks_its_probe_answers(int8_export: Path, tmp_path: Path) -> None:
    proc = run("-m", "export", "--verify", str(int8_export))
    assert proc.returncode == 0, proc.stderr
    assert "int8 within 2% of its own" in proc.stdout and "int8: passed its gate" in proc.stdout

    def shifted(m: dict) -> None:
        m["reference"]["int8_logits"] = (np.asarray(m["reference"]["int8_logits"]) + 1.0).tolist()
    copy = edit_manifest(int8_export, tmp_path / "copy", shifted, reseal=True)
    proc = run("-m", "export", "--verify", str(copy))
    assert proc.returncode == 1
    one_error_line(proc.stderr, "artifacts disagree with the logits recorded at export: onnxruntime_int8")


def test_serve_cli_precision(int8_export: Path, tmp_path: Path) -> None:
    images = pngs(tmp_path / "imgs", 8)
    rows = {}
    for precision in ("fp32", "int8", "auto"):
        proc = run("-m", "serve_cli", "predict", str(images), "--model", str(int8_export), "--precision", precision,
                   "--format", "jsonl")
        assert proc.returncode == 0, proc.stderr
        rows[precision] = [json.loads(line) for line in proc.stdout.splitlines()]
        summary = proc.stderr.strip().splitlines()[-1]
        if precision == "int8":
            assert "[onnxruntime int8 (CPUExecutionProvider)" in summary
        if precision == "auto":
            assert "--precision auto: int8 ran" in summary
    assert [r["class"] for r in rows["int8"]] == [r["class"] for r in rows["fp32"]]
    assert any(not math.isclose(a["confidence"], b["confidence"], rel_tol=1e-6)
               for a, b in zip(rows["int8"], rows["fp32"])), "the int8 rows came from the fp32 model"
    proc = run("-m", "serve_cli", "predict", str(images), "--model", str(int8_export), "--precision", "int8",
               "--runtime", "torchscript")
    assert proc.returncode == 2
    one_error_line(proc.stderr, "--precision int8 runs model.int8.onnx on ONNX Runtime")


def test_calibration_reads_what_a_real_checkpoint_records(int8_run: Path) -> None:
    from distributed import checkpoint
    from export.quantize import calibration_set
    info = checkpoint.summary(checkpoint.load(int8_run / "checkpoints" / "best.pt"))
    images, where = calibration_set(info, None)
    assert len(images) == 512 and images.dtype == np.float32 and 0 <= images.min() and images.max() <= 1
    info["training"].pop("val_size")
    with pytest.raises(Exception, match="does not record its run's --val-size and --seed"):
        calibration_set(info, None)


def test_verify_without_the_labelled_data_does_not_fail_a_good_int8(int8_export: Path, tmp_path: Path) -> None:
    proc = run("-m", "export", "--verify", str(int8_export), "--data-dir", str(tmp_path / "nothing-here"))
    assert proc.returncode == 0, proc.stderr
    assert "int8: its gate not rerun: seeded uniform random images" in proc.stdout
