"""The worker pool behind `serve_cli predict`: batches of paths in, rows' raw material out, in input order.

Forked processes each decode a batch and, on the CPU, run their own copy of the model on it, so only
logits cross back; at most `in_flight` batches are submitted and not yet collected.
"""
from __future__ import annotations

import functools
import itertools
import multiprocessing
import signal
from collections import deque
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import numpy as np

from .base.images import digit_or_reason
from .model import ModelError, Runtime


@dataclass
class Chunk:
    """One batch back from a worker: a reason per failed file, and logits when the worker holds the
    model (else the decoded images, for the model in the main process)."""
    errors: list[str | None]
    logits: np.ndarray | None = None
    images: np.ndarray | None = None


_worker_model: Callable[[np.ndarray], np.ndarray] | None = None  # per pool process, set once at its start


def start_worker(runtime: Runtime | None) -> None:
    global _worker_model
    # Ctrl-C and a closed terminal's SIGHUP reach the whole process group; the main process decides, and shuts
    # the pool down.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if runtime is None:
        return
    try:
        _worker_model = runtime.build()[1]
    except ModelError as e:  # raised from each batch, so the main process reports it as one line
        _worker_model = functools.partial(_fail, str(e))


def _fail(message: str, images: np.ndarray) -> np.ndarray:
    raise ModelError(message)


def decode(paths: list[str]) -> tuple[list[np.ndarray], list[str | None]]:
    """Each file's uint8 digit or the reason it has none; never raises, so one bad file cannot stop the run."""
    digits: list[np.ndarray] = []
    errors: list[str | None] = []
    for path in paths:
        result = digit_or_reason(path)
        if isinstance(result, str):
            errors.append(result)
        else:
            digits.append(result)
            errors.append(None)
    return digits, errors


def process_batch(paths: list[str]) -> Chunk:
    """Paths as text (find_images's): a Path is pickled as its parts and parsed again on the other side."""
    digits, errors = decode(paths)
    if not digits:
        return Chunk(errors)
    # the model's [0, 1] input: k / 255, for the whole batch at once rather than image by image
    images = np.stack(digits)[:, None].astype(np.float32) / np.float32(255.0)
    if _worker_model is None:
        return Chunk(errors, images=images)
    return Chunk(errors, logits=_worker_model(images))


def worker_pool(workers: int, runtime: Runtime | None) -> Executor:
    """Forked processes that decode and, given a CPU `runtime`, also run the model on what they decoded:
    every core then does both, and only logits cross back. Processes, not threads: decoding is
    Python-heavy and holds the GIL (measured here: 2 threads decode at half the rate of 1)."""
    if workers == 1:
        return ThreadPoolExecutor(1)  # one decoder beside the model, without a process to start
    fork = multiprocessing.get_context("fork") if "fork" in multiprocessing.get_all_start_methods() else None
    pool = ProcessPoolExecutor(workers, mp_context=fork, initializer=start_worker, initargs=(runtime,))
    # Forked workers all start at the first task: a no-op now, so that they import the runtime and build their
    # models while the main process lists the folder, not after.
    pool.submit(int)
    return pool


def processed_batches(paths: Iterable[str], pool: Executor, batch_size: int,
                      in_flight: int) -> Iterator[tuple[list[str], Chunk]]:
    """Batches in input order; at most `in_flight` are submitted and not yet collected."""
    pending: deque[tuple[list[str], Future]] = deque()
    for batch in iter(lambda: list(itertools.islice(paths, batch_size)), []):
        pending.append((batch, pool.submit(process_batch, batch)))
        if len(pending) >= in_flight:
            path_batch, future = pending.popleft()
            yield path_batch, future.result()
    while pending:
        path_batch, future = pending.popleft()
        yield path_batch, future.result()
