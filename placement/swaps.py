"""The local moves of the affinity search (`affinity.py`), on one layer's items: `repair` swaps
items until the load tolerance and distinct replicas hold, `swap_descent` lowers a per-(expert, GPU)
cost by pairwise swaps that keep them, and `balanced_kmeans` clusters items into GPUs of exactly S
slots each. Pure numpy/scipy.
Legend: R items (replicas) of a layer, e_R each item's expert, w_R its load, gpu_R its GPU, G GPUs,
C (E, G) the cost of putting an expert on a GPU, cap the load limit per GPU.
"""

from __future__ import annotations

import numpy as np


def loads(gpu_R, w_R, G):
    return np.bincount(gpu_R, weights=w_R, minlength=G)


def repair(gpu_R, e_R, w_R, C, cap, G, max_iter: int = 10_000) -> np.ndarray | None:
    """Swap items until no GPU exceeds `cap` and no GPU holds an expert twice: each step takes the
    swap that most reduces the violation (overload + duplicate replicas), cheapest first. None if stuck."""
    gpu = gpu_R.copy()
    E = C.shape[0]
    f = lambda c: np.maximum(c - 1, 0)  # noqa: E731  excess replicas in a cell
    replicas = len(np.unique(e_R)) < len(e_R)
    for _ in range(max_iter):
        load = loads(gpu, w_R, G)
        cnt = np.zeros((E, G), dtype=np.int64)
        np.add.at(cnt, (e_R, gpu), 1)
        over = np.maximum(load - cap, 0.0)
        if not over.any() and not (cnt > 1).any():
            return gpu
        rows = np.flatnonzero((over[gpu] > 0) | (cnt[e_R, gpu] > 1))  # items on a violating GPU
        ga, gb = gpu[rows][:, None], gpu[None, :]
        ea, eb = e_R[rows][:, None], e_R[None, :]
        dw = w_R[None, :] - w_R[rows][:, None]
        d_over = (np.maximum(load[ga] + dw - cap, 0) + np.maximum(load[gb] - dw - cap, 0) - over[ga] - over[gb])
        d_dup = 0.0
        if replicas:
            d_dup = (f(cnt[ea, ga] - 1) - f(cnt[ea, ga]) + f(cnt[ea, gb] + 1) - f(cnt[ea, gb])
                     + f(cnt[eb, gb] - 1) - f(cnt[eb, gb]) + f(cnt[eb, ga] + 1) - f(cnt[eb, ga]))
        d_viol = d_over + d_dup * (1.0 + cap)  # a duplicate outweighs any overload
        d_cost = C[ea, gb] + C[eb, ga] - C[ea, ga] - C[eb, gb]
        valid = (ga != gb) & (ea != eb) & (d_viol < -1e-12)
        if not valid.any():
            return None
        score = np.where(valid, d_viol * 1e6 + d_cost, np.inf)
        a, b = np.unravel_index(np.argmin(score), score.shape)
        a = rows[a]
        gpu[a], gpu[b] = gpu[b], gpu[a]
    return None


def swap_descent(gpu_R, e_R, w_R, C, cap, G, max_iter: int = 100_000) -> np.ndarray | None:
    """Best-improvement pairwise swaps on sum C[e, gpu] keeping loads <= cap and replicas distinct."""
    if gpu_R is None:
        return None
    gpu = gpu_R.copy()
    E = C.shape[0]
    for _ in range(max_iter):
        load = loads(gpu, w_R, G)
        held = np.zeros((E, G), dtype=bool)
        held[e_R, gpu] = True
        ca = C[e_R, gpu]  # (R,)
        delta = C[e_R[:, None], gpu[None, :]] + C[e_R[None, :], gpu[:, None]] - ca[:, None] - ca[None, :]
        dw = w_R[None, :] - w_R[:, None]  # a's GPU gains w_b - w_a
        ok = (load[gpu][:, None] + dw <= cap) & (load[gpu][None, :] - dw <= cap)
        ok &= gpu[:, None] != gpu[None, :]
        ok &= e_R[:, None] != e_R[None, :]
        ok &= ~held[e_R[:, None], gpu[None, :]] & ~held[e_R[None, :], gpu[:, None]]
        delta = np.where(ok, delta, np.inf)
        k = np.unravel_index(np.argmin(delta), delta.shape)
        if not delta[k] < -1e-12:
            return gpu
        a, b = k
        gpu[a], gpu[b] = gpu[b], gpu[a]
    return gpu


def balanced_kmeans(X_RF: np.ndarray, G: int, S: int, rng: np.random.Generator, iters: int = 20) -> np.ndarray:
    """(R,) cluster of each row, exactly S rows per cluster: k-means whose assignment step is a
    transportation problem (linear_sum_assignment on the slot-expanded distances)."""
    from scipy.optimize import linear_sum_assignment

    R = X_RF.shape[0]
    centers = X_RF[rng.choice(R, size=G, replace=False)]
    labels = np.zeros(R, dtype=np.int64)
    for _ in range(iters):
        d = ((X_RF[:, None, :] - centers[None, :, :]) ** 2).sum(-1)  # (R, G)
        rows, cols = linear_sum_assignment(np.repeat(d, S, axis=1))
        new = np.empty(R, dtype=np.int64)
        new[rows] = cols // S
        if np.array_equal(new, labels):
            break
        labels = new
        centers = np.stack([X_RF[labels == g].mean(0) if (labels == g).any() else centers[g] for g in range(G)])
    return labels
