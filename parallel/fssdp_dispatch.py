"""The FSSDP layer's forward and backward: when each of its collectives runs (Hecate, arXiv 2502.02581).

In the forward pass, `FSSDPDispatcher` (1) completes the layer's SparseAllGather (prefetched by the
previous layer) and issues the next layer's, (2) runs the EP dispatch with the gathered weights, and
(3) frees them (re-materialization). In the backward pass, `_BackwardTrigger` runs first in the
layer's backward, on every rank: (4) it completes the SparseReduceScatter issued one layer ago,
(5) issues the following layer's (its backward is complete), and (6) gathers this layer's freed
weights again, prefetching the previous layer's. The store and the collectives are in `fssdp.py`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from moesaic.parallel.expert_parallel import ExpertParallelDispatcher

if TYPE_CHECKING:
    from moesaic.parallel.fssdp import FSSDPExperts


class _BackwardTrigger(torch.autograd.Function):
    """Identity on the layer's output; its backward runs first in the layer's backward pass, on every
    rank. By then the following MoE layer's backward is complete, so its gradients go to their
    owners here (and its gathered weights are freed); then this layer's freed weights are gathered
    again. The first layer's reduce-scatter runs after backward (`fssdp_reduce_scatter`)."""

    @staticmethod
    def forward(ctx, x, experts):
        ctx.experts = experts
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        nxt = ctx.experts.next
        if nxt is not None:
            if nxt.next is not None:  # 4. issued one layer ago, overlapped with that backward
                nxt.next.finish_reduce_scatter()
            if nxt._mat is not None:  # 5. the following layer's gradients to their owners, asynchronously
                nxt.sparse_reduce_scatter(async_op=True)
        ctx.experts.regather()  # 6. this layer's freed weights again (then the previous layer's, prefetched)
        return grad, None


class FSSDPDispatcher(ExpertParallelDispatcher):
    """The EP dispatcher, with the layer's weights materialized before and released after."""

    @torch.compiler.disable  # as the EP dispatcher's: the plan's Python values stay out of dynamo
    def forward(self, x_TD, route, experts: FSSDPExperts):
        if torch._C._current_graph_task_id() != -1:  # inside backward: activation checkpointing recomputes
            experts.restore()  # this layer's weights, as its forward had them; nothing released or prefetched
            return super().forward(x_TD, route, experts)
        experts.sparse_all_gather()  # 1. this layer's weights; the next layer's gather is issued
        out = super().forward(x_TD, route, experts)  # 2. EP dispatch, grouped GEMMs, combine
        experts.release()  # 3. re-materialization: free the gathered storage (autograd keeps its views)
        if torch.is_grad_enabled():
            out = _BackwardTrigger.apply(out, experts)
        return out
