"""How a run stops early: a stop signal, or a loss that is no longer finite.

SLURM and Kubernetes stop jobs with SIGTERM, a user with Ctrl-C. Before the training loop starts there is
nothing to save, so the signal stops the process at once (serve_cli.cli.Stopped: the data phase may take a
while, a folder's first decoding); once the loop runs, the ranks agree on a step to stop at together, save,
and raise Preempted.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from serve_cli.cli import Stopped


class Preempted(Exception):
    """A stop signal arrived; a checkpoint was saved and the run can resume."""


class Diverged(RuntimeError):
    """The loss became NaN or infinite; nothing after the last good checkpoint was saved."""


@dataclass
class StopRequest:
    """The signal handler: raises Stopped before training, else records the signal for the loop to agree on."""
    signal: int | None = None
    training: bool = False

    def __call__(self, signum: int, frame: Any) -> None:
        self.signal = signum
        if not self.training:
            raise Stopped(signum)
