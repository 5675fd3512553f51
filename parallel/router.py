"""Token router: scores -> top-k expert ids and weights, plus the auxiliary losses.

Knows nothing about ranks. Shapes: T tokens, D model dim, E experts, K top-k.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(kw_only=True)
class RouterConfig:
    """How tokens pick experts."""

    score_func: str = "softmax"
    """`softmax` over all experts, then top-k (Mixtral); `sigmoid` per expert with the top-k weights
    normalised to sum to one (DeepSeek-V3)."""
    aux_loss_coef: float = 0.01
    """Coefficient of the Switch-Transformer load-balancing loss E * sum_e f_e * p_e."""
    z_loss_coef: float = 0.001
    """Coefficient of the router z-loss mean(logsumexp(logits)^2) (ST-MoE)."""
    bias_update_rate: float = 0.0
    """Aux-loss-free balancing (DeepSeek-V3): after each step, each expert's selection bias moves by
    this much towards balance (bias += rate * sign(mean load - load)). 0 turns it off. The bias
    changes which experts are picked, never the combine weights."""

    def __post_init__(self) -> None:
        if self.score_func not in ("softmax", "sigmoid"):
            raise ValueError(
                f"model.moe.router.score_func ({self.score_func!r}) must be one of 'softmax', 'sigmoid'"
            )
        for name in ("aux_loss_coef", "z_loss_coef", "bias_update_rate"):
            value = getattr(self, name)
            if value < 0:
                raise ValueError(f"model.moe.router.{name} ({value}) must be >= 0")


@dataclass
class RouterOutput:
    """What the router hands the dispatcher."""

    expert_ids_TK: torch.Tensor  # int64, the chosen experts per token, best first
    weights_TK: torch.Tensor  # float, the combine weights (differentiable)
    aux_loss: torch.Tensor  # scalar, unscaled
    z_loss: torch.Tensor  # scalar, unscaled
    tokens_per_expert_E: torch.Tensor  # int64, token-slots routed to each expert


def expert_counts(ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Token-slots per expert (int64). Unlike `torch.bincount`, no host sync on a GPU."""
    return torch.zeros(num_experts, dtype=torch.int64, device=ids.device).scatter_add_(0, ids, torch.ones_like(ids))


class TopKRouter(nn.Module):
    """A linear gate over the model dim, followed by top-k selection."""

    def __init__(self, dim: int, num_experts: int, top_k: int, cfg: RouterConfig):
        super().__init__()
        self.num_experts = num_experts
        self.top_k = top_k
        self.cfg = cfg
        self.gate = nn.Linear(dim, num_experts, bias=False)
        self.register_buffer("bias_E", torch.zeros(num_experts))  # selection-only bias (aux-loss-free)

    def forward(self, x_TD: torch.Tensor) -> RouterOutput:
        logits_TE = self.gate(x_TD).float()
        scores_TE = logits_TE.softmax(dim=-1) if self.cfg.score_func == "softmax" else logits_TE.sigmoid()
        ids_TK = (scores_TE.detach() + self.bias_E).topk(self.top_k, dim=-1).indices
        weights_TK = scores_TE.gather(1, ids_TK)
        if self.cfg.score_func == "sigmoid":
            weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True).clamp_min(1e-20)

        num_tokens = x_TD.shape[0]
        counts_E = expert_counts(ids_TK.flatten(), self.num_experts)
        if num_tokens > 0:
            # Switch aux loss: E * sum_e (fraction of slots routed to e) * (mean probability of e).
            probs_TE = scores_TE if self.cfg.score_func == "softmax" else scores_TE / scores_TE.sum(-1, keepdim=True)
            frac_E = counts_E.to(probs_TE.dtype) / (num_tokens * self.top_k)
            aux = self.num_experts * (frac_E * probs_TE.mean(dim=0)).sum()
            z = torch.logsumexp(logits_TE, dim=-1).pow(2).mean()
        else:
            aux = z = logits_TE.sum() * 0.0
        return RouterOutput(
            expert_ids_TK=ids_TK,
            weights_TK=weights_TK.to(x_TD.dtype),
            aux_loss=aux,
            z_loss=z,
            tokens_per_expert_E=counts_E,
        )

    @torch.no_grad()
    def update_bias(self, global_counts_E: torch.Tensor) -> None:
        """Aux-loss-free balancing step from the loads of all ranks (identical on every rank)."""
        if self.cfg.bias_update_rate > 0:
            c = global_counts_E.to(self.bias_E.device, self.bias_E.dtype)
            self.bias_E += self.cfg.bias_update_rate * torch.sign(c.mean() - c)
