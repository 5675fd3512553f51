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
