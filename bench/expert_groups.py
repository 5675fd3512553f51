"""Expert groups and placement: EPLB's and the affinity solver's two policies on DeepSeek-V3-like
routing, with and without group-limited routing.

    python bench/expert_groups.py [--tokens 16000] [--layers 8] [--gpus 16 32 64] [--time-limit 20] [--json out.json]

Traces: the synthetic `deepseek-v3` preset (256 experts, top-8), its first `--layers` layers, a fit
set and a held-out set of `--tokens` tokens each (two sample seeds of one model), routed freely or
group-limited (8 groups of 32 experts, each token's top-8 within its 4 best groups: DeepSeek-V3's
node-limited routing). Topologies: nodes of 8 GPUs. Plans are fitted on the fit set and measured on
the held-out set:

- contiguous (Megatron's layout: group k's experts on consecutive GPUs),
- eplb (the global policy: replicas anywhere, packed nodes first),
- eplb + groups (DeepSeek's hierarchical policy: whole groups onto nodes, replicas within them),
- affinity (moesaic's solver, experts one by one, `--time-limit` seconds a plan),
- affinity + groups (`placement.hierarchical.by_groups`: the groups onto nodes by their flows and
  loads, then each node's experts onto its GPUs, replicas within the node),

each with S = E/G slots per GPU (no redundant experts) and E/G + 1 (G redundant experts a layer).
Columns: the worst layer's max/mean GPU load, and the mean number of nodes that serve a token's
experts (`placement.metrics.nodes_per_token`): the times dispatch that sends a token once per node
crosses the inter-node network, less its own node (n (1 - 1/N) for a source node apart from routing).
Then the cluster simulator (`placement.simulate`, cluster h200-nvlink-ib400, DeepSeek-V3's dim) on
the held-out tokens, each GPU the home of tokens/G of them: one training step's token all-to-alls
(dispatch and combine, forward and backward), their inter-node bytes and time, with a row per
token-slot (`slot`: moesaic's default), per token and GPU (`gpu`: `parallel.token_dedup`), and per
token and node (`node`: DeepEP's two stages, moesaic's `parallel.node_dispatch`); and ExFlow's
coherent inference (a token stays on the GPU of its top-1 expert: one all-to-all a layer), where
the flows between layers are what the affinity plans cut. Pure numpy: no torch, no GPU.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ensure_importable, machine, table, write_json  # noqa: E402

ensure_importable()
from moesaic.placement import RoutingStats, Topology, evaluate, solve, synth  # noqa: E402
from moesaic.placement.metrics import nodes_per_token  # noqa: E402
from moesaic.placement.simulate import CLUSTERS, DISPATCHES, SHAPES, coherent_inference, simulate  # noqa: E402

GROUPS, LIMITED, GPUS_PER_NODE, CLUSTER = 8, 4, 8, "h200-nvlink-ib400"


def traces(routing: str, tokens: int, layers: int, seed: int):
    groups = {"expert_groups": GROUPS, "limited_groups": LIMITED} if routing == "group-limited" else {}
    fit = synth("deepseek-v3", tokens, seed, sample_seed=1, **groups)[:, :layers]
    held = synth("deepseek-v3", tokens, seed, sample_seed=2, **groups)[:, :layers]
    return fit, held


PLANS = (("contiguous", "contiguous", 1), ("eplb", "eplb", 1), ("eplb + groups", "eplb", GROUPS),
         ("affinity", "affinity", 1), ("affinity + groups", "affinity", GROUPS))


def rows_for(routing: str, fit, held, gpus: list[int], extra_slots: list[int], time_limit: float) -> list[dict]:
    s_fit, s_held = RoutingStats.from_experts(fit, 256), RoutingStats.from_experts(held, 256)
    rows = []
    for G in gpus:
        topo = Topology(num_gpus=G, gpus_per_node=min(GPUS_PER_NODE, G))
        for extra in extra_slots:
            S = 256 // G + extra
            for name, method, groups in PLANS:
                if extra and method == "contiguous":
                    continue  # contiguous has no replicas: the same plan
                t0 = time.perf_counter()
                plan = solve(method, s_fit, topo, slots_per_gpu=S, num_groups=groups, time_limit=time_limit)
                seconds = time.perf_counter() - t0
                m = evaluate(plan, s_held, topo)
                sim = {d: simulate(held, plan, CLUSTERS[CLUSTER], SHAPES["deepseek-v3"], dispatch=d) for d in DISPATCHES}
                coherent = coherent_inference(held, plan, CLUSTERS[CLUSTER], SHAPES["deepseek-v3"])
                rows.append({"routing": routing, "GPUs": G, "nodes": topo.num_nodes, "slots": S, "plan": name,
                             "policy": plan.meta.get("policy", "-"), "load_max": m["load_max"],
                             "load_mean": m["load_mean"], "nodes_per_token": float(nodes_per_token(plan, held).mean()),
                             "hop_cost": m["hop_cost"], "solve_s": seconds,
                             **{f"inter_GB_{d}": r["a2a_inter_bytes"] / 1e9 for d, r in sim.items()},
                             **{f"a2a_ms_{d}": 1e3 * r["a2a_s"] for d, r in sim.items()},
                             "coherent_ms": 1e3 * coherent["a2a_s"]})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=16000)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--gpus", type=int, nargs="+", default=[16, 32, 64])
    ap.add_argument("--extra-slots", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--time-limit", type=float, default=20.0, help="seconds for each affinity plan")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    for G in a.gpus:
        if G < 2 or 256 % G or (G > GPUS_PER_NODE and G % GPUS_PER_NODE):
            sys.exit(f"--gpus {G}: must divide the 256 experts and be a multiple of {GPUS_PER_NODE} above it")
    rows = []
    for routing in ("group-limited", "free"):
        fit, held = traces(routing, a.tokens, a.layers, a.seed)
        rows += rows_for(routing, fit, held, a.gpus, a.extra_slots, a.time_limit)
    info = machine()
    print(f"# Expert groups in placement ({info['cpu']}, {info['date']})\n")
    print(f"synthetic deepseek-v3: {a.layers} layers x 256 experts, top-8; {a.tokens} fit + {a.tokens} held-out "
          f"tokens; group-limited = {GROUPS} groups, {LIMITED} per token; nodes of {GPUS_PER_NODE} GPUs\n")
    print(table(rows, ["routing", "GPUs", "nodes", "slots", "plan", "policy", "load_max", "load_mean",
                       "nodes_per_token", "hop_cost", *(f"inter_GB_{d}" for d in DISPATCHES), *(f"a2a_ms_{d}" for d in DISPATCHES),
                       "coherent_ms", "solve_s"]))
    write_json(a.json, {"machine": info, "args": vars(a), "rows": rows})


if __name__ == "__main__":
    main()
