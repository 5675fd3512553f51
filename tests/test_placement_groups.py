"""Tier 1: expert groups in placement: EPLB's hierarchical policy (whole groups onto nodes), nodes
per token, and synthetic traces with group-limited routing (DeepSeek-V2/V3)."""

import numpy as np
import pytest

from moesaic.placement import Placement, RoutingStats, Topology, TraceError, solve, synth
from moesaic.placement.baselines import eplb
from moesaic.placement.metrics import gpu_loads, nodes_per_token


def stats_of(P_LE) -> RoutingStats:
    P = np.asarray(P_LE, dtype=np.float64)
    return RoutingStats(P=P, W=np.zeros((P.shape[0] - 1, P.shape[1], P.shape[1])))


def gpus_of(plan: Placement, layer: int) -> list[set[int]]:
    return [set(np.flatnonzero(row).tolist()) for row in plan.holds(layer)]


def test_eplb_packs_whole_groups_onto_nodes_by_hand():
    # 8 experts in 4 groups of 2; group loads 9, 2, 8, 1; 2 nodes of 2 GPUs
    s = stats_of([[8, 1, 1, 1, 4, 4, 0.5, 0.5]])
    topo = Topology(num_gpus=4, gpus_per_node=2)
    plan = eplb(s, topo, 2, num_groups=4)
    # 1. groups largest first into the least-loaded node, 2 each: g0 -> n0, g2 -> n1, g1 -> n1, g3 -> n0
    # 3. per node, experts largest first into the least-loaded GPU with a free slot
    assert gpus_of(plan, 0) == [{0}, {1}, {2}, {3}, {2}, {3}, {1}, {0}]
    assert plan.meta["policy"] == "hierarchical" and plan.meta["expert_groups"] == 4
    # the global policy spreads groups across nodes
    flat = eplb(s, topo, 2)
    assert any(len({g // 2 for g in gpus_of(flat, 0)[e] | gpus_of(flat, 0)[e + 1]}) == 2 for e in range(0, 8, 2))
    assert "policy" not in flat.meta
    # 2. replicas stay within the node of their group: 3 slots per GPU, 6 per node for 4 experts
    rep = eplb(s, topo, 3, num_groups=4)
    holds = gpus_of(rep, 0)
    assert holds[0] == {0, 1} and holds[1] == {0, 1}  # the node's two hottest, one copy per GPU
    assert all(g < 2 for e in (0, 1, 6, 7) for g in holds[e]) and all(g >= 2 for e in (2, 3, 4, 5) for g in holds[e])
    assert (rep.holds(0).sum(0) == 3).all()


def test_hierarchical_eplb_on_group_limited_traces():
    tr = synth("olmoe", 3000, 2, expert_groups=8, limited_groups=2)
    s = RoutingStats.from_experts(tr, 64)
    topo = Topology(num_gpus=16, gpus_per_node=4)  # 4 nodes, 2 groups each
    hier, flat = eplb(s, topo, 5, num_groups=8), eplb(s, topo, 5)
    for l in range(s.num_layers):
        node_E = [{g // 4 for g in gpus} for gpus in gpus_of(hier, l)]
        for k in range(8):  # every replica of a group's experts on one node
            assert len(set().union(*node_E[8 * k: 8 * k + 8])) == 1
        node_of_group = [next(iter(node_E[8 * k])) for k in range(8)]
        assert np.bincount(node_of_group, minlength=4).tolist() == [2, 2, 2, 2]
        # and the node's load is its groups' load
        node_load = gpu_loads(hier, s)[l].reshape(4, 4).sum(1)
        group_load = s.P[l].reshape(8, 8).sum(1)
        assert node_load == pytest.approx(np.bincount(node_of_group, weights=group_load, minlength=4))
    # a token reaches at most its 2 groups' nodes; spread globally, more
    n_hier, n_flat = nodes_per_token(hier, tr), nodes_per_token(flat, tr)
    assert n_hier.max() <= 2 + 1e-9 and n_flat.mean() > n_hier.mean() + 0.3
    # solve() passes the groups to eplb only, and names a count that does not divide the experts
    assert solve("eplb", s, topo, slots_per_gpu=5, num_groups=8).meta["policy"] == "hierarchical"
    with pytest.raises(ValueError, match=r"num_groups \(6\) must be >= 1 and divide the experts \(64\)"):
        solve("contiguous", s, topo, num_groups=6)


def test_groups_the_nodes_do_not_divide_use_the_global_policy():
    s = RoutingStats.from_experts(synth("olmoe", 1000, 0)[:, :2, :], 64)
    topo = Topology(num_gpus=12, gpus_per_node=4)  # 3 nodes, 8 groups
    plan, flat = eplb(s, topo, num_groups=8), eplb(s, topo)
    assert plan.meta["policy"] == "global"
    assert all(np.array_equal(plan.holds(l), flat.holds(l)) for l in range(2))


def test_nodes_per_token_by_hand():
    holds = np.eye(4, dtype=bool)  # expert e on GPU e; nodes {0, 1} and {2, 3}
    plan = Placement.from_holds([holds], 4, 2)
    tr = np.array([[[0, 1]], [[0, 2]], [[3, 2]]], dtype=np.int16)  # 1, 2, 1 nodes
    assert nodes_per_token(plan, tr) == pytest.approx([4 / 3])
    rep = holds.copy()
    rep[0, 2] = True  # expert 0 also on node 1: token (0, 2) is served there alone
    assert nodes_per_token(Placement.from_holds([rep], 4, 2), tr) == pytest.approx([1.0])
    # a replicated expert that meets no chosen node takes its first holder's node
    assert nodes_per_token(Placement.from_holds([rep], 4, 2), np.array([[[0, 0]]], dtype=np.int16)) == pytest.approx([1.0])
    with pytest.raises(ValueError, match="routes to expert 7 at layer 0; the plan has 4 experts"):
        nodes_per_token(plan, np.array([[[7, 0]]], dtype=np.int16))


def test_synth_group_limited_routing():
    tr = synth("olmoe", 2000, 5, expert_groups=8, limited_groups=2)
    groups = tr.astype(np.int64) // 8
    used = np.array([[len(set(row)) for row in groups[:, l].tolist()] for l in range(tr.shape[1])])
    assert used.max() == 2 and used.mean() > 1.9  # top-8 among the experts of 2 groups of 8
    free = synth("olmoe", 2000, 5).astype(np.int64) // 8
    assert np.mean([len(set(row)) for row in free[:, 3].tolist()]) > 4
    assert all(len(set(row)) == 8 for row in tr[:, 3].tolist())
    assert np.array_equal(tr, synth("olmoe", 2000, 5, expert_groups=8, limited_groups=2))
    with pytest.raises(TraceError, match=r"expert_groups \(7\) must divide the experts \(64\)"):
        synth("olmoe", 10, 0, expert_groups=7, limited_groups=1)
    with pytest.raises(TraceError, match=r"limited_groups \(1\) must be in \[1, expert_groups \(16\)\] and its groups must hold top-k \(8\)"):
        synth("olmoe", 10, 0, expert_groups=16, limited_groups=1)


def chain_stats(G: int, size: int, target) -> RoutingStats:
    """2 layers of G groups of `size` experts, equal loads; every token of group k at layer 0 goes
    to group target[k] at layer 1, spread over its experts."""
    E = G * size
    W = np.zeros((1, E, E))
    for k, t in enumerate(target):
        W[0, k * size:(k + 1) * size, t * size:(t + 1) * size] = 1.0
    return RoutingStats(P=np.ones((2, E)) * size, W=W)


@pytest.mark.parametrize("method", ["affinity", "moetuner"])
def test_affinity_methods_put_the_groups_that_tokens_travel_between_on_one_node(method):
    # 4 groups of 2 experts, 2 nodes of 2 GPUs: g0 -> g3, g1 -> g2, g2 -> g0, g3 -> g1
    s = chain_stats(4, 2, [3, 2, 0, 1])
    topo = Topology(num_gpus=4, gpus_per_node=2)
    plan = solve(method, s, topo, slots_per_gpu=2, num_groups=4, time_limit=5)
    assert plan.meta["policy"] == "hierarchical" and plan.meta["method"] == method
    node = [[{g // 2 for g in gpus} for gpus in gpus_of(plan, l)] for l in range(2)]
    group_node = [[set().union(*node[l][2 * k: 2 * k + 2]) for k in range(4)] for l in range(2)]
    assert all(len(n) == 1 for row in group_node for n in row)  # whole groups on nodes
    for k, t in enumerate([3, 2, 0, 1]):  # and no token crosses nodes
        assert group_node[0][k] == group_node[1][t]
    assert plan.meta["cross_node_flow_share"] == 0
    # DeepSeek's hierarchical EPLB places the groups by load alone: equal loads, half the flow crosses
    flat = eplb(s, topo, 2, num_groups=4)
    cross = sum(s.W[0][i, j] for i in range(8) for j in range(8)
                if {g // 2 for g in gpus_of(flat, 0)[i]} != {g // 2 for g in gpus_of(flat, 1)[j]})
    assert cross == pytest.approx(0.5 * s.W.sum())
    # the objective is the plan's hop cost: flows within a node cost 1 a pair unless on one GPU
    from moesaic.placement.metrics import hop_cost
    assert plan.meta["objective"] == pytest.approx(hop_cost(plan, s, topo, normalise=False))


def test_the_hop_cost_splits_into_the_group_and_node_problems():
    from moesaic.placement.hierarchical import group_stats, node_stats
    from moesaic.placement.metrics import hop_cost

    tr = synth("olmoe", 1500, 3, expert_groups=8, limited_groups=2)[:, :4]
    s = RoutingStats.from_experts(tr, 64)
    topo = Topology(num_gpus=8, gpus_per_node=2, inter_node_cost=3.0)  # 4 nodes, 2 groups each
    plan = solve("affinity", s, topo, slots_per_gpu=9, num_groups=8, time_limit=4)
    # group statistics by hand: the sums over each group's experts
    g = group_stats(s, 8)
    assert g.P[1, 5] == pytest.approx(s.P[1, 40:48].sum()) and g.W[2, 3, 6] == pytest.approx(s.W[2, 24:32, 48:56].sum())
    node_LE = np.stack([[min(gpus_of(plan, l)[e]) // 2 for e in range(64)] for l in range(4)])
    assert all((node_LE[:, 8 * k: 8 * k + 8] == node_LE[:, [8 * k]]).all() for k in range(8))
    assert (gpu_loads(plan, s) > 0).all() and (plan.holds(0).sum(0) == 9).all()  # 8 spare slots used
    # the cost = inter_node_cost x the flow across nodes + each node's own problem on its 2 GPUs
    cross = sum(s.W[l][node_LE[l][:, None] != node_LE[l + 1][None, :]].sum() for l in range(3))
    assert plan.meta["cross_node_flow_share"] == pytest.approx(cross / s.W.sum())
    within = 0.0
    for n in range(4):
        experts_L = [np.flatnonzero(node_LE[l] == n) for l in range(4)]
        sub = Placement.from_holds([plan.holds(l)[experts_L[l]][:, 2 * n: 2 * n + 2] for l in range(4)], 2, 2)
        within += hop_cost(sub, node_stats(s, experts_L), Topology(num_gpus=2), normalise=False)
    assert hop_cost(plan, s, topo, normalise=False) == pytest.approx(3.0 * cross + within)
    # a token reaches at most its 2 groups' nodes
    assert nodes_per_token(plan, tr).max() <= 2 + 1e-9


def test_affinity_without_a_node_per_group_places_experts_one_by_one():
    s = chain_stats(4, 2, [3, 2, 0, 1])
    one_node = Topology(num_gpus=4)
    plan = solve("moetuner", s, one_node, slots_per_gpu=2, num_groups=4)
    assert plan.meta["policy"] == "global"
    flat = solve("moetuner", s, one_node, slots_per_gpu=2)
    assert all(np.array_equal(plan.holds(l), flat.holds(l)) for l in range(2))
    from moesaic.placement.hierarchical import by_groups
    with pytest.raises(ValueError, match=r"num_groups \(4\) must be > 1 and a multiple of the nodes \(1\)"):
        by_groups(None, s, one_node, 2, 4, 1.0)
    with pytest.raises(ValueError, match=r"slots_per_gpu \(1\) x num_gpus \(4\) = 4 slots cannot hold 8 experts"):
        solve("affinity", s, Topology(num_gpus=4, gpus_per_node=2), slots_per_gpu=1, num_groups=4)


@pytest.mark.parametrize("method", ["affinity", "moetuner"])
def test_nodes_of_one_gpu(method):
    """Groups onto nodes of one GPU leave each node problem one GPU to fill (the trainer's 2 ranks as
    2 nodes): the balance step once failed there, with no GPU to swap with."""
    s = chain_stats(2, 2, [1, 0])
    plan = solve(method, s, Topology(num_gpus=2, gpus_per_node=1), slots_per_gpu=2, num_groups=2, time_limit=5)
    assert plan.meta["policy"] == "hierarchical" and plan.meta["cross_node_flow_share"] == 0
    for l in range(2):  # each GPU holds one whole group
        assert sorted(tuple(np.flatnonzero(plan.holds(l)[:, g])) for g in range(2)) == [(0, 1), (2, 3)]
    assert (solve(method, s, Topology(num_gpus=1), time_limit=5).holds(0) == 1).all()
