"""--profile-steps A:B: torch.profiler over optimiser steps A to B of the real run, on every rank.

Each rank writes its own RUN_DIR/profile/rankR.trace.json.gz (Chrome trace format: ui.perfetto.dev or
chrome://tracing open it as it is) and rankR.operators.txt, the steps' operators' self time by category:
the table benchmarks/profile_step.py prints. The profiler exists only between A and B: no cost elsewhere.
"""
from __future__ import annotations

import gzip
import os
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from serve_cli.base.files import atomic_write

# operator name fragment -> category, first match wins
CATEGORIES = (
    ("all_reduce", "DDP all-reduce (gloo/NCCL)"), ("allreduce", "DDP all-reduce (gloo/NCCL)"),
    ("record_param_comms", "DDP all-reduce (gloo/NCCL)"), ("c10d", "DDP all-reduce (gloo/NCCL)"),
    ("Optimizer.step", "optimiser"), ("adam", "optimiser"), ("_foreach", "optimiser"), ("sgd", "optimiser"),
    ("autograd::engine", "autograd engine"), ("convolution_backward", "conv backward"),
    ("ConvolutionBackward", "conv backward"), ("mkldnn_convolution", "conv forward"),
    ("convolution", "conv forward"), ("conv", "conv forward"),
    ("addmm", "linear (matmul)"), ("mm", "linear (matmul)"), ("linear", "linear (matmul)"),
    ("max_pool", "pooling"), ("batch_norm", "batch norm"), ("relu", "activations"), ("threshold", "activations"),
    ("cross_entropy", "loss"), ("log_softmax", "loss"), ("nll_loss", "loss"),
    ("index", "batch (gather, augment, normalise)"), ("grid_sampler", "batch (gather, augment, normalise)"),
    ("affine_grid", "batch (gather, augment, normalise)"), ("div", "batch (gather, augment, normalise)"),
    ("sub", "batch (gather, augment, normalise)"),
)


def category(name: str) -> str:
    lowered = name.lower()
    return next((cat for fragment, cat in CATEGORIES if fragment.lower() in lowered), "other operators")


def parse_steps(text: str) -> tuple[int, int]:
    first, last = text.split(":")
    return int(first), int(last)


def activities(device: torch.device) -> list[ProfilerActivity]:
    return [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])


def operator_table(prof: profile, steps: int, wall: float, title: str) -> str:
    """The steps' operators' self time by category (ms per step, share of the wall clock), then the largest."""
    totals: dict[str, float] = defaultdict(float)
    by_operator: dict[str, float] = defaultdict(float)
    for event in prof.key_averages():
        totals[category(event.key)] += event.self_cpu_time_total / 1e3  # ms
        by_operator[event.key] += event.self_cpu_time_total / 1e3
    steps = max(steps, 1)
    lines = [f"{title}: {steps} steps, {wall / steps * 1e3:.1f} ms per step",
             "| where | ms per step | share of wall |", "|---|---|---|"]
    lines += [f"| {name} | {ms / steps:.2f} | {ms / 1e3 / wall:.0%} |"
              for name, ms in sorted(totals.items(), key=lambda kv: -kv[1])]
    outside = wall * 1e3 - sum(totals.values())
    lines.append(f"| outside operators (Python, autograd engine, waiting) | {outside / steps:.2f} | "
                 f"{outside / 1e3 / wall:.0%} |")
    largest = sorted(by_operator.items(), key=lambda kv: -kv[1])[:8]
    lines.append("largest operators: " + ", ".join(f"{name} {ms / steps:.2f} ms" for name, ms in largest))
    return "\n".join(lines)


class StepProfiler:
    """Starts before step `first` runs and stops after step `last` (or when the run ends first), then writes
    this rank's trace and table. `before_step` / `after_step` take the global, 1-based step number."""

    def __init__(self, steps: str, folder: Path, rank: int, world_size: int, device: torch.device) -> None:
        self.first, self.last = parse_steps(steps)
        self.folder, self.rank, self.world_size, self.device = folder, rank, world_size, device
        self.prof: profile | None = None
        self.start = 0.0
        self.started_at = 0
        self.steps = 0

    def before_step(self, step: int) -> None:
        if self.prof is None and self.first <= step <= self.last:
            os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # kineto's "no GPU" ERROR line on a CPU machine
            self.prof = profile(activities=activities(self.device))
            self.prof.__enter__()
            self.started_at, self.steps, self.start = step, 0, time.perf_counter()

    def after_step(self, step: int) -> None:
        if self.prof is not None:
            self.steps += 1
            if step >= self.last:
                self.stop()

    def stop(self) -> Path | None:
        """End the profile (if one runs) and write its files; the trace's path."""
        if self.prof is None:
            return None
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        wall = time.perf_counter() - self.start
        prof, self.prof = self.prof, None
        prof.__exit__(None, None, None)
        self.folder.mkdir(parents=True, exist_ok=True)
        trace = self.folder / f"rank{self.rank}.trace.json.gz"
        with tempfile.TemporaryDirectory(dir=self.folder) as tmp:  # the profiler writes a path, uncompressed
            raw = Path(tmp) / "trace.json"
            prof.export_chrome_trace(str(raw))
            atomic_write(trace, lambda t: t.write_bytes(gzip.compress(raw.read_bytes(), compresslevel=6)))
        end = self.started_at + self.steps - 1
        table = operator_table(prof, self.steps, wall, f"rank {self.rank} of {self.world_size}, steps "
                                                       f"{self.started_at}:{end}")
        atomic_write(self.folder / f"rank{self.rank}.operators.txt", lambda t: t.write_text(table + "\n"))
        return trace
