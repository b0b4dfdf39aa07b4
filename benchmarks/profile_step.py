"""Where one training step's time goes, per rank: torch.profiler over real steps of the real trainer.

    torchrun --standalone --nproc_per_node=2 benchmarks/profile_step.py --data-dir data   # the default run
    python benchmarks/profile_step.py --data-dir data --model samnet --steps 20          # one process

Each rank builds the run exactly as `distributed.train` does (build_parts: data on the device, the model,
DDP under torchrun), trains `--warmup` steps, then profiles `--steps` steps and sorts the operators' self
time into categories: the network's forward and backward kernels, DDP's gradient all-reduce, the optimiser,
the batch (gather, augmentation, normalisation) and the rest (distributed/profiling.py: the same table as the
trainer's --profile-steps, which profiles the steps of a real run instead). "wall" is the steps' wall clock; "outside
operators" is wall minus every operator's self time: Python, the autograd engine's own work, waiting.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> int:
    import torch
    from torch.profiler import profile

    from distributed import comms
    from distributed.config import parse_args
    from distributed.profiling import activities, operator_table
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
            with profile(activities=activities(env.device)) as prof:
                start = time.perf_counter()
                for k in steps[args.warmup:]:
                    trainer.step(order, k)
                if env.device.type == "cuda":
                    torch.cuda.synchronize()
                wall = time.perf_counter() - start
            report = operator_table(prof, args.steps, wall, f"rank {env.rank} of {env.world_size}, {cfg.model}, "
                                    f"global batch {trainer.cfg.global_batch_size}, micro-batch {cfg.batch_size}")
            gathered = comms.all_gather_objects(report, env)
            if env.is_main:
                print("\n\n".join(gathered))
        finally:
            trainer.close()
            comms.teardown(peers_in_step=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
