"""The MoE feed-forward block: router -> dispatcher -> grouped experts -> weighted combine.

The dispatcher and the expert store are the seams that expert parallelism and FSSDP swap:
`LocalDispatcher` keeps every token on its rank and computes every expert here (the skeleton's
data-parallel mode). Legend: T tokens, D model dim, F ffn dim, E experts, K top-k.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from moesaic.parallel.experts import KERNELS, GroupedExperts, combine_slots, gather_slots
from moesaic.parallel.router import RouterConfig, RouterOutput, TopKRouter, expert_counts
from moesaic.parallel.swiglu import silu_mul_down_recomputed


@dataclass(kw_only=True)
class MoEConfig:
    """Shape of one MoE feed-forward block."""

    num_experts: int = 8
    """Routed experts per MoE layer."""
    top_k: int = 2
    """Experts each token is sent to."""
    ffn_dim: int = 256
    """Hidden size of each routed SwiGLU expert (fine-grained experts: many experts, small ffn_dim)."""
    num_shared_experts: int = 0
    """Always-active SwiGLU experts of the same ffn_dim, computed locally (DeepSeekMoE)."""
    capacity_factor: float = 0.0
    """0: dropless. Otherwise each expert takes at most ceil(capacity_factor * tokens * top_k /
    num_experts) token-slots of the (expert-parallel group's) batch, by position; the rest are dropped."""
    router: RouterConfig = field(default_factory=RouterConfig)
    """How tokens choose experts."""
    kernels: str = "torch"
    """The layer's element-wise steps (SwiGLU, the gather's backward, the combine): "torch", or
    "triton" (one fused kernel each way; needs Triton and a CUDA device). The grouped GEMMs are
    `torch._grouped_mm` either way."""

    def __post_init__(self) -> None:
        if isinstance(self.router, dict):
            self.router = RouterConfig(**self.router)
        if self.num_experts < 1:
            raise ValueError(f"model.moe.num_experts ({self.num_experts}) must be >= 1")
        if self.top_k < 1:
            raise ValueError(f"model.moe.top_k ({self.top_k}) must be >= 1")
        if self.top_k > self.num_experts:
            raise ValueError(
                f"model.moe.top_k ({self.top_k}) must be <= model.moe.num_experts ({self.num_experts})"
            )
        self.router.check_experts(self.num_experts, self.top_k)
        if self.ffn_dim < 1:
            raise ValueError(f"model.moe.ffn_dim ({self.ffn_dim}) must be >= 1")
        if self.capacity_factor < 0:
            raise ValueError(f"model.moe.capacity_factor ({self.capacity_factor}) must be >= 0 (0: dropless)")
        if self.kernels not in KERNELS:
            raise ValueError(f"model.moe.kernels ({self.kernels!r}) must be one of {', '.join(KERNELS)}")
        if self.num_shared_experts < 0:
            raise ValueError(f"model.moe.num_shared_experts ({self.num_shared_experts}) must be >= 0")


class SwiGLU(nn.Module):
    """A dense SwiGLU MLP (the shared expert, and the FFN of dense layers)."""

    def __init__(self, dim: int, ffn_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, ffn_dim, bias=False)
        self.w3 = nn.Linear(dim, ffn_dim, bias=False)
        self.w2 = nn.Linear(ffn_dim, dim, bias=False)
        self.recompute_act = False  # keep w1 x and w3 x alone for backward (parallel.recompute_moe_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.recompute_act and torch.is_grad_enabled():
            return silu_mul_down_recomputed(self.w1(x), self.w3(x), self.w2)
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class LocalDispatcher(nn.Module):
    """Every expert is on this rank: sort token-slots by expert, compute, combine."""

    def __init__(self, capacity_factor: float = 0.0):
        super().__init__()
        self.capacity_factor = capacity_factor
        self.counters: dict = {}

    def forward(self, x_TD: torch.Tensor, route: RouterOutput, experts: GroupedExperts) -> torch.Tensor:
        from moesaic.parallel.expert_parallel import capacity_keep

        num_tokens, top_k = route.expert_ids_TK.shape
        ids = route.expert_ids_TK.flatten()
        # 1. permute token-slots so that each expert's rows are contiguous (stable: token order kept)
        if self.capacity_factor > 0:
            keep = capacity_keep(ids, experts.num_experts, self.capacity_factor, num_tokens)
            kept = torch.nonzero(keep).flatten()
            order = kept[torch.argsort(ids[kept], stable=True)]
            counts = expert_counts(ids[kept], experts.num_experts)
        else:
            order = torch.argsort(ids, stable=True)
            counts = route.tokens_per_expert_E
        self.counters = {"dropped": num_tokens * top_k - order.numel()}
        # 2. grouped GEMM over the sorted rows
        y_sorted = experts(gather_slots(x_TD, order, top_k, experts.kernels), counts)
        # 3. un-permute and combine with the router weights
        return combine_slots(y_sorted, order, route.weights_TK, experts.kernels)


class MoE(nn.Module):
    """Router + dispatcher + grouped experts (+ optional shared experts)."""

    def __init__(self, dim: int, cfg: MoEConfig, *, init_std: float = 0.02, out_std: float | None = None):
        super().__init__()
        self.cfg = cfg
        self.router = TopKRouter(dim, cfg.num_experts, cfg.top_k, cfg.router)
        self.experts = GroupedExperts(cfg.num_experts, dim, cfg.ffn_dim, init_std=init_std, out_std=out_std,
                                      kernels=cfg.kernels)
        self.dispatcher: nn.Module = LocalDispatcher(cfg.capacity_factor)
        self.shared = (
            SwiGLU(dim, cfg.ffn_dim * cfg.num_shared_experts) if cfg.num_shared_experts > 0 else None
        )
        self.last_route: RouterOutput | None = None

    def forward(self, x_BSD: torch.Tensor) -> tuple[torch.Tensor, RouterOutput]:
        x_TD = x_BSD.reshape(-1, x_BSD.shape[-1])
        if torch.is_autocast_enabled(x_TD.device.type):  # tokens travel and meet the experts in bf16
            x_TD = x_TD.to(torch.get_autocast_dtype(x_TD.device.type))
        route = self.router(x_TD, seq_len=x_BSD.shape[1] if x_BSD.dim() == 3 else None)
        out_TD = self.dispatcher(x_TD, route, self.experts)
        if self.shared is not None:
            out_TD = out_TD + self.shared(x_TD)
        self.last_route = route.detached()  # (a graph would keep its saved tensors until the next forward)
        return out_TD.view_as(x_BSD), route
