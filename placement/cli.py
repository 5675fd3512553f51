"""`moesaic-place`: solve, evaluate, compare and plot expert placements from routing traces.

    moesaic-place solve --trace a.json b.json --gpus 4 --method affinity --out plan.json
    moesaic-place eval --trace c.json --plan plan.json [--json]
    moesaic-place compare --fit a.json b.json --eval c.json --gpus 4 [--json]
    moesaic-place synth --preset deepseek-v3 --tokens 100000 --seed 0 --out trace.npz [--expert-groups 8 --limited-groups 4]
    moesaic-place plot --plan plan.json --trace c.json --out figs/
    moesaic-place plot --run outputs/<run> --out figs/
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path

from moesaic.placement import ilp
from moesaic.placement.metrics import evaluate, nodes_per_token
from moesaic.placement.plan import Placement
from moesaic.placement.solve import METHODS, solve
from moesaic.placement.topology import Topology
from moesaic.placement.traces import PRESETS, load_trace, save_npz, stats_from_traces, synth


def _topology_args(p: argparse.ArgumentParser, gpus_required: bool = True) -> None:
    p.add_argument("--gpus", type=int, required=gpus_required, help="GPUs (expert-parallel ranks)")
    p.add_argument("--gpus-per-node", type=int, default=0, help="GPUs per node (default: all in one node)")
    p.add_argument("--inter-node-cost", type=float, default=2.0, help="hop cost across nodes (1 within a node)")


def _solver_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--slots-per-gpu", type=int, default=None, help="experts per GPU per layer (default E/G)")
    p.add_argument("--epsilon", type=float, default=0.05, help="load tolerance above the best balance")
    p.add_argument("--time-limit", type=float, default=60.0, help="seconds for the affinity solver")
    p.add_argument("--solver", choices=ilp.SOLVERS, default="highs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--expert-groups", type=int, default=1,
                   help="the router's expert groups: whole groups onto nodes where the nodes divide them (eplb: DeepSeek's "
                        "hierarchical policy; affinity and moetuner: groups, then each node's experts, by affinity)")


def _topo(a) -> Topology:
    return Topology(num_gpus=a.gpus, gpus_per_node=a.gpus_per_node, inter_node_cost=a.inter_node_cost)


def _row(name: str, m: dict, seconds: float | None = None, nodes: float | None = None) -> dict:
    keep = ("cross_gpu_share", "hop_cost", "load_max", "load_mean", "max_pair_traffic")
    out = {"method": name, **{k: m[k] for k in keep}}
    if nodes is not None:
        out["nodes_per_token"] = nodes
    if seconds is not None:
        out["solve_seconds"] = seconds
    return out


def _print_table(rows: list[dict]) -> None:
    cols = list(rows[0])
    widths = [max(len(c), *(len(_fmt(r[c])) for r in rows)) for c in cols]
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths)))
    for r in rows:
        print("  ".join(_fmt(r[c]).ljust(w) for c, w in zip(cols, widths)))


def _fmt(v) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def _traces(paths: list[str]):
    """The traces, read once at the first call (only multi-node plans need them)."""
    return functools.cache(lambda: [load_trace(p) for p in paths])


def _nodes(plan: Placement, traces) -> float | None:
    """Mean nodes per token over the traces' tokens and layers; None within one node."""
    if plan.num_gpus == plan.gpus_per_node:
        return None
    ts = traces()
    return float(sum(nodes_per_token(plan, t).mean() * len(t) for t in ts) / sum(len(t) for t in ts))


def cmd_solve(a) -> int:
    stats = stats_from_traces(a.trace)
    plan = solve(a.method, stats, _topo(a), slots_per_gpu=a.slots_per_gpu, epsilon=a.epsilon,
                 time_limit=a.time_limit, solver=a.solver, seed=a.seed, num_groups=a.expert_groups)
    plan.save(a.out)
    m = evaluate(plan, stats, _topo(a))
    print(f"wrote {a.out}: method {a.method}, status {plan.meta.get('status')}, {plan.meta.get('seconds', 0):.2f}s")
    _print_table([_row(a.method, m, nodes=_nodes(plan, _traces(a.trace)))])
    return 0


def cmd_eval(a) -> int:
    stats, traces = stats_from_traces(a.trace), _traces(a.trace)
    rows = []
    for path in a.plan:
        plan = Placement.load(path)
        topo = Topology(num_gpus=plan.num_gpus, gpus_per_node=plan.gpus_per_node, inter_node_cost=a.inter_node_cost)
        rows.append(_row(f"{Path(path).name}", evaluate(plan, stats, topo), nodes=_nodes(plan, traces)))
    if a.json:
        print(json.dumps(rows, indent=1))
    else:
        _print_table(rows)
    return 0


def cmd_compare(a) -> int:
    fit, ev, topo, traces = stats_from_traces(a.fit), stats_from_traces(a.eval), _topo(a), _traces(a.eval)
    rows = []
    for method in a.methods:
        plan = solve(method, fit, topo, slots_per_gpu=a.slots_per_gpu, epsilon=a.epsilon,
                     time_limit=a.time_limit, solver=a.solver, seed=a.seed, num_groups=a.expert_groups)
        rows.append(_row(method, evaluate(plan, ev, topo), round(float(plan.meta.get("seconds", 0.0)), 3),
                         nodes=_nodes(plan, traces)))
    if a.json:
        print(json.dumps(rows, indent=1))
    else:
        _print_table(rows)
    return 0


def cmd_synth(a) -> int:
    ex = synth(a.preset, a.tokens, a.seed, skew=a.skew, affinity=a.affinity, expert_groups=a.expert_groups,
               limited_groups=a.limited_groups)
    save_npz(a.out, ex, meta={"preset": a.preset, "tokens": a.tokens, "seed": a.seed, "skew": a.skew, "affinity": a.affinity,
                              "expert_groups": a.expert_groups, "limited_groups": a.limited_groups})
    print(f"wrote {a.out}: {ex.shape[0]} tokens x {ex.shape[1]} layers x top-{ex.shape[2]}")
    return 0


def cmd_plot(a) -> int:
    from moesaic.placement.plot import plot_all
    from moesaic.placement.stats import RoutingStats

    plans = {Path(p).stem: Placement.load(p) for p in (a.plan or [])}
    if a.run:  # a training run directory: its recorded statistics and the plans it adopted
        run = Path(a.run)
        if not (run / "routing_stats.npz").is_file():
            raise ValueError(f"--run {str(run)!r} has no routing_stats.npz (not a finished moesaic run directory?)")
        stats = RoutingStats.load_npz(run / "routing_stats.npz")
        for p in sorted((run / "plans").glob("plan-*.json")):
            plans[p.stem] = Placement.load(p)
        summary = run / "summary.json"
        if summary.is_file() and json.loads(summary.read_text()).get("plan"):
            plans.setdefault("final", Placement.from_dict(json.loads(summary.read_text())["plan"]))
    else:
        if not a.trace:
            raise ValueError("plot needs --trace (with --plan) or --run")
        stats = stats_from_traces(a.trace)
    if not plans:
        raise ValueError("no plan to plot: give --plan, or a --run that used expert parallelism")
    for path in plot_all(plans, stats, Path(a.out), layer=a.layer):
        print(path)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moesaic-place", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("solve", help="fit a plan to traces")
    p.add_argument("--trace", nargs="+", required=True)
    p.add_argument("--method", choices=METHODS, default="affinity")
    p.add_argument("--out", required=True)
    _topology_args(p)
    _solver_args(p)
    p.set_defaults(fn=cmd_solve)
    p = sub.add_parser("eval", help="metrics of plans on traces")
    p.add_argument("--trace", nargs="+", required=True)
    p.add_argument("--plan", nargs="+", required=True, action="extend")
    p.add_argument("--inter-node-cost", type=float, default=2.0)
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_eval)
    p = sub.add_parser("compare", help="fit every method on some traces, evaluate on others")
    p.add_argument("--fit", nargs="+", required=True)
    p.add_argument("--eval", nargs="+", required=True)
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--json", action="store_true")
    _topology_args(p)
    _solver_args(p)
    p.set_defaults(fn=cmd_compare)
    p = sub.add_parser("synth", help="write a synthetic trace (.npz)")
    p.add_argument("--preset", required=True, help=", ".join(PRESETS))
    p.add_argument("--tokens", type=int, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skew", type=float, default=None, help="Zipf exponent of expert popularity")
    p.add_argument("--affinity", type=float, default=None, help="strength of the planted inter-layer affinity")
    p.add_argument("--expert-groups", type=int, default=0, help="group-limited routing: experts in this many groups")
    p.add_argument("--limited-groups", type=int, default=0, help="group-limited routing: groups each token may use")
    p.add_argument("--out", required=True)
    p.set_defaults(fn=cmd_synth)
    p = sub.add_parser("plot", help="PNG figures of plans on traces, or of a training run directory")
    p.add_argument("--plan", nargs="+", action="extend")
    p.add_argument("--trace", nargs="+")
    p.add_argument("--run", help="a moesaic run directory: its routing_stats.npz and plans/")
    p.add_argument("--layer", type=int, default=0, help="layer pair (l, l+1) of the affinity heatmap")
    p.add_argument("--out", required=True)
    p.set_defaults(fn=cmd_plot)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except (ValueError, RuntimeError, OSError) as e:  # TraceError and PlanError are ValueErrors
        print(f"moesaic-place: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
