"""The honest baselines: `contiguous` (Megatron's default), `round_robin`, and `eplb` (DeepSeek's
load balancer). Each is `(RoutingStats, Topology, slots_per_gpu) -> Placement`."""

from __future__ import annotations

import time

import numpy as np

from moesaic.placement.balance import check_slots, default_slots, items_of, pack_eplb, pack_greedy, replicate
from moesaic.placement.plan import Placement
from moesaic.placement.stats import RoutingStats
from moesaic.placement.topology import Topology


def contiguous(stats: RoutingStats, topo: Topology, slots_per_gpu: int | None = None) -> Placement:
    """Experts [g*E/G, (g+1)*E/G) on GPU g (ceil-sized blocks when G does not divide E). No replicas."""
    E, G = stats.num_experts, topo.num_gpus
    S = slots_per_gpu or default_slots(E, G)
    check_slots(E, G, S)
    block = default_slots(E, G)
    gpu = np.arange(E) // block
    return Placement.from_gpu_of_expert(np.tile(gpu, (stats.num_layers, 1)), G, topo.gpus_per_node,
                                        meta={"method": "contiguous", "slots_per_gpu": S})


def round_robin(stats: RoutingStats, topo: Topology, slots_per_gpu: int | None = None) -> Placement:
    """Expert e on GPU e mod G. No replicas."""
    E, G = stats.num_experts, topo.num_gpus
    S = slots_per_gpu or default_slots(E, G)
    check_slots(E, G, S)
    return Placement.from_gpu_of_expert(np.tile(np.arange(E) % G, (stats.num_layers, 1)), G, topo.gpus_per_node,
                                        meta={"method": "round_robin", "slots_per_gpu": S})


def eplb(stats: RoutingStats, topo: Topology, slots_per_gpu: int | None = None, num_groups: int = 1) -> Placement:
    """DeepSeek EPLB: replicas to the highest load per replica until the slots are used, then
    largest-first packing into the least-loaded GPU with a free slot (nodes first).

    With `num_groups` > 1 expert groups (the router's group-limited routing: experts
    [k E/n, (k+1) E/n) form group k) and a number of nodes that divides them, DeepSeek's
    hierarchical policy instead: 1. whole groups to nodes, the same number on each, largest group
    load first into the least-loaded node; 2. each node replicates its own experts in its
    gpus_per_node x S slots; 3. the node's replicas packed onto its GPUs. A token that routes to
    M groups then reaches at most M nodes (DeepSeek-V3's node-limited routing)."""
    t0 = time.perf_counter()
    E, G = stats.num_experts, topo.num_gpus
    S = slots_per_gpu or default_slots(E, G)
    check_slots(E, G, S)
    check_groups(num_groups, E)
    by_groups = places_groups(num_groups, topo)
    holds = []
    for l in range(stats.num_layers):
        if by_groups:
            holds.append(groups_to_nodes(stats.P[l], num_groups, topo, S))
            continue
        r = replicate(stats.P[l], G * S, G)
        gpu_R = pack_eplb(stats.P[l], r, topo, S)
        h = np.zeros((E, G), dtype=bool)
        h[items_of(r), gpu_R] = True
        holds.append(h)
    meta = {"method": "eplb", "slots_per_gpu": S, "seconds": time.perf_counter() - t0}
    if num_groups > 1:
        meta.update(expert_groups=num_groups, policy="hierarchical" if by_groups else "global")
    return Placement.from_holds(holds, G, topo.gpus_per_node, meta=meta)


def check_groups(num_groups: int, num_experts: int) -> None:
    if num_groups < 1 or num_experts % num_groups:
        raise ValueError(f"num_groups ({num_groups}) must be >= 1 and divide the experts ({num_experts}): "
                         "group k holds experts [k E/n, (k+1) E/n)")


def places_groups(num_groups: int, topo: Topology) -> bool:
    """Whether whole groups go onto nodes: more than one of each, and the nodes divide the groups
    (DeepSeek's rule; otherwise the methods place experts one by one: the `global` policy)."""
    return num_groups > 1 and topo.num_nodes > 1 and num_groups % topo.num_nodes == 0


def groups_to_nodes(load_E: np.ndarray, num_groups: int, topo: Topology, slots_per_gpu: int) -> np.ndarray:
    """(E, G) holds of one layer under EPLB's hierarchical policy (see `eplb`)."""
    E, N, gpn = len(load_E), topo.num_nodes, topo.gpus_per_node
    size = E // num_groups
    # 1. groups to nodes: num_groups / N each (balanced packing: a group is an item of a unique kind)
    node_of_group = pack_greedy(load_E.reshape(num_groups, size).sum(1), np.arange(num_groups), N, num_groups // N)
    node_E = np.repeat(node_of_group, size)
    holds = np.zeros((E, topo.num_gpus), dtype=bool)
    for n in range(N):
        experts = np.flatnonzero(node_E == n)
        # 2. replicas within the node, 3. packed onto its GPUs
        r = replicate(load_E[experts], gpn * slots_per_gpu, gpn)
        local_R = items_of(r)
        gpu_R = pack_greedy(load_E[experts][local_R] / r[local_R], local_R, gpn, slots_per_gpu)
        holds[experts[local_R], n * gpn + gpu_R] = True
    return holds


def static_plan(method: str, num_layers: int, num_experts: int, num_gpus: int, gpus_per_node: int = 0) -> Placement:
    """`contiguous` or `round_robin` without statistics (the trainer's start-up plans)."""
    from moesaic.placement.stats import RoutingStats

    fn = {"contiguous": contiguous, "round_robin": round_robin}.get(method)
    if fn is None:
        raise ValueError(f"placement.plan ({method!r}) must be 'contiguous', 'round_robin' or a plan file path")
    return fn(RoutingStats.zeros(num_layers, num_experts), Topology(num_gpus=num_gpus, gpus_per_node=gpus_per_node))
