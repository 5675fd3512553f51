"""Process-group set-up from the launcher's environment (torchrun today; SLURM in launch/).

Returns a `DistInfo`; a single process without launcher variables runs with no process group.
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from moesaic.parallel.all_to_all import all_reduce_anywhere
from moesaic.parallel.config import ParallelConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str | None  # None: single process, no process group

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name} ({value!r}) must be an integer") from None


def pick_device(pcfg: ParallelConfig, local_rank: int) -> torch.device:
    if pcfg.device == "cpu" or (pcfg.device == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError("parallel.device ('cuda') was asked for, but torch.cuda.is_available() is False")
    count = torch.cuda.device_count()
    if local_rank >= count:
        if pcfg.device == "cuda":
            raise ValueError(f"LOCAL_RANK ({local_rank}) needs a GPU, but this node has {count}")
        return torch.device("cpu")
    return torch.device("cuda", local_rank)


def adopt_launcher_env() -> None:
    """Fill RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT from the launcher that started
    us when torchrun did not: SLURM's srun (one task per rank) or the DeepSpeed launcher
    (`--local_rank`, already moved to LOCAL_RANK by the entry point). Idempotent."""
    env = os.environ
    if "RANK" in env or "SLURM_PROCID" not in env or _env_int("SLURM_NTASKS", 1) <= 1:
        return
    env["RANK"] = env["SLURM_PROCID"]
    env["WORLD_SIZE"] = env["SLURM_NTASKS"]
    env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
    if "LOCAL_WORLD_SIZE" not in env and "SLURM_NTASKS_PER_NODE" in env:
        env["LOCAL_WORLD_SIZE"] = env["SLURM_NTASKS_PER_NODE"].split("(")[0]
    if not env.get("MASTER_ADDR"):
        env["MASTER_ADDR"] = _first_slurm_host(env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST", ""))
    if not env.get("MASTER_PORT"):
        env["MASTER_PORT"] = str(20000 + _env_int("SLURM_JOB_ID", 0) % 20000)


def _first_slurm_host(nodelist: str) -> str:
    import subprocess

    if not nodelist:
        raise ValueError("SLURM_JOB_NODELIST is not set: cannot find the first node for MASTER_ADDR")
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise ValueError(f"cannot expand SLURM_JOB_NODELIST ({nodelist!r}) with scontrol: {e}; export MASTER_ADDR") from None
    hosts = out.stdout.split()
    if out.returncode or not hosts:
        raise ValueError(f"scontrol show hostnames {nodelist!r} failed ({out.stderr.strip()}); export MASTER_ADDR")
    return hosts[0]


def init_distributed(pcfg: ParallelConfig) -> DistInfo:
    """Read RANK/WORLD_SIZE/LOCAL_RANK, pick the device and backend, and join the process group."""
    adopt_launcher_env()
    world_size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    if not 0 <= rank < world_size:
        raise ValueError(f"RANK ({rank}) must be in [0, WORLD_SIZE ({world_size}))")
    device = pick_device(pcfg, local_rank)
    if world_size == 1 and "MASTER_ADDR" not in os.environ:
        return DistInfo(0, 1, 0, device, None)
    for var in ("MASTER_ADDR", "MASTER_PORT"):
        if not os.environ.get(var):
            raise ValueError(
                f"{var} is not set: start the job with torchrun (or srun under SLURM), or export "
                "MASTER_ADDR and MASTER_PORT"
            )
    backend = pcfg.backend
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl" and device.type != "cuda":
        raise ValueError("parallel.backend ('nccl') needs a GPU per rank; use gloo on CPU")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    try:
        timeout = datetime.timedelta(seconds=pcfg.timeout_s)
        store, rank, world_size = next(dist.rendezvous("env://", rank, world_size, timeout=timeout))
        # A restarted job (torchrun --max-restarts) reuses the agent's store: keys of the killed
        # attempt (the old ranks' addresses) would still be there. Each attempt gets its own prefix.
        store = dist.PrefixStore(f"moesaic/attempt{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)
        dist.init_process_group(
            backend=backend,
            store=store,
            rank=rank,
            world_size=world_size,
            timeout=timeout,
            device_id=device if device.type == "cuda" else None,
        )
    except (RuntimeError, dist.DistError) as e:
        if "timeout" in str(e).lower() or "timed out" in str(e).lower():
            raise TimeoutError(
                f"rendezvous at {os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']} timed out after "
                f"parallel.timeout_s ({pcfg.timeout_s:g}) s as rank {rank} of WORLD_SIZE {world_size}: check that "
                "every rank was started and can reach that address"
            ) from None
        raise
    return DistInfo(rank, world_size, local_rank, device, backend)


def shutdown(info: DistInfo, *, barrier: bool = True) -> None:
    """Leave the process group: after a barrier when every rank has finished, without one after an error."""
    if info.backend is not None and dist.is_initialized():
        if barrier:
            dist.barrier()
        dist.destroy_process_group()


def launcher_gpus_per_node(num_gpus: int) -> int:
    """GPUs per node of the EP domain, from torchrun's or SLURM's environment (1 node if unknown)."""
    for var in ("LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE", "SLURM_GPUS_ON_NODE"):
        try:
            n = int(os.environ.get(var, "0").split("(")[0])
        except ValueError:
            continue
        if 0 < n < num_gpus and num_gpus % n == 0:
            return n
    return num_gpus


def broadcast_object(obj, info: DistInfo, src: int = 0):
    if info.backend is None:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_reduce_(t: torch.Tensor, info: DistInfo, op=dist.ReduceOp.SUM) -> torch.Tensor:
    if info.backend is not None:
        all_reduce_anywhere(t, op=op)
    return t


def all_gather_object(obj, info: DistInfo) -> list:
    if info.backend is None:
        return [obj]
    out = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out
