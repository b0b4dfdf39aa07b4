"""The run dir: created or refused in one line, and the one-run-per-run-dir lock."""
from __future__ import annotations

import fcntl
import os
import socket
import time
from pathlib import Path
from typing import TextIO

from serve_cli.base.files import broken_link

from .comms import DistEnv, all_ok

LOCK_NAME = ".lock"
CHECKPOINT_DIR = "checkpoints"  # RUN_DIR/checkpoints/{last,best}.pt


class RunDirError(RuntimeError):
    """The run dir cannot be used: not a folder, not writable, or held by another run."""


def prepare_run_dir(run_dir: Path) -> None:
    """Create the run dir, and check the checkpoint folder in it (made at the first save), or say in one line
    why they cannot be used: before any work, not at the first save. A link (to a bigger disk, say) is fine
    where it leads to a folder."""
    checkpoints = run_dir / CHECKPOINT_DIR
    for folder, name in ((run_dir, f"--run-dir {run_dir}"), (checkpoints, str(checkpoints))):
        broken = broken_link(folder, name)
        if broken:
            raise RunDirError(f"{broken}: make it lead to a folder, or remove it")
        if folder.exists() and not folder.is_dir():
            raise RunDirError(f"{name} is a file, not a folder: move it away, or choose another --run-dir")
        if folder == run_dir:
            try:
                folder.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise RunDirError(f"cannot create {name} ({e.strerror}): choose a writable place") from None
        if folder.exists() and not os.access(folder, os.W_OK | os.X_OK):
            raise RunDirError(f"{name} is not writable: choose a writable place")


class RunDirLock:
    """An exclusive flock on RUN_DIR/.lock for the life of a run.

    The kernel drops the lock when the process dies however it dies, so a crashed run leaves nothing stale
    behind; the file itself only says who holds it, for the second run's error message.
    """

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / LOCK_NAME
        self.stream: TextIO | None = None

    def acquire(self) -> None:
        stream = open(self.path, "a+")
        try:
            fcntl.flock(stream, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            stream.seek(0)
            holder = stream.read().strip() or "another process"
            stream.close()
            raise RunDirError(f"--run-dir {self.path.parent} is in use by {holder}: wait for that run to end, "
                              f"or choose another --run-dir") from None
        stream.seek(0)
        stream.truncate()
        stream.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        stream.flush()
        self.stream = stream

    def release(self) -> None:
        if self.stream is not None:
            self.stream.close()  # closing drops the flock
            self.stream = None


def lock_run_dir(run_dir: Path, env: DistEnv) -> RunDirLock | None:
    """Rank 0 holds RUN_DIR/.lock for the run; every rank fails together when it cannot."""
    lock, error = None, None
    if env.is_main:
        try:
            prepare_run_dir(run_dir)
            lock = RunDirLock(run_dir)
            lock.acquire()
        except RunDirError as e:
            error = e
    if not all_ok(error is None, env):
        raise error or RunDirError(f"--run-dir {run_dir} cannot be used (see rank 0's error)")
    return lock
