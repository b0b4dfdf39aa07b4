"""serve_cli: predict digits in image files and folders with an exported model (no training code, no torch).

  serve_cli predict images/ [more.png ...] [--model DIR] [--format table|csv|jsonl] [--output FILE]
  serve_cli info [DIR]

Exit status: 0 every file predicted; 1 some files failed (error rows say why); 2 usage error.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from concurrent.futures import Executor
from pathlib import Path
from typing import Iterable, Iterator, TextIO

import numpy as np

from .base.cli import (NON_NEGATIVE_INT, DefaultsHelpFormatter, Stopped, UsageError, number_in, stop_signals_raise,
                       usable_cores)
from .base.images import find_images
from .base.progress import Progress
from .base.manifest import ManifestError, verify_file
from .model import (ARTIFACT_OF, MODEL_ENV, PRECISIONS, LoadedModel, ModelError, default_model_dir, open_manifest,
                    resolve_model, softmax)
from .output import WRITERS, OutputError, Row, Written, check_output, open_output, what_became_of
from .pool import Chunk, processed_batches, worker_pool


MAX_BATCH = 16384  # a model call's images: larger ones are no faster, and each holds 3 kB an image


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="serve_cli", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("predict", help="predict every image in the given files and folders",
                       formatter_class=DefaultsHelpFormatter)
    p.add_argument("inputs", nargs="+", help="image files and/or folders")
    p.add_argument("--model", help=f"export dir with manifest.json (default: ${MODEL_ENV}, else the newest "
                                   f"runs/*/export)")
    p.add_argument("--runtime", "--backend", choices=["auto", *ARTIFACT_OF], default="auto",
                   help="what runs the model (--backend is its old name); auto: ONNX Runtime, on CUDA when its "
                        "provider is available")
    p.add_argument("--precision", choices=PRECISIONS, default="fp32",
                   help="fp32, or the export's int8 model (model.int8.onnx, on the CPU); auto: int8 when the export "
                        "has one and it runs faster than fp32 on this CPU (timed at start-up), else fp32")
    p.add_argument("--format", choices=sorted(WRITERS), default="table")
    p.add_argument("--output", help="write rows to this file instead of stdout")
    cores = usable_cores()
    p.add_argument("--top-k", type=NON_NEGATIVE_INT, default=0, help="also list the K most likely classes")
    p.add_argument("--batch-size", type=number_in(int, 1, MAX_BATCH), default=256,
                   help=f"images per model call, at most {MAX_BATCH} (each batch in flight holds ~3 kB an image)")
    p.add_argument("--workers", type=number_in(int, 1, 4 * cores), default=cores,
                   help=f"processes that decode images and, on the CPU, each run a copy of the model (default: the "
                        f"{cores} core(s) this process may use; at most 4 a core, for slow file systems)")
    p.add_argument("--threads", type=number_in(int, 0, cores), default=0,
                   help=f"model threads per copy, at most the {cores} core(s) (0: 1 per worker, or the runtime's "
                        f"choice with --workers 1)")
    p.add_argument("--recursive", "-r", action="store_true", help="descend into sub-folders")
    i = sub.add_parser("info", help="what an exported model is: classes, input, artifacts, parity, accuracy")
    i.add_argument("model", nargs="?", help="export dir (default as for predict)")
    i.add_argument("--json", action="store_true", help="print the raw manifest")
    return parser


def predict_rows(batch: list[str], chunk: Chunk, model: LoadedModel | None, classes: list[str],
                 top_k: int) -> list[Row]:
    logits = chunk.logits
    if logits is None and chunk.images is not None:
        assert model is not None, "the images came back to be run here"
        logits = model.run(chunk.images)
    probs = softmax(logits) if logits is not None else np.empty((0, 0))
    # the batch's answers at once, as Python numbers: per row, numpy's calls would cost more than the row
    winners = probs.argmax(axis=1) if len(probs) else np.empty(0, dtype=np.intp)
    best, confidence = winners.tolist(), probs[np.arange(len(probs)), winners].tolist()
    k = min(top_k, len(classes))
    top = np.argsort(-probs, axis=1, kind="stable")[:, :k].tolist() if k else None
    rows, j = [], 0
    for path, error in zip(batch, chunk.errors):
        if error is not None:
            rows.append(Row(path, error=error))
            continue
        b = best[j]
        alternatives = tuple((classes[c], float(probs[j, c])) for c in top[j]) if top else ()
        rows.append(Row(path, classes[b], b, confidence[j], alternatives))
        j += 1
    return rows


def check_exist(inputs: list[str]) -> None:
    missing = [i for i in inputs if not os.path.lexists(i)]
    if missing:
        raise UsageError(f"no such file or folder: {missing[0]}")


def check_inputs(inputs: list[str], recursive: bool) -> Iterator[str]:
    paths = find_images(inputs, recursive)
    first = next(paths, None)
    if first is None:
        hint = "" if recursive else " (add --recursive for sub-folders)"
        raise UsageError(f"no image files in {', '.join(inputs)}{hint}")
    return itertools.chain([first], paths)


def predict(args: argparse.Namespace, written: Written) -> int:
    check_output(args.output, args.inputs, args.recursive)
    check_exist(args.inputs)
    if args.precision == "int8" and args.runtime == "torchscript":
        raise UsageError("--precision int8 runs model.int8.onnx on ONNX Runtime: drop --runtime torchscript")
    model_dir = Path(args.model) if args.model else default_model_dir()
    start = time.perf_counter()
    manifest, runtime = resolve_model(model_dir, args.runtime, args.threads or None, args.precision)
    # On the CPU each worker runs its own model copy, one thread each unless --threads says otherwise;
    # a GPU session stays single, in this process, fed by the workers' decoded images.
    in_workers = args.workers > 1 and runtime.on_cpu
    worker_runtime = runtime.with_threads(args.threads or 1) if in_workers else None
    pool = worker_pool(args.workers, worker_runtime)
    try:
        # The first folder is listed (and sorted) while the workers start and build their models; the output is
        # opened after that check, so that a run with nothing to predict leaves a device or FIFO untouched.
        paths = check_inputs(args.inputs, args.recursive)
        model = None if in_workers else LoadedModel(*runtime.build())
        with open_output(args.output, written) as stream:
            count, failed = run_predictions(stream, paths, pool, model, manifest["model"]["classes"], args.format,
                                            args.batch_size, 2 * args.workers, args.top_k)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    seconds = time.perf_counter() - start
    where = f", {args.workers} workers" if in_workers else ""
    note = f"; {runtime.note}" if runtime.note else ""
    print(f"{count:,} images, {failed:,} failed, {seconds:.2f}s, {count / seconds:,.0f} images/s "
          f"[{model.runtime if model else runtime.name}{where}, model {model_dir}{note}]", file=sys.stderr)
    return 1 if failed else 0


def run_predictions(stream: TextIO, paths: Iterable[str], pool: Executor, model: LoadedModel | None,
                    classes: list[str], format: str, batch_size: int, in_flight: int, top_k: int) -> tuple[int, int]:
    """Stream rows batch by batch; (images, failures)."""
    # A live line on stderr when it is a terminal and the rows go elsewhere (a file, a pipe): never between rows.
    # Only runs longer than a second show it.
    progress = Progress(None, "predict", "image", delay=1.0, live=sys.stderr.isatty() and not stream.isatty())
    count = failed = 0
    writer = None  # made at the first rows: a run that fails before any prediction prints nothing
    try:
        for batch, chunk in processed_batches(paths, pool, batch_size, in_flight):
            rows = predict_rows(batch, chunk, model, classes, top_k)
            writer = writer or WRITERS[format](stream, min(top_k, len(classes)))
            for row in rows:
                writer.write(row)
                failed += row.error is not None
            count += len(batch)
            stream.flush()
            progress.update(len(batch))
    finally:
        progress.close()
    return count, failed


def info(args: argparse.Namespace) -> int:
    directory = Path(args.model) if args.model else default_model_dir()
    manifest = open_manifest(directory)
    if args.json:
        print(json.dumps(manifest, indent=2))
        return 0
    print(describe(directory, manifest))
    return 0


def describe(directory: Path, m: dict) -> str:
    model, inp, parity = m["model"], m["input"], m.get("parity", {})
    src = m.get("source", {})
    norm = inp.get("normalization", {})
    lines = [
        f"model      {directory}",
        f"network    {model['name']} (dataset {model.get('dataset', 'mnist')}, task {model['task']}, "
        f"{model['num_classes']} classes: {', '.join(model['classes'])})",
        f"input      {inp['name']} {inp['dtype']} [{', '.join(map(str, inp['shape']))}] in "
        f"[{inp['range'][0]:g}, {inp['range'][1]:g}], {inp['polarity']}; "
        f"mean {norm.get('mean')} / std {norm.get('std')} applied {norm.get('applied')}",
        f"output     {m['output']['name']} {m['output']['dtype']} [{', '.join(map(str, m['output']['shape']))}]",
    ]
    if inp.get("preprocessing"):
        lines.insert(3, f"preprocess {inp['preprocessing']}")
    if src:
        acc = f", test accuracy {src['test_accuracy']:.2%}" if src.get("test_accuracy") is not None else ""
        lines.append(f"source     {src['checkpoint']} (epoch {src['epoch']}{acc})")
        if src.get("training"):
            run = src["training"]
            lines.append(f"training   {run.get('model')}, {run.get('epochs')} epoch(s), {run.get('global_batch_size')} "
                         f"images per step, world size {run.get('world_size')}, seed {run.get('seed')}")
    for name, entry in m["artifacts"].items():
        try:
            verify_file(directory, m, name)
            status = "sha256 ok"
        except ManifestError as e:
            status = f"BAD: {e}"
        extra = ", ".join(f"{k} {entry[k]}" for k in ("opset", "method") if k in entry)
        lines.append(f"artifact   {entry['file']:<10} {entry['bytes'] / 1e6:6.2f} MB  {name}"
                     f"{' (' + extra + ')' if extra else ''}  {status}")
    if parity:
        lines.append(f"parity     {'passed' if parity['passed'] else 'FAILED'} on {parity['dataset']}, batch sizes "
                     f"{', '.join(map(str, parity['batch_sizes']))}, atol {parity['atol']:g}")
        for name, r in parity.get("runtimes", {}).items():
            acc = f"  accuracy {r['accuracy']:.2%}" if r.get("accuracy") is not None else ""
            lines.append(f"           {name:<17} max |diff| {r['max_abs_diff']:.1e}  top-1 agree "
                         f"{r['top1_agreement']:.2%}{acc}")
    int8 = parity.get("int8")
    if int8:
        r = int8.get("onnxruntime_int8")
        numbers = (f": accuracy {r['accuracy']:.2%}, top-1 agree {r['top1_agreement']:.2%}, max |diff| "
                   f"{r['max_abs_diff']:.2g} (its gate: accuracy within {int8['max_accuracy_drop'] * 100:.1f} points "
                   f"of eager, top-1 agreement {int8['min_top1_agreement']:.0%})") if int8["passed"] and r else ""
        lines.append(f"int8       {'passed' if int8['passed'] else 'not exported: ' + int8['why']}{numbers}")
    versions = ", ".join(f"{k} {v}" for k, v in m.get("versions", {}).items())
    lines.append(f"created    {m.get('created', '?')} with {versions}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    written = Written()
    try:
        with stop_signals_raise():  # stop promptly, leave no partial output file
            return predict(args, written) if args.command == "predict" else info(args)
    except (UsageError, ModelError) as e:
        print(f"serve_cli: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `serve_cli predict ... | head` is fine
        sys.stderr.close()
        return 0
    except Stopped as e:
        print(f"serve_cli: interrupted by signal {e.signum}; {what_became_of(args.output, written)}", file=sys.stderr)
        return 128 + e.signum
    except OutputError as e:  # a full disk or device while writing rows
        print(f"serve_cli: error: {e.strerror}", file=sys.stderr)
        return 1
    except OSError as e:  # stdout on a full disk
        where = f"{e.filename}: " if e.filename else ""
        print(f"serve_cli: error: writing the rows: {where}{e.strerror or e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
