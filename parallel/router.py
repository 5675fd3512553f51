"""Token router: scores -> top-k expert ids and weights, plus the auxiliary losses.

Knows nothing about ranks, except under `aux_loss_scope=global_batch`, where the balance loss counts
its f_e over a process group that `apply_global_balance` hands it. Shapes: T tokens, D model dim,
E experts, K top-k.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


@dataclass(kw_only=True)
class RouterConfig:
    """How tokens pick experts."""

    score_func: str = "softmax"
    """`softmax` over all experts, then top-k (Switch, GShard, DeepSeek-V2; Mixtral and Qwen3-MoE with
    `route_norm: true`); `sigmoid` per expert (DeepSeek-V3)."""
    route_norm: bool | None = None
    """Renormalise each token's top-k weights to sum to one. null: as the score function's models do,
    true for sigmoid (DeepSeek-V3) and false for softmax (the raw probabilities, Switch and GShard).
    true with softmax is Mixtral's and Qwen3-MoE's router."""
    route_scale: float = 1.0
    """Multiplies the combine weights after any renormalisation (DeepSeek-V3's routed_scaling_factor,
    2.5; DeepSeek-V2's, 16)."""
    num_expert_groups: int = 0
    """Group-limited routing, DeepSeek-V2's and V3's node-limited routing: the experts form this many
    groups of consecutive ids, and each token chooses its top-k among the experts of its
    `num_limited_groups` best groups only. 0: off."""
    num_limited_groups: int = 0
    """Groups each token may route to (with num_expert_groups)."""
    group_score: str = "top2_sum"
    """How a group ranks for a token: `top2_sum`, the sum of its two best selection scores
    (DeepSeek-V3), or `max`, its best one (DeepSeek-V2). Selection scores include the balancing bias."""
    aux_loss_coef: float = 0.01
    """Coefficient of the Switch-Transformer load-balancing loss E * sum_e f_e * p_e."""
    aux_loss_scope: str = "micro_batch"
    """The tokens that f_e and p_e are counted over: `micro_batch`, this rank's tokens (Switch); or
    `sequence`, each sequence on its own, then the mean over sequences (DeepSeek-V3's complementary
    sequence-wise balance loss, Megatron's seq_aux_loss); or `global_batch`, f_e over the tokens of
    every data-parallel rank and of the step's micro-batches so far, p_e over this rank's tokens (the
    global-batch balance loss of "Demons in the Detail", arXiv 2501.11873, Qwen3; Megatron's
    global_aux_loss). Averaged over the ranks, that is the loss of the whole global batch."""
    z_loss_coef: float = 0.001
    """Coefficient of the router z-loss mean(logsumexp(logits)^2) (ST-MoE)."""
    dtype: str = "auto"
    """The gate's matmul: `auto` computes it as the rest of the model does (bf16 under bf16 autocast;
    the scores are fp32 either way); `fp32` computes it in fp32 under any mixed precision, as DeepSpeed's
    TopKGate always does and Megatron's --moe-router-dtype fp32 (fewer near-ties among many experts)."""
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
        if not self.route_scale > 0:
            raise ValueError(f"model.moe.router.route_scale ({self.route_scale}) must be > 0")
        if self.aux_loss_scope not in AUX_LOSS_SCOPES:
            raise ValueError(f"model.moe.router.aux_loss_scope ({self.aux_loss_scope!r}) must be one of "
                             f"{', '.join(map(repr, AUX_LOSS_SCOPES))}")
        if self.dtype not in ("auto", "fp32"):
            raise ValueError(f"model.moe.router.dtype ({self.dtype!r}) must be one of 'auto', 'fp32'")
        if self.group_score not in GROUP_SCORES:
            raise ValueError(f"model.moe.router.group_score ({self.group_score!r}) must be one of "
                             f"{', '.join(map(repr, GROUP_SCORES))}")
        G, M = self.num_expert_groups, self.num_limited_groups
        if G < 0 or M < 0:
            raise ValueError(f"model.moe.router.num_expert_groups ({G}) and num_limited_groups ({M}) must be >= 0")
        if G and not 1 <= M <= G:
            raise ValueError(f"model.moe.router.num_limited_groups ({M}) must be in [1, num_expert_groups ({G})] "
                             "when num_expert_groups is set")
        if M and not G:
            raise ValueError(f"model.moe.router.num_limited_groups ({M}) needs model.moe.router.num_expert_groups")

    @property
    def normalized(self) -> bool:
        """Whether the top-k weights are renormalised (`route_norm` resolved)."""
        return resolved_route_norm(self.score_func, self.route_norm)

    def check_experts(self, num_experts: int, top_k: int) -> None:
        """The rules that tie group-limited routing to the layer's experts (called by MoEConfig)."""
        G, M = self.num_expert_groups, self.num_limited_groups
        if not G:
            return
        if num_experts % G:
            raise ValueError(f"model.moe.router.num_expert_groups ({G}) must divide model.moe.num_experts ({num_experts})")
        per_group = num_experts // G
        if top_k > M * per_group:
            raise ValueError(f"model.moe.top_k ({top_k}) must be <= num_limited_groups x experts per group "
                             f"({M} x {per_group}) of model.moe.router")
        if self.group_score == "top2_sum" and per_group < 2:
            raise ValueError(f"model.moe.router.group_score ('top2_sum') needs >= 2 experts per group; "
                             f"num_experts ({num_experts}) / num_expert_groups ({G}) is {per_group}: use group_score=max")


GROUP_SCORES = ("top2_sum", "max")


def resolved_route_norm(score_func: str, route_norm: bool | None) -> bool:
    """`route_norm`, with null resolved as the score function's models do (sigmoid: true, softmax: false)."""
    return score_func == "sigmoid" if route_norm is None else bool(route_norm)
AUX_LOSS_SCOPES = ("micro_batch", "sequence", "global_batch")


@dataclass
class RouterOutput:
    """What the router hands the dispatcher."""

    expert_ids_TK: torch.Tensor  # int64, the chosen experts per token, best first
    weights_TK: torch.Tensor  # float, the combine weights (differentiable)
    aux_loss: torch.Tensor  # scalar, unscaled
    z_loss: torch.Tensor  # scalar, unscaled
    tokens_per_expert_E: torch.Tensor  # int64, token-slots routed to each expert

    def detached(self) -> RouterOutput:
        """The same tensors without their autograd graph: what a layer keeps for the recorder. A kept
        graph would keep its saved tensors alive; under activation checkpointing, the recomputed
        forward's graph, which no backward frees, until the next forward."""
        return RouterOutput(*(t.detach() for t in (self.expert_ids_TK, self.weights_TK, self.aux_loss, self.z_loss,
                                                   self.tokens_per_expert_E)))


def limit_to_groups(select_TE: torch.Tensor, num_groups: int, num_limited: int, group_score: str) -> torch.Tensor:
    """Selection scores with every expert outside each token's `num_limited` best groups set to -inf.

    Groups are consecutive expert ids (E / num_groups each). A group's score for a token is the sum of
    its two best selection scores (`top2_sum`, DeepSeek-V3) or its best one (`max`, DeepSeek-V2).
    """
    T, E = select_TE.shape
    select_TGX = select_TE.view(T, num_groups, E // num_groups)
    if group_score == "top2_sum":
        group_TG = select_TGX.topk(2, dim=-1).values.sum(dim=-1)
    else:
        group_TG = select_TGX.amax(dim=-1)
    chosen_TM = group_TG.topk(num_limited, dim=-1).indices
    outside_TG = torch.ones_like(group_TG, dtype=torch.bool).scatter_(1, chosen_TM, False)
    return select_TGX.masked_fill(outside_TG.unsqueeze(-1), float("-inf")).view(T, E)


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
        # aux_loss_scope=global_batch: the ranks that f_e counts over (None: this process alone), and
        # (token-slots per expert, token-slots) of the step's micro-batches so far: before this one, and with it
        self.balance_group: dist.ProcessGroup | None = None
        self._running_E1: torch.Tensor | None = None
        self._current_E1: torch.Tensor | None = None

    def forward(self, x_TD: torch.Tensor, seq_len: int | None = None) -> RouterOutput:
        """x_TD: the tokens, sequence after sequence, `seq_len` each (needed for aux_loss_scope=sequence)."""
        cfg = self.cfg
        if cfg.dtype == "fp32":  # outside autocast, with fp32 copies (the weight is bf16 under FSDP's bf16 gathers)
            with torch.autocast(x_TD.device.type, enabled=False):
                logits_TE = F.linear(x_TD.float(), self.gate.weight.float())
        else:
            logits_TE = self.gate(x_TD).float()
        scores_TE = logits_TE.softmax(dim=-1) if cfg.score_func == "softmax" else logits_TE.sigmoid()
        # 1. selection: the scores plus the balancing bias, limited to each token's best groups
        select_TE = scores_TE.detach() + self.bias_E
        if cfg.num_expert_groups:
            select_TE = limit_to_groups(select_TE, cfg.num_expert_groups, cfg.num_limited_groups, cfg.group_score)
        ids_TK = select_TE.topk(self.top_k, dim=-1).indices
        # 2. combine weights: the chosen experts' scores (never the bias), renormalised and scaled
        weights_TK = scores_TE.gather(1, ids_TK)
        if cfg.normalized:
            weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True).clamp_min(1e-20)
        if cfg.route_scale != 1.0:
            weights_TK = weights_TK * cfg.route_scale

        num_tokens = x_TD.shape[0]
        counts_E = expert_counts(ids_TK.flatten(), self.num_experts)
        # global_batch counts over every rank (a collective: every rank, with or without tokens); in
        # evaluation (no gradient), over this micro-batch as micro_batch does
        balance_E1 = (self._global_slots(counts_E, num_tokens)
                      if cfg.aux_loss_scope == "global_batch" and torch.is_grad_enabled() else None)
        if num_tokens > 0:
            # Switch aux loss: E * sum_e (fraction of slots routed to e) * (mean probability of e),
            # over the micro-batch, per sequence and then averaged (DeepSeek-V3), or with the fractions
            # of the global batch so far
            probs_TE = scores_TE if cfg.score_func == "softmax" else scores_TE / scores_TE.sum(-1, keepdim=True)
            if cfg.aux_loss_scope == "sequence":
                aux = self._sequence_aux(ids_TK, probs_TE, seq_len)
            else:
                frac_E = (counts_E.to(probs_TE.dtype) / (num_tokens * self.top_k) if balance_E1 is None
                          else (balance_E1[:-1].double() / balance_E1[-1]).to(probs_TE.dtype))
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

    @torch.compiler.disable  # a collective and the step's running total: eager under torch.compile
    def _global_slots(self, counts_E: torch.Tensor, num_tokens: int) -> torch.Tensor:
        """(token-slots per expert, token-slots) over the balance group's ranks and the step's micro-batches so far."""
        # 1. this rank's micro-batch: each expert's token-slots, and its token-slots in all
        slots_E1 = torch.cat([counts_E, counts_E.new_tensor([num_tokens * self.top_k])])
        # 2. summed over the ranks (int64: exact at any scale)
        if self.balance_group is not None:
            dist.all_reduce(slots_E1, group=self.balance_group)
        # 3. added to the step's earlier micro-batches (Megatron's running mean over the global batch)
        if self._running_E1 is not None:
            slots_E1 = slots_E1 + self._running_E1
        self._current_E1 = slots_E1
        return slots_E1

    def end_micro_batch(self, last: bool) -> None:
        """global_batch: a micro-batch is done, backward included (activation checkpointing recomputes
        its forward within backward, which must find the same running total). Its counts join the
        total that the step's later micro-batches count f_e over; after the step's last, it restarts."""
        self._running_E1 = None if last else self._current_E1
        self._current_E1 = None

    def _sequence_aux(self, ids_TK: torch.Tensor, probs_TE: torch.Tensor, seq_len: int | None) -> torch.Tensor:
        T, E = probs_TE.shape
        if seq_len is None or seq_len < 1 or T % seq_len:
            raise ValueError(f"aux_loss_scope='sequence' needs the tokens as whole sequences: {T} tokens, "
                             f"seq_len {seq_len}")
        B = T // seq_len
        ids_BN = ids_TK.reshape(B, seq_len * self.top_k)
        counts_BE = torch.zeros(B, E, dtype=probs_TE.dtype, device=probs_TE.device).scatter_add_(
            1, ids_BN, torch.ones_like(ids_BN, dtype=probs_TE.dtype))
        frac_BE = counts_BE / (seq_len * self.top_k)
        return E * (frac_BE * probs_TE.view(B, seq_len, E).mean(dim=1)).sum(dim=1).mean()

    @torch.no_grad()
    def update_bias(self, global_counts_E: torch.Tensor) -> None:
        """Aux-loss-free balancing step from the loads of all ranks (identical on every rank)."""
        if self.cfg.bias_update_rate > 0:
            c = global_counts_E.to(self.bias_E.device, self.bias_E.dtype)
            self.bias_E += self.cfg.bias_update_rate * torch.sign(c.mean() - c)


def apply_global_balance(model: nn.Module) -> None:
    """aux_loss_scope=global_batch: each such router of `model` counts its f_e over every rank (all
    of them train on tokens of their own). Call on every rank. A group of its own keeps these small
    all-reduces from queueing among DDP's or FSDP's, also when backward recomputes a checkpointed block."""
    routers = [m for m in model.modules() if isinstance(m, TopKRouter) and m.cfg.aux_loss_scope == "global_batch"]
    if routers:
        group = dist.new_group()
        for router in routers:
            router.balance_group = group
