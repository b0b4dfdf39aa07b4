"""Where one training step's time goes, per rank: torch.profiler over real steps of the real trainer.

    torchrun --standalone --nproc_per_node=2 benchmarks/profile_step.py --data-dir data   # the default run
    python benchmarks/profile_step.py --data-dir data --model samnet --steps 20          # one process

Each rank builds the run exactly as `distributed.train` does (build_parts: data on the device, the model,
DDP under torchrun), trains `--warmup` steps, then profiles `--steps` steps and sorts the operators' self
time into categories: the network's forward and backward kernels, DDP's gradient all-reduce, the optimiser,
the batch (gather, augmentation, normalisation) and the rest. "wall" is the steps' wall clock; "outside
operators" is wall minus every operator's self time: Python, the autograd engine's own work, waiting.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

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


def main() -> int:
    import torch
    from torch.profiler import ProfilerActivity, profile

    from distributed import comms
    from distributed.config import parse_args
    from distributed.timing import Phases
    from distributed.train import StopRequest, Trainer

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--steps", type=int, default=20)
    args, trainer_flags = p.parse_known_args()
    with tempfile.TemporaryDirectory() as run_dir:
        # many epochs: the schedule must not end before the profiled steps do (the trainer's flags come after)
        cfg = parse_args(["--epochs", "1000", *trainer_flags, "--run-dir", run_dir, "--no-resume"])
        env = comms.setup(cfg.device)
        trainer = Trainer.build(cfg, env, StopRequest(), Phases())
        try:
            order = trainer.parts.plan.order(0, env.device)
            steps = [k % trainer.parts.plan.steps for k in range(args.warmup + args.steps)]
            trainer.parts.net.train()
            for k in steps[:args.warmup]:
                trainer.step(order, k)
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if env.device.type == "cuda" else [])
            with profile(activities=activities) as prof:
                start = time.perf_counter()
                for k in steps[args.warmup:]:
                    trainer.step(order, k)
                if env.device.type == "cuda":
                    torch.cuda.synchronize()
                wall = time.perf_counter() - start
            totals: dict[str, float] = defaultdict(float)
            by_operator: dict[str, float] = defaultdict(float)
            for event in prof.key_averages():
                totals[category(event.key)] += event.self_cpu_time_total / 1e3  # ms
                by_operator[event.key] += event.self_cpu_time_total / 1e3
            rows = sorted(totals.items(), key=lambda kv: -kv[1])
            measured = sum(totals.values())
            report = [f"rank {env.rank} of {env.world_size}, {cfg.model}, global batch "
                      f"{trainer.cfg.global_batch_size}, micro-batch {cfg.batch_size}, "
                      f"{args.steps} steps: {wall / args.steps * 1e3:.1f} ms per step",
                      "| where | ms per step | share of wall |", "|---|---|---|"]
            report += [f"| {name} | {ms / args.steps:.2f} | {ms / 1e3 / wall:.0%} |" for name, ms in rows]
            outside = wall * 1e3 - measured
            report.append(f"| outside operators (Python, autograd engine, waiting) | {outside / args.steps:.2f} | "
                          f"{outside / 1e3 / wall:.0%} |")
            largest = sorted(by_operator.items(), key=lambda kv: -kv[1])[:8]
            report.append("largest operators: " + ", ".join(f"{name} {ms / args.steps:.2f} ms" for name, ms in largest))
            gathered = comms.all_gather_objects("\n".join(report), env)
            if env.is_main:
                print("\n\n".join(gathered))
        finally:
            trainer.close()
            comms.teardown(peers_in_step=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
