"""Distributed helpers for torchrun, plain ``srun`` and single-process runs.

``init_distributed`` reads, in this order:

* torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT), which also
  covers ``srun torchrun --rdzv-backend c10d ...`` (torchrun sets them for its workers);
* a plain ``srun python script.py`` step, one task per GPU: SLURM_PROCID (rank),
  SLURM_STEP_NUM_TASKS / SLURM_NTASKS (world size), SLURM_LOCALID (local rank); the master
  address is the first host of SLURM_STEP_NODELIST / SLURM_JOB_NODELIST, expanded by
  :func:`expand_nodelist` (no ``scontrol`` needed), and the port MASTER_PORT or
  ``20000 + SLURM_JOB_ID % 20000`` (the same on every task of a job, different across jobs
  that share a node);
* otherwise a world of one, without a process group.

CPU runs use gloo, CUDA runs use NCCL with one GPU per process. See ``docs/cluster.md``.
"""
from __future__ import annotations

import datetime
import os
import re
from dataclasses import dataclass

import torch
import torch.distributed as dist

from socokit.errors import ConfigError, LaunchError  # noqa: F401  (LaunchError re-exported)


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    distributed: bool

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _resolve_device(device: str, local_rank: int) -> torch.device:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"device: {device!r} requested but no CUDA device is available", "device", device)
        if device == "cuda":
            device = f"cuda:{local_rank % torch.cuda.device_count()}"
        torch.cuda.set_device(torch.device(device))
    return torch.device(device)


def _split_top_level(text: str) -> list[str]:
    """Split on commas that are not inside brackets."""
    parts, depth, cur = [], 0, []
    for ch in text:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise LaunchError(f"unbalanced ']' in node list {text!r}")
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if depth:
        raise LaunchError(f"unbalanced '[' in node list {text!r}")
    parts.append("".join(cur))
    return [p for p in parts if p]


def _expand_range(body: str, text: str) -> list[str]:
    out = []
    for item in body.split(","):
        lo, sep, hi = item.partition("-")
        if not lo.isdigit() or (sep and not hi.isdigit()):
            raise LaunchError(f"bad range {item!r} in node list {text!r}")
        if not sep:
            out.append(lo)
            continue
        width = len(lo)  # SLURM keeps the zero padding of the lower bound
        if int(hi) < int(lo):
            raise LaunchError(f"descending range {item!r} in node list {text!r}")
        out.extend(str(v).zfill(width) for v in range(int(lo), int(hi) + 1))
    return out


def expand_nodelist(text: str) -> list[str]:
    """Expand a SLURM host list such as ``gpu[001-003,007],login-a[1-2]-ib`` into host names.

    Follows SLURM's hostlist syntax: comma-separated entries, each with zero or more
    bracketed groups of comma-separated numbers or ``lo-hi`` ranges (zero padding taken from
    ``lo``); several groups in one entry expand to their cartesian product, in order. This is
    what ``scontrol show hostnames`` prints, without needing ``scontrol`` on the compute node.

    Raises:
        LaunchError: unbalanced brackets or a malformed range.
    """
    hosts = []
    for entry in _split_top_level(text.strip()):
        pieces = re.split(r"(\[[^\]]*\])", entry)
        names = [""]
        for piece in pieces:
            if piece.startswith("["):
                options = _expand_range(piece[1:-1], text)
            else:
                if "[" in piece or "]" in piece:
                    raise LaunchError(f"unbalanced brackets in node list {text!r}")
                options = [piece]
            names = [n + o for n in names for o in options]
        hosts.extend(names)
    return hosts


@dataclass(frozen=True)
class LaunchEnv:
    """What the launcher told this process: its rank, the world, the rendezvous address."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str | None
    master_port: str | None
    launcher: str  # "torchrun", "srun" or "none"


def launch_env(environ=None) -> LaunchEnv:
    """Read the launcher's variables (torchrun first, then a plain ``srun`` step).

    A plain ``srun`` step is recognised by SLURM_STEP_ID together with SLURM_PROCID, so
    running ``python train.py`` by hand inside an ``sbatch`` / ``salloc`` shell (a batch step,
    no SLURM_STEP_ID) stays a single process.

    Raises:
        LaunchError: the rank is outside the world, or the node list cannot be parsed.
    """
    env = os.environ if environ is None else environ
    if "RANK" in env or "WORLD_SIZE" in env:
        out = LaunchEnv(int(env.get("RANK", "0")), int(env.get("WORLD_SIZE", "1")),
                        int(env.get("LOCAL_RANK", "0")), env.get("MASTER_ADDR"),
                        env.get("MASTER_PORT"), "torchrun")
    elif "SLURM_PROCID" in env and "SLURM_STEP_ID" in env:
        world = int(env.get("SLURM_STEP_NUM_TASKS") or env.get("SLURM_NTASKS") or "1")
        nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
        addr = env.get("MASTER_ADDR") or (expand_nodelist(nodes)[0] if nodes else "127.0.0.1")
        port = env.get("MASTER_PORT") or str(20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000)
        out = LaunchEnv(int(env["SLURM_PROCID"]), world, int(env.get("SLURM_LOCALID", "0")),
                        addr, port, "srun")
    else:
        return LaunchEnv(0, 1, 0, None, None, "none")
    if out.world_size < 1 or not 0 <= out.rank < out.world_size:
        raise LaunchError(f"{out.launcher}: rank {out.rank} is outside a world of {out.world_size}")
    return out


def init_distributed(device: str = "auto", timeout_minutes: float | None = None) -> DistInfo:
    """Initialise the default process group from torchrun's or srun's environment.

    Args:
        device: "auto" (CUDA if available), "cpu", "cuda" or "cuda:N".
        timeout_minutes: how long a collective may wait for the other ranks before the job
            fails (torch's default, 10 min for NCCL, when None). Raise it when a rank may
            legitimately lag, e.g. rank 0 evaluating a large set while others wait.

    Returns:
        DistInfo for this process. Without launcher variables: rank 0 of 1, no group.

    Raises:
        LaunchError: inconsistent launcher variables.
    """
    launch = launch_env()
    if launch.launcher == "srun":  # torch's env:// rendezvous reads these
        os.environ.setdefault("MASTER_ADDR", launch.master_addr)
        os.environ.setdefault("MASTER_PORT", launch.master_port)
    rank, world_size, local_rank = launch.rank, launch.world_size, launch.local_rank
    dev = _resolve_device(device, local_rank)
    distributed = world_size > 1
    if distributed and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        kwargs = {"device_id": dev} if dev.type == "cuda" else {}
        if timeout_minutes:
            kwargs["timeout"] = datetime.timedelta(minutes=timeout_minutes)
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size,
                                init_method="env://", **kwargs)
    return DistInfo(rank, world_size, local_rank, dev, distributed)


def cleanup_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_dist() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def barrier() -> None:
    if is_dist():
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over ranks (returns a new tensor; the input is untouched)."""
    out = tensor.detach().clone()
    if is_dist():
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Mean of ``tensor`` over ranks (returns a new tensor)."""
    return all_reduce_sum(tensor) / get_world_size()


def all_gather_object(obj) -> list:
    """Gather a picklable object from every rank, in rank order."""
    if not is_dist():
        return [obj]
    out = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


def gather_object(obj, dst: int = 0) -> list | None:
    """Gather a picklable object from every rank onto rank ``dst`` only.

    Returns:
        On ``dst``: the objects in rank order. Elsewhere: None (nothing is received, so
        ranks other than ``dst`` do not hold every rank's data in memory, unlike
        :func:`all_gather_object`).
    """
    if not is_dist():
        return [obj]
    out = [None] * get_world_size() if get_rank() == dst else None
    dist.gather_object(obj, out, dst=dst)
    return out


def broadcast_object(obj, src: int = 0):
    """Send ``obj`` from rank ``src`` to every rank and return it."""
    if not is_dist():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def shard_from_env() -> tuple[int, int]:
    """(shard_id, num_shards) from torchrun's RANK / WORLD_SIZE or a plain srun step, without a
    process group.

    Raises:
        LaunchError: the launcher's variables are inconsistent.
    """
    launch = launch_env()
    return launch.rank, launch.world_size
