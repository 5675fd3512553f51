"""Routing statistics recorder: counts loads P[l, e] and inter-layer flows W[l, i, j] from the
router's choices each step, in the placement solver's input format (`RoutingStats`).

    P[l, e]    += 1 per token-slot routed to e at MoE layer l
    W[l, a, b] += 1/k per token, per a in its top-k at layer l and b in its top-k at layer l+1
Optionally keeps raw per-token choices for a bounded number of tokens (the `.npz` trace format).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist

from moesaic.parallel.all_to_all import all_reduce_anywhere
from moesaic.placement.stats import RoutingStats


class RoutingRecorder:
    def __init__(self, num_layers: int, num_experts: int, top_k: int, *, trace_tokens: int = 0):
        self.L, self.E, self.K = num_layers, num_experts, top_k
        # host memory by design: the counts feed the solver (numpy), and their all-reduce goes through
        # the GPU under NCCL (all_reduce_anywhere)
        self.P = torch.zeros(num_layers, num_experts, dtype=torch.float64, device="cpu")
        self.W = torch.zeros(max(num_layers - 1, 0), num_experts, num_experts, dtype=torch.float64, device="cpu")
        self.num_tokens = 0.0
        self.trace_tokens = trace_tokens
        self._trace: list[np.ndarray] = []
        self._traced = 0

    def observe(self, ids_LTK: list[torch.Tensor]) -> None:
        """One forward pass: per MoE layer, the (T, K) expert ids, tokens aligned across layers."""
        E, K = self.E, self.K
        # all layers' ids (same tokens, same k) in one copy to the host: one sync, not one per layer
        ids = list(torch.stack([t.detach() for t in ids_LTK]).to("cpu", torch.int64)) if ids_LTK else []
        for l, t in enumerate(ids):
            self.P[l] += torch.bincount(t.flatten(), minlength=E).double()
        for l in range(len(ids) - 1):
            pairs = (ids[l][:, :, None] * E + ids[l + 1][:, None, :]).flatten()
            self.W[l] += torch.bincount(pairs, minlength=E * E).double().view(E, E) / K
        self.num_tokens += ids[0].shape[0] if ids else 0
        if self._traced < self.trace_tokens and ids:
            take = min(self.trace_tokens - self._traced, ids[0].shape[0])
            self._trace.append(torch.stack([t[:take] for t in ids], 1).numpy().astype(np.int16))
            self._traced += take

    def observe_model(self, model) -> None:
        self.observe([m.last_route.expert_ids_TK for m in model.moe_layers()])

    def stats(self, group=None, *, all_reduce: bool = False) -> RoutingStats:
        """The counts so far; with all_reduce, summed over the ranks of `group` (a collective)."""
        P, W = self.P.clone(), self.W.clone()
        n = torch.tensor([self.num_tokens], dtype=torch.float64, device="cpu")
        if all_reduce and dist.is_initialized():
            for t in (P, W, n):
                all_reduce_anywhere(t, group)
        return RoutingStats(P.numpy(), W.numpy(), float(n[0]), self.K)

    def reset(self) -> None:
        self.P.zero_()
        self.W.zero_()
        self.num_tokens = 0.0

    def trace(self) -> np.ndarray:
        """(tokens, layers, k) int16 of the raw choices kept so far (this rank's)."""
        if not self._trace:
            return np.zeros((0, self.L, self.K), dtype=np.int16)
        return np.concatenate(self._trace)
