"""Expert groups onto nodes for the methods that place by affinity (`affinity`, `moetuner`).

Group-limited routing (DeepSeek-V2/V3) sends each token to the experts of at most M of the n expert
groups; with whole groups on nodes, a token reaches at most M nodes. EPLB's hierarchical policy
(`baselines.groups_to_nodes`) puts groups onto nodes by load alone. Here the method that places the
experts places the groups too, so the flows between layers decide which groups share a node:

1. the group problem: per layer, the n groups as "experts" (loads P and flows W summed over their
   experts) onto N "GPUs" of one node each, n/N slots each (no replicas). Every pair of distinct
   nodes costs the same hop, so its objective is the flow that crosses nodes; its load tolerance
   balances the nodes.
2. the node problems, one per node: at each layer, the E/N experts of the groups that step 1 put
   on the node (which ones may change from layer to layer), with P and W restricted to them, onto
   the node's gpus_per_node GPUs and their slots (replicas stay within the node, as EPLB's step 2).

The hop cost splits exactly: a pair of experts on different nodes costs `inter_node_cost` wherever
on those nodes they are, so the cross-node terms depend on step 1 alone, and each node's problem
holds every term within it. (Solving the two in turn is not a joint optimum: step 1 does not see
how well its node sets can be arranged.) Legend: L layers, E experts, n groups, N nodes, G GPUs.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np

from moesaic.placement.balance import check_slots
from moesaic.placement.baselines import check_groups, places_groups
from moesaic.placement.metrics import hop_cost
from moesaic.placement.plan import Placement
from moesaic.placement.stats import RoutingStats
from moesaic.placement.topology import Topology

# (stats, topology, slots per GPU, time limit in seconds) -> Placement
Placer = Callable[[RoutingStats, Topology, int, float], Placement]


def group_stats(stats: RoutingStats, num_groups: int) -> RoutingStats:
    """The statistics of the groups: group k is experts [k E/n, (k+1) E/n)."""
    check_groups(num_groups, stats.num_experts)
    L, E = stats.P.shape
    size = E // num_groups
    P = stats.P.reshape(L, num_groups, size).sum(2)
    W = stats.W.reshape(max(L - 1, 0), num_groups, size, num_groups, size).sum((2, 4))
    return RoutingStats(P, W, stats.num_tokens, stats.top_k, list(stats.sources))


def node_stats(stats: RoutingStats, experts_L: list[np.ndarray]) -> RoutingStats:
    """The statistics restricted to one node's experts at each layer (`experts_L[l]`, as many at
    every layer): expert i of the result at layer l is `experts_L[l][i]`."""
    L = stats.num_layers
    P = np.stack([stats.P[l, experts_L[l]] for l in range(L)])
    W = np.stack([stats.W[l][np.ix_(experts_L[l], experts_L[l + 1])] for l in range(L - 1)]) if L > 1 \
        else np.zeros((0, P.shape[1], P.shape[1]))
    return RoutingStats(P, W, stats.num_tokens, stats.top_k, list(stats.sources))


def by_groups(place: Placer, stats: RoutingStats, topo: Topology, slots_per_gpu: int, num_groups: int,
              time_limit: float) -> Placement:
    """Steps 1 and 2 above with `place` for both; half of `time_limit` for the groups, the rest shared
    by the nodes. The plan's meta has the method's name, `policy: hierarchical`, the cross-node
    share of the flow, and the statuses of the N + 1 solves."""
    t0 = time.perf_counter()
    if not places_groups(num_groups, topo):
        raise ValueError(f"num_groups ({num_groups}) must be > 1 and a multiple of the nodes ({topo.num_nodes}), "
                         "which must be more than one, to place whole groups onto nodes")
    L, E, N, gpn = stats.num_layers, stats.num_experts, topo.num_nodes, topo.gpus_per_node
    check_slots(E, topo.num_gpus, slots_per_gpu)
    size = E // num_groups
    # 1. groups onto nodes: N one-GPU nodes, num_groups / N slots each
    nodes = Topology(num_gpus=N, gpus_per_node=1, inter_node_cost=topo.inter_node_cost)
    grouped = place(group_stats(stats, num_groups), nodes, num_groups // N, time_limit / 2)
    if any((grouped.holds(l).sum(1) != 1).any() for l in range(L)):
        raise RuntimeError(f"the group problem replicated a group ({grouped.meta.get('method')})")
    node_of_group = np.stack([grouped.holds(l).argmax(1) for l in range(L)])  # (L, n)
    node_of_expert = np.repeat(node_of_group, size, axis=1)  # (L, E)
    # 2. each node's experts onto its GPUs, replicas within the node
    holds = [np.zeros((E, topo.num_gpus), dtype=bool) for _ in range(L)]
    statuses = [grouped.meta.get("status")]
    for n in range(N):
        experts_L = [np.flatnonzero(node_of_expert[l] == n) for l in range(L)]
        left = t0 + time_limit - time.perf_counter()
        sub = place(node_stats(stats, experts_L), Topology(num_gpus=gpn), slots_per_gpu, max(0.05, left / (N - n)))
        for l in range(L):
            holds[l][experts_L[l], n * gpn:(n + 1) * gpn] = sub.holds(l)
        statuses.append(sub.meta.get("status"))
    total = float(stats.W.sum())
    cross = sum(float(stats.W[l][node_of_expert[l][:, None] != node_of_expert[l + 1][None, :]].sum())
                for l in range(L - 1))
    meta = {"method": grouped.meta.get("method"), "slots_per_gpu": slots_per_gpu, "expert_groups": num_groups,
            "policy": "hierarchical", "status": _worst(statuses), "statuses": statuses,
            "cross_node_flow_share": cross / total if total else 0.0, "seconds": time.perf_counter() - t0,
            "traces": list(stats.sources)}
    plan = Placement.from_holds(holds, topo.num_gpus, gpn, meta=meta)
    plan.meta["objective"] = hop_cost(plan, stats, topo, normalise=False)
    plan.meta["objective_per_token_pair"] = plan.meta["objective"] / total if total else 0.0
    return plan


# the statuses of the methods, from the best to the worst: the plan is as good as its worst solve
_ORDER = ("optimal", "local-optimum", "feasible", "heuristic", "time-limit")


def _worst(statuses: list) -> str:
    known = [s for s in statuses if s in _ORDER]
    return max(known, key=_ORDER.index) if known else "feasible"
