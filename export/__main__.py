"""python -m export: checkpoint -> model.ts / model.onnx / model.pt2 + manifest.json, gated on output parity.

  python -m export --run-dir runs/digits                 # best.pt -> runs/digits/export/
  python -m export --checkpoint last.pt --out-dir artifacts/digits
  python -m export --verify artifacts/digits             # re-check hashes and parity later
"""
from __future__ import annotations

import argparse
import platform
import shutil
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime
import torch

from distributed.checkpoint import CheckpointError
from distributed.datasets import folder_path
from distributed.run_dir import CHECKPOINT_DIR
from serve_cli.base.cli import NON_NEGATIVE, DefaultsHelpFormatter, Stopped, number_in, path_text, stop_signals_raise
from serve_cli.base.files import write_json
from serve_cli.base.manifest import (FORMAT_VERSION, FORMATS, INPUT_NAME, INT8, INT8_PROBE_TOLERANCE, MANIFEST,
                                OUTPUT_NAME, ManifestError, file_entry, probe_images, probe_reference, read_manifest,
                                seal, sha256_file, verify_file)

from .formats import MAX_BATCH, WRITERS
from .install import InstallError, Progress, install, previous_export
from .parity import (ParityError, ParitySet, compare, eager_runtime, failures, format_report, load_onnx, load_runtimes,
                     parity_report, parity_set)
from . import quantize, triton
from .wrap import load_for_export

DEFAULT_OPSET = 20
PROBE_SEED, PROBE_COUNT = 0, 16


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m export", description=__doc__.split("\n")[0],
                                formatter_class=DefaultsHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--run-dir", type=path_text,
                     help="training run dir: exports checkpoints/best.pt into RUN_DIR/export")
    src.add_argument("--checkpoint", type=path_text, help="a checkpoint file (best.pt or last.pt)")
    src.add_argument("--verify", metavar="DIR", type=path_text,
                     help="re-check an export dir: sha256s, then output parity")
    p.add_argument("--out-dir", type=path_text, help="where the artifacts go (default: RUN_DIR/export)")
    p.add_argument("--data-dir", type=path_text,
                   help="where the parity set's test images are: the dataset root (as the trainer's --data-dir), "
                        "or the image folder of a folder:PATH dataset (default: the checkpoint's)")
    p.add_argument("--atol", type=NON_NEGATIVE, default=1e-4, help="max |logit difference| any runtime may show")
    p.add_argument("--batch-sizes", default="1,7,1000", help="batch sizes the parity gate runs at")
    p.add_argument("--opset", type=number_in(int, 18, 23), default=DEFAULT_OPSET, help="ONNX opset")
    p.add_argument("--triton", nargs="?", const="", metavar="NAME", type=triton_name,
                   help="also write a Triton model repository, OUT_DIR/triton/NAME (default NAME: DATASET_TASK)")
    return p


def triton_name(text: str) -> str:
    try:
        return triton.check_name(text) if text else text
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e).split(": ", 1)[1]) from None


MAX_BATCH_SIZES = 8


def parse_batch_sizes(text: str, parser: argparse.ArgumentParser) -> list[int]:
    try:
        sizes = sorted({int(s) for s in text.split(",")})
    except ValueError:
        parser.error(f"--batch-sizes {text!r}: give whole numbers separated by commas, e.g. 1,7,1000")
    if sizes[0] < 1 or sizes[-1] > MAX_BATCH or len(sizes) > MAX_BATCH_SIZES:
        parser.error(f"--batch-sizes {text}: give at most {MAX_BATCH_SIZES} sizes from 1 to {MAX_BATCH} (the "
                     f"parity set runs once per size; a size above the set's count runs it in one batch)")
    return sizes


def versions() -> dict[str, str]:
    return {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
            "python": platform.python_version()}


# What serve_cli does to an image file before the model sees it; a folder dataset was trained through the same.
PREPROCESSING = ("serve_cli.base.images.digit_bytes: first frame, EXIF orientation, gray; light paper inverted; ink "
                 "stretched, cropped, scaled to 20 px and centred by mass in 28x28 (28x28 dark images as they are); "
                 "8-bit levels")


def input_spec(info: dict[str, Any]) -> dict[str, Any]:
    return {"name": INPUT_NAME, "dtype": "float32", "shape": ["N", 1, 28, 28], "range": [0.0, 1.0],
            "polarity": "MNIST: bright ink (1.0) on a dark background (0.0)",
            "preprocessing": PREPROCESSING,
            "normalization": {"mean": info["mean"], "std": info["std"], "applied": "inside the model"}}


def output_spec(classes: list[str]) -> dict[str, Any]:
    return {"name": OUTPUT_NAME, "dtype": "float32", "shape": ["N", len(classes)],
            "meaning": "unnormalised class scores in the order of model.classes; softmax for probabilities"}


def build_manifest(info: dict[str, Any], checkpoint: Path, artifacts: dict[str, Any], parity: dict[str, Any],
                   reference: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """`extra`: the optional parts (triton), present only when written."""
    classes = info["classes"]
    return seal({
        "format_version": FORMAT_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": {"name": info["name"], "dataset": info["dataset"], "task": info["task"], "classes": classes,
                  "num_classes": len(classes)},
        "input": input_spec(info),
        "output": output_spec(classes),
        "artifacts": artifacts,
        "source": {"checkpoint": str(checkpoint.resolve()), "sha256": sha256_file(checkpoint),
                   "epoch": info["epoch"],
                   # a mid-epoch checkpoint's record is an earlier epoch's: it does not describe these weights
                   "test_accuracy": info["metrics"].get("test_accuracy") if info["scored"] else None,
                   "val_accuracy": info["metrics"].get("val_accuracy") if info["scored"] else None,
                   "training": info["training"]},
        "versions": versions(),
        "parity": parity,
        "reference": reference,
        **extra,
    })


def write_artifacts(model: Any, files: dict[str, Path], opset: int) -> dict[str, Any]:
    """Every artifact file (artifact kind -> path), in FORMATS' order; their manifest entries, keyed the same way."""
    return {kind: file_entry(path, **WRITERS[kind](model, path, opset)) for kind, path in files.items()}


def parity_data(info: dict[str, Any], data_dir: str | None) -> ParitySet:
    # A folder dataset's images are in its folder:PATH; the others' under the trainer's --data-dir.
    default = None if folder_path(info["dataset"]) is not None else info["data_dir"]
    return parity_set(data_dir or default, info["dataset"], info["task"], info["classes"])


def check_parity(model: Any, files: dict[str, Path], info: dict[str, Any], data: ParitySet,
                 batch_sizes: list[int], atol: float, failed: str) -> tuple[dict[str, Any], np.ndarray]:
    """The gate: every fp32 artifact file against the eager model; prints the table, raises ParityError starting
    with `failed` when any runtime is off, or when the eager model does not score what the checkpoint
    recorded on the very test split the run was scored on (its weights are then not the ones it was saved with).
    The manifest's parity record, and the eager logits the int8 model is gated against."""
    report, eager_logits = parity_report(eager_runtime(model), load_runtimes(files), data.images, data.labels,
                                         batch_sizes, atol)
    print(f"parity on {data.described}, batch sizes {batch_sizes}:")
    print(format_report(report))
    if not report["passed"]:
        raise ParityError(f"{failed}: " + "; ".join(failures(report)))
    same_set = data.digest is not None and data.digest == info["test_digest"] and info["scored"]
    if same_set:
        check_recorded_accuracy(info, report["runtimes"]["eager"]["accuracy"], report["count"], failed)
    return {"dataset": data.described, "training_test_set": same_set, **report}, eager_logits


def check_recorded_accuracy(info: dict[str, Any], accuracy: float, count: int, failed: str) -> None:
    """Autocast on the GPU may flip a few near-ties; in fp32 only kernel order differs (an image or two)."""
    recorded = info["metrics"].get("test_accuracy")
    allowed = max(2 / count, 2e-4) if info["amp"] == "off" else max(5 / count, 3e-3)
    if recorded is not None and abs(accuracy - recorded) > allowed:
        raise ParityError(f"{failed}: the checkpoint records test accuracy {recorded:.2%}, but its weights score "
                          f"{accuracy:.2%} on the same {count} test images: they are not the weights it was "
                          f"saved with; export another checkpoint or train again")


def export_checkpoint(checkpoint: Path, out_dir: Path, data_dir: str | None, batch_sizes: list[int],
                      atol: float, opset: int, triton_model: str | None, progress: Progress) -> dict[str, Any]:
    """Everything is built and gated in a staging dir beside out_dir; only a passing export is installed.
    `triton_model`: None for no Triton repository, "" for the default model name."""
    old = previous_export(out_dir)
    model, info = load_for_export(checkpoint)
    name = None if triton_model is None else triton_model or triton.default_name(info["dataset"], info["task"])
    if name is not None:
        check_triton_target(out_dir, name, old, info["classes"])
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.staging-", dir=out_dir.parent))
    try:
        files = {kind: staging / fmt.file for kind, fmt in FORMATS.items() if not fmt.quantized}
        artifacts = write_artifacts(model, files, opset)
        data = parity_data(info, data_dir)
        parity, eager_logits = check_parity(model, files, info, data, batch_sizes, atol,
                                            failed="parity gate failed, nothing exported")
        probes = probe_images(PROBE_SEED, PROBE_COUNT)
        reference = {"seed": PROBE_SEED, "count": PROBE_COUNT, "logits": eager_runtime(model)(probes).tolist()}
        int8_file = staging / FORMATS[INT8].file
        fp32_accuracy = parity["runtimes"]["eager"]["accuracy"]
        parity["int8"], int8_notes = quantize.int8_artifact(files["onnx"], int8_file, info, data_dir, data,
                                                            eager_logits, fp32_accuracy, batch_sizes)
        print(quantize.int8_line(parity["int8"], fp32_accuracy))
        if int8_notes is not None:
            artifacts[INT8] = file_entry(int8_file, **int8_notes)
            reference["int8_logits"] = load_onnx(int8_file)(probes).tolist()
        extra = {}
        if name is not None:
            extra["triton"] = triton.write_repository(staging, name, files["onnx"], input_spec(info),
                                                      output_spec(info["classes"]), info["classes"],
                                                      min(max(batch_sizes), len(data.images)))
        manifest = build_manifest(info, checkpoint, artifacts, parity, reference, extra)
        write_json(staging / MANIFEST, manifest)
        install(staging, out_dir, manifest, old, progress)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return manifest


def check_triton_target(out_dir: Path, name: str, old: dict[str, Any] | None, classes: list[str]) -> None:
    """A Triton model folder in out_dir may be replaced only when the export there wrote it and nobody has
    changed its files since (a config.pbtxt edited by hand is the user's)."""
    try:
        triton.labels_text(classes)
    except ValueError as e:
        raise ManifestError(f"--triton: {e}; rename that class") from None
    target = out_dir / triton.REPOSITORY / name
    previous = (old or {}).get("triton")
    ours = isinstance(previous, dict) and previous.get("name") == name and isinstance(previous.get("files"), dict)
    if (target.exists() or target.is_symlink()) and not ours:
        raise ManifestError(f"--out-dir {out_dir} holds {target}, which no export of this tool wrote: choose another "
                            f"--triton NAME or another --out-dir")
    for rel, entry in (previous["files"].items() if ours else ()):
        path = out_dir / rel
        if path.is_file() and isinstance(entry, dict) and sha256_file(path) != entry.get("sha256"):
            raise ManifestError(f"{path} was changed after the export that wrote it: move it away, or choose another "
                                f"--triton NAME or another --out-dir")


def verify(directory: Path, data_dir: str | None, batch_sizes: list[int], atol: float) -> dict[str, Any]:
    """Manifest digest and hashes first; then every runtime against the eager logits the manifest recorded;
    then, when the source checkpoint is still where it was (same sha256), the full gate against a fresh eager model."""
    manifest = read_manifest(directory)
    files = {kind: verify_file(directory, manifest, kind) for kind in manifest["artifacts"]}
    print(f"manifest digest and sha256 ok: {', '.join(e['file'] for e in manifest['artifacts'].values())}")
    if "triton" in manifest:
        wrong = triton.problems(directory, manifest)
        if wrong:
            raise ManifestError(f"the Triton repository: {'; '.join(wrong)}: re-export with --triton")
        print(f"triton repository ok: {directory / triton.REPOSITORY} (model {manifest['triton']['name']}, "
              f"max_batch_size {manifest['triton']['max_batch_size']})")
    ref = manifest["reference"]
    images = probe_images(ref["seed"], ref["count"])
    wrong = []
    for kind, runtime in zip(files, load_runtimes(files).values()):
        expected, tolerance = probe_reference(manifest, kind, atol)
        got = compare(expected, runtime(images), None)
        if not got["finite"] or not got["max_abs_diff"] <= tolerance or (
                got["top1_agreement"] < 1 and not FORMATS[kind].quantized):
            wrong.append(f"{FORMATS[kind].runtime}: max |logit diff| {got['max_abs_diff']:.3g} (allowed "
                         f"{tolerance:.3g}), top-1 agreement {got['top1_agreement']:.2%}")
    if wrong:
        raise ParityError(f"{directory}: artifacts disagree with the logits recorded at export: " + "; ".join(wrong))
    print(f"reference logits ok ({ref['count']} probe images, atol {atol:g}"
          + (f"; int8 within {INT8_PROBE_TOLERANCE:.0%} of its own" if INT8 in files else "") + ")")
    source = Path(manifest["source"]["checkpoint"])
    if source.is_file() and sha256_file(source) == manifest["source"]["sha256"]:
        model, info = load_for_export(source)
        data = parity_data(info, data_dir)
        fp32 = {kind: path for kind, path in files.items() if not FORMATS[kind].quantized}
        parity, eager_logits = check_parity(model, fp32, info, data, batch_sizes, atol,
                                            failed=f"{directory}: parity gate failed")
        if INT8 in files and data.labels is None:
            print(f"int8: its gate not rerun: {data.described} has no labels to score it on")
        elif INT8 in files:
            result, why = quantize.check(files[INT8], eager_logits, data, parity["runtimes"]["eager"]["accuracy"],
                                         batch_sizes)
            if why is not None:
                raise ParityError(f"{directory}: {files[INT8].name} fails its gate: {why}")
            print(quantize.int8_line({"passed": True, "onnxruntime_int8": result},
                                     parity["runtimes"]["eager"]["accuracy"]))
    else:
        print(f"source checkpoint {source} not available: full parity not rerun")
    return manifest


def human_size(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 1e6 else f"{n / 1e3:.0f} kB"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    sizes = parse_batch_sizes(args.batch_sizes, parser)
    progress = Progress()
    try:
        with stop_signals_raise():
            return run(args, parser, sizes, progress)
    except Stopped as e:  # the staging dir is gone (finally); out-dir is as it was, or installed in full
        what = (f"it came once the export was installed: {progress.installed} holds the new export, complete"
                if progress.installed else "nothing was exported or changed")
        print(f"error: stopped by signal {e.signum}; {what}", file=sys.stderr)
        return 128 + e.signum


def run(args: argparse.Namespace, parser: argparse.ArgumentParser, sizes: list[int], progress: Progress) -> int:
    try:
        if args.verify:
            verify(Path(args.verify), args.data_dir, sizes, args.atol)
            print(f"verified: {args.verify}")
            return 0
        if args.run_dir:
            checkpoint = Path(args.run_dir) / CHECKPOINT_DIR / "best.pt"
            out_dir = Path(args.out_dir or Path(args.run_dir) / "export")
        else:
            if not args.out_dir:
                parser.error("--checkpoint needs --out-dir")
            checkpoint, out_dir = Path(args.checkpoint), Path(args.out_dir)
        manifest = export_checkpoint(checkpoint, out_dir, args.data_dir, sizes, args.atol, args.opset, args.triton,
                                     progress)
    except (CheckpointError, ManifestError, ParityError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except InstallError as e:
        print(f"error: {e.strerror}", file=sys.stderr)
        return 1
    except OSError as e:  # a full disk, an unwritable folder: nothing was installed
        where = f"{e.filename}: " if e.filename else ""
        print(f"error: {where}{e.strerror or e}; nothing was exported or changed", file=sys.stderr)
        return 1
    files = ", ".join(f"{e['file']} ({human_size(e['bytes'])})" for e in manifest["artifacts"].values())
    if "triton" in manifest:
        files += f", {triton.REPOSITORY}/{manifest['triton']['name']}/"
    print(f"exported {manifest['model']['name']} ({manifest['model']['task']}) to {out_dir}: {files}, {MANIFEST}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
