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
import tempfile
import time
from collections import deque
import multiprocessing
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator, TextIO

import numpy as np

from .images import ImageError, find_images, load_digit
from .model import MODEL_ENV, LoadedModel, ModelError, default_model_dir, load_model, open_manifest, softmax
from .output import WRITERS, Row

CHUNK = 64  # files one decode task handles: amortises the pool's per-task cost (pickling, scheduling)


class UsageError(RuntimeError):
    """The command cannot do its job at all: exit 2 with one line."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="serve_cli", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("predict", help="predict every image in the given files and folders",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("inputs", nargs="+", help="image files and/or folders")
    p.add_argument("--model", help=f"export dir with manifest.json (default: ${MODEL_ENV}, else the newest "
                                   f"runs/*/export)")
    p.add_argument("--backend", choices=["auto", "onnxruntime", "torchscript"], default="auto",
                   help="auto: ONNX Runtime, on CUDA when its provider is available")
    p.add_argument("--format", choices=sorted(WRITERS), default="table")
    p.add_argument("--output", help="write rows to this file instead of stdout")
    p.add_argument("--top-k", type=int, default=0, help="also list the K most likely classes")
    p.add_argument("--batch-size", type=int, default=256, help="images per model call")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="decode processes")
    p.add_argument("--threads", type=int, default=0, help="model threads (0: the runtime's choice)")
    p.add_argument("--recursive", "-r", action="store_true", help="descend into sub-folders")
    i = sub.add_parser("info", help="what an exported model is: classes, input, artifacts, parity, accuracy")
    i.add_argument("model", nargs="?", help="export dir (default as for predict)")
    i.add_argument("--json", action="store_true", help="print the raw manifest")
    return parser


def decode_chunk(paths: list[Path]) -> list[np.ndarray | str]:
    """Each file's digit, or the reason it has none; never raises, so one bad file cannot stop the run."""
    out: list[np.ndarray | str] = []
    for path in paths:
        try:
            out.append(load_digit(path))
        except ImageError as e:
            out.append(str(e))
        except Exception as e:  # a decoder bug must cost one row, not the run
            out.append(f"unexpected {type(e).__name__}: {str(e)[:120]}")
    return out


def decode_pool(workers: int) -> Executor:
    """Processes, not threads: decoding is Python-heavy and holds the GIL (measured here: 2 threads decode
    at half the rate of 1, 2 forked processes at twice it)."""
    if workers == 1:
        return ThreadPoolExecutor(1)  # one decoder beside the model, without a process to start
    fork = multiprocessing.get_context("fork") if "fork" in multiprocessing.get_all_start_methods() else None
    pool = ProcessPoolExecutor(workers, mp_context=fork)
    pool.submit(int).result()  # fork the workers now, before the model's runtime starts its threads
    return pool


def decoded_batches(paths: Iterable[Path], pool: Executor,
                    batch_size: int) -> Iterator[list[tuple[Path, np.ndarray | str]]]:
    """Batches in input order, decoded one batch ahead of the model; at most two batches held at once."""
    pending: deque[tuple[list[Path], list[Future]]] = deque()
    batches = iter(lambda: list(itertools.islice(paths, batch_size)), [])
    for batch in batches:
        chunks = [batch[i:i + CHUNK] for i in range(0, len(batch), CHUNK)]
        pending.append((batch, [pool.submit(decode_chunk, c) for c in chunks]))
        if len(pending) > 1:
            yield _collect(*pending.popleft())
    while pending:
        yield _collect(*pending.popleft())


def _collect(batch: list[Path], futures: list[Future]) -> list[tuple[Path, np.ndarray | str]]:
    return list(zip(batch, itertools.chain.from_iterable(f.result() for f in futures)))


def predict_rows(model: LoadedModel, batch: list[tuple[Path, np.ndarray | str]], top_k: int) -> list[Row]:
    good = [x for _, x in batch if isinstance(x, np.ndarray)]
    probs = softmax(model.run(np.stack(good)[:, None])) if good else np.empty((0, 0))
    classes, k = model.classes, min(top_k, len(model.classes))
    rows, j = [], 0
    for path, x in batch:
        if isinstance(x, str):
            rows.append(Row(str(path), error=x))
            continue
        p = probs[j]
        j += 1
        best = int(p.argmax())
        top = tuple((classes[c], float(p[c])) for c in np.argsort(-p)[:k]) if k else ()
        rows.append(Row(str(path), classes[best], best, float(p[best]), top))
    return rows


@contextmanager
def open_output(path: str | None) -> Iterator[TextIO]:
    """stdout, or a temp file beside `path` that replaces it only when the run completes."""
    if path is None:
        yield sys.stdout
        return
    target = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent)
    try:
        with os.fdopen(fd, "w") as stream:
            yield stream
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def check_inputs(inputs: list[str], recursive: bool) -> Iterator[Path]:
    missing = [i for i in inputs if not os.path.exists(i)]
    if missing:
        raise UsageError(f"no such file or folder: {missing[0]}")
    paths = find_images(inputs, recursive)
    first = next(paths, None)
    if first is None:
        hint = "" if recursive else " (add --recursive for sub-folders)"
        raise UsageError(f"no image files in {', '.join(inputs)}{hint}")
    return itertools.chain([first], paths)


def predict(args: argparse.Namespace) -> int:
    if args.batch_size < 1 or args.workers < 1 or args.top_k < 0 or args.threads < 0:
        raise UsageError("--batch-size and --workers must be at least 1, --top-k and --threads at least 0")
    if args.output and not Path(args.output).parent.is_dir():
        raise UsageError(f"--output {args.output}: folder {Path(args.output).parent} does not exist")
    paths = check_inputs(args.inputs, args.recursive)
    model_dir = Path(args.model) if args.model else default_model_dir()
    start = time.perf_counter()
    with decode_pool(args.workers) as pool:
        model = load_model(model_dir, args.backend, args.threads or None)
        count, failed = run_predictions(args, paths, model, pool)
    seconds = time.perf_counter() - start
    print(f"{count:,} images, {failed:,} failed, {seconds:.2f}s, {count / seconds:,.0f} images/s "
          f"[{model.backend}, model {model.directory}]", file=sys.stderr)
    return 1 if failed else 0


def run_predictions(args: argparse.Namespace, paths: Iterable[Path], model: LoadedModel,
                    pool: Executor) -> tuple[int, int]:
    """Stream rows batch by batch; (images, failures)."""
    show_progress = sys.stderr.isatty()
    count = failed = 0
    start = time.perf_counter()
    with open_output(args.output) as stream:
        writer = WRITERS[args.format](stream)
        for batch in decoded_batches(paths, pool, args.batch_size):
            for row in predict_rows(model, batch, args.top_k):
                writer.write(row)
                failed += row.error is not None
            count += len(batch)
            stream.flush()
            if show_progress:
                rate = count / (time.perf_counter() - start)
                print(f"\r{count:,} images, {rate:,.0f}/s", end="", file=sys.stderr, flush=True)
    if show_progress:
        print(file=sys.stderr)
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
    from export.manifest import ManifestError, verify_file

    model, inp, parity = m["model"], m["input"], m.get("parity", {})
    src = m.get("source", {})
    norm = inp.get("normalization", {})
    lines = [
        f"model      {directory}",
        f"network    {model['name']} (task {model['task']}, {model['num_classes']} classes: "
        f"{' '.join(model['classes'])})",
        f"input      {inp['name']} {inp['dtype']} [{', '.join(map(str, inp['shape']))}] in "
        f"[{inp['range'][0]:g}, {inp['range'][1]:g}], {inp['polarity']}; "
        f"mean {norm.get('mean')} / std {norm.get('std')} applied {norm.get('applied')}",
        f"output     {m['output']['name']} {m['output']['dtype']} [{', '.join(map(str, m['output']['shape']))}]",
    ]
    if src:
        acc = f", test accuracy {src['test_accuracy']:.2%}" if src.get("test_accuracy") is not None else ""
        lines.append(f"source     {src['checkpoint']} (epoch {src['epoch']}{acc})")
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
        for name, r in parity["backends"].items():
            acc = f"  accuracy {r['accuracy']:.2%}" if r.get("accuracy") is not None else ""
            lines.append(f"           {name:<17} max |diff| {r['max_abs_diff']:.1e}  top-1 agree "
                         f"{r['top1_agreement']:.2%}{acc}")
    versions = ", ".join(f"{k} {v}" for k, v in m.get("versions", {}).items())
    lines.append(f"created    {m.get('created', '?')} with {versions}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return predict(args) if args.command == "predict" else info(args)
    except (UsageError, ModelError) as e:
        print(f"serve_cli: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `serve_cli predict ... | head` is fine
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
