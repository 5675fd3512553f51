"""Placement at scale: the synthetic `deepseek-v3` preset (58 layers x 256 experts, top-8) on 64 GPUs,
8 per node, solved by every method; the affinity solve must take <= 120 s on the 2-core machine.

    python bench/placement_scale.py [--tokens 100000] [--time-limit 100] [--json out.json]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, table, write_json  # noqa: E402

from moesaic.placement import RoutingStats, Topology, evaluate, solve, synth  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="deepseek-v3")
    ap.add_argument("--tokens", type=int, default=100_000)
    ap.add_argument("--gpus", type=int, default=64)
    ap.add_argument("--gpus-per-node", type=int, default=8)
    ap.add_argument("--time-limit", type=float, default=100.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--methods", nargs="+", default=["contiguous", "round_robin", "eplb", "moetuner", "affinity"])
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    print("machine:", machine())
    t0 = time.perf_counter()
    fit = RoutingStats.from_experts(synth(a.preset, a.tokens, a.seed), None)
    ev = RoutingStats.from_experts(synth(a.preset, max(a.tokens // 4, 1000), a.seed, sample_seed=1), fit.num_experts)
    print(f"synthetic {a.preset} (model seed {a.seed}): {a.tokens} fit tokens, {ev.num_tokens:.0f} held-out tokens "
          f"(same model, other sample seed), "
          f"{fit.num_layers} layers x {fit.num_experts} experts, top-{fit.top_k}; {time.perf_counter() - t0:.1f}s to generate")
    topo = Topology(num_gpus=a.gpus, gpus_per_node=a.gpus_per_node)
    rows = []
    for method in a.methods:
        plan = solve(method, fit, topo, time_limit=a.time_limit)
        for split, stats in (("fit", fit), ("eval", ev)):
            m = evaluate(plan, stats, topo)
            rows.append({"method": method, "on": split, "cross_gpu_share": m["cross_gpu_share"], "hop_cost": m["hop_cost"],
                         "load_max": m["load_max"], "load_mean": m["load_mean"], "max_pair_traffic": m["max_pair_traffic"],
                         "solve_s": round(float(plan.meta["seconds"]), 1), "status": plan.meta.get("status")})
    print()
    print(table(rows))
    write_json(a.json, {"machine": machine(), "args": vars(a), "rows": rows})


if __name__ == "__main__":
    main()
