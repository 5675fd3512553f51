"""`affinity`: minimise the inter-layer hop cost subject to per-layer load tolerance and slot counts.

    min  sum_l sum_{i,j} W[l, i, j] * min_{g holds i at l, h holds j at l+1} hop[g, h]
    s.t. every GPU holds exactly S replicas per layer, no GPU holds an expert twice,
         load_g(l) <= (b_l + epsilon) * mean load(l), replica counts as EPLB gives them.

The textbook linearisation's LP bound is useless (x = 1/G co-locates everything), so the whole model
is not handed to branch-and-bound. Instead, a block-coordinate descent: with layers l-1 and l+1
fixed, placing layer l is a transportation problem, solved exactly by `linear_sum_assignment` on the
slot-expanded cost matrix; a swap search restores the load tolerance; small layers are then polished
by a per-layer PuLP ILP warm-started from that solution. Seeded restarts, forward/backward sweeps,
and a time limit. `monolithic` (in exact.py) proves optimality on tiny instances.
Legend: L layers, E experts, G GPUs, S slots per GPU, R = G*S replicas (items) per layer.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import pulp

from moesaic.placement import ilp
from moesaic.placement.balance import balance_layer, check_slots, default_slots, items_of, replicate
from moesaic.placement.plan import Placement
from moesaic.placement.stats import RoutingStats
from moesaic.placement.swaps import balanced_kmeans, repair, swap_descent
from moesaic.placement.topology import Topology


# The per-layer ILP starts from the swap search's feasible placement, so HiGHS's feasibility jump
# heuristic (on by default, and 4 of a small layer's 6 ms) has nothing to find. Off, the same plans
# come 2.2x sooner on the Mixtral traces at 4 GPUs (bench/RESULTS.md, thirteenth session).
LAYER_ILP_HIGHS_OPTIONS = {"mip_heuristic_run_feasibility_jump": False}


@dataclass(kw_only=True)
class AffinityOptions:
    """Knobs of the affinity solver."""

    epsilon: float = 0.05
    """Load tolerance above the best balance b_l of each layer (1.0 in effect lifts it)."""
    time_limit: float = 60.0
    """Wall-clock budget for the whole solve, seconds."""
    solver: str = "highs"
    """MILP solver for the per-layer polish and the exact balance bound: `highs` or `cbc`."""
    restarts: int = 4
    """Seeded restarts of the descent (the first starts from the balance-only plan)."""
    max_sweeps: int = 30
    """Forward/backward sweeps per restart, at most."""
    seed: int = 0
    """Seeds the restarts; a fixed seed gives the same plan (unless the time limit cuts a run short)."""
    ilp_max_vars: int = 1024
    """Polish a layer with the PuLP ILP when E * G is at most this (0: never)."""
    ilp_time_limit: float = 5.0
    """Time limit of one per-layer ILP, seconds."""
    gap: float = 1e-6
    """Relative gap at which a per-layer ILP stops."""

    def __post_init__(self) -> None:
        if self.epsilon < 0:
            raise ValueError(f"epsilon ({self.epsilon}) must be >= 0")
        if self.time_limit <= 0:
            raise ValueError(f"time_limit ({self.time_limit}) must be > 0")
        if self.solver not in ilp.SOLVERS:
            raise ValueError(f"solver ({self.solver!r}) must be one of {', '.join(ilp.SOLVERS)}")
        if self.restarts < 1:
            raise ValueError(f"restarts ({self.restarts}) must be >= 1")


@dataclass
class Problem:
    """Everything fixed before the search: replica items, weights and load caps per layer."""

    W: np.ndarray  # (L-1, E, E)
    hop: np.ndarray  # (G, G)
    S: int
    expert_LR: list[np.ndarray]  # expert id of each item
    weight_LR: list[np.ndarray]  # load of each item: P / replicas
    cap_L: np.ndarray  # max load per GPU
    best_balance_L: np.ndarray  # b_l
    balance_gpu_LR: list[np.ndarray]  # the balance-only packing (a feasible start)
    balance_exact: bool

    @property
    def num_layers(self) -> int:
        return len(self.expert_LR)

    @property
    def num_gpus(self) -> int:
        return self.hop.shape[0]


def build_problem(stats: RoutingStats, topo: Topology, S: int, epsilon: float, *, solver: str = "highs",
                  exact_balance_max_vars: int = 256, deadline: float | None = None) -> Problem:
    """The per-layer replicas, best packings and load caps. Layers of at most `exact_balance_max_vars`
    expert-GPU pairs get an exact balance ILP, each with an equal share of the time left before
    `deadline` (a `time.perf_counter()` value; None: 10 s each). `balance_exact` is False unless every
    layer's packing was proven optimal."""
    E, G = stats.num_experts, topo.num_gpus
    check_slots(E, G, S)
    experts, weights, caps, bests, packs, exact = [], [], [], [], [], True
    for l in range(stats.num_layers):
        P = stats.P[l]
        r = replicate(P, G * S, G)
        e_R = items_of(r)
        w_R = P[e_R] / r[e_R]
        gpu_R = balance_layer(P, r, topo, S)
        if E * G <= exact_balance_max_vars and P.sum() > 0:
            limit = 10.0 if deadline is None else ilp.share_of(deadline, stats.num_layers - l, 10.0)
            gpu_R, optimal = _exact_balance(e_R, w_R, r, G, S, gpu_R, solver, limit)
            exact = exact and optimal
        else:
            exact = False
        load = np.bincount(gpu_R, weights=w_R, minlength=G)
        mean = load.mean()
        b = load.max() / mean if mean > 0 else 1.0
        experts.append(e_R)
        weights.append(w_R)
        bests.append(b)
        caps.append((b + epsilon) * mean * (1 + 1e-9) + 1e-12)
        packs.append(gpu_R)
    return Problem(stats.W, topo.hop_matrix(), S, experts, weights, np.array(caps), np.array(bests), packs, exact)


def _exact_balance(e_R, w_R, r_E, G, S, start_gpu_R, solver, time_limit: float) -> tuple[np.ndarray, bool]:
    """Minimum max-load packing by ILP (tiny layers): the exact b_l. Returns the packing, and whether
    the ILP proved it optimal within `time_limit` seconds (otherwise the better of its best packing and
    the start)."""
    E = len(r_E)
    w_E = np.zeros(E)
    w_E[e_R] = w_R
    prob = pulp.LpProblem("balance", pulp.LpMinimize)
    x = {(e, g): prob.add_variable(f"x_{e}_{g}", cat="Binary") for e in range(E) for g in range(G)}
    t = prob.add_variable("t", lowBound=0)
    prob += t
    for e in range(E):
        prob += pulp.lpSum(x[e, g] for g in range(G)) == int(r_E[e])
    for g in range(G):
        prob += pulp.lpSum(x[e, g] for e in range(E)) == S
        prob += pulp.lpSum(float(w_E[e]) * x[e, g] for e in range(E)) <= t
    rep = ilp.solve(prob, solver=solver, time_limit=time_limit, gap=1e-9)
    if rep.status not in ("optimal", "feasible"):
        return start_gpu_R, False
    holds = np.array([[x[e, g].value() > 0.5 for g in range(G)] for e in range(E)])
    out = _items_from_holds(holds, e_R)
    start = np.bincount(start_gpu_R, weights=w_R, minlength=G).max()
    if np.bincount(out, weights=w_R, minlength=G).max() <= start:
        return out, rep.status == "optimal"
    return start_gpu_R, False


def _items_from_holds(holds_EG: np.ndarray, e_R: np.ndarray) -> np.ndarray:
    out = np.empty(len(e_R), dtype=np.int64)
    for e in np.unique(e_R):
        out[e_R == e] = np.flatnonzero(holds_EG[e])
    return out


def _holds(gpu_R: np.ndarray, e_R: np.ndarray, E: int, G: int) -> np.ndarray:
    h = np.zeros((E, G), dtype=bool)
    h[e_R, gpu_R] = True
    return h


def _dist(holds_EG: np.ndarray, hop: np.ndarray) -> np.ndarray:
    """(E, G): cheapest hop from a GPU holding expert e to GPU g."""
    if (holds_EG.sum(1) == 1).all():
        return hop[holds_EG.argmax(1)]
    return np.where(holds_EG[:, :, None], hop[None, :, :], np.inf).min(axis=1)


def _transition_cost(W: np.ndarray, holds_a: np.ndarray, dist_b: np.ndarray) -> float:
    """sum_{i,j} W[i,j] * min_{g holds i} dist_b[j, g]."""
    if (holds_a.sum(1) == 1).all():  # no replicas at layer a: one GPU per expert
        return float((W * dist_b[:, holds_a.argmax(1)].T).sum())
    pair = np.where(holds_a[:, None, :], dist_b[None, :, :], np.inf).min(axis=2)
    return float((W * pair).sum())


class Search:
    """Block-coordinate descent over layers for one restart."""

    def __init__(self, prob: Problem, gpu_LR: list[np.ndarray], opts: AffinityOptions, deadline: float):
        self.p, self.opts, self.deadline = prob, opts, deadline
        self.E = prob.W.shape[1] if prob.W.size else int(max(e.max() for e in prob.expert_LR)) + 1
        self.G = prob.num_gpus
        self.gpu = [g.copy() for g in gpu_LR]
        self.ilp_reports: list[str] = []

    def holds(self, l: int) -> np.ndarray:
        return _holds(self.gpu[l], self.p.expert_LR[l], self.E, self.G)

    def total_cost(self) -> float:
        p = self.p
        return sum(_transition_cost(p.W[l], self.holds(l), _dist(self.holds(l + 1), p.hop)) for l in range(p.num_layers - 1))

    def local_cost(self, l: int, gpu_R: np.ndarray) -> float:
        """Cost of the transitions touching layer l, with layer l placed as gpu_R."""
        p, h = self.p, _holds(gpu_R, self.p.expert_LR[l], self.E, self.G)
        c = 0.0
        if l > 0:
            c += _transition_cost(p.W[l - 1], self.holds(l - 1), _dist(h, p.hop))
        if l < p.num_layers - 1:
            c += _transition_cost(p.W[l], h, _dist(self.holds(l + 1), p.hop))
        return c

    def cost_matrix(self, l: int, *, use_next: bool = True) -> np.ndarray:
        """(E, G) cost of putting (one replica of) expert e at layer l on GPU g, neighbours fixed."""
        p, C = self.p, np.zeros((self.E, self.G))
        if l > 0:
            C += p.W[l - 1].T @ _dist(self.holds(l - 1), p.hop)
        if use_next and l < p.num_layers - 1:
            C += p.W[l] @ _dist(self.holds(l + 1), p.hop)
        return C

    def solve_layer(self, l: int, *, use_next: bool = True) -> np.ndarray:
        """The best feasible placement of layer l found for its cost matrix (neighbours fixed)."""
        from scipy.optimize import linear_sum_assignment  # here, not at import: scipy.optimize costs every rank 0.3 s

        p = self.p
        e_R, w_R, cap, S = p.expert_LR[l], p.weight_LR[l], p.cap_L[l], p.S
        r_E = np.bincount(e_R, minlength=self.E)
        C = self.cost_matrix(l, use_next=use_next) / np.maximum(r_E, 1)[:, None]
        # 1. transportation problem on the slot-expanded matrix (exact without load and replica rules)
        C_RS = np.repeat(C[e_R], S, axis=1)
        rows, cols = linear_sum_assignment(C_RS)
        lsa = np.empty(len(e_R), dtype=np.int64)
        lsa[rows] = cols // S
        bound = float(C_RS[rows, cols].sum())  # no placement of layer l costs less
        # 2. restore the load tolerance and the replica rule by swaps, then descend by swaps
        best = swap_descent(repair(lsa, e_R, w_R, C, cap, self.G), e_R, w_R, C, cap, self.G)
        if best is None:  # the repair got stuck: descend from the current (feasible) placement
            best = swap_descent(self.gpu[l], e_R, w_R, C, cap, self.G)
        # 3. per-layer ILP polish, warm-started from the swap solution, unless that meets the bound
        best_cost = C[e_R, best].sum()
        proven = best_cost <= bound + 1e-9 * max(1.0, abs(bound))
        if not proven and self.E * self.G <= self.opts.ilp_max_vars and time.perf_counter() < self.deadline:
            polished = self._ilp(C, e_R, w_R, r_E, cap, best)
            if polished is not None and C[e_R, polished].sum() < best_cost - 1e-12:
                best = polished
        return best

    def place(self, l: int) -> bool:
        """Re-place layer l given its neighbours; keep it only if the true local cost went down."""
        cur, best = self.gpu[l], self.solve_layer(l)
        before, after = self.local_cost(l, cur), self.local_cost(l, best)
        if after < before - 1e-9 * max(1.0, before):
            self.gpu[l] = best
            return True
        return False

    def chain(self, rng: np.random.Generator | None = None) -> None:
        """A coherent start: optionally cluster layer 0's experts by their affinity rows (balanced
        k-means), then place layers 1..L-1 in turn against the previous layer only."""
        p = self.p
        if rng is not None and p.num_layers > 1:
            A = p.W[0] / np.maximum(p.W[0].sum(1, keepdims=True), 1e-12)
            e_R = p.expert_LR[0]
            start = balanced_kmeans(A[e_R], self.G, p.S, rng)
            fixed = swap_descent(repair(start, e_R, p.weight_LR[0], np.zeros((self.E, self.G)), p.cap_L[0], self.G),
                                  e_R, p.weight_LR[0], np.zeros((self.E, self.G)), p.cap_L[0], self.G)
            if fixed is not None:
                self.gpu[0] = fixed
        for l in range(1, self.p.num_layers):
            if time.perf_counter() > self.deadline:
                return
            self.gpu[l] = self.solve_layer(l, use_next=False)

    def _ilp(self, C, e_R, w_R, r_E, cap, start) -> np.ndarray | None:
        E, G, S = self.E, self.G, self.p.S
        w_E = np.zeros(E)
        w_E[e_R] = w_R
        prob = pulp.LpProblem("layer", pulp.LpMinimize)
        x = {(e, g): prob.add_variable(f"x_{e}_{g}", cat="Binary") for e in range(E) for g in range(G)}
        prob += pulp.lpSum(float(C[e, g]) * x[e, g] for e in range(E) for g in range(G))
        for e in range(E):
            prob += pulp.lpSum(x[e, g] for g in range(G)) == int(r_E[e])
        for g in range(G):
            prob += pulp.lpSum(x[e, g] for e in range(E)) == S
            prob += pulp.lpSum(float(w_E[e]) * x[e, g] for e in range(E)) <= float(cap)
        held = _holds(start, e_R, E, G)
        for (e, g), v in x.items():
            v.setInitialValue(int(held[e, g]))
        limit = min(self.opts.ilp_time_limit, max(0.1, self.deadline - time.perf_counter()))
        rep = ilp.solve(prob, solver=self.opts.solver, time_limit=limit, gap=self.opts.gap, warm_start=True,
                        highs_options=LAYER_ILP_HIGHS_OPTIONS)
        self.ilp_reports.append(rep.status)
        if rep.status not in ("optimal", "feasible"):
            return None
        holds = np.array([[x[e, g].value() > 0.5 for g in range(G)] for e in range(E)])
        return _items_from_holds(holds, e_R)

    def run(self) -> tuple[float, int, bool]:
        """Sweep forward and backward until a sweep improves nothing; returns (cost, sweeps, converged)."""
        L = self.p.num_layers
        order = list(range(L)) + list(range(L - 2, 0, -1))
        for sweep in range(1, self.opts.max_sweeps + 1):
            improved = False
            for l in order:
                if time.perf_counter() > self.deadline:
                    return self.total_cost(), sweep, False
                improved |= self.place(l)
            if not improved:
                return self.total_cost(), sweep, True
        return self.total_cost(), self.opts.max_sweeps, False


def affinity(stats: RoutingStats, topo: Topology, slots_per_gpu: int | None = None,
             options: AffinityOptions | None = None) -> Placement:
    """The main method. Returns a Placement whose meta holds status, objective, seconds and more."""
    opts = options or AffinityOptions()
    t0 = time.perf_counter()
    deadline = t0 + opts.time_limit
    E, G = stats.num_experts, topo.num_gpus
    S = slots_per_gpu or default_slots(E, G)
    # the exact balance bounds may take up to half of the budget; the search has the rest
    prob = build_problem(stats, topo, S, opts.epsilon, solver=opts.solver, deadline=t0 + opts.time_limit / 2)
    rng = np.random.default_rng(opts.seed)
    best = None
    runs = []
    for restart in range(opts.restarts):
        if restart and time.perf_counter() > deadline:
            break
        start = [g.copy() for g in prob.balance_gpu_LR]
        if restart:  # relabel GPUs per layer: same loads, a different basin
            start = [_relabel(g, topo, rng) for g in start]
        search = Search(prob, start, opts, deadline)
        if restart % 2 == 0:  # even restarts grow a chain from a clustered layer 0; odd ones descend as is
            search.chain(rng if restart else None)
        cost, sweeps, converged = search.run()
        runs.append({"restart": restart, "cost": cost, "sweeps": sweeps, "converged": converged,
                     "ilp": {s: search.ilp_reports.count(s) for s in set(search.ilp_reports)}})
        if best is None or cost < best[0] - 1e-12:
            best = (cost, search)
    cost, search = best
    gpu_LR = _canonical(search.gpu, prob.expert_LR, topo)
    holds = [_holds(g, e, E, G) for g, e in zip(gpu_LR, prob.expert_LR)]
    total_w = float(stats.W.sum())
    converged = all(r["converged"] for r in runs)
    meta = {
        "method": "affinity",
        "slots_per_gpu": S,
        "epsilon": opts.epsilon,
        "status": "local-optimum" if converged else "time-limit",
        "objective": cost,
        "objective_per_token_pair": cost / total_w if total_w else 0.0,
        "bound": None,
        "gap": None,
        "seconds": time.perf_counter() - t0,
        "solver": opts.solver,
        "seed": opts.seed,
        "best_balance_per_layer": prob.best_balance_L.tolist(),
        "best_balance_exact": prob.balance_exact,
        "restarts": runs,
        "traces": list(stats.sources),
    }
    return Placement.from_holds(holds, G, topo.gpus_per_node, meta=meta)


def _relabel(gpu_R: np.ndarray, topo: Topology, rng: np.random.Generator) -> np.ndarray:
    """Permute nodes, and GPUs within each node (hop costs are invariant under this)."""
    n, k = topo.num_nodes, topo.gpus_per_node
    node_perm = rng.permutation(n)
    perm = np.concatenate([node_perm[i] * k + rng.permutation(k) for i in range(n)])
    return perm[gpu_R]


def _canonical(gpu_LR: list[np.ndarray], e_LR: list[np.ndarray], topo: Topology) -> list[np.ndarray]:
    """Break the GPU-label symmetry: expert 0 of layer 0 (its first replica) on GPU 0."""
    g0 = int(gpu_LR[0][np.flatnonzero(e_LR[0] == 0)[0]])
    k = topo.gpus_per_node
    node0, local0 = divmod(g0, k)
    perm = np.arange(topo.num_gpus)
    # swap node 0 with node0, then local GPU 0 with local0 inside node 0
    nodes = np.arange(topo.num_nodes)
    nodes[[0, node0]] = nodes[[node0, 0]]
    locals_ = np.arange(k)
    locals_[[0, local0]] = locals_[[local0, 0]]
    inv_node = np.argsort(nodes)
    for g in range(topo.num_gpus):
        nd, lc = divmod(g, k)
        new_node = inv_node[nd]
        new_local = np.argsort(locals_)[lc] if new_node == 0 else lc
        perm[g] = new_node * k + new_local
    return [perm[g] for g in gpu_LR]
