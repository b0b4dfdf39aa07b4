"""How a run stops early: a stop signal, or a loss that is no longer finite.

SLURM and Kubernetes stop jobs with SIGTERM, a user with Ctrl-C, a closed terminal with SIGHUP. Before the
training loop starts there is nothing to save, so the signal stops the process at once
(serve_cli.base.cli.Stopped: the data phase may take a while, a folder's first decoding); once the loop runs, the
ranks agree on a step to stop at together, save, and raise Preempted.
"""
from __future__ import annotations

import os
import sys
import time
from contextlib import suppress
from dataclasses import dataclass, field
from typing import Any

from serve_cli.base.cli import Stopped, after_hangup, terminals

from . import comms

FAIL_GRACE_SECONDS = 1.0  # how long the other ranks wait for rank 0 to report an error they all hit


class Preempted(Exception):
    """A stop signal arrived; a checkpoint was saved and the run can resume."""


class Diverged(RuntimeError):
    """The loss became NaN or infinite; nothing after the last good checkpoint was saved."""


@dataclass
class StopRequest:
    """The signal handler: raises Stopped before training, else records the signal for the loop to agree on.
    `ttys`: the terminals a hangup takes away (serve_cli.base.cli.after_hangup), read when the handler is made."""
    signal: int | None = None
    training: bool = False
    ttys: tuple[int, ...] = field(default_factory=terminals)

    def __call__(self, signum: int, frame: Any) -> None:
        self.signal = signum
        after_hangup(signum, self.ttys)
        if not self.training:
            raise Stopped(signum)


def fail(message: str, code: int, env: comms.DistEnv | None) -> int:
    """One line on stderr, from rank 0 alone (every rank hits the same error, also before the process group).

    The other ranks leave a moment later: torchrun stops every worker as soon as one exits, and rank 0 must
    have said why by then."""
    if (env.rank if env is not None else comms.env_int("RANK", 0)) == 0:
        print(message, file=sys.stderr, flush=True)
    else:
        with suppress(Stopped):  # torchrun's SIGTERM, once rank 0 has gone
            time.sleep(FAIL_GRACE_SECONDS)
    return code


def exit_now(code: int) -> None:
    """Leave without the interpreter's teardown of torch's modules: 0.8-1.2 s here, after the run is over.

    Everything a user relies on is already on disk (atomic writes, fsynced), the TensorBoard writer is
    closed and the process group destroyed; only stdout/stderr need a flush."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
