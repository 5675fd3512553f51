"""MoETuner (arXiv 2502.06643), its two stages:

ILP1 clusters each layer's experts into G groups of equal count, minimising sum_c |T_c - T_mean|
(linearised with d_c >= T_c - T_mean and d_c >= T_mean - T_c), where T_c is the cluster's load.
ILP2 maps the clusters to GPUs layer by layer, minimising the topology-weighted flow between
consecutive layers: with layer l mapped, layer l+1's mapping is an assignment problem, solved exactly
by `linear_sum_assignment`. Replicas (spare slots) are counted as EPLB counts them.
"""

from __future__ import annotations

import time

import numpy as np
import pulp

from moesaic.placement import ilp
from moesaic.placement.balance import balance_layer, check_slots, default_slots, items_of, replicate
from moesaic.placement.plan import Placement
from moesaic.placement.stats import RoutingStats
from moesaic.placement.topology import Topology


def ilp1_cluster(load_E: np.ndarray, r_E: np.ndarray, topo: Topology, S: int, *, solver: str = "highs",
                 time_limit: float = 2.0, max_vars: int = 4096) -> tuple[np.ndarray, str]:
    """(R,) cluster of each replica item, and the ILP status. Warm-started from the balance packing;
    layers larger than `max_vars` keep that packing (status `heuristic`)."""
    G = topo.num_gpus
    e_R = items_of(r_E)
    w_R = load_E[e_R] / r_E[e_R]
    start = balance_layer(load_E, r_E, topo, S)
    E = len(r_E)
    if E * G > max_vars:
        return start, "heuristic"
    w_E = load_E / r_E
    mean = float(w_R.sum()) / G
    prob = pulp.LpProblem("moetuner_ilp1", pulp.LpMinimize)
    x = {(e, c): prob.add_variable(f"x_{e}_{c}", cat="Binary") for e in range(E) for c in range(G)}
    d = [prob.add_variable(f"d_{c}", lowBound=0) for c in range(G)]
    prob += pulp.lpSum(d)
    for e in range(E):
        prob += pulp.lpSum(x[e, c] for c in range(G)) == int(r_E[e])
    held = np.zeros((E, G), dtype=bool)
    held[e_R, start] = True
    for c in range(G):
        T_c = pulp.lpSum(float(w_E[e]) * x[e, c] for e in range(E))
        prob += pulp.lpSum(x[e, c] for e in range(E)) == S
        prob += d[c] >= T_c - mean
        prob += d[c] >= mean - T_c
    for (e, c), v in x.items():
        v.setInitialValue(int(held[e, c]))
    for c in range(G):
        d[c].setInitialValue(abs(float(w_E[held[:, c]].sum()) - mean))
    rep = ilp.solve(prob, solver=solver, time_limit=time_limit, gap=1e-6, warm_start=True)
    if rep.objective is None:
        return start, rep.status
    out = np.empty(len(e_R), dtype=np.int64)
    for e in range(E):
        out[e_R == e] = [c for c in range(G) if x[e, c].value() > 0.5]
    return out, rep.status


def ilp2_map(W: np.ndarray, cluster_LR: list[np.ndarray], e_LR: list[np.ndarray], topo: Topology) -> list[np.ndarray]:
    """(L,) lists of (R,) GPU per item: clusters of layer 0 on GPUs in order, then each next layer's
    clusters assigned to GPUs to minimise sum flow(gpu h at l -> cluster c at l+1) * hop[h, g]."""
    from scipy.optimize import linear_sum_assignment

    G, hop = topo.num_gpus, topo.hop_matrix()
    gpu_LR = [cluster_LR[0].copy()]
    for l in range(len(cluster_LR) - 1):
        E = W[l].shape[0]
        # share of each expert's flow that each of its replicas serves
        a = np.zeros((E, G))
        np.add.at(a, (e_LR[l], gpu_LR[l]), 1.0)
        a /= a.sum(1, keepdims=True)
        b = np.zeros((E, G))  # expert -> cluster at l+1
        np.add.at(b, (e_LR[l + 1], cluster_LR[l + 1]), 1.0)
        b /= b.sum(1, keepdims=True)
        flow_GC = a.T @ W[l] @ b  # from GPU h at l to cluster c at l+1
        cost_CG = flow_GC.T @ hop  # cluster c placed on GPU g
        rows, cols = linear_sum_assignment(cost_CG)
        gpu_of_cluster = np.empty(G, dtype=np.int64)
        gpu_of_cluster[rows] = cols
        gpu_LR.append(gpu_of_cluster[cluster_LR[l + 1]])
    return gpu_LR


def moetuner(stats: RoutingStats, topo: Topology, slots_per_gpu: int | None = None, *, solver: str = "highs",
             time_limit_per_layer: float = 2.0, time_limit: float | None = None) -> Placement:
    """`time_limit_per_layer` caps each layer's ILP1; `time_limit` (None: no cap) is the whole solve's
    budget: a layer gets at most its share of what is left, so model building and ILP2 count too."""
    t0 = time.perf_counter()
    E, G = stats.num_experts, topo.num_gpus
    S = slots_per_gpu or default_slots(E, G)
    check_slots(E, G, S)
    clusters, items, statuses = [], [], []
    for l in range(stats.num_layers):
        r = replicate(stats.P[l], G * S, G)
        limit = time_limit_per_layer  # ILP2 is one assignment per layer pair, milliseconds: no share
        if time_limit is not None:
            limit = ilp.share_of(t0 + time_limit, stats.num_layers - l, time_limit_per_layer)
        c, status = ilp1_cluster(stats.P[l], r, topo, S, solver=solver, time_limit=limit)
        clusters.append(c)
        items.append(items_of(r))
        statuses.append(status)
    gpu_LR = ilp2_map(stats.W, clusters, items, topo)
    holds = []
    for g, e in zip(gpu_LR, items):
        h = np.zeros((E, G), dtype=bool)
        h[e, g] = True
        holds.append(h)
    meta = {"method": "moetuner", "slots_per_gpu": S, "seconds": time.perf_counter() - t0,
            "status": "optimal" if all(s == "optimal" for s in statuses) else "feasible",
            "ilp1_status": {s: statuses.count(s) for s in set(statuses)}, "traces": list(stats.sources)}
    return Placement.from_holds(holds, G, topo.gpus_per_node, meta=meta)
