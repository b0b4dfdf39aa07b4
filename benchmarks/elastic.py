"""The global batch at work: the same steps at 2 ranks and at 1 rank accumulating, and a node lost mid-epoch.

    python benchmarks/elastic.py --data-dir data        # about 3 minutes on 2 CPU cores (real MNIST)

Rows, every one the real CLI on this machine, read back from metrics.json:
  2 ranks x 32           torchrun --nproc_per_node=2 ... --global-batch-size 64 --batch-size 32
  1 rank x 32, accum 2   torchrun --nproc_per_node=1 ... --global-batch-size 64 --batch-size 32
  2 nodes, uninterrupted launch/multinode.sh, NNODES=1:2, one rank per node
  2 nodes, one lost      the same, with the second node (agent and worker) killed at step --kill-at; the
                         survivor's agent restarts its worker at world size 1, which resumes from last.pt
"wall s" is Enter to prompt of the job (the first node's command); "lost s" is the interrupted job's wall
time minus the uninterrupted one's. FLAGS are the trainer's, added to every row.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import suppress
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def torchrun(nproc: int, flags: list[str]) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "distributed.train", *flags]


def children(pid: int) -> list[int]:
    """torchrun starts its workers in sessions of their own: a node is its agent and these."""
    found = []
    for entry in Path("/proc").iterdir():
        with suppress(OSError, IndexError, ValueError):
            if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def last_step(run_dir: Path) -> tuple[int, int]:
    """(world size, step) of RUN_DIR's last.pt, or (0, -1) while there is none that reads."""
    from distributed import checkpoint
    with suppress(checkpoint.CheckpointError, OSError):
        state = checkpoint.load(run_dir / "checkpoints" / "last.pt")
        return state["world_size"], state["run"]["step"]
    return 0, -1


def two_nodes(flags: list[str], run_dir: Path, kill_at: int | None) -> tuple[float, int | None]:
    """launch/multinode.sh twice on loopback; (wall seconds, the step of the checkpoint the survivor resumed
    from, when a node was killed)."""
    env = {**os.environ, "SKIP_SETUP": "1", "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "NNODES": "1:2", "NPROC_PER_NODE": "1", "RDZV_ENDPOINT": f"127.0.0.1:{free_port()}",
           "RDZV_ID": f"bench-{time.time_ns()}", "MAX_RESTARTS": "3", "RDZV_CONF": "last_call_timeout=3"}
    cmd = ["bash", "launch/multinode.sh", *flags, "--run-dir", str(run_dir)]
    log = run_dir.parent / f"{run_dir.name}.log"
    start = time.perf_counter()
    nodes = []
    with log.open("w") as out:
        for i in range(2):
            nodes.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out if i == 0 else subprocess.DEVNULL,
                                          stderr=subprocess.STDOUT))
            time.sleep(0.5 if i == 0 else 0)  # node 0 hosts the rendezvous store, and survives
    try:
        if kill_at is not None:
            deadline = time.time() + 600
            while last_step(run_dir) < (2, kill_at):
                if nodes[0].poll() is not None or time.time() > deadline:
                    raise SystemExit(f"the job ended or stalled before --kill-at: {log.read_text()[-3000:]}")
                time.sleep(0.05)
            for pid in (nodes[1].pid, *children(nodes[1].pid)):
                os.kill(pid, signal.SIGKILL)
        if nodes[0].wait(timeout=1800) != 0:
            raise SystemExit(f"the job failed: {log.read_text()[-3000:]}")
        wall = time.perf_counter() - start
        resumed = re.findall(r"resumed from .* step (\d+)$", log.read_text(), re.MULTILINE)
        return wall, int(resumed[-1]) if resumed else None
    finally:
        for node in nodes:
            for pid in (*children(node.pid), node.pid):
                with suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default="data")
    p.add_argument("--kill-at", type=int, default=500, help="step after which the second node is killed")
    p.add_argument("flags", nargs="*", help="trainer flags for every row (after --)")
    args = p.parse_args()
    flags = ["--data-dir", args.data_dir, "--device", "cpu", "--global-batch-size", "64", "--batch-size", "32",
             "--checkpoint-every-steps", "50", *args.flags]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, nproc in (("2 ranks x 32", 2), ("1 rank x 32, accumulating 2", 1)):
            run_dir = Path(tmp) / name.replace(" ", "_").replace(",", "")
            start = time.perf_counter()
            subprocess.run(torchrun(nproc, [*flags, "--run-dir", str(run_dir)]), cwd=ROOT, check=True,
                           capture_output=True)
            rows.append((name, time.perf_counter() - start, None, json.loads((run_dir / "metrics.json").read_text())))
        for name, kill_at in (("2 nodes, uninterrupted", None), (f"2 nodes, one lost after step {args.kill_at}",
                                                                  args.kill_at)):
            run_dir = Path(tmp) / ("lost" if kill_at else "whole")
            wall, resumed = two_nodes(flags, run_dir, kill_at)
            rows.append((name, wall, resumed, json.loads((run_dir / "metrics.json").read_text())))
    print("| run | test accuracy | steps | images trained | train s | wall s | resumed from step | lost s |")
    print("|---|---|---|---|---|---|---|---|")
    whole = rows[2][1]
    for name, wall, resumed, m in rows:
        lost = f"{wall - whole:+.1f}" if resumed is not None else ""
        print(f"| {name} | {m['test_accuracy']:.2%} | {m['steps']} | {m['train_images']:,} | {m['train_seconds']:.1f} "
              f"| {wall:.1f} | {'' if resumed is None else resumed} | {lost} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
