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

    def __post_init__(self) -> None:
        if self.score_func not in ("softmax", "sigmoid"):
            raise ValueError(
                f"model.moe.router.score_func ({self.score_func!r}) must be one of 'softmax', 'sigmoid'"
            )
        for name in ("aux_loss_coef", "z_loss_coef"):
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


class TopKRouter(nn.Module):
    """A linear gate over the model dim, followed by top-k selection."""

    def __init__(self, dim: int, num_experts: int, top_k: int, cfg: RouterConfig):
        super().__init__()
        self.num_experts = num_experts
        self.top_k = top_k
        self.cfg = cfg
        self.gate = nn.Linear(dim, num_experts, bias=False)

    def forward(self, x_TD: torch.Tensor) -> RouterOutput:
        logits_TE = self.gate(x_TD).float()
        if self.cfg.score_func == "softmax":
            scores_TE = logits_TE.softmax(dim=-1)
            weights_TK, ids_TK = scores_TE.topk(self.top_k, dim=-1)
        else:
            scores_TE = logits_TE.sigmoid()
            weights_TK, ids_TK = scores_TE.topk(self.top_k, dim=-1)
            weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True).clamp_min(1e-20)

        num_tokens = x_TD.shape[0]
        counts_E = torch.bincount(ids_TK.flatten(), minlength=self.num_experts)
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
