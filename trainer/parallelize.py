"""Compose the parallelisms for the trainer: the device mesh ("edp", "ep"), the placement plan,
expert parallelism, and DDP or FSDP for the dense parameters; then the per-step gradient reduction and
the global gradient-norm clipping that both need.

Checks that need only the config and the launcher's WORLD_SIZE run in `resolve_plan`, before any
process group forms.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from moesaic.parallel.dense_ddp import apply_ddp
from moesaic.parallel.dense_fsdp import apply_fsdp, dense_grad_sq_norm, no_gradient_sync
from moesaic.parallel.expert_parallel import (ExpertParallelDispatcher, apply_expert_parallel, expert_grad_sq_norm,
                                             reduce_expert_grads)
from moesaic.parallel.experts import GroupedExperts
from moesaic.parallel.fssdp import apply_fssdp, fssdp_bytes, fssdp_grad_sq_norm, fssdp_reduce_scatter
from moesaic.parallel.moe import MoE
from moesaic.parallel.router import apply_global_balance
from moesaic.placement.baselines import static_plan
from moesaic.placement.plan import Placement, PlanError, check_fits
from moesaic.trainer.config import TrainConfig
from moesaic.trainer.dist import DistInfo, launcher_gpus_per_node
from moesaic.trainer.loss_scale import grad_multiplier, unscale_and_clip_

log = logging.getLogger(__name__)


def resolve_plan(cfg: TrainConfig, world_size: int) -> Placement | None:
    """The plan the EP layer starts from (None without expert parallelism). Raises ValueError naming
    the field when the plan or the EP size does not fit the model or the world."""
    ep = cfg.parallel.ep_size or world_size
    if world_size % ep:
        raise ValueError(f"parallel.ep_size ({ep}) must divide the world size ({world_size})")
    shard = cfg.parallel.dense_shard_size
    if shard and world_size % shard:
        raise ValueError(f"parallel.dense_shard_size ({shard}) must divide the world size ({world_size})")
    E = cfg.model.moe.num_experts
    if cfg.model.moe_impl == "deepspeed":  # DeepSpeed-MoE's own contiguous layout, no moesaic plan
        if E % ep:
            raise ValueError(f"model.moe.num_experts ({E}) must be divisible by the expert-parallel size ({ep}) "
                             "with model.moe_impl (deepspeed)")
        return None
    if ep == 1 and cfg.parallel.expert_sharding == "resident":
        return None
    slots = cfg.placement.slots_per_gpu
    if slots and not E <= slots * ep <= E * ep:
        raise ValueError(f"placement.slots_per_gpu ({slots}) must be between ceil(experts / GPUs) "
                         f"({-(-E // ep)}) and experts ({E}) for {E} experts on {ep} GPUs")
    gpn = cfg.parallel.gpus_per_node
    if gpn and ep % gpn:
        raise ValueError(f"parallel.gpus_per_node ({gpn}) must divide the expert-parallel size ({ep})")
    L = cfg.model.num_moe_layers
    if L == 0:  # a dense model trains without expert parallelism
        raise ValueError(f"model.num_dense_layers ({cfg.model.num_dense_layers}) and model.moe_every ({cfg.model.moe_every}) "
                         f"leave no MoE block of model.num_layers ({cfg.model.num_layers}): use parallel=ddp")
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


def align_owners(cfg) -> bool:
    """FSSDP owners follow the plan (placement.align_owners), unless Hecate's re-sharding owns them."""
    placement = getattr(cfg, "placement", None)
    return bool(getattr(placement, "align_owners", False)) and not getattr(cfg.parallel, "reshard_every_n_steps", 0)


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
    expert_names: list = field(default_factory=list)  # parameters and buffers that differ across ranks
    ds_engine: object = None  # the DeepSpeed engine over the dense parameters (engine=deepspeed)
    deepspeed_moe_ep: int = 0  # model.moe_impl=deepspeed: DeepSpeed-MoE's ep_size (its engine owns everything)
    align_owners: bool = False  # FSSDP: owners follow each new plan (placement.align_owners)
    gpus_per_node: int = 0  # of the EP domain: parallel.gpus_per_node, else the launcher's (the solvers' nodes)
    dense_fsdp: bool = False  # parallel.dense_sharding=fsdp: the dense parameters are FSDP2 DTensor shards
    dense_shard_group: object = None  # the ranks that share one copy of them (None: the world)
    reduce_dtype: torch.dtype = torch.float32  # what gradients are summed across ranks in (parallel.reduce_dtype)

    def build_optimizer(self, cfg: TrainConfig):
        """(optimizer, scheduler) that the loop steps. Under engine=deepspeed they cover the experts
        only; the dense AdamW and its schedule live inside the DeepSpeed engine."""
        from moesaic.trainer.optim import build_optimizer, lr_lambda, param_groups

        if cfg.parallel.engine != "deepspeed" or self.info.backend is None:
            opt = build_optimizer(self.model, cfg.optim)
            return opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg.optim, cfg.steps))
        if self.deepspeed_moe_ep:
            return self._build_deepspeed_moe(cfg)
        from moesaic.parallel.deepspeed_engine import apply_deepspeed

        names = set(self.expert_names)
        experts = [p for n, p in self.model.named_parameters() if n in names]
        dense = [p for n, p in self.model.named_parameters() if n not in names]
        o = cfg.optim

        def adamw(params):
            return torch.optim.AdamW(param_groups(params, o.weight_decay), lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps)

        dense_opt = adamw(dense)
        dense_sched = torch.optim.lr_scheduler.LambdaLR(dense_opt, lr_lambda(o, cfg.steps))
        self.ds_engine = apply_deepspeed(self.model, self.expert_names, dense_opt, dense_sched,
                                         zero_stage=cfg.parallel.zero_stage, micro_batch=cfg.batch_size,
                                         grad_accum=cfg.grad_accum_steps, reduce_dtype=cfg.parallel.reduce_dtype,
                                         zero_config=dict(cfg.parallel.zero_config))
        self.train_model = self.ds_engine
        expert_opt = adamw(experts) if experts else torch.optim.AdamW([torch.zeros(1, requires_grad=True)], lr=o.lr)
        return expert_opt, torch.optim.lr_scheduler.LambdaLR(expert_opt, lr_lambda(o, cfg.steps))

    def _build_deepspeed_moe(self, cfg: TrainConfig):
        """DeepSpeed's engine trains the whole model, experts included; the loop's own optimizer is empty."""
        from moesaic.parallel.deepspeed_moe import check_expert_groups, deepspeed_moe_optimizer, initialize_deepspeed_moe
        from moesaic.trainer.optim import lr_lambda

        opt = deepspeed_moe_optimizer(self.model, cfg.optim)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg.optim, cfg.steps))
        self.ds_engine = initialize_deepspeed_moe(self.model, opt, sched, zero_stage=cfg.parallel.zero_stage,
                                                  micro_batch=cfg.batch_size, grad_accum=cfg.grad_accum_steps,
                                                  grad_clip=cfg.optim.grad_clip, reduce_dtype=cfg.parallel.reduce_dtype,
                                                  zero_config=dict(cfg.parallel.zero_config))
        check_expert_groups(self.deepspeed_moe_ep, self.info.rank)
        self.train_model = self.ds_engine
        empty = torch.optim.AdamW([torch.zeros(1, requires_grad=True)], lr=cfg.optim.lr)
        return empty, torch.optim.lr_scheduler.LambdaLR(empty, lambda _: 1.0)

    @property
    def expert_parallel(self) -> bool:
        return self.plan is not None

    @property
    def fssdp(self) -> bool:
        return self.plan is not None and self.sharding == "fssdp"

    def no_sync(self):
        if self.dense_fsdp:
            return no_gradient_sync(self.model)
        return self.train_model.no_sync() if isinstance(self.train_model, DDP) else _Null()

    def backward(self, loss: torch.Tensor, grad_accum_steps: int) -> None:
        if self.ds_engine is not None:
            self.ds_engine.backward(loss)  # DeepSpeed divides by its gradient_accumulation_steps
        else:
            (loss / grad_accum_steps).backward()

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
            self.counters["expert_grad_bytes"] = reduce_expert_grads(self.model, self.mesh, self.info.world_size,
                                                                     self.reduce_dtype)

    def clip_grad_norm(self, max_norm: float, unscale: float = 1.0) -> torch.Tensor:
        """The global norm (each expert counted once) of the gradients times `unscale` (1 / the fp16
        loss scale, trainer/loss_scale.py), which the gradients are multiplied by, and clipped to
        max_norm if > 0. A non-finite norm leaves them as they are: that step is skipped."""
        if self.ds_engine is not None:
            return self._clip_with_zero(max_norm, unscale)
        params = [p for p in self.model.parameters() if p.grad is not None]
        if not self.expert_parallel and not self.dense_fsdp:
            if unscale == 1.0 and max_norm > 0:
                return torch.nn.utils.clip_grad_norm_(params, max_norm)
            norm = torch.nn.utils.get_total_norm([p.grad for p in params]) if params else torch.zeros(())
            return unscale_and_clip_(params, norm, max_norm, unscale)
        # 1. the dense gradients' norm: equal on every rank under DDP; under FSDP summed over the shards
        dense = [p for n, p in self.model.named_parameters() if p.grad is not None
                 and (".experts." not in n or not self.expert_parallel)]
        dense_sq = dense_grad_sq_norm(dense, sharded=self.dense_fsdp, group=self.dense_shard_group)
        # 2. the experts' norm, each expert counted once
        expert_sq = torch.zeros((), dtype=torch.float64, device="cpu")  # the norm is read on the host
        if self.expert_parallel:
            expert_sq = (fssdp_grad_sq_norm if self.fssdp else expert_grad_sq_norm)(self.model, self.mesh)
            dist.all_reduce(expert_sq)
        # 3. one multiply per gradient: the unscaling and the clipping coefficient together
        return unscale_and_clip_(params, torch.sqrt(dense_sq + expert_sq.cpu()), max_norm, unscale)

    def _clip_with_zero(self, max_norm: float, unscale: float = 1.0) -> torch.Tensor:
        """engine=deepspeed: one global norm over the dense gradients (in ZeRO's partitions at stages 1
        and 2) and the experts', and one coefficient for both, as under the torch engine. DeepSpeed's
        own clipping is off; DeepSpeed-MoE's engine clips its whole model itself. fp16 (`unscale`):
        ZeRO's loss scale is set to moesaic's for this step (`boundary_step` puts 1 back), so that
        ZeRO divides its partitions by it, and the norm it reports is unscaled."""
        from moesaic.parallel.deepspeed_engine import zero_optimizer

        zero = zero_optimizer(self.ds_engine)
        if self.deepspeed_moe_ep:
            from moesaic.parallel.deepspeed_moe import grads_finite

            # the loop reads the norm from DeepSpeed after its step. ZeRO 1/2 skip a step whose gradients
            # are not finite (their overflow check); at stage 0 DeepSpeed would apply it, so look here
            if zero is None and not grads_finite(self.model.parameters(), self.info.device):
                return torch.tensor(float("nan"))
            return torch.zeros(())
        names = set(self.expert_names)
        # 1. the dense gradients' norm: from ZeRO's reduced partitions (an all-reduce over its ranks), or
        #    at stage 0 from the dense gradients, which DeepSpeed's backward has already averaged
        if zero is not None:
            zero.loss_scale = 1.0 / unscale  # (1 without fp16)
            dense_sq = (float(zero.scaled_global_norm()) / zero.loss_scale) ** 2
        else:
            dense_sq = float(sum((p.grad.double() ** 2).sum() for n, p in self.model.named_parameters()
                                 if n not in names and p.grad is not None)) * unscale ** 2
        # 2. the experts' norm, each expert counted once
        expert_sq = torch.zeros((), dtype=torch.float64)
        if self.expert_parallel:
            expert_sq = (fssdp_grad_sq_norm if self.fssdp else expert_grad_sq_norm)(self.model, self.mesh)
            dist.all_reduce(expert_sq)
        norm = math.sqrt(dense_sq + float(expert_sq) * unscale ** 2)
        coef = max_norm / (norm + 1e-6) if max_norm > 0 else 1.0
        # 3. ZeRO's step divides its gradients by (dense + 1e-6) / clip_grad when that exceeds 1 (and by
        #    its loss scale): set clip_grad so that the quotient is 1 / coef; moesaic scales the other
        #    gradients by coef (and unscale)
        if zero is not None:
            zero.clip_grad = max_norm * (math.sqrt(dense_sq) + 1e-6) / (norm + 1e-6) if coef < 1 else 0.0
        scale_by = grad_multiplier(norm, max_norm, unscale)
        if scale_by != 1.0:
            for n, p in self.model.named_parameters():
                if p.grad is not None and (n in names or zero is None):
                    p.grad.mul_(scale_by)
        return torch.tensor(norm)


def parallelize(model: torch.nn.Module, cfg: TrainConfig, info: DistInfo, plan: Placement | None) -> Parallel:
    """Apply expert parallelism or FSSDP (per the plan), then DDP or FSDP (parallel.dense_sharding).
    The model holds every expert, as built: on the meta device (then it is materialized on
    `info.device` once the experts, and under FSDP the dense weights, are sharded: a rank allocates
    only what it holds), or initialized."""
    if info.backend is None:
        return Parallel(_materialize(model, info.device), model, info)
    apply_global_balance(model)  # aux_loss_scope=global_batch: f_e over every rank's tokens
    mesh, gpn = None, 0
    ignored: list[str] = []
    pc = cfg.parallel
    reduce_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(pc.reduce_dtype, torch.float32)
    if cfg.model.moe_impl == "deepspeed":
        from moesaic.parallel.deepspeed_moe import apply_deepspeed_moe

        ep = pc.ep_size or info.world_size
        names = apply_deepspeed_moe(model, ep, info.rank)
        return Parallel(model, model, info, expert_names=names, deepspeed_moe_ep=ep)
    if plan is not None:
        from torch.distributed.device_mesh import init_device_mesh

        ep = pc.ep_size or info.world_size
        mesh = init_device_mesh(info.device.type, (info.world_size // ep, ep), mesh_dim_names=("edp", "ep"))
        cf = cfg.model.moe.capacity_factor
        gpn = pc.gpus_per_node or launcher_gpus_per_node(ep)
        dedup = pc.token_dedup
        if pc.node_dispatch:
            from moesaic.parallel.node_dispatch import node_groups

            dedup = node_groups(mesh, gpn)
        if pc.expert_sharding == "fssdp":
            from moesaic.parallel.gather_schedule import start_owners

            owners = start_owners(plan, ep, align_owners(cfg))
            ignored = apply_fssdp(model, mesh, plan, reshard_after_forward=pc.reshard_after_forward,
                                  prefetch=pc.prefetch, capacity_factor=cf, owners=owners, token_dedup=dedup,
                                  device=info.device, gather_dtype=pc.expert_gather_dtype(), reduce_dtype=reduce_dtype)
        else:
            ignored = apply_expert_parallel(model, mesh, plan, capacity_factor=cf, token_dedup=dedup,
                                            device=info.device)
        DDP._set_params_and_buffers_to_ignore_for_model(model, ignored)
    if pc.dense_sharding == "fsdp":  # (ParallelConfig allows it under engine=torch only)
        # on meta too: then each rank allocates and initializes only its shards of the dense part
        from torch.distributed.device_mesh import init_device_mesh

        shard = pc.dense_shard_size or info.world_size
        dp_mesh = init_device_mesh(info.device.type, (info.world_size // shard, shard),
                                   mesh_dim_names=("dp_replicate", "dp_shard"))
        if shard == info.world_size:
            dp_mesh = dp_mesh["dp_shard"]  # FSDP; else HSDP: replicated across the groups
        experts = {p for n, p in model.named_parameters() if n in ignored}
        apply_fsdp(model, dp_mesh, ignored=experts, reshard_after_forward=pc.reshard_after_forward,
                   param_dtype=torch.bfloat16 if pc.dense_gather_dtype == "bf16" else None, reduce_dtype=reduce_dtype)
    _materialize(model, info.device)
    align = plan is not None and pc.expert_sharding == "fssdp" and align_owners(cfg)
    if pc.engine == "deepspeed":  # the engine is built with the optimizer (build_optimizer)
        return Parallel(model, model, info, mesh, plan, pc.expert_sharding, expert_names=ignored, align_owners=align,
                        gpus_per_node=gpn, reduce_dtype=reduce_dtype)
    if pc.dense_sharding == "fsdp":
        group = dp_mesh.get_group("dp_shard") if dp_mesh.ndim == 2 else None
        return Parallel(model, model, info, mesh, plan, pc.expert_sharding, expert_names=ignored, align_owners=align,
                        gpus_per_node=gpn, dense_fsdp=True, dense_shard_group=group, reduce_dtype=reduce_dtype)
    ddp = apply_ddp(model, device=info.device, bucket_order=pc.ddp_bucket_order, reduce_dtype=reduce_dtype,
                    bucket_view=pc.ddp_bucket_view)
    return Parallel(model, ddp, info, mesh, plan, pc.expert_sharding, expert_names=ignored, align_owners=align,
                    gpus_per_node=gpn, reduce_dtype=reduce_dtype)


def _materialize(model: torch.nn.Module, device) -> torch.nn.Module:
    if any(t.is_meta for t in (*model.parameters(), *model.buffers())):
        model.materialize(device)
    return model


def apply_activation_checkpoint(model: torch.nn.Module, mode: str, *, recompute_moe_act: bool = False,
                                recast_expert_weights: bool = False) -> None:
    """Recompute each block's activations in backward (`mode`: none, attention or full), with
    `recompute_moe_act` the experts' activation where full does not, and with `recast_expert_weights`
    the casts of the experts' weights that the rank holds (see ParallelConfig). It composes with DDP,
    FSDP2, autocast, gradient accumulation and torch.compile. The state dict does not change."""
    act = recompute_moe_act and mode != "full"
    for block in model.layers:
        block.activation_checkpoint = mode
        if block.is_moe and isinstance(block.moe, MoE):  # not DeepSpeed-MoE's layer (model.moe_impl=deepspeed)
            for store in [m for m in (block.moe.experts, block.moe.shared) if m is not None]:
                store.recompute_act = act
                if isinstance(store, GroupedExperts):  # the routed experts (FSSDP's: reshard_after_forward)
                    store.recast_weights = recast_expert_weights


def apply_compile(model: torch.nn.Module) -> None:
    """Compile each transformer block in place (one graph, reused by every block of the same shape).
    Under expert parallelism and FSSDP the dispatcher (its collectives, and the plan's per-layer
    tables) runs eagerly between the compiled regions, and the experts' SwiGLU runs one compiled
    function shared by every layer (`compiled_grouped_swiglu`), so a plan costs no recompiles."""
    for block in model.layers:
        block.compile()
    for moe in model.moe_layers():
        if isinstance(moe.dispatcher, ExpertParallelDispatcher):
            moe.experts.compiled = True


def compile_stats() -> dict:
    """What torch.compile did in this process (the run's summary): graphs compiled, graph breaks, and
    the frames that hit dynamo's recompile limit, which then run eagerly for the rest of the run."""
    from torch._dynamo.utils import counters

    limit = sum(n for reason, n in counters["unimplemented"].items() if "recompile limit" in reason.lower())
    return {"graphs": int(counters["stats"]["unique_graphs"]), "graph_breaks": int(sum(counters["graph_break"].values())),
            "recompile_limit_hits": int(limit)}


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
