"""Project placement strategies to 16-256 GPUs with the cluster simulator (placement/simulate.py).

    python bench/simulate.py [--preset deepseek-v3] [--gpus 16 64 256] [--layers 8] [--tokens-per-gpu 512]

For each GPU count: plans are fit on one synthetic sample and evaluated on another sample of the
same synthetic model. The strategies are contiguous EP, EP with eplb, EP with the affinity plan,
FSSDP with Hecate-style dynamic replicas (oracle loads of the step), and FSSDP with the affinity plan
plus dynamic replicas, owners aligned to the base plan (moesaic). Also coherent (ExFlow) inference. The step time covers the MoE part
only: all-to-alls, exposed parameter traffic and expert compute. The cluster preset's bandwidths and
GEMM rate are assumptions, stated in placement/simulate.py.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, table, write_json  # noqa: E402

from moesaic.placement import RoutingStats, Topology, solve  # noqa: E402
from moesaic.placement.dynamic import add_replicas  # noqa: E402
from moesaic.placement.simulate import CLUSTERS, SHAPES, coherent_inference, simulate  # noqa: E402
from moesaic.placement.traces import PRESETS, Preset, synth  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="deepseek-v3")
    ap.add_argument("--gpus", type=int, nargs="+", default=[16, 64, 256])
    ap.add_argument("--layers", type=int, default=8, help="simulate the first N layers (results scale per layer)")
    ap.add_argument("--tokens-per-gpu", type=int, default=2048)
    ap.add_argument("--cluster", default="h100-nvlink-ib400")
    ap.add_argument("--replicas", type=float, default=0.25, help="dynamic replicas per layer, as a share of the GPUs")
    ap.add_argument("--time-limit", type=float, default=60.0)
    ap.add_argument("--traces", default=None, help="a folder of real traces (e.g. ../shared/data/traces/mixtral-8x7b): "
                    "fit on all but --held-out, evaluate on it")
    ap.add_argument("--held-out", default="coding")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    print("machine:", machine())
    p = PRESETS[a.preset]
    preset = Preset(p.num_layers if a.traces else min(a.layers, p.num_layers), p.num_experts, p.top_k, p.skew, p.affinity)
    cluster, shape = CLUSTERS[a.cluster], SHAPES[a.preset]
    print(f"{a.preset}: {preset.num_layers} layers x {preset.num_experts} experts, top-{preset.top_k}; "
          f"{a.tokens_per_gpu} tokens per GPU; cluster {a.cluster} {cluster}\n")
    rows, infer = [], []
    real = None
    if a.traces:
        from moesaic.placement.traces import load_trace

        files = sorted(Path(a.traces).glob("*.json"))
        held = [f for f in files if f.stem == a.held_out]
        real = (RoutingStats.from_experts(np.concatenate([load_trace(f) for f in files if f not in held]), preset.num_experts),
                load_trace(held[0]).astype(np.int64))
        print(f"real traces: fit on {[f.stem for f in files if f not in held]}, evaluate on {a.held_out} "
              f"({real[1].shape[0]} tokens, all layers)\n")
    for G in a.gpus:
        T = a.tokens_per_gpu * G
        if real is not None:
            fit, ev = real
        else:
            fit = RoutingStats.from_experts(synth(preset, T, 0, sample_seed=1), preset.num_experts)
            ev = synth(preset, T, 0, sample_seed=2)
        ev_loads = RoutingStats.from_experts(ev, preset.num_experts).P
        topo = Topology(num_gpus=G, gpus_per_node=min(cluster.gpus_per_node, G))
        t0 = time.perf_counter()
        plans = {m: solve(m, fit, topo, time_limit=a.time_limit) for m in ("contiguous", "eplb", "affinity")}
        solve_s = time.perf_counter() - t0
        owners = np.array([[e * G // preset.num_experts for e in range(preset.num_experts)]] * preset.num_layers)
        # moesaic keeps each expert's owner where its base plan computes it (a re-shard per re-plan)
        aligned = np.array([[gpus[0] for gpus in layer] for layer in plans["affinity"].placement])
        budget = max(1, int(a.replicas * G))
        hecate = add_replicas(plans["contiguous"], ev_loads, budget)
        moesaic = add_replicas(plans["affinity"], ev_loads, budget)
        cases = {
            "EP contiguous": simulate(ev, plans["contiguous"], cluster, shape),
            "EP eplb": simulate(ev, plans["eplb"], cluster, shape),
            "EP affinity": simulate(ev, plans["affinity"], cluster, shape),
            "FSSDP + dynamic replicas (Hecate)": simulate(ev, hecate, cluster, shape, fssdp=True, owners_LE=owners),
            "FSSDP + affinity + dynamic replicas (moesaic)": simulate(ev, moesaic, cluster, shape, fssdp=True, owners_LE=aligned),
        }
        base = cases["EP contiguous"]["step_s"]
        for name, r in cases.items():
            rows.append({"gpus": G, "strategy": name, "step_ms": 1e3 * r["step_s"], "speedup_vs_contiguous": base / r["step_s"],
                         "a2a_ms": 1e3 * r["a2a_s"], "param_ms": 1e3 * r["param_s"], "compute_ms": 1e3 * r["compute_s"],
                         "inter_node_share": r["a2a_inter_bytes"] / max(r["a2a_bytes"], 1)})
        for name in ("contiguous", "affinity"):
            c = coherent_inference(ev, plans[name], cluster, shape)
            infer.append({"gpus": G, "plan": name, "cross_gpu_share": c["cross_gpu_share"], "a2a_ms": 1e3 * c["a2a_s"]})
        print(f"{G} GPUs: plans solved in {solve_s:.1f}s")
    print("\n## training step, MoE part\n")
    print(table(rows))
    print("\n## coherent inference (ExFlow: tokens stay with their top-1 expert)\n")
    print(table(infer))
    write_json(a.json, {"machine": machine(), "args": vars(a), "train": rows, "inference": infer})


if __name__ == "__main__":
    main()
