"""Step metrics over a window of --log-every steps: throughput, where a step's time went, utilisation, memory.

Every rank measures; the window closes at a logged step with the one host synchronisation of the window
(steps that are not logged add none), and the ranks' own figures are gathered so that a straggler shows.
What is shown, and where, is report.py's; this module only measures.
"""
from __future__ import annotations

import copy
import resource
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

# Dense (no sparsity) peak TFLOP/s per GPU from the vendors' datasheets, by the name torch reports; the
# longest matching name wins ("H100 PCIe" before "H100"). fp32 is the CUDA-core figure (no TF32: torch's
# default for matmuls). Sources: NVIDIA H200 datasheet (SXM: 989 bf16/fp16, 67 fp32); H100 datasheet
# (SXM 989/67, PCIe 756/51, NVL 835/60; the 1,979 quoted is with sparsity); A100 datasheet (312/19.5);
# L40S datasheet (362/91.6); L4 datasheet (121/30.3); A10 datasheet (125/31.2); Ada whitepaper, RTX 4090
# (165.2 fp16/bf16 with fp32 accumulate, 82.6 fp32); V100 datasheet (SXM2: 125 fp16 tensor, 15.7 fp32; no bf16).
PEAK_TFLOPS: dict[str, dict[str, float]] = {
    "H200": {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0},
    "H100 PCIe": {"bf16": 756.0, "fp16": 756.0, "fp32": 51.0},
    "H100 NVL": {"bf16": 835.0, "fp16": 835.0, "fp32": 60.0},
    "H100": {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0},
    "A100": {"bf16": 312.0, "fp16": 312.0, "fp32": 19.5},
    "L40S": {"bf16": 362.0, "fp16": 362.0, "fp32": 91.6},
    "L4": {"bf16": 121.0, "fp16": 121.0, "fp32": 30.3},
    "A10": {"bf16": 125.0, "fp16": 125.0, "fp32": 31.2},
    "RTX 4090": {"bf16": 165.2, "fp16": 165.2, "fp32": 82.6},
    "V100": {"fp16": 125.0, "fp32": 15.7},
}

# What each rank reports at a logged step, in this order (gathered as one float tensor).
RANK_FIELDS = ("data_ms", "allreduce_ms", "memory_gib", "memory_reserved_gib")


def training_flops_per_image(model: nn.Module, image_shape: tuple[int, ...], num_classes: int) -> float:
    """FLOPs of one forward + backward per training image, counted by torch's FlopCounterMode (matmuls and
    convolutions, as is usual) on a copy of the model on the meta device: no memory, no time, no RNG, and the
    real model's weights, gradients and BatchNorm statistics are untouched."""
    from torch.utils.flop_counter import FlopCounterMode
    meta = copy.deepcopy(model).to("meta").train()
    x = torch.zeros((2, *image_shape), device="meta")
    y = torch.zeros(2, dtype=torch.long, device="meta")
    with FlopCounterMode(display=False) as counter:
        F.cross_entropy(meta(x), y.clamp(max=num_classes - 1)).backward()
    return counter.get_total_flops() / 2


def device_peak_flops(device: torch.device, dtype: torch.dtype | None) -> float | None:
    """One GPU's dense peak for the training dtype from PEAK_TFLOPS; None for an unknown GPU or a CPU."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    key = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "fp32")
    for known in sorted(PEAK_TFLOPS, key=len, reverse=True):
        if known in name and key in PEAK_TFLOPS[known]:
            return PEAK_TFLOPS[known][key] * 1e12
    return None


def job_peak_flops(node_peak: float | None, device: torch.device, dtype: torch.dtype | None, world_size: int,
                   local_world_size: int) -> float | None:
    """The whole job's peak: --peak-flops per node times the nodes, else the GPU's datasheet figure times the
    ranks (one GPU each); None on a CPU without --peak-flops."""
    if node_peak:
        return node_peak * max(world_size // max(local_world_size, 1), 1)
    per_device = device_peak_flops(device, dtype)
    return per_device * world_size if per_device else None


class AllReduceTimer:
    """DDP's own all-reduce (its default comm hook) with the wall time from each bucket's launch to its
    completion added up: it runs beside the backward, so it is not a share of the step. CUDA times it with
    events in stream order, read only when the window closes; the CPU (gloo) with the host clock in the
    future's callback, which DDP waits for before the backward returns."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.seconds = 0.0
        self.events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []

    # No annotations: DDP compares them with its classes, and under `from __future__ import annotations` they
    # are strings.
    def hook(self, process_group, bucket):  # noqa: ANN001, ANN201
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
        if self.cuda:
            start = torch.cuda.Event(enable_timing=True)
            start.record()
        else:
            began = time.perf_counter()

        def done(future: torch.futures.Future) -> torch.Tensor:
            if self.cuda:
                end = torch.cuda.Event(enable_timing=True)
                end.record()
                self.events.append((start, end))
            else:
                self.seconds += time.perf_counter() - began
            return future.value()

        return allreduce_hook(process_group, bucket).then(done)

    def take(self) -> float:
        """Seconds since the last take (the device synchronised by the caller)."""
        seconds = self.seconds + sum(a.elapsed_time(b) for a, b in self.events) / 1000
        self.seconds, self.events = 0.0, []
        return seconds


def peak_memory(device: torch.device) -> tuple[float, float]:
    """(allocated, reserved) peak GiB since the last reset on CUDA; the process's peak RSS (twice) on the CPU."""
    if device.type == "cuda":
        return (torch.cuda.max_memory_allocated(device) / 2 ** 30, torch.cuda.max_memory_reserved(device) / 2 ** 30)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2 ** 30  # KiB on Linux
    return rss, rss


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


@dataclass
class Window:
    """The steps since the last logged one. `data_seconds` is host time spent assembling batches (the data is
    on the device, so this is indexing, augmentation and normalisation being launched or run)."""
    first_step: int
    first_images: int
    start: float = field(default_factory=time.perf_counter)
    data_seconds: float = 0.0


@dataclass
class StepMeter:
    """One rank's measurements; `close` returns the window's figures at a logged step (a collective)."""
    device: torch.device
    flops_per_image: float
    job_peak_flops: float | None  # every rank's devices together; None: FLOP/s without a percentage
    allreduce: AllReduceTimer | None
    window: Window | None = None

    def open(self, step: int, images: int) -> None:
        self.window = Window(step, images)
        reset_peak_memory(self.device)
        if self.allreduce is not None:
            self.allreduce.take()

    def data_time(self, seconds: float) -> None:
        if self.window is not None:
            self.window.data_seconds += seconds

    def close(self, step: int, images: int, gather) -> dict[str, Any]:
        """The window's metrics (every rank calls it at the same step: the ranks' figures are gathered)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        w = self.window
        seconds = max(time.perf_counter() - w.start, 1e-9)
        steps, done = step - w.first_step, images - w.first_images
        allreduce = self.allreduce.take() if self.allreduce is not None else 0.0
        allocated, reserved = peak_memory(self.device)
        mine = [w.data_seconds * 1000 / max(steps, 1), allreduce * 1000 / max(steps, 1), allocated, reserved]
        ranks = gather(mine)
        images_per_second = done / seconds
        out: dict[str, Any] = {
            "steps": steps, "images": done, "seconds": seconds, "images_per_second": images_per_second,
            "step_ms": seconds * 1000 / max(steps, 1), "flops_per_second": self.flops_per_image * images_per_second,
            "ranks": {name: [r[i] for r in ranks] for i, name in enumerate(RANK_FIELDS)},
        }
        for i, name in enumerate(RANK_FIELDS):  # the slowest rank's: what the step waited for
            out[name] = max(r[i] for r in ranks)
        out["compute_ms"] = max(out["step_ms"] - out["data_ms"], 0.0)
        if self.device.type != "cuda":  # one figure on the CPU: the peak RSS
            del out["memory_reserved_gib"], out["ranks"]["memory_reserved_gib"]
        if self.job_peak_flops:
            out["mfu"] = out["flops_per_second"] / self.job_peak_flops
        self.open(step, images)
        return out


def epoch_summary(windows: list[dict[str, Any]]) -> dict[str, Any]:
    """metrics.json's per-epoch view of its windows: totals for the rates, the worst for memory, the last
    gradient norm."""
    if not windows:
        return {}
    seconds = sum(w["seconds"] for w in windows)
    steps = sum(w["steps"] for w in windows)
    images = sum(w["images"] for w in windows)
    out = {"windows": len(windows), "steps": steps, "images": images, "seconds": seconds,
           "images_per_second": images / seconds, "step_ms": seconds * 1000 / steps,
           "data_ms": sum(w["data_ms"] * w["steps"] for w in windows) / steps,
           "allreduce_ms": sum(w["allreduce_ms"] * w["steps"] for w in windows) / steps,
           "flops_per_second": sum(w["flops_per_second"] * w["seconds"] for w in windows) / seconds,
           "memory_gib": max(w["memory_gib"] for w in windows),
           "grad_norm": windows[-1].get("grad_norm")}
    if "memory_reserved_gib" in windows[-1]:
        out["memory_reserved_gib"] = max(w["memory_reserved_gib"] for w in windows)
    if "mfu" in windows[-1]:
        out["mfu"] = sum(w["mfu"] * w["seconds"] for w in windows) / seconds
    if "loss_scale" in windows[-1]:
        out["loss_scale"] = windows[-1]["loss_scale"]
    return out
