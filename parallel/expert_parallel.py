"""Expert parallelism driven by a placement plan.

Each MoE layer's experts are spread over the `ep` ranks as the `Placement` says (any map, per layer,
replicas allowed). Tokens travel to their experts and back by `all_to_all_single` with uneven splits.
A token uses a replica on its own rank if there is one; otherwise the replicas share the work by token
index. The expert-data-parallel (`edp`) ranks hold the same experts; expert gradients are summed over
replicas in the EP group and over `edp`, then scaled to the gradient of the global mean loss.

Legend: T local tokens, K top-k, N = T*K token-slots, D model dim, E experts, P ep ranks.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from moesaic.parallel.all_to_all import all_gather_single, all_to_all, exchange_counts
from moesaic.parallel.experts import EXPERT_WEIGHTS, GroupedExperts, combine_slots, gather_slots, place_rows
from moesaic.parallel.router import RouterOutput, expert_counts
from moesaic.parallel.node_dispatch import NodeGroups, node_dispatch
from moesaic.parallel.token_dedup import dedup_dispatch, local_index_table
from moesaic.placement.plan import Placement, check_fits

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LayerPlan:
    """One MoE layer's plan as seen from one EP rank."""

    holders: tuple[tuple[int, ...], ...]  # expert -> sorted EP ranks holding it
    ep_rank: int
    ep_size: int

    @property
    def num_experts(self) -> int:
        return len(self.holders)

    @property
    def local_experts(self) -> list[int]:
        return [e for e, h in enumerate(self.holders) if self.ep_rank in h]

    def tables(self, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """holders padded (E, maxH), replica counts (E,), and whether this rank holds e (E,), on `device`."""
        max_h = max(len(h) for h in self.holders)
        pad = torch.tensor([list(h) + [h[0]] * (max_h - len(h)) for h in self.holders], dtype=torch.int64, device=device)
        n = torch.tensor([len(h) for h in self.holders], dtype=torch.int64, device=device)
        local = torch.tensor([self.ep_rank in h for h in self.holders], device=device)
        return pad, n, local


def capacity_keep(ids_N: torch.Tensor, num_experts: int, capacity_factor: float, num_tokens: int,
                  group=None) -> torch.Tensor:
    """(N,) bool: which token-slots fit in their expert's capacity. Capacity per expert is
    ceil(capacity_factor * tokens of the whole group * K / E); priority is position in the group's
    batch: rank order, then token order, then slot order (the same order a one-process reference sees)."""
    dev = ids_N.device
    counts_E = expert_counts(ids_N, num_experts)
    row = torch.cat([counts_E, torch.tensor([num_tokens], device=dev)])
    if group is not None and dist.get_world_size(group) > 1:
        P = dist.get_world_size(group)
        rows = torch.empty(P * row.numel(), dtype=row.dtype, device=dev)
        all_gather_single(rows, row, group=group)
        rows = rows.view(P, -1)
        me = dist.get_rank(group)
    else:
        rows, me = row[None], 0
    total_tokens = int(rows[:, -1].sum())
    top_k = ids_N.numel() // max(num_tokens, 1) if num_tokens else 1
    capacity = math.ceil(capacity_factor * total_tokens * top_k / num_experts)
    before_E = rows[:me, :-1].sum(0)  # slots of earlier ranks
    # position of each slot among this rank's slots of the same expert
    order = torch.argsort(ids_N, stable=True)
    starts = torch.cumsum(counts_E, 0) - counts_E
    pos_sorted = torch.arange(ids_N.numel(), device=dev) - starts[ids_N[order]]
    pos = torch.empty_like(pos_sorted)
    pos[order] = pos_sorted
    return (before_E[ids_N] + pos) < capacity


class ExpertParallelDispatcher(nn.Module):
    """route -> permute by destination -> exchange counts -> all-to-all -> group by local expert ->
    grouped GEMM -> reverse all-to-all -> un-permute -> weighted combine. With `token_dedup` (True),
    one row per (token, destination rank) each way instead (`moesaic.parallel.token_dedup`); with a
    `NodeGroups`, one per (token, destination node) across nodes, then per (token, rank) within
    (`moesaic.parallel.node_dispatch`).

    Under torch.compile the forward stays eager (`torch.compiler.disable`), and the experts run one
    compiled function shared by all layers (`compiled_grouped_swiglu`). Traced, each layer's plan
    (its holders, its local experts) would be a guard: a solved plan, different in every layer, would
    recompile the dispatcher per layer, and past dynamo's recompile limit run it eagerly anyway."""

    def __init__(self, plan: LayerPlan, group, *, device, capacity_factor: float = 0.0,
                 token_dedup: bool | NodeGroups = False):
        super().__init__()
        self.plan, self.group, self.capacity_factor = plan, group, capacity_factor
        self.token_dedup = token_dedup  # False, True or NodeGroups (kept as given: a new plan's dispatcher takes it)
        # the plan's tables on the tokens' device: a dispatcher is built after the model has moved
        # there (at apply and at each re-plan), so `model.to` never sees them
        if token_dedup:
            self.register_buffer("local_index_PE", local_index_table(plan.holders, plan.ep_size, device), persistent=False)
        pad, n, local = plan.tables(device)
        self.register_buffer("holders_pad", pad, persistent=False)
        self.register_buffer("num_holders", n, persistent=False)
        self.register_buffer("is_local", local, persistent=False)
        self.local_experts = plan.local_experts
        self.counters: dict = {}

    @torch.compiler.disable
    def forward(self, x_TD: torch.Tensor, route: RouterOutput, experts: GroupedExperts) -> torch.Tensor:
        P, me, E = self.plan.ep_size, self.plan.ep_rank, self.plan.num_experts
        T, K = route.expert_ids_TK.shape
        ids_N = route.expert_ids_TK.flatten()
        slot = torch.arange(T * K, device=ids_N.device)
        # 1. drop token-slots over capacity (capacity mode only)
        keep_N = (capacity_keep(ids_N, E, self.capacity_factor, T, self.group) if self.capacity_factor > 0
                  else torch.ones_like(ids_N, dtype=torch.bool))
        # 2. pick each slot's destination: a local replica, else replicas in turn by slot index
        pick = self.holders_pad[ids_N, slot % self.num_holders[ids_N]]
        dest_N = torch.where(self.is_local[ids_N], torch.full_like(pick, me), pick)
        kept = torch.nonzero(keep_N).flatten()
        dropped = T * K - kept.numel()
        if isinstance(self.token_dedup, NodeGroups):
            ng = self.token_dedup
            out_TD, self.counters = node_dispatch(x_TD, route.weights_TK, dest_N, kept, self.local_index_PE, ids_N,
                                                  experts, len(self.local_experts), me, P, ng.gpus_per_node, ng.rail,
                                                  ng.node)
            self.counters["dropped"] = dropped
            return out_TD
        if self.token_dedup:
            out_TD, self.counters = dedup_dispatch(x_TD, route.weights_TK, dest_N, kept, self.local_index_PE, ids_N,
                                                   experts, len(self.local_experts), me, P, self.group)
            self.counters["dropped"] = dropped
            return out_TD
        # 3. permute the kept slots by (destination, expert): the receiver's local experts are id-sorted
        order = kept[torch.argsort(dest_N[kept] * E + ids_N[kept], stable=True)]
        x_send = gather_slots(x_TD, order, K, experts.kernels)
        # 4. exchange the (destination, expert) counts
        send_PE = torch.zeros(P, E, dtype=torch.int64, device=ids_N.device)
        send_PE.index_put_((dest_N[order], ids_N[order]), torch.ones_like(order), accumulate=True)
        recv_PE = exchange_counts(send_PE, self.group)
        in_splits, out_splits = send_PE.sum(1).tolist(), recv_PE.sum(1).tolist()
        # 5. tokens to their experts
        x_recv = all_to_all(x_send, out_splits, in_splits, self.group)
        # 6. regroup the received rows from (source, expert) blocks to expert-major order
        cnt_PL = recv_PE[:, self.local_experts]
        if len(self.local_experts):
            perm = _source_to_expert_major(cnt_PL)
            y = experts(x_recv[perm], cnt_PL.sum(0))
            y_recv = place_rows(y, perm, y.shape[0])  # (index_copy would keep y for its backward)
        else:  # this rank computes no expert in this layer: it receives nothing
            y_recv = x_recv
        # 7. results back to the tokens' ranks, then the weighted combine
        y_back = all_to_all(y_recv, in_splits, out_splits, self.group)
        out_TD = combine_slots(y_back, order, route.weights_TK, experts.kernels)
        row_bytes = x_TD.shape[-1] * x_TD.element_size()
        bytes_to = [2 * row_bytes * c if d != me else 0 for d, c in enumerate(in_splits)]  # by EP rank, both ways
        self.counters = {
            "tokens_sent": sum(c for d, c in enumerate(in_splits) if d != me),
            "tokens_received": sum(c for s, c in enumerate(out_splits) if s != me),
            "a2a_bytes": sum(bytes_to),
            "a2a_bytes_to": bytes_to,
            "dropped": dropped,
            "tokens_per_local_expert": cnt_PL.sum(0).tolist(),
        }
        return out_TD


def _source_to_expert_major(cnt_PL: torch.Tensor) -> torch.Tensor:
    """Rows arrive as blocks (source s, local expert e), source-major; return the index that lists
    them expert-major (all sources' rows of expert 0, then expert 1, ...)."""
    P, Lx = cnt_PL.shape
    flat = cnt_PL.flatten()
    starts = (torch.cumsum(flat, 0) - flat).view(P, Lx)
    cnt_em = cnt_PL.t().flatten()
    start_em = starts.t().flatten()
    total = int(flat.sum())
    seg_begin = torch.cumsum(cnt_em, 0) - cnt_em
    return (torch.repeat_interleave(start_em - seg_begin, cnt_em, output_size=total)
            + torch.arange(total, device=cnt_PL.device))


def layer_plans(plan: Placement, ep_rank: int) -> list[LayerPlan]:
    return [LayerPlan(tuple(layer), ep_rank, plan.num_gpus) for layer in plan.placement]


def apply_expert_parallel(model: nn.Module, mesh, plan: Placement, *, capacity_factor: float = 0.0,
                          token_dedup: bool | NodeGroups = False, device=None) -> list[str]:
    """Keep on this rank only the experts that `plan` gives its EP rank, and route tokens to the others
    by all-to-all. `mesh` is a 2-D DeviceMesh ("edp", "ep"). Returns the names of the expert
    parameters and plan buffers, which differ across ranks (to keep them out of DDP). The model
    holds every expert, as built: initialized, or on the meta device (then `device` says where the
    tokens will be, and `Transformer.materialize` allocates only the local experts)."""
    ep_group, ep_rank = mesh.get_group("ep"), mesh.get_local_rank("ep")
    moes = model.moe_layers()
    check_fits(plan, num_layers=len(moes), num_experts=moes[0].cfg.num_experts, num_gpus=mesh.size(1) if mesh.ndim > 1 else mesh.size())
    names = []
    for lp, moe in zip(layer_plans(plan, ep_rank), moes):
        full = moe.experts
        local = lp.local_experts
        # built on meta (nothing allocated or drawn): it takes this rank's rows of the full weights,
        # themselves on meta when the model is (then `Transformer.materialize` allocates them)
        sub = GroupedExperts(len(local), full.dim, full.ffn_dim, kernels=full.kernels, device="meta")
        for name in EXPERT_WEIGHTS:  # (indexing by a list copies: the full tensors are freed with `full`)
            setattr(sub, name, nn.Parameter(getattr(full, name).detach()[local]))
        moe.experts = sub
        moe.dispatcher = ExpertParallelDispatcher(lp, ep_group, device=device or full.w2_EDF.device,
                                                  capacity_factor=capacity_factor,
                                                  token_dedup=token_dedup)
        moe.layer_plan = lp
    names += [n for n, _ in model.named_parameters() if ".experts." in n]
    names += [n for n, _ in model.named_buffers() if ".dispatcher." in n]  # per-rank plan tables
    n_local = [len(m.layer_plan.local_experts) for m in moes]
    log.info("applied expert parallel: ep_size %d, edp_size %d, local experts per layer %s",
             mesh.size(-1), mesh.size(0) if mesh.ndim > 1 else 1, n_local)
    return names


def _flat_grads(experts: GroupedExperts) -> torch.Tensor:
    """(n_local, 3*F*D) this rank's expert gradients, one row per local expert ([w13 | w2])."""
    ws = [getattr(experts, name) for name in EXPERT_WEIGHTS]
    n = experts.num_experts
    return torch.cat([(w.grad if w.grad is not None else torch.zeros_like(w)).reshape(n, w.shape[1] * w.shape[2])
                      for w in ws], 1)


def _set_flat_grads(experts: GroupedExperts, flat: torch.Tensor) -> None:
    n, i = experts.num_experts, 0
    for w in (getattr(experts, name) for name in EXPERT_WEIGHTS):
        size = w.shape[1] * w.shape[2]
        w.grad = flat[:, i : i + size].reshape(w.shape).contiguous()
        i += size


def reduce_expert_grads(model: nn.Module, mesh, world_size: int, dtype: torch.dtype = torch.float32) -> int:
    """Make every expert gradient the gradient of the global mean loss: sum over the replicas in the
    EP group and over the edp ranks, then divide by the world size. Every holder of an expert adds
    the replicas' partial sums in the same order (by EP rank), so that its copies stay equal, bit
    for bit. `dtype` (parallel.reduce_dtype): what the sums travel and are added in (bf16: half the
    bytes, each sum rounded to bf16); an expert that no other rank holds keeps its fp32 gradient.
    Returns the bytes this rank sent."""
    ep_group, edp_group = mesh.get_group("ep"), mesh.get_group("edp") if mesh.ndim > 1 else None
    sent = 0
    for moe in model.moe_layers():
        lp: LayerPlan = moe.layer_plan
        flat = _flat_grads(moe.experts)
        local = lp.local_experts
        # 1. replicas in the EP group: each holder sends its partial sum to every other holder
        pairs = [(d, e) for e in local for d in lp.holders[e] if d != lp.ep_rank]
        if any(len(h) > 1 for h in lp.holders):
            pairs.sort()
            row = {e: i for i, e in enumerate(local)}
            send = flat[[row[e] for _, e in pairs]].to(dtype) if pairs else flat.new_zeros(0, flat.shape[1], dtype=dtype)
            in_splits = [sum(1 for d, _ in pairs if d == r) for r in range(lp.ep_size)]
            recv_from = [(s, e) for s in range(lp.ep_size) if s != lp.ep_rank for e in local if s in lp.holders[e]]
            out_splits = [sum(1 for s, _ in recv_from if s == r) for r in range(lp.ep_size)]
            recv = send.new_empty(len(recv_from), flat.shape[1])
            dist.all_to_all_single(recv, send.contiguous(), out_splits, in_splits, group=ep_group)
            sent += send.numel() * send.element_size()
            # 2. each replicated expert: its holders' partial sums added in EP-rank order
            parts = {e: {lp.ep_rank: flat[row[e]].to(dtype)} for e in local if len(lp.holders[e]) > 1}
            for (s, e), g in zip(recv_from, recv):
                parts[e][s] = g
            for e, by_rank in parts.items():
                ranks = sorted(by_rank)
                total = by_rank[ranks[0]].clone()
                for r in ranks[1:]:
                    total += by_rank[r]
                flat[row[e]] = total.to(flat.dtype)
        # 3. the same experts on the other edp ranks
        if edp_group is not None and dist.get_world_size(edp_group) > 1:
            comm = flat.to(dtype)  # flat itself in fp32
            dist.all_reduce(comm, group=edp_group)
            sent += comm.numel() * comm.element_size()
            flat = comm.to(flat.dtype)
        # 4. the global mean over all ranks' tokens
        flat /= world_size
        _set_flat_grads(moe.experts, flat)
    return sent


def expert_grad_sq_norm(model: nn.Module, mesh) -> torch.Tensor:
    """This rank's share of the global squared norm of expert gradients: each expert counted once
    across its replicas and the edp ranks (all-reduce the result over the world)."""
    total = torch.zeros((), dtype=torch.float64, device=next(model.parameters()).device)
    edp = mesh.size(0) if mesh.ndim > 1 else 1
    for moe in model.moe_layers():
        lp = moe.layer_plan
        flat = _flat_grads(moe.experts).double()
        reps = torch.tensor([len(lp.holders[e]) for e in lp.local_experts], dtype=torch.float64, device=flat.device)
        total += ((flat ** 2).sum(1) / (reps * edp)).sum()
    return total


def migrate_resident(model: nn.Module, optimizer: torch.optim.Optimizer, plan: Placement) -> int:
    """Adopt a new plan under resident EP: each rank receives the experts it newly computes, with their
    AdamW moments, from their first old holder, in one all_to_all_single per layer (collective).
    The optimizer's entries are swapped in place. Returns the bytes this rank sent."""
    from moesaic.parallel import expert_state

    sent = 0
    for layer, moe in zip(plan.placement, model.moe_layers()):
        old: LayerPlan = moe.layer_plan
        new = LayerPlan(tuple(layer), old.ep_rank, old.ep_size)
        store: GroupedExperts = moe.experts
        flat, moments = expert_state.pack(store, optimizer)
        row_of = {e: i for i, e in enumerate(old.local_experts)}
        P, me = old.ep_size, old.ep_rank
        wanted = {d: [e for e, h in enumerate(new.holders) if d in h] for d in range(P)}
        held = {d: [e for e, h in enumerate(old.holders) if d in h] for d in range(P)}
        source = {e: old.holders[e][0] for e in range(old.num_experts)}
        # 1. rows to send: experts a rank newly computes, from their first old holder, by (dest, expert)
        sends = [(d, e) for d in range(P) if d != me for e in wanted[d] if e not in held[d] and source[e] == me]
        recvs = sorted((source[e], e) for e in wanted[me] if e not in held[me])
        send = flat[[row_of[e] for _, e in sends]] if sends else flat[:0]
        recv = flat.new_empty(len(recvs), flat.shape[1])
        # 2. one uneven all_to_all_single within the EP group
        dist.all_to_all_single(recv, send.contiguous(), [sum(1 for s, _ in recvs if s == r) for r in range(P)],
                               [sum(1 for d, _ in sends if d == r) for r in range(P)], group=moe.dispatcher.group)
        sent += send.numel() * send.element_size()
        # 3. the new shard, the optimizer pointed at it, and a dispatcher for the new plan
        got = {e: recv[i] for i, (_, e) in enumerate(recvs)}
        rows = torch.stack([flat[row_of[e]] if e in row_of else got[e] for e in new.local_experts]) \
            if new.local_experts else flat[:0]
        # built on meta (no memory, no random draws): its weights are replaced at once
        sub = GroupedExperts(len(new.local_experts), store.dim, store.ffn_dim, kernels=store.kernels, device="meta")
        for name in EXPERT_WEIGHTS:  # the optimizer's entries are keyed by the old tensors
            setattr(sub, name, getattr(store, name))
        expert_state.install(sub, optimizer, rows, moments, store.ffn_dim, store.dim)
        sub.compiled, sub.recompute_act, sub.recast_weights = store.compiled, store.recompute_act, store.recast_weights
        moe.experts = sub
        old_dispatcher = moe.dispatcher
        moe.dispatcher = ExpertParallelDispatcher(new, old_dispatcher.group, device=store.w2_EDF.device,
                                                  capacity_factor=old_dispatcher.capacity_factor,
                                                  token_dedup=old_dispatcher.token_dedup)
        moe.layer_plan = new
    return sent
