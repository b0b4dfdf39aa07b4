"""A folder dataset's first decoding: every file through serve_cli's preprocessing, in a pool of processes
that a stop signal ends cleanly."""
from __future__ import annotations

import gc
import multiprocessing
import signal
import sys
from pathlib import Path

import numpy as np

from serve_cli.base.cli import usable_cores
from serve_cli.base.images import digits_or_reasons
from serve_cli.base.progress import Progress


def decode_all(paths: list[Path], chunk: int = 500, label: str = "decoding") -> list[np.ndarray | str]:
    """Every file through serve_cli's preprocessing, in a pool of processes (one per core), with progress: a
    live line on a terminal, else a plain line every 30 s (the process that decodes: each node's local rank 0).

    "spawn": a fork of a process that holds torch's thread pools can deadlock. A Ctrl-C reaches the whole
    process group, and so does a closed terminal's SIGHUP: the workers ignore both (they are started with them
    ignored, which survives exec, so not even their start-up prints a KeyboardInterrupt; a signal mask would
    not: the spawn resets it) and the parent, stopping, terminates them (SIGTERM ends a worker silently)."""
    workers = min(usable_cores(), -(-len(paths) // chunk))
    chunks = [paths[i:i + chunk] for i in range(0, len(paths), chunk)]
    progress = Progress(len(paths), label, "image", plain=sys.stdout)
    try:
        return decode_chunks(chunks, workers, progress)
    finally:
        progress.close()


def decode_chunks(chunks: list[list[Path]], workers: int, progress: Progress) -> list[np.ndarray | str]:
    results: list[np.ndarray | str] = []
    if workers <= 1:
        for c in chunks:
            results += digits_or_reasons(c)
            progress.update(len(c))
        return results
    # For the milliseconds the workers take to start, a Ctrl-C is lost to the parent too; it can be pressed again.
    previous = {signum: signal.signal(signum, signal.SIG_IGN) for signum in (signal.SIGINT, signal.SIGHUP)}
    try:
        pool = multiprocessing.get_context("spawn").Pool(workers, initializer=quiet_worker)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    try:
        for part in pool.imap(digits_or_reasons, chunks):  # in order
            results += part
            progress.update(len(part))
    except BaseException as e:
        pool.terminate()
        pool.join()
        # The traceback's frames (inside Pool.map) and the pool's own cycles hold its semaphores: freed here, or
        # a later os._exit leaves them to the resource tracker, which warns of "leaked semaphore objects".
        error = e.with_traceback(None)
        del e, pool
        gc.collect()
        raise error from None
    pool.close()
    pool.join()
    return results


def quiet_worker() -> None:
    """A decoding worker: Ctrl-C and SIGHUP are the parent's to handle; SIGTERM (the parent's terminate) ends it
    silently."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
