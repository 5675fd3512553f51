"""One entry point for every method: `solve(method, stats, topo, ...) -> Placement`."""

from __future__ import annotations

import time

from moesaic.placement.affinity import AffinityOptions, affinity
from moesaic.placement.baselines import check_groups, contiguous, eplb, round_robin
from moesaic.placement.moetuner import moetuner
from moesaic.placement.plan import Placement
from moesaic.placement.stats import RoutingStats
from moesaic.placement.topology import Topology

METHODS = ("affinity", "moetuner", "eplb", "contiguous", "round_robin")


def solve(method: str, stats: RoutingStats, topo: Topology, *, slots_per_gpu: int | None = None,
          epsilon: float = 0.05, time_limit: float = 60.0, solver: str = "highs", seed: int = 0,
          num_groups: int = 1) -> Placement:
    """`num_groups`: the router's expert groups; `eplb` packs whole groups onto nodes when the nodes
    divide them (DeepSeek's hierarchical policy). The other methods place experts one by one."""
    if method not in METHODS:
        raise ValueError(f"method ({method!r}) must be one of {', '.join(METHODS)}")
    check_groups(num_groups, stats.num_experts)
    t0 = time.perf_counter()
    if method == "affinity":
        plan = affinity(stats, topo, slots_per_gpu,
                        AffinityOptions(epsilon=epsilon, time_limit=time_limit, solver=solver, seed=seed))
    elif method == "moetuner":
        plan = moetuner(stats, topo, slots_per_gpu, solver=solver, time_limit=time_limit)
    elif method == "eplb":
        plan = eplb(stats, topo, slots_per_gpu, num_groups=num_groups)
    else:
        plan = {"contiguous": contiguous, "round_robin": round_robin}[method](stats, topo, slots_per_gpu)
    plan.meta.setdefault("seconds", time.perf_counter() - t0)
    plan.meta.setdefault("status", "heuristic" if method == "eplb" else "fixed")
    plan.meta.setdefault("traces", list(stats.sources))
    return plan
