"""Where a run's wall time went, by phase, from the moment the process started: what the user waited for."""
from __future__ import annotations

import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

PHASES = ("start-up", "data", "training", "evaluation", "checkpoints/logging")


def seconds_since_process_start() -> float:
    """How long this process has run (interpreter start, imports, torchrun's worker spawn); 0.0 if unknown.

    Linux only: /proc/self/stat's start time and /proc/uptime share one clock (10 ms ticks)."""
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        started = int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22 of the man page, counted after comm
        return max(0.0, float(Path("/proc/uptime").read_text().split()[0]) - started)
    except (OSError, ValueError, IndexError):
        return 0.0


class Phases:
    """Charges every second since process start to exactly one phase; nested phases pause the outer one.

    Time outside any explicit phase counts as start-up (imports, process group, model, DDP), so the
    phases always add up to the whole run."""

    def __init__(self, already: float | None = None) -> None:
        self.seconds = dict.fromkeys(PHASES, 0.0)
        self.seconds["start-up"] = seconds_since_process_start() if already is None else already
        self.stack = ["start-up"]
        self.mark = time.perf_counter()

    def _charge(self) -> None:
        now = time.perf_counter()
        self.seconds[self.stack[-1]] += now - self.mark
        self.mark = now

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        self._charge()
        self.stack.append(phase)
        try:
            yield
        finally:
            self._charge()
            self.stack.pop()

    def snapshot(self) -> dict[str, float]:
        self._charge()
        return {name: round(value, 3) for name, value in self.seconds.items()}


def phase_line(seconds: dict[str, float]) -> str:
    parts = ", ".join(f"{name} {value:.1f}s" for name, value in seconds.items())
    return f"time: {parts} (total {sum(seconds.values()):.1f}s)"
