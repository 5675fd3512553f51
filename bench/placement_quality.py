"""Placement quality on the real Mixtral-8x7B traces: fit on three domains, evaluate on the fourth.

    python bench/placement_quality.py [--time-limit 60] [--json out.json] [--plot tradeoff.png]

Prints (1) every method at 4 GPUs / one node / no replicas per held-out domain, (2) the trade-off of
cross-GPU share against load for several epsilons, (3) 8 GPUs with 2 slots each (replicas).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import TRACES, machine, table, write_json  # noqa: E402

from moesaic.placement import METHODS, Topology, evaluate, solve, stats_from_traces  # noqa: E402

DOMAINS = ["coding", "math", "stem", "writing"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--time-limit", type=float, default=60.0)
    ap.add_argument("--epsilons", type=float, nargs="+", default=[0.0, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0])
    ap.add_argument("--domains", nargs="+", default=DOMAINS)
    ap.add_argument("--json", default=None)
    ap.add_argument("--plot", default=None)
    a = ap.parse_args()
    print("machine:", machine())
    cols = ["held_out", "method", "cross_gpu_share", "hop_cost", "load_max", "load_mean", "max_pair_traffic", "solve_s"]
    rows4, rows8, curve = [], [], []
    for held in a.domains:
        fit = stats_from_traces([TRACES / f"{d}.json" for d in DOMAINS if d != held])
        ev = stats_from_traces([TRACES / f"{held}.json"])
        for gpus, slots, rows in ((4, None, rows4), (8, 2, rows8)):
            topo = Topology(num_gpus=gpus)
            for method in METHODS:
                if slots and method in ("contiguous", "round_robin"):
                    continue
                plan = solve(method, fit, topo, slots_per_gpu=slots, time_limit=a.time_limit)
                m = evaluate(plan, ev, topo)
                rows.append({"held_out": held, "method": method, **{k: m[k] for k in cols[2:7]},
                             "solve_s": round(float(plan.meta["seconds"]), 2)})
        topo = Topology(num_gpus=4)
        for eps in a.epsilons:
            plan = solve("affinity", fit, topo, epsilon=eps, time_limit=a.time_limit)
            m = evaluate(plan, ev, topo)
            curve.append({"held_out": held, "epsilon": eps, "cross_gpu_share": m["cross_gpu_share"],
                          "load_max": m["load_max"], "load_mean": m["load_mean"]})
    print("\n## 4 GPUs, one node, no replicas (fit on 3 domains, evaluate on the held-out one)\n")
    print(table(rows4, cols))
    print("\nmean over held-out domains:\n")
    print(table(_mean(rows4, cols), cols[1:]))
    print("\n## 8 GPUs, 2 slots per GPU (replicas)\n")
    print(table(rows8, cols))
    print("\nmean over held-out domains:\n")
    print(table(_mean(rows8, cols), cols[1:]))
    print("\n## affinity trade-off at 4 GPUs: cross-GPU share against load, by epsilon (mean over domains)\n")
    tcols = ["epsilon", "cross_gpu_share", "load_max", "load_mean"]
    mean_curve = [{"epsilon": e, **{k: float(np.mean([r[k] for r in curve if r["epsilon"] == e])) for k in tcols[1:]}}
                  for e in a.epsilons]
    print(table(mean_curve, tcols))
    if a.plot:
        from moesaic.placement.plot import plot_tradeoff

        pts = [{"label": f"eps={r['epsilon']}", **r} for r in mean_curve]
        for method in ("contiguous", "eplb", "moetuner"):
            mm = [r for r in _mean(rows4, cols) if r["method"] == method][0]
            pts.append({"label": method, "load_max": mm["load_max"], "cross_gpu_share": mm["cross_gpu_share"]})
        plot_tradeoff(pts, Path(a.plot))
        print(f"\nwrote {a.plot}")
    write_json(a.json, {"machine": machine(), "gpus4": rows4, "gpus8_slots2": rows8, "tradeoff": curve})


def _mean(rows, cols):
    out = []
    for method in dict.fromkeys(r["method"] for r in rows):
        sel = [r for r in rows if r["method"] == method]
        out.append({"method": method, **{k: float(np.mean([r[k] for r in sel])) for k in cols[2:]}})
    return out


if __name__ == "__main__":
    main()
