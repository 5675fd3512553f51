"""One entry point for every method: `solve(method, stats, topo, ...) -> Placement`."""

from __future__ import annotations

import time

from moesaic.placement.affinity import AffinityOptions, affinity
from moesaic.placement.balance import default_slots
from moesaic.placement.baselines import check_groups, contiguous, eplb, places_groups, round_robin
from moesaic.placement.hierarchical import Placer, by_groups
from moesaic.placement.moetuner import moetuner
from moesaic.placement.plan import Placement
from moesaic.placement.stats import RoutingStats
from moesaic.placement.topology import Topology

METHODS = ("affinity", "moetuner", "eplb", "contiguous", "round_robin")


def solve(method: str, stats: RoutingStats, topo: Topology, *, slots_per_gpu: int | None = None,
          epsilon: float = 0.05, time_limit: float = 60.0, solver: str = "highs", seed: int = 0,
          num_groups: int = 1) -> Placement:
    """`num_groups`: the router's expert groups. Where the nodes divide them, `eplb` packs whole
    groups onto nodes by load (DeepSeek's hierarchical policy), and `affinity` and `moetuner` place
    the groups onto nodes and then each node's experts onto its GPUs, both by their own objective
    (`hierarchical.by_groups`). Elsewhere, and for the fixed layouts, experts are placed one by one."""
    if method not in METHODS:
        raise ValueError(f"method ({method!r}) must be one of {', '.join(METHODS)}")
    check_groups(num_groups, stats.num_experts)
    t0 = time.perf_counter()
    if method in ("affinity", "moetuner"):
        place = _placer(method, epsilon=epsilon, solver=solver, seed=seed)
        if places_groups(num_groups, topo):
            plan = by_groups(place, stats, topo, slots_per_gpu or default_slots(stats.num_experts, topo.num_gpus),
                             num_groups, time_limit)
        else:
            plan = place(stats, topo, slots_per_gpu, time_limit)
            if num_groups > 1:
                plan.meta.update(expert_groups=num_groups, policy="global")
    elif method == "eplb":
        plan = eplb(stats, topo, slots_per_gpu, num_groups=num_groups)
    else:
        plan = {"contiguous": contiguous, "round_robin": round_robin}[method](stats, topo, slots_per_gpu)
    plan.meta.setdefault("seconds", time.perf_counter() - t0)
    plan.meta.setdefault("status", "heuristic" if method == "eplb" else "fixed")
    plan.meta.setdefault("traces", list(stats.sources))
    return plan


def _placer(method: str, *, epsilon: float, solver: str, seed: int) -> Placer:
    """`affinity` or `moetuner` as `(stats, topology, slots per GPU, time limit) -> Placement`."""
    if method == "affinity":
        return lambda s, t, S, limit: affinity(s, t, S, AffinityOptions(epsilon=epsilon, time_limit=limit,
                                                                        solver=solver, seed=seed))
    return lambda s, t, S, limit: moetuner(s, t, S, solver=solver, time_limit=limit)
