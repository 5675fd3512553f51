"""Two-stage token-deduplicated dispatch across nodes (`parallel.node_dispatch`), as DeepSeek-V3
dispatches and DeepEP's internode kernels do: a token crosses the network once to each node that
computes any of its experts, to the GPU there with its own GPU's in-node index (its rail peer), which
forwards it once to each GPU of that node that computes it (`moesaic.parallel.token_dedup`, within
the node). The results come back the same way, summed at each stage, so one row per (token, node)
crosses the network each way. With the router's group-limited routing and a plan that keeps each
expert group on one node (`eplb` with expert groups), a token reaches at most `num_limited_groups`
nodes.

The EP ranks form nodes of `gpus_per_node` consecutive ranks: rank r is GPU r % gpus_per_node of
node r // gpus_per_node. Two process groups per rank: its rail (the ranks of its in-node index, one
per node) and its node.

A stage-1 row carries its token and, per slot, three more columns: the combine weight (zero for the
slots of other nodes), the destination's in-node index (-1 there) and the expert id, the two indices
stored bit for bit in the row's dtype. The math is the layer's; only the order of the combine's sums
changes.

Legend: T local tokens, K top-k, N = T*K token-slots, D model dim, P ep ranks, g GPUs per node,
R rows of stage 1 (one per token and destination node).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from moesaic.parallel.all_to_all import all_to_all, exchange_counts
from moesaic.parallel.experts import combine_slots, gather_slots
from moesaic.parallel.token_dedup import _INT_OF_SIZE, dedup_dispatch, pair_rows


@dataclass(frozen=True)
class NodeGroups:
    """This rank's two process groups for node dispatch (`token_dedup=NodeGroups(...)` in the
    `apply_*` functions)."""

    gpus_per_node: int
    rail: object  # the EP ranks with this rank's in-node index, one per node, by node
    node: object  # the EP ranks of this rank's node, by in-node index


def node_groups(mesh, gpus_per_node: int) -> NodeGroups:
    """Every EP domain's rail and node groups (a collective over the world: each rank creates all
    of them), and this rank's. `mesh`: ("edp", "ep") as `apply_*` take it."""
    ranks = mesh.mesh.reshape(-1, mesh.size(-1)).tolist()  # one row of global ranks per EP domain
    P, g = len(ranks[0]), gpus_per_node
    if g < 1 or P % g:
        raise ValueError(f"parallel.gpus_per_node ({g}) must divide the expert-parallel size ({P})")
    rail, _ = dist.new_subgroups_by_enumeration([d[i::g] for d in ranks for i in range(g)])
    node, _ = dist.new_subgroups_by_enumeration([d[n:n + g] for d in ranks for n in range(0, P, g)])
    return NodeGroups(g, rail, node)


def node_dispatch(x_TD: torch.Tensor, weights_TK: torch.Tensor, dest_N: torch.Tensor, kept: torch.Tensor,
                  local_index_PE: torch.Tensor, ids_N: torch.Tensor, experts, num_local: int, me: int, P: int,
                  gpus_per_node: int, rail_group, node_group) -> tuple[torch.Tensor, dict]:
    """The layer's output (T, D) and its counters, sending each (token, destination node) once
    across nodes and each (token, destination GPU) once within the destination node."""
    T, K = weights_TK.shape
    D, dev, dtype, g = x_TD.shape[-1], ids_N.device, x_TD.dtype, gpus_per_node
    my_node = me // g
    node_N = dest_N // g
    # 1. stage-1 rows: one per (destination node, token), ordered by node then token
    by_pair, nd, first, row_of, pos = pair_rows(node_N, kept, T, K)
    row_slot = by_pair[first]
    R = row_slot.numel()
    # 2. each row's slots: combine weight, destination in-node index, expert id (K columns each)
    at = row_of * K + pos
    w_RK = torch.zeros(R * K, dtype=dtype, device=dev).index_put((at,), weights_TK.reshape(-1)[by_pair].to(dtype))
    gpu_RK = torch.full((R * K,), -1, dtype=torch.int64, device=dev).index_put_((at,), dest_N[by_pair] % g)
    id_RK = torch.full((R * K,), -1, dtype=torch.int64, device=dev).index_put_((at,), ids_N[by_pair])
    as_int = _INT_OF_SIZE[x_TD.element_size()]
    payload = torch.cat([gather_slots(x_TD, row_slot, K, experts.kernels), w_RK.view(R, K),
                         gpu_RK.to(as_int).view(dtype).view(R, K), id_RK.to(as_int).view(dtype).view(R, K)], 1)
    # 3. exchange the row counts over the rail, then the rows to the rail peers of their nodes
    rows_N = torch.zeros(P // g, dtype=torch.int64, device=dev).index_add_(0, nd[first], torch.ones_like(row_slot))
    rows_in = rows_N.tolist()
    rows_out = exchange_counts(rows_N[:, None], rail_group)[:, 0].tolist()
    recv = all_to_all(payload, rows_out, rows_in, rail_group)
    x1, w1 = recv[:, :D], recv[:, D:D + K]
    gpu1 = recv[:, D + K:D + 2 * K].detach().contiguous().view(as_int).long().flatten()
    id1 = recv[:, D + 2 * K:].detach().contiguous().view(as_int).long().flatten()
    # 4. within this node, each received row is a token with up to K slots: token-deduplicated
    #    dispatch over the node's GPUs, which returns each row's weighted sum of its slots
    kept1 = torch.nonzero(gpu1 >= 0).flatten()
    mine = local_index_PE[my_node * g:(my_node + 1) * g]
    y1, inner = dedup_dispatch(x1, w1, gpu1, kept1, mine, id1, experts, num_local, me % g, g, node_group)
    # 5. the sums back over the rail; a token's output is the sum of its rows
    y_back = all_to_all(y1, rows_in, rows_out, rail_group)
    out_TD = combine_slots(y_back, row_slot, torch.ones_like(weights_TK, dtype=y_back.dtype), experts.kernels)
    away = sum(c for n, c in enumerate(rows_in) if n != my_node)
    row1 = (2 * D + 3 * K) * x_TD.element_size()  # one row each way, the outgoing with 3K slot columns
    bytes_to = [0] * P  # by EP rank: the rail peers of the other nodes, then this node's ranks
    for n, c in enumerate(rows_in):
        if n != my_node:
            bytes_to[n * g + me % g] = row1 * c
    for d, b in enumerate(inner["a2a_bytes_to"]):
        bytes_to[my_node * g + d] += b
    counters = {
        "tokens_sent": away,
        "tokens_received": sum(c for n, c in enumerate(rows_out) if n != my_node),
        "slots_sent": int((dest_N[kept] != me).sum()),
        "a2a_bytes": sum(bytes_to),
        "a2a_inter_node_bytes": row1 * away,
        "a2a_bytes_to": bytes_to,
        "tokens_per_local_expert": inner["tokens_per_local_expert"],
    }
    return out_TD, counters
