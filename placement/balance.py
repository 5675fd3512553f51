"""Load balance: how many replicas each expert gets, and packing replicas onto GPUs.

DeepSeek's EPLB: replicate the expert with the highest load per replica until every slot is used,
then pack replicas largest first into the least-loaded GPU that has a free slot (hierarchically:
nodes first, then the GPUs of each node). `refine_balance` then swaps replicas between the most
loaded GPU and the others while that lowers the maximum: the balance-only solve that gives b_l.
Legend: E experts, G GPUs, S slots per GPU, R replicas (items) in a layer, R = G * S.
"""

from __future__ import annotations

import numpy as np

from moesaic.placement.topology import Topology


def default_slots(num_experts: int, num_gpus: int) -> int:
    return -(-num_experts // num_gpus)


def check_slots(num_experts: int, num_gpus: int, slots_per_gpu: int) -> None:
    if slots_per_gpu < 1 or num_gpus * slots_per_gpu < num_experts:
        raise ValueError(
            f"slots_per_gpu ({slots_per_gpu}) x num_gpus ({num_gpus}) = {slots_per_gpu * num_gpus} slots "
            f"cannot hold {num_experts} experts"
        )


def replicate(load_E: np.ndarray, num_slots: int, max_replicas: int) -> np.ndarray:
    """(E,) replica counts summing to min(num_slots, E * max_replicas): EPLB's greedy."""
    E = len(load_E)
    r = np.ones(E, dtype=np.int64)
    for _ in range(min(num_slots, E * max_replicas) - E):
        per = np.where(r < max_replicas, load_E / r, -np.inf)
        r[int(np.argmax(per))] += 1
    return r


def items_of(r_E: np.ndarray) -> np.ndarray:
    """(R,) expert id of each replica item, hottest-first order not implied."""
    return np.repeat(np.arange(len(r_E)), r_E)


def pack_greedy(weight_R: np.ndarray, expert_R: np.ndarray, num_bins: int, capacity: int,
                forbid: np.ndarray | None = None, max_copies: int = 1) -> np.ndarray:
    """(R,) bin of each item: largest first into the least-loaded bin with a free slot that holds
    fewer than `max_copies` replicas of the same expert (a GPU: 1; a node: its GPUs), among those
    the bins with the fewest (so that a bin takes a second copy only when every bin has one).
    `forbid` (R, num_bins) marks bins an item may not use."""
    E = int(expert_R.max()) + 1 if len(expert_R) else 0
    load = np.zeros(num_bins)
    used = np.zeros(num_bins, dtype=np.int64)
    copies = np.zeros((num_bins, E), dtype=np.int64)
    out = np.full(len(weight_R), -1, dtype=np.int64)
    for i in np.argsort(-weight_R, kind="stable"):
        ok = (used < capacity) & (copies[:, expert_R[i]] < max_copies)
        if forbid is not None:
            ok &= ~forbid[i]
        if not ok.any():
            raise ValueError("no bin has a free slot for this replica (too many replicas of one expert?)")
        ok &= copies[:, expert_R[i]] == copies[ok, expert_R[i]].min()
        b = int(np.flatnonzero(ok)[np.argmin(load[ok])])
        out[i] = b
        load[b] += weight_R[i]
        used[b] += 1
        copies[b, expert_R[i]] += 1
    return out


def pack_eplb(load_E: np.ndarray, r_E: np.ndarray, topo: Topology, slots_per_gpu: int) -> np.ndarray:
    """(R,) GPU of each replica item (items ordered as `items_of(r_E)`), hierarchical over nodes."""
    expert_R = items_of(r_E)
    weight_R = load_E[expert_R] / r_E[expert_R]
    if topo.num_nodes == 1:
        return pack_greedy(weight_R, expert_R, topo.num_gpus, slots_per_gpu)
    per_node = topo.gpus_per_node * slots_per_gpu
    # a node may hold an expert once per GPU (more replicas than nodes: few experts, many GPUs)
    node_R = pack_greedy(weight_R, expert_R, topo.num_nodes, per_node, max_copies=topo.gpus_per_node)
    gpu_R = np.empty(len(expert_R), dtype=np.int64)
    for n in range(topo.num_nodes):
        idx = np.flatnonzero(node_R == n)
        gpu_R[idx] = n * topo.gpus_per_node + pack_greedy(weight_R[idx], expert_R[idx], topo.gpus_per_node, slots_per_gpu)
    return gpu_R


def refine_balance(gpu_R: np.ndarray, weight_R: np.ndarray, expert_R: np.ndarray, num_gpus: int,
                   max_rounds: int = 10_000) -> np.ndarray:
    """Swap items between the most loaded GPU and any other while that lowers the pair's maximum
    (and so, eventually, the overall maximum). Slot counts are unchanged."""
    gpu_R = gpu_R.copy()
    load = np.bincount(gpu_R, weights=weight_R, minlength=num_gpus)
    for _ in range(max_rounds):
        g = int(np.argmax(load))
        mine = np.flatnonzero(gpu_R == g)
        others = np.flatnonzero(gpu_R != g)
        if not others.size:  # one GPU: nothing to swap with
            break
        # swap a (on g) with b (on h): new loads g: L_g - w_a + w_b, h: L_h - w_b + w_a
        delta = weight_R[mine][:, None] - weight_R[others][None, :]  # > 0 moves load off g
        h = gpu_R[others][None, :]
        new_max = np.maximum(load[g] - delta, load[h] + delta)
        # replicas of one expert must stay on distinct GPUs
        allowed = (expert_R[mine][:, None] != expert_R[others][None, :]) & (
            ~_holds(gpu_R, expert_R, h, expert_R[mine][:, None]) & ~_holds(gpu_R, expert_R, np.full_like(h, g), expert_R[others][None, :])
        )
        new_max = np.where((delta > 1e-12) & allowed, new_max, np.inf)
        k = np.unravel_index(np.argmin(new_max), new_max.shape)
        if not new_max[k] < load[g] - 1e-9:
            break
        a, b = mine[k[0]], others[k[1]]
        hb = gpu_R[b]
        gpu_R[a], gpu_R[b] = hb, g
        load[g] += weight_R[b] - weight_R[a]
        load[hb] += weight_R[a] - weight_R[b]
    return gpu_R


def _holds(gpu_R, expert_R, gpu, expert) -> np.ndarray:
    """Broadcast test: does `gpu` already hold a replica of `expert`?"""
    E = int(expert_R.max()) + 1
    G = int(gpu_R.max()) + 1
    table = np.zeros((max(G, int(np.max(gpu)) + 1), E), dtype=bool)
    table[gpu_R, expert_R] = True
    return table[gpu, expert]


def balance_layer(load_E: np.ndarray, r_E: np.ndarray, topo: Topology, slots_per_gpu: int) -> np.ndarray:
    """The balance-only solve for one layer: EPLB packing, then refined. (R,) GPU per item."""
    expert_R = items_of(r_E)
    weight_R = load_E[expert_R] / r_E[expert_R]
    gpu_R = pack_eplb(load_E, r_E, topo, slots_per_gpu)
    return refine_balance(gpu_R, weight_R, expert_R, topo.num_gpus)


def max_over_mean(gpu_R: np.ndarray, weight_R: np.ndarray, num_gpus: int) -> float:
    load = np.bincount(gpu_R, weights=weight_R, minlength=num_gpus)
    mean = load.mean()
    return float(load.max() / mean) if mean > 0 else 1.0
