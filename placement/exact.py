"""Exact solutions for tiny instances: the monolithic ILP (proven optimal by the MILP solver) and a
brute-force enumeration (a dynamic programme over every feasible per-layer assignment) that checks it.

Both solve the `affinity` problem exactly as `affinity.py` states it, with the same replica counts and
load caps (`build_problem`).
"""

from __future__ import annotations

import itertools
import time

import numpy as np
import pulp

from moesaic.placement import ilp
from moesaic.placement.affinity import Problem, _dist, _transition_cost, build_problem
from moesaic.placement.balance import default_slots
from moesaic.placement.plan import Placement
from moesaic.placement.stats import RoutingStats
from moesaic.placement.topology import Topology


def monolithic(stats: RoutingStats, topo: Topology, slots_per_gpu: int | None = None, *, epsilon: float = 0.05,
               solver: str = "highs", time_limit: float = 120.0) -> Placement:
    """x[l,e,g] binary (GPU g holds expert e at layer l); z[l,i,j,g,h] in [0,1] picks the GPU pair
    that serves (i at l, j at l+1): sum_{g,h} z = 1, z <= x[l,i,g], z <= x[l+1,j,h], so that the
    objective sum W * hop[g,h] * z charges each pair its cheapest hop. Expert 0 of layer 0 is fixed on
    GPU 0 (the GPU labels are symmetric)."""
    t0 = time.perf_counter()
    E, G = stats.num_experts, topo.num_gpus
    S = slots_per_gpu or default_slots(E, G)
    p = build_problem(stats, topo, S, epsilon, solver=solver)
    L, hop = p.num_layers, p.hop
    prob = pulp.LpProblem("affinity_monolithic", pulp.LpMinimize)
    x = {(l, e, g): prob.add_variable(f"x_{l}_{e}_{g}", cat="Binary") for l in range(L) for e in range(E) for g in range(G)}
    z = {}
    for l in range(L - 1):
        for i, j in zip(*np.nonzero(p.W[l])):
            for g in range(G):
                for h in range(G):
                    z[l, i, j, g, h] = prob.add_variable(f"z_{l}_{i}_{j}_{g}_{h}", lowBound=0, upBound=1)
    prob += pulp.lpSum(float(p.W[l][i, j] * hop[g, h]) * v for (l, i, j, g, h), v in z.items())
    for l in range(L):
        r = np.bincount(p.expert_LR[l], minlength=E)
        w_E = stats.P[l] / np.maximum(r, 1)
        for e in range(E):
            prob += pulp.lpSum(x[l, e, g] for g in range(G)) == int(r[e])
        for g in range(G):
            prob += pulp.lpSum(x[l, e, g] for e in range(E)) == S
            prob += pulp.lpSum(float(w_E[e]) * x[l, e, g] for e in range(E)) <= float(p.cap_L[l])
    for l in range(L - 1):
        for i, j in zip(*np.nonzero(p.W[l])):
            prob += pulp.lpSum(z[l, i, j, g, h] for g in range(G) for h in range(G)) == 1
            for g in range(G):
                for h in range(G):
                    prob += z[l, i, j, g, h] <= x[l, i, g]
                    prob += z[l, i, j, g, h] <= x[l + 1, j, h]
    prob += x[0, 0, 0] == 1
    rep = ilp.solve(prob, solver=solver, time_limit=time_limit, gap=1e-9)
    if rep.objective is None:
        raise RuntimeError(f"monolithic ILP found no solution ({rep.status})")
    holds = [np.array([[x[l, e, g].value() > 0.5 for g in range(G)] for e in range(E)]) for l in range(L)]
    meta = {"method": "affinity-monolithic", "slots_per_gpu": S, "epsilon": epsilon, **rep.as_meta(),
            "seconds": time.perf_counter() - t0, "traces": list(stats.sources)}
    return Placement.from_holds(holds, G, topo.gpus_per_node, meta=meta)


def layer_assignments(p: Problem, l: int, E: int, fix_first: bool) -> list[np.ndarray]:
    """Every feasible (E, G) holds matrix of layer l: S replicas per GPU, none twice, load <= cap."""
    G, S = p.num_gpus, p.S
    e_R, w_R = p.expert_LR[l], p.weight_LR[l]
    r_E = np.bincount(e_R, minlength=E)
    w_E = np.zeros(E)
    w_E[e_R] = w_R
    out = []

    def rec(g: int, remaining: np.ndarray, holds: np.ndarray):
        if g == G:
            if not remaining.any():
                out.append(holds.copy())
            return
        candidates = np.flatnonzero(remaining > 0)
        for combo in itertools.combinations(candidates, S):
            if w_E[list(combo)].sum() > p.cap_L[l]:
                continue
            if fix_first and g == 0 and 0 not in combo:
                continue
            holds[list(combo), g] = True
            remaining[list(combo)] -= 1
            rec(g + 1, remaining, holds)
            remaining[list(combo)] += 1
            holds[list(combo), g] = False

    rec(0, r_E.copy(), np.zeros((E, G), dtype=bool))
    return out


def brute_force(stats: RoutingStats, topo: Topology, slots_per_gpu: int | None = None, *,
                epsilon: float = 0.05) -> tuple[float, list[np.ndarray]]:
    """The optimum by enumeration: (objective, holds per layer). Exponential; tiny instances only."""
    E, G = stats.num_experts, topo.num_gpus
    S = slots_per_gpu or default_slots(E, G)
    p = build_problem(stats, topo, S, epsilon)
    choices = [layer_assignments(p, l, E, fix_first=(l == 0)) for l in range(p.num_layers)]
    if any(not c for c in choices):
        raise RuntimeError("no feasible assignment for some layer")
    best = np.zeros(len(choices[0]))
    back = []
    for l in range(p.num_layers - 1):
        dists = [_dist(h, p.hop) for h in choices[l + 1]]
        T = np.array([[_transition_cost(p.W[l], a, d) for d in dists] for a in choices[l]])
        total = best[:, None] + T
        back.append(total.argmin(0))
        best = total.min(0)
    k = int(best.argmin())
    path = [k]
    for b in reversed(back):
        path.append(int(b[path[-1]]))
    path.reverse()
    return float(best[k]), [choices[l][i] for l, i in enumerate(path)]
