"""How a run stops early: a stop signal, or a loss that is no longer finite.

SLURM and Kubernetes stop jobs with SIGTERM, a user with Ctrl-C, a closed terminal with SIGHUP. Before the
training loop starts there is nothing to save, so the signal stops the process at once
(serve_cli.base.cli.Stopped: the data phase may take a while, a folder's first decoding); once the loop runs, the
ranks agree on a step to stop at together, save, and raise Preempted.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from serve_cli.base.cli import Stopped, after_hangup, terminals


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
