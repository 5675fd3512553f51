"""The honest baselines: `contiguous` (Megatron's default), `round_robin`, and `eplb` (DeepSeek's
load balancer). Each is `(RoutingStats, Topology, slots_per_gpu) -> Placement`."""

from __future__ import annotations

import time

import numpy as np

from moesaic.placement.balance import check_slots, default_slots, items_of, pack_eplb, replicate
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


def eplb(stats: RoutingStats, topo: Topology, slots_per_gpu: int | None = None) -> Placement:
    """DeepSeek EPLB: replicas to the highest load per replica until the slots are used, then
    largest-first packing into the least-loaded GPU with a free slot (nodes first)."""
    t0 = time.perf_counter()
    E, G = stats.num_experts, topo.num_gpus
    S = slots_per_gpu or default_slots(E, G)
    check_slots(E, G, S)
    holds = []
    for l in range(stats.num_layers):
        r = replicate(stats.P[l], G * S, G)
        gpu_R = pack_eplb(stats.P[l], r, topo, S)
        h = np.zeros((E, G), dtype=bool)
        h[items_of(r), gpu_R] = True
        holds.append(h)
    return Placement.from_holds(holds, G, topo.gpus_per_node,
                                meta={"method": "eplb", "slots_per_gpu": S, "seconds": time.perf_counter() - t0})


def static_plan(method: str, num_layers: int, num_experts: int, num_gpus: int, gpus_per_node: int = 0) -> Placement:
    """`contiguous` or `round_robin` without statistics (the trainer's start-up plans)."""
    from moesaic.placement.stats import RoutingStats

    fn = {"contiguous": contiguous, "round_robin": round_robin}.get(method)
    if fn is None:
        raise ValueError(f"placement.plan ({method!r}) must be 'contiguous', 'round_robin' or a plan file path")
    return fn(RoutingStats.zeros(num_layers, num_experts), Topology(num_gpus=num_gpus, gpus_per_node=gpus_per_node))
