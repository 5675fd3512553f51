"""Compose the parallelisms for the trainer: the device mesh ("edp", "ep"), the placement plan,
expert parallelism, and DDP for the dense parameters; then the per-step gradient reduction and
the global gradient-norm clipping that both need.

Checks that need only the config and the launcher's WORLD_SIZE run in `resolve_plan`, before any
process group forms.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from moesaic.parallel.expert_parallel import apply_expert_parallel, expert_grad_sq_norm, reduce_expert_grads
from moesaic.parallel.fssdp import apply_fssdp, fssdp_bytes, fssdp_grad_sq_norm, fssdp_reduce_scatter
from moesaic.placement.baselines import static_plan
from moesaic.placement.plan import Placement, PlanError, check_fits
from moesaic.trainer.config import TrainConfig
from moesaic.trainer.dist import DistInfo

log = logging.getLogger(__name__)


def resolve_plan(cfg: TrainConfig, world_size: int) -> Placement | None:
    """The plan the EP layer starts from (None without expert parallelism). Raises ValueError naming
    the field when the plan or the EP size does not fit the model or the world."""
    ep = cfg.parallel.ep_size or world_size
    if world_size % ep:
        raise ValueError(f"parallel.ep_size ({ep}) must divide the world size ({world_size})")
    if ep == 1 and cfg.parallel.expert_sharding == "resident":
        return None
    E = cfg.model.moe.num_experts
    L = cfg.model.num_moe_layers
    source = cfg.placement.plan
    if source in ("contiguous", "round_robin"):
        return static_plan(source, L, E, ep)
    path = Path(source).expanduser()
    if not path.exists():
        raise ValueError(f"placement.plan ({source!r}) is neither 'contiguous', 'round_robin' nor an existing plan file")
    try:
        plan = Placement.load(path)
        check_fits(plan, num_layers=L, num_experts=E, num_gpus=ep)
    except PlanError as e:
        raise ValueError(f"placement.plan ({source!r}) does not fit: {e}") from None
    return plan


def world_size_from_env() -> int:
    from moesaic.trainer.dist import adopt_launcher_env

    adopt_launcher_env()
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise ValueError(f"environment variable WORLD_SIZE ({os.environ['WORLD_SIZE']!r}) must be an integer") from None


@dataclass
class Parallel:
    """The wrapped model and what the loop must call around backward."""

    model: torch.nn.Module  # the bare model (optimizer, eval, checkpoints)
    train_model: torch.nn.Module  # what the forward pass calls (DDP or the bare model)
    info: DistInfo
    mesh: object = None
    plan: Placement | None = None
    sharding: str = "resident"
    counters: dict = field(default_factory=dict)

    @property
    def expert_parallel(self) -> bool:
        return self.plan is not None

    @property
    def fssdp(self) -> bool:
        return self.plan is not None and self.sharding == "fssdp"

    def no_sync(self):
        return self.train_model.no_sync() if isinstance(self.train_model, DDP) else _Null()

    def reduce_grads(self) -> None:
        """After backward (DDP has averaged the dense gradients): reduce the expert gradients."""
        if self.fssdp:
            fssdp_reduce_scatter(self.model)
            total = fssdp_bytes(self.model)  # since the start; the difference is this step's
            prev = self.counters.get("_fssdp_total", {"gather": 0, "reduce_scatter": 0})
            self.counters["expert_grad_bytes"] = total["reduce_scatter"] - prev["reduce_scatter"]
            self.counters["expert_gather_bytes"] = total["gather"] - prev["gather"]
            self.counters["_fssdp_total"] = total
        elif self.expert_parallel:
            self.counters["expert_grad_bytes"] = reduce_expert_grads(self.model, self.mesh, self.info.world_size)

    def clip_grad_norm(self, max_norm: float) -> torch.Tensor:
        """The global gradient norm (each expert counted once), clipped to max_norm if > 0."""
        params = [p for p in self.model.parameters() if p.grad is not None]
        if not self.expert_parallel:
            if max_norm > 0:
                return torch.nn.utils.clip_grad_norm_(params, max_norm)
            return torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params])) if params else torch.zeros(())
        dense = [p for n, p in self.model.named_parameters() if p.grad is not None and ".experts." not in n]
        dense_sq = sum((p.grad.double() ** 2).sum() for p in dense) if dense else torch.zeros((), dtype=torch.float64)
        expert_sq = (fssdp_grad_sq_norm if self.fssdp else expert_grad_sq_norm)(self.model, self.mesh)
        dist.all_reduce(expert_sq)
        norm = torch.sqrt(dense_sq + expert_sq)
        if max_norm > 0:
            coef = max_norm / (float(norm) + 1e-6)
            if coef < 1:
                for p in params:
                    p.grad.mul_(coef)
        return norm.float()


def parallelize(model: torch.nn.Module, cfg: TrainConfig, info: DistInfo, plan: Placement | None) -> Parallel:
    """Apply expert parallelism or FSSDP (per the plan) and DDP; the model must hold every expert."""
    if info.backend is None:
        return Parallel(model, model, info)
    mesh = None
    ignored: list[str] = []
    pc = cfg.parallel
    if plan is not None:
        from torch.distributed.device_mesh import init_device_mesh

        ep = pc.ep_size or info.world_size
        mesh = init_device_mesh(info.device.type, (info.world_size // ep, ep), mesh_dim_names=("edp", "ep"))
        cf = cfg.model.moe.capacity_factor
        if pc.expert_sharding == "fssdp":
            ignored = apply_fssdp(model, mesh, plan, reshard_after_forward=pc.reshard_after_forward,
                                  prefetch=pc.prefetch, capacity_factor=cf)
        else:
            ignored = apply_expert_parallel(model, mesh, plan, capacity_factor=cf)
        DDP._set_params_and_buffers_to_ignore_for_model(model, ignored)
    ddp = DDP(model, device_ids=[info.device.index] if info.device.type == "cuda" else None)
    return Parallel(model, ddp, info, mesh, plan, pc.expert_sharding)


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
