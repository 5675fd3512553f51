"""How good a plan is on given routing statistics. Definitions shared by every method and test:

- a pair (i at l, j at l+1) is co-located when some GPU holds both i and j;
- cross-GPU flow share: the share of the total W mass on pairs that are not co-located;
- hop cost: W weighted by the cheapest hop between a GPU holding i and a GPU holding j;
- load on a GPU: the sum over the experts it holds of P[l, e] / replicas(e); a plan's load figure is
  the worst layer's max over mean (the mean across layers is reported too);
- max pair traffic (MoETuner's tail measure): the largest flow between two distinct GPUs in a layer
  transition, with each pair's flow split evenly over the cheapest GPU pairs that serve it;
- nodes per token (from traces, not statistics): the nodes that serve a token's top-k experts in a
  layer, where a replicated expert adds no node when one already chosen holds it (else its first).
  Dispatch that sends a token once per node (DeepSeek-V3's) crosses the inter-node network that
  many times, less the token's own node.
"""

from __future__ import annotations

import numpy as np

from moesaic.placement.plan import Placement
from moesaic.placement.stats import RoutingStats
from moesaic.placement.topology import Topology


def gpu_loads(plan: Placement, stats: RoutingStats) -> np.ndarray:
    """(L, G) load per GPU per layer."""
    out = np.zeros((plan.num_layers, plan.num_gpus))
    for l in range(plan.num_layers):
        holds = plan.holds(l)
        out[l] = (stats.P[l] / holds.sum(1)) @ holds
    return out


def load_ratio(plan: Placement, stats: RoutingStats) -> np.ndarray:
    """(L,) max over mean GPU load per layer (1.0 is perfect balance)."""
    loads = gpu_loads(plan, stats)
    mean = loads.mean(1)
    return np.divide(loads.max(1), mean, out=np.ones_like(mean), where=mean > 0)


def pair_hops(plan: Placement, layer: int, hop_GG: np.ndarray) -> np.ndarray:
    """(E, E') cheapest hop between a GPU holding i at `layer` and one holding j at `layer`+1."""
    a = plan.holds(layer).astype(np.float64)
    b = plan.holds(layer + 1).astype(np.float64)
    big = hop_GG.max() + 1.0
    # min over (g, h) of hop[g, h] where a[i, g] and b[j, h]
    cost_ih = np.where(a[:, :, None] > 0, hop_GG[None, :, :], big).min(axis=1)  # (E, G): best g for each h
    return np.where(b[None, :, :] > 0, cost_ih[:, None, :], big).min(axis=2)


def cross_gpu_share(plan: Placement, stats: RoutingStats, per_layer: bool = False):
    shares, total, crossed = [], 0.0, 0.0
    for l in range(plan.num_layers - 1):
        co = (plan.holds(l).astype(np.int64) @ plan.holds(l + 1).T.astype(np.int64)) > 0
        w = stats.W[l]
        c = float(w[~co].sum())
        shares.append(c / w.sum() if w.sum() > 0 else 0.0)
        total, crossed = total + float(w.sum()), crossed + c
    overall = crossed / total if total > 0 else 0.0
    return (overall, np.array(shares)) if per_layer else overall


def hop_cost(plan: Placement, stats: RoutingStats, topo: Topology, normalise: bool = True) -> float:
    """Sum of W * cheapest hop; normalised by the total W mass unless asked otherwise."""
    hop = topo.hop_matrix()
    cost = sum(float((stats.W[l] * pair_hops(plan, l, hop)).sum()) for l in range(plan.num_layers - 1))
    total = float(stats.W.sum())
    return cost / total if (normalise and total > 0) else cost


def max_pair_traffic(plan: Placement, stats: RoutingStats, topo: Topology) -> np.ndarray:
    """(L-1,) the largest GPU-to-GPU flow (as a share of the layer transition's W) per transition."""
    hop = topo.hop_matrix()
    out = []
    for l in range(plan.num_layers - 1):
        a, b = plan.holds(l), plan.holds(l + 1)
        if (a.sum(1) == 1).all() and (b.sum(1) == 1).all():  # no replicas: one route per pair
            T = a.T.astype(np.float64) @ stats.W[l] @ b.astype(np.float64)
            np.fill_diagonal(T, 0.0)
            total = stats.W[l].sum()
            out.append(T.max() / total if total > 0 else 0.0)
            continue
        best = pair_hops(plan, l, hop)
        T = np.zeros((plan.num_gpus, plan.num_gpus))
        for i, j in zip(*np.nonzero(stats.W[l])):
            gs, hs = np.flatnonzero(a[i]), np.flatnonzero(b[j])
            cand = [(g, h) for g in gs for h in hs if hop[g, h] == best[i, j]]
            for g, h in cand:
                T[g, h] += stats.W[l][i, j] / len(cand)
        np.fill_diagonal(T, 0.0)
        total = stats.W[l].sum()
        out.append(T.max() / total if total > 0 else 0.0)
    return np.array(out)


def nodes_per_token(plan: Placement, experts_TLK: np.ndarray) -> np.ndarray:
    """(L,) mean number of nodes that serve a token's top-k experts, per layer (see the legend)."""
    T, L, K = experts_TLK.shape
    if L != plan.num_layers:
        raise ValueError(f"plan has {plan.num_layers} layers, the trace {L}")
    N = plan.num_gpus // plan.gpus_per_node
    out = np.zeros(L)
    for l in range(L):
        holds = plan.holds(l)
        if int(experts_TLK[:, l].max(initial=-1)) >= holds.shape[0]:
            raise ValueError(f"the trace routes to expert {int(experts_TLK[:, l].max())} at layer {l}; "
                             f"the plan has {holds.shape[0]} experts")
        node_EN = holds.reshape(holds.shape[0], N, plan.gpus_per_node).any(2)
        served_TKN = node_EN[experts_TLK[:, l].astype(np.int64)]
        single_TK = served_TKN.sum(2) == 1
        chosen = (served_TKN & single_TK[:, :, None]).any(1)  # (T, N): nodes with the only copy of some expert
        for k in range(K):  # replicated experts, in routing order: a chosen node if it has one
            need = ~single_TK[:, k] & ~(served_TKN[:, k] & chosen).any(1)
            first = served_TKN[need, k].argmax(1)
            chosen[np.flatnonzero(need), first] = True
        out[l] = chosen.sum(1).mean()
    return out


def evaluate(plan: Placement, stats: RoutingStats, topo: Topology | None = None) -> dict:
    """Every metric above, as plain numbers (for tables and JSON)."""
    if plan.num_layers != stats.num_layers:
        raise ValueError(f"plan has {plan.num_layers} layers, the statistics {stats.num_layers}")
    if plan.num_experts() != stats.num_experts:
        raise ValueError(f"plan has {plan.num_experts()} experts per layer, the statistics {stats.num_experts}")
    topo = topo or Topology(num_gpus=plan.num_gpus, gpus_per_node=plan.gpus_per_node)
    share, per_layer = cross_gpu_share(plan, stats, per_layer=True)
    ratio = load_ratio(plan, stats)
    pair = max_pair_traffic(plan, stats, topo)
    return {
        "cross_gpu_share": share,
        "hop_cost": hop_cost(plan, stats, topo),
        "load_max": float(ratio.max()),
        "load_mean": float(ratio.mean()),
        "max_pair_traffic": float(pair.max()) if pair.size else 0.0,
        "cross_gpu_share_per_layer": per_layer.tolist(),
        "load_per_layer": ratio.tolist(),
    }
