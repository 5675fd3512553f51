"""`model.moe_impl: deepspeed`: DeepSpeed-MoE's own layer (`deepspeed.moe.layer.MoE`, GShard-style
capacity buffers and one equal-split all-to-all each way) inside moesaic's model, as the baseline
that `bench/compare.py` measures moesaic against. It is trained through `deepspeed.initialize` with
ZeRO and `split_params_into_different_moe_groups_for_optimizer` (trainer/parallelize.py).

`apply_deepspeed_moe(model, ep_size, rank)` swaps every MoE block for a `DeepSpeedMoEBlock` that
starts from the same router and expert weights (this rank's experts: DeepSpeed puts consecutive
ranks in one expert-parallel group, and expert e of the layer on ep rank e // (E / ep_size)), and
keeps moesaic's block interface: forward returns (output, RouterOutput), `dispatcher.counters`,
`last_route` for the routing recorder.

What differs from moesaic's layer, and stays different because it is DeepSpeed's math:
- the top-k weights are renormalised over the chosen experts, where moesaic's softmax router uses
  the raw probabilities unless `model.moe.router.route_norm=true` (Mixtral's router);
- the aux loss is GShard's, E^2 * mean_e(mean gate prob * top-1 fraction), and there is no z-loss;
- dropless means every expert's buffer is padded to the largest expert's load in the EP group, and
  the padding travels in the all-to-all.
"""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist
from torch import nn

from moesaic.parallel.moe import MoE, SwiGLU
from moesaic.parallel.router import RouterOutput

log = logging.getLogger(__name__)


class _RouterInfo:
    """What the trainer reads of a router (its config); DeepSpeed's gate holds the weights."""

    def __init__(self, cfg):
        self.cfg = cfg


class _Counters:
    def __init__(self):
        self.counters: dict = {}


class DeepSpeedMoEBlock(nn.Module):
    """`deepspeed.moe.layer.MoE` behind moesaic's MoE-block interface."""

    def __init__(self, moe: MoE, ep_size: int, ep_rank: int):
        super().__init__()
        from deepspeed.moe.layer import MoE as DSMoE

        cfg, E = moe.cfg, moe.cfg.num_experts
        dim = moe.router.gate.in_features
        self.cfg, self.ep_size = cfg, ep_size
        self.num_local = E // ep_size
        self.deepspeed = DSMoE(hidden_size=dim, expert=SwiGLU(dim, cfg.ffn_dim), num_experts=E, ep_size=ep_size,
                               k=cfg.top_k, capacity_factor=1.0, eval_capacity_factor=1.0, min_capacity=0,
                               drop_tokens=False, use_rts=False, top2_2nd_expert_sampling=False)
        with torch.no_grad():
            self.deepspeed.deepspeed_moe.gate.wg.weight.copy_(moe.router.gate.weight)
            for i, ex in enumerate(self.deepspeed.deepspeed_moe.experts.deepspeed_experts):
                g = ep_rank * self.num_local + i
                ex.w1.weight.copy_(moe.experts.w1_EFD[g])
                ex.w3.weight.copy_(moe.experts.w3_EFD[g])
                ex.w2.weight.copy_(moe.experts.w2_EDF[g])
        self.shared = moe.shared
        self.router = _RouterInfo(cfg.router)
        self.dispatcher = _Counters()
        self.last_route: RouterOutput | None = None
        self._gate_out = None
        self.deepspeed.deepspeed_moe.gate.register_forward_hook(self._keep_gate_output)

    def _keep_gate_output(self, module, args, output):
        self._gate_out = output

    def forward(self, x_BSD: torch.Tensor) -> tuple[torch.Tensor, RouterOutput]:
        y, l_aux, exp_counts = self.deepspeed(x_BSD)
        # the gate ran with sparse_routes: (l_aux, capacity, E, indices (K, T), locations, gates, counts)
        _, capacity, num_experts, indices_KT, _, gates_KT, _ = self._gate_out
        self._gate_out = None
        row_bytes = x_BSD.shape[-1] * x_BSD.element_size()
        buffer_rows = int(num_experts) * int(capacity)  # the (E, C, D) buffer each all-to-all moves
        off_rank = buffer_rows * (self.ep_size - 1) // self.ep_size
        self.dispatcher.counters = {
            "a2a_bytes": 2 * row_bytes * off_rank,  # dispatch + combine, forward; backward repeats it
            "tokens_received": buffer_rows,  # padded rows, this rank's experts
            "capacity": int(capacity),
            "dropped": 0,
        }
        if self.shared is not None:
            y = y + self.shared(x_BSD)
        route = RouterOutput(
            expert_ids_TK=indices_KT.t().to(torch.int64),
            weights_TK=gates_KT.t().detach(),
            aux_loss=l_aux,
            z_loss=l_aux.new_zeros(()),
            tokens_per_expert_E=exp_counts.to(torch.int64),
        )
        self.last_route = route.detached()
        return y, route


def apply_deepspeed_moe(model: nn.Module, ep_size: int, rank: int) -> list[str]:
    """Swap each MoE block of `model` for DeepSpeed-MoE's layer (in place). Returns the names of the
    expert parameters (DeepSpeed reduces them over its expert-data-parallel groups)."""
    ep_rank = rank % ep_size  # DeepSpeed's layout: expert-parallel groups are consecutive ranks
    for block in model.layers:
        if getattr(block, "is_moe", False):
            block.moe = DeepSpeedMoEBlock(block.moe, ep_size, ep_rank)
    names = [n for n, p in model.named_parameters() if getattr(p, "allreduce", True) is False]
    log.info("applied deepspeed-moe: ep_size %d, %d expert tensors", ep_size, len(names))
    return names


def check_expert_groups(ep_size: int, rank: int) -> None:
    """After `deepspeed.initialize`: DeepSpeed's expert-parallel rank must be the one the weights were
    copied for. Raises RuntimeError otherwise (a DeepSpeed layout change would show here)."""
    from deepspeed.utils import groups

    name = f"ep_size_{ep_size}"
    got = groups._get_expert_parallel_rank(name)
    if got != rank % ep_size:
        raise RuntimeError(f"DeepSpeed put rank {rank} at expert-parallel rank {got}, expected {rank % ep_size}")


def deepspeed_moe_optimizer(model: nn.Module, optim_cfg):
    """AdamW over the whole model, with DeepSpeed's MoE parameter groups (expert tensors apart, so
    that ZeRO reduces them over the expert-data-parallel group only)."""
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    o = optim_cfg
    params = list(model.parameters())
    groups = [{"name": "decay", "params": [p for p in params if p.ndim >= 2], "weight_decay": o.weight_decay},
              {"name": "no_decay", "params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    groups = split_params_into_different_moe_groups_for_optimizer([g for g in groups if g["params"]])
    return torch.optim.AdamW(groups, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps)


def initialize_deepspeed_moe(model: nn.Module, optimizer, scheduler, *, zero_stage: int, micro_batch: int,
                             grad_accum: int, grad_clip: float, reduce_dtype: str = "fp32",
                             zero_config: dict | None = None):
    """`deepspeed.initialize` over the whole model (dense and DeepSpeed-MoE experts); `reduce_dtype`:
    DeepSpeed's communication_data_type; `zero_config`: more zero_optimization keys."""
    import deepspeed

    from moesaic.parallel.deepspeed_engine import deepspeed_config

    config = deepspeed_config(zero_stage=zero_stage, micro_batch=micro_batch, grad_accum=grad_accum, grad_clip=grad_clip,
                              reduce_dtype=reduce_dtype, zero_config=zero_config)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=config,
                                           dist_init_required=False)
    return engine


def grads_finite(params, device: torch.device) -> bool:
    """Collective over the world: whether every rank's gradients are finite. A NaN in one rank's expert
    gradient reaches only that expert's replicas, so the flag is all-reduced over every rank. One host
    sync: the flags are reduced on `device` (NCCL's device on a GPU)."""
    ok = [torch.isfinite(p.grad).all() for p in params if p.grad is not None]
    bad = torch.zeros(1, device=device)
    if ok:
        bad += (~torch.stack(ok).all()).to(device=device, dtype=bad.dtype)
    dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    return not bool(bad)
