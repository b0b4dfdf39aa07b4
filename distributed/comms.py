"""Process group up and down, device choice, and the few collectives the trainer needs."""
from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from serve_cli.base.cli import first_line, usable_cores

from .digest import digest


# How long a collective may wait for a peer: the first download of a dataset by local rank 0 (the others
# wait in the next all-reduce) fits; a rank that died without torchrun noticing does not hold the rest forever
# (gloo's own default is 30 minutes). A rank that fails alone in a save tells the others at once (all_ok).
COLLECTIVE_TIMEOUT = timedelta(minutes=10)


class LaunchError(RuntimeError):
    """The processes cannot be placed on the requested devices."""


# What gloo raises (a plain RuntimeError) when the rank at the other end of a collective has gone away.
PEER_GONE = ("Connection closed by peer", "Connection reset by peer")


def peer_gone(error: BaseException) -> str | None:
    """Why a collective failed, when it failed because another rank stopped (a node lost, a worker killed):
    the environment, not a bug of ours; None for anything else. NCCL and the store raise torch.distributed's
    own error types."""
    reason = next((text for text in PEER_GONE if text in str(error)), None)
    return reason or (first_line(error, 100) if isinstance(error, dist.DistError) else None)


@dataclass(frozen=True)
class DistEnv:
    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    device: torch.device
    warning: str = ""  # for the user, from rank 0 (a GPU that this torch build cannot use)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return dist.is_available() and dist.is_initialized()


def env_int(name: str, default: int) -> int:
    """A whole number from torchrun's environment; the default when it is absent or not a number."""
    value = os.environ.get(name, "")
    return int(value) if value.strip().lstrip("-").isdigit() else default


def choose_device(flag: str, local_rank: int, local_world_size: int) -> tuple[torch.device, str]:
    """The rank's device, and a warning for the user ("" when there is none)."""
    if flag == "cpu":
        return torch.device("cpu"), ""
    if not torch.cuda.is_available():
        unusable = unusable_gpus()
        if flag == "cuda":
            raise LaunchError(unusable or "--device cuda was asked for but no CUDA device is visible; use --device cpu")
        return torch.device("cpu"), f"warning: {unusable}; training on the CPU" if unusable else ""
    gpus = torch.cuda.device_count()
    if local_world_size > gpus:
        raise LaunchError(
            f"{local_world_size} processes on this node but only {gpus} GPU(s) visible: "
            f"use --nproc_per_node={gpus}, or --device cpu to run every rank on the CPU")
    return torch.device("cuda", local_rank), ""


def unusable_gpus() -> str:
    """Why torch sees no GPU where nvidia-smi sees some ("" when nvidia-smi sees none): a torch build for a
    newer CUDA than the driver's, whose only sign from torch is a warning and is_available() being False."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return ""
    try:
        out = subprocess.run([smi, "--query-gpu=name,driver_version", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return ""
    gpus = [line.strip() for line in out.stdout.splitlines() if line.strip()]
    if out.returncode != 0 or not gpus:
        return ""
    driver = gpus[0].rsplit(",", 1)[-1].strip()
    major = int(driver.split(".")[0]) if driver.split(".")[0].isdigit() else 0
    # The oldest driver of each CUDA major version that torch publishes wheels for (minor-version compatibility).
    wheel = "cu130" if major >= 580 else "cu126" if major >= 525 else "cu118"
    return (f"nvidia-smi sees {len(gpus)} GPU(s) ({gpus[0]}) but torch {torch.__version__} (built for CUDA "
            f"{torch.version.cuda}) cannot use them: its driver {driver} is too old for that build; install "
            f"torch for your driver (pip install torch --index-url https://download.pytorch.org/whl/{wheel}) "
            f"or update the driver")


def cpu_threads_per_rank(local_world_size: int) -> int:
    return max(1, usable_cores() // local_world_size)


def setup(device_flag: str) -> DistEnv:
    """Read torchrun's environment (world size 1 without it) and join the process group."""
    rank, world_size = env_int("RANK", 0), env_int("WORLD_SIZE", 1)
    local_rank = env_int("LOCAL_RANK", 0)
    local_world_size = env_int("LOCAL_WORLD_SIZE", 1)
    device, warning = choose_device(device_flag, local_rank, local_world_size)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:
        # Several ranks on one CPU would each grab every core and thrash.
        torch.set_num_threads(cpu_threads_per_rank(local_world_size))
    if "RANK" in os.environ and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, store=attempt_store(), rank=rank, world_size=world_size,
                                device_id=device if device.type == "cuda" else None, timeout=COLLECTIVE_TIMEOUT)
    return DistEnv(rank, local_rank, world_size, local_world_size, device, warning)


def attempt_store() -> dist.Store:
    """torchrun's store, with one key namespace per restart attempt.

    After `torchrun --max-restarts` restarts the workers, the previous attempt's keys are still in the
    agent's store (seen with torch 2.15): a restarted gloo rank reads its dead peer's address, connects
    to it and hangs in connectFullMesh. Prefixing by the restart count gives every attempt fresh keys.
    """
    store, _, _ = next(dist.rendezvous("env://"))
    return dist.PrefixStore(f"attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def teardown(peers_in_step: bool) -> None:
    """Leave the process group; `peers_in_step` says every rank got here the same way (no rank raised).

    Then a barrier comes first. destroy_process_group does not join gloo's worker threads while a
    DistributedDataParallel has ever held the group (seen with torch 2.15: the C++ reducer keeps it
    alive), and a worker still dropping the last collective's tensors when the interpreter shuts down
    aborts the process ("terminate called without an active exception", exit -6) on a rank that
    finished first. Waiting for the slowest rank gives every worker time to finish.
    """
    if dist.is_available() and dist.is_initialized():
        if peers_in_step:
            try:
                dist.barrier()
            except RuntimeError:  # a peer is already gone: nobody left to wait for
                pass
        dist.destroy_process_group()


def all_reduce_sum(tensor: torch.Tensor, env: DistEnv) -> torch.Tensor:
    if env.is_distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_ok(ok: bool, env: DistEnv) -> bool:
    """True only when every rank says ok: lets ranks fail together instead of hanging in a collective."""
    return not any_rank([not ok], env)[0]


def any_rank(flags: list[bool], env: DistEnv) -> list[bool]:
    """For each flag, whether any rank raised it: one small all-reduce for several questions."""
    votes = torch.tensor([int(f) for f in flags], dtype=torch.int32, device=env.device)
    return [bool(v) for v in all_reduce_sum(votes, env).tolist()]


def sync_buffers(module: torch.nn.Module, env: DistEnv) -> None:
    """Give every rank rank 0's buffers (BatchNorm running statistics).

    DDP broadcasts rank 0's buffers at the start of each forward, then every rank updates its own copy
    from its own batch: after the last step the replicas differ. Training never sees the difference (the
    next forward overwrites it), but evaluation and checkpoints would, so both call this first.
    """
    if env.is_distributed:
        for buffer in module.buffers():
            dist.broadcast(buffer, src=0)


def all_gather_objects(obj: object, env: DistEnv) -> list:
    if not env.is_distributed:
        return [obj]
    out: list = [None] * env.world_size
    dist.all_gather_object(out, obj)
    return out


def all_gather_floats(values: list[float], env: DistEnv) -> list[list[float]]:
    """Every rank's `values` (the same length everywhere), in rank order: one small all-gather."""
    if not env.is_distributed:
        return [list(values)]
    mine = torch.tensor(values, dtype=torch.float64, device=env.device)
    out = [torch.empty_like(mine) for _ in range(env.world_size)]
    dist.all_gather(out, mine)
    return [t.tolist() for t in out]


def weights_fingerprint(module: torch.nn.Module) -> str:
    """The digest of the parameters and buffers: equal on every rank when DDP kept replicas in sync."""
    return digest(module.state_dict())
