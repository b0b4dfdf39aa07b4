"""model.int8.onnx: ONNX Runtime's static quantization of the gated fp32 ONNX model, kept only when it is as
right as fp32.

QDQ format, int8 weights per output channel, uint8 activations calibrated (min/max) on a seeded sample of the
checkpoint's own training images: the training split less the run's validation images, never test images. Its
gate is not max |logit diff| (int8 rounds every activation: differences of a few tenths are normal) but what a
user sees, on the parity set's labelled test images: accuracy within MAX_ACCURACY_DROP of eager fp32 and top-1
agreement with it of at least MIN_TOP1_AGREEMENT. A model whose int8 fails is exported without it.
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from distributed.data import split_indices, to_unit
from distributed.datasets import DataError, folder_path, read_mnist
from distributed.folder import FolderError, load_folder
from serve_cli.base.cli import first_line
from serve_cli.base.manifest import INPUT_NAME

from .parity import ParitySet, load_onnx, runtime_result

MAX_ACCURACY_DROP = 0.003  # 0.3 points
MIN_TOP1_AGREEMENT = 0.99
CALIBRATION_COUNT, CALIBRATION_SEED = 512, 0


def calibration_set(info: dict[str, Any], data_dir: str | None) -> tuple[np.ndarray, str]:
    """A seeded sample of the run's training images (float32 [N, 1, 28, 28] in [0, 1]) and where it came from:
    its training split less its validation images, as the run drew them. DataError when they cannot be read, or
    when the checkpoint does not say how the run drew its validation images."""
    dataset, training = info["dataset"], info.get("training") or {}
    val_size, seed = training.get("val_size"), training.get("seed")
    if not isinstance(val_size, int) or not isinstance(seed, int):
        raise DataError("the checkpoint does not record its run's --val-size and --seed, so its validation images "
                        "cannot be told from its training images")
    folder = folder_path(dataset)
    if folder is not None:
        root = Path(data_dir) if data_dir else folder  # --data-dir FOLDER: where the folder is now
        try:
            loaded = load_folder(root)
        except FolderError as e:
            raise DataError(f"image folder {root} is not usable ({e}; --data-dir FOLDER points at the image "
                            f"folder)") from None
        images, labels = loaded.train_images, loaded.train_labels
    else:
        root = Path(data_dir or info["data_dir"])
        images, labels = read_mnist(root, True, dataset)
    _, train = split_indices(len(labels), val_size, seed)
    pick = np.random.default_rng(CALIBRATION_SEED).choice(train.numpy(), min(CALIBRATION_COUNT, len(train)),
                                                          replace=False)
    return to_unit(images[np.sort(pick)]).numpy(), f"{len(pick)} training images of {root} (seed {CALIBRATION_SEED})"


def quantize(fp32: Path, out: Path, images: np.ndarray, input_name: str) -> None:
    """Write the QDQ int8 model of `fp32` to `out`, calibrated on `images`."""
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Batches(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{input_name: images[i:i + 128]} for i in range(0, len(images), 128)])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.batches, None)

    with tempfile.TemporaryDirectory(dir=out.parent) as scratch:
        prepared = Path(scratch) / "prepared.onnx"  # shapes inferred and graph folded: what quantization expects
        quant_pre_process(str(fp32), str(prepared))
        quantize_static(str(prepared), str(out), Batches(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax)


def gate(result: dict[str, Any], fp32_accuracy: float | None) -> str | None:
    """Why the int8 runtime's parity result (parity.compare's fields) fails its gate; None when it passes."""
    if fp32_accuracy is None or result["accuracy"] is None:
        return "the parity set has no labels to score it on (point --data-dir at the dataset)"
    if not result["finite"]:
        return "NaN or infinite logits"
    drop = fp32_accuracy - result["accuracy"]
    if drop > MAX_ACCURACY_DROP + 1e-9:  # a drop of exactly 0.3 points passes, whatever float rounding says
        return (f"accuracy {result['accuracy']:.2%} against fp32's {fp32_accuracy:.2%}, a drop of {drop * 100:.2f} "
                f"points (at most {MAX_ACCURACY_DROP * 100:.1f})")
    if result["top1_agreement"] < MIN_TOP1_AGREEMENT:
        return f"top-1 agreement with fp32 {result['top1_agreement']:.2%} (at least {MIN_TOP1_AGREEMENT:.0%})"
    return None


def check(path: Path, reference: np.ndarray, data: ParitySet, fp32_accuracy: float | None,
          batch_sizes: list[int]) -> tuple[dict[str, Any], str | None]:
    """The int8 model at `path` on the parity set against eager fp32's logits `reference`: its results and why it
    fails its gate (None: it passes). Export and --verify both gate it here."""
    result = runtime_result(reference, load_onnx(path), data.images, data.labels, batch_sizes)
    return result, gate(result, fp32_accuracy)


def int8_artifact(fp32: Path, out: Path, info: dict[str, Any], data_dir: str | None, data: ParitySet,
                  reference: np.ndarray, fp32_accuracy: float | None,
                  batch_sizes: list[int]) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Quantize `fp32` into `out` and gate it on the parity set against eager fp32's logits `reference`:
    (the manifest's parity.int8 record, what its artifact entry notes, or None when `out` was not kept)."""
    record: dict[str, Any] = {"max_accuracy_drop": MAX_ACCURACY_DROP, "min_top1_agreement": MIN_TOP1_AGREEMENT}
    try:
        images, where = calibration_set(info, data_dir)
        quantize(fp32, out, images, INPUT_NAME)
        result, why = check(out, reference, data, fp32_accuracy, batch_sizes)
    except DataError as e:
        return {**record, "passed": False, "why": f"its calibration images cannot be read ({e})"}, None
    except Exception as e:  # ONNX Runtime's quantizer refuses some graphs, in many ways
        out.unlink(missing_ok=True)
        return {**record, "passed": False, "why": f"ONNX Runtime could not quantize it ({first_line(e)})"}, None
    record.update(passed=why is None, onnxruntime_int8=result)
    if why is not None:
        out.unlink()
        return {**record, "why": why}, None
    return record, {"calibration": where, "quantization": "QDQ: int8 weights per output channel, uint8 "
                                                          "activations calibrated by min/max"}


def int8_line(record: dict[str, Any], fp32_accuracy: float | None) -> str:
    if not record["passed"]:
        return f"int8: not exported: {record['why']}"
    r = record["onnxruntime_int8"]
    return (f"int8: passed its gate (accuracy {r['accuracy']:.2%}, fp32 {fp32_accuracy:.2%}; top-1 agreement "
            f"{r['top1_agreement']:.2%}; max |diff| {r['max_abs_diff']:.3g}, which is not its gate)")
