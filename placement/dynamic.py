"""Dynamic replicas (Hecate, Algorithm 1) and load predictors.

Each step, replicas of the currently hot experts are added on top of the base plan: repeatedly take
the most loaded GPU, replicate its hottest expert (by load per replica) onto the least loaded GPU that
does not hold it, while that lowers the maximum and the replica budget lasts. Under FSSDP a plan
change is free, so this can run every step.

Predictors of the next step's loads:
- `window`: the mean of the last k steps' loads (Hecate);
- `affinity`: within a step, layer l's actual loads times the inter-layer affinity predict layer
  l+1's loads before its router runs: P[l+1] ~ P[l] @ A[l] (moesaic's own).
Pure numpy. Legend: L layers, E experts, G GPUs.
"""

from __future__ import annotations

import numpy as np

from moesaic.placement.plan import Placement


def add_replicas(plan: Placement, loads_LE: np.ndarray, budget: int) -> Placement:
    """The base plan plus up to `budget` extra replicas per layer, chosen greedily from predicted loads."""
    layers = []
    for l, layer in enumerate(plan.placement):
        holders = [set(g) for g in layer]
        p = np.asarray(loads_LE[l], dtype=np.float64)
        for _ in range(budget):
            r = np.array([len(h) for h in holders], dtype=np.float64)
            per = p / r
            gpu_load = np.zeros(plan.num_gpus)
            for e, h in enumerate(holders):
                for g in h:
                    gpu_load[g] += per[e]
            g_max = int(np.argmax(gpu_load))
            on_max = [e for e, h in enumerate(holders) if g_max in h and len(h) < plan.num_gpus]
            if not on_max:
                break
            e = max(on_max, key=lambda x: per[x])
            free = [g for g in range(plan.num_gpus) if g not in holders[e]]
            g_min = min(free, key=lambda g: gpu_load[g])
            # new loads: every holder of e sheds per[e] - p/(r+1); g_min gains p/(r+1)
            new_per = p[e] / (r[e] + 1)
            trial = gpu_load.copy()
            for g in holders[e]:
                trial[g] -= per[e] - new_per
            trial[g_min] += new_per
            if trial.max() >= gpu_load.max() - 1e-12:
                break
            holders[e].add(g_min)
        layers.append([tuple(sorted(h)) for h in holders])
    return Placement(plan.num_gpus, plan.gpus_per_node, layers, dict(plan.meta, dynamic_replicas=budget))


def window_prediction(history_TLE: np.ndarray, window: int = 5) -> np.ndarray:
    """(L, E): mean of the last `window` steps' loads."""
    return np.asarray(history_TLE[-window:], dtype=np.float64).mean(axis=0)


def affinity_prediction(loads_LE: np.ndarray, W: np.ndarray) -> np.ndarray:
    """(L-1, E): layer l+1's loads from layer l's actual loads and the affinity A = W / rowsum(W)."""
    rows = W.sum(axis=2, keepdims=True)
    A = np.divide(W, rows, out=np.full_like(W, 1.0 / W.shape[2]), where=rows > 0)
    return np.einsum("le,lej->lj", np.asarray(loads_LE[:-1], dtype=np.float64), A)


def hecate_owners(load_E: np.ndarray, num_gpus: int, gpus_per_node: int | None = None) -> np.ndarray:
    """Heterogeneous sharding (Hecate, Algorithm 2): (E,) owner of each expert. Experts are taken from
    the least loaded up; each goes to the least loaded node, then to its least loaded device, that
    still has room, where room is an equal share of experts per device (so every device holds the
    same parameter and optimizer memory)."""
    E = len(load_E)
    k = gpus_per_node or num_gpus
    nodes = num_gpus // k
    per_gpu = -(-E // num_gpus)
    per_node = per_gpu * k
    node_load, gpu_load = np.zeros(nodes), np.zeros(num_gpus)
    node_n, gpu_n = np.zeros(nodes, dtype=int), np.zeros(num_gpus, dtype=int)
    owners = np.empty(E, dtype=np.int64)
    for e in np.argsort(np.asarray(load_E, dtype=np.float64), kind="stable"):
        n = min((i for i in range(nodes) if node_n[i] < per_node), key=lambda i: (node_load[i], i))
        g = min((j for j in range(n * k, (n + 1) * k) if gpu_n[j] < per_gpu), key=lambda j: (gpu_load[j], j))
        owners[e] = g
        node_load[n] += load_E[e]
        gpu_load[g] += load_E[e]
        node_n[n] += 1
        gpu_n[g] += 1
    return owners


def aligned_owners(plan: Placement, current_LE: np.ndarray) -> np.ndarray:
    """(L, E) FSSDP owners that compute their own experts: each expert's owner becomes one of the GPUs
    that `plan` has compute it, every GPU keeps the number of experts it owns (its parameter and
    optimizer memory), and as many experts as possible keep their current owner (fewest moves). An
    expert whose plan leaves no such GPU free keeps an owner that does not compute it, preferably its
    current one, and is gathered as before. One assignment problem per layer (deterministic)."""
    current_LE = np.asarray(current_LE, dtype=np.int64)
    G = plan.num_gpus
    out = np.empty((plan.num_layers, plan.num_experts()), dtype=np.int64)
    for l, layer in enumerate(plan.placement):
        cur = current_LE[l]
        if all(cur[e] in gpus for e, gpus in enumerate(layer)):  # cost 0: every owner stays (no scipy import)
            out[l] = cur
            continue
        from scipy.optimize import linear_sum_assignment

        cols = np.repeat(np.arange(G), np.bincount(cur, minlength=G))  # one column per owned slot
        # lexicographic: first the fewest experts gathered every step, then the fewest moved once
        cost = np.zeros((len(layer), len(cols)))
        for e, gpus in enumerate(layer):
            cost[e] = 10.0 * ~np.isin(cols, gpus) + (cols != cur[e])
        rows, picked = linear_sum_assignment(cost)
        out[l, rows] = cols[picked]
    return out
