"""How close are the cluster simulator's times? Measured on this machine at 4 gloo ranks.

    python bench/simulate_calibrate.py [--nproc 4] [--tokens 2048] [--json out.json]

One torchrun run (this file with --worker) does, on every rank at once:
1. measures the machine the way the simulator describes a cluster: the all_to_all_single send
   bandwidth per rank, and the expert grouped-GEMM rate (forward+backward, fp32) while every rank
   computes; also the latency of a one-element all-to-all, which the simulator has no term for;
2. times forward+backward of a stack of MoE layers (the demo model's shape, no attention: the
   simulator covers the MoE part only) under resident EP with a contiguous and a replicated plan,
   and under FSSDP (gather, re-gather for backward, reduce-scatter) with the replicated plan; and the
   same stack with every expert local and no communication, which splits the measured time;
3. records every rank's routing and simulates the same trace and plan with a cluster built from
   the figures of step 1 (`placement.simulate.simulate`). Nothing is fitted to the step times.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, machine, table, write_json  # noqa: E402


def _median_time(fn, reps: int, warmup: int = 2) -> float:
    import torch.distributed as dist

    ts = []
    for i in range(warmup + reps):
        dist.barrier()
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        if i >= warmup:
            ts.append(dt)
    import torch

    t = torch.tensor(ts, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)  # an exchange or a step ends when its slowest rank does
    return float(t.median())


def worker(a) -> None:
    import numpy as np
    import torch
    import torch.distributed as dist
    from torch import nn
    from torch.distributed.device_mesh import init_device_mesh

    from moesaic.parallel.doctor import make_plan
    from moesaic.parallel.expert_parallel import apply_expert_parallel
    from moesaic.parallel.experts import GroupedExperts
    from moesaic.parallel.fssdp import apply_fssdp, fssdp_reduce_scatter
    from moesaic.parallel.process import finish_rank
    from moesaic.parallel.moe import MoE, MoEConfig

    dist.init_process_group("gloo")
    W, rank = dist.get_world_size(), dist.get_rank()
    D, F, E, K, L, T = a.dim, a.ffn, a.experts, a.top_k, a.layers, a.tokens
    mesh = init_device_mesh("cpu", (1, W), mesh_dim_names=("edp", "ep"))

    # 1. the machine, as the simulator sees a cluster
    rows = T * K // W  # slots a rank sends to each peer when routing is even
    buf = torch.randn(W * rows, D)
    out = torch.empty_like(buf)
    a2a_s = _median_time(lambda: dist.all_to_all_single(out, buf), 20)
    send_gbs = (W - 1) * rows * D * 4 / a2a_s / 1e9
    one, one_out = torch.zeros(W), torch.zeros(W)
    latency_s = _median_time(lambda: dist.all_to_all_single(one_out, one), 50)
    ex = GroupedExperts(E // W, D, F)
    counts = torch.full((E // W,), T * K // E, dtype=torch.int64)
    xg = torch.randn(int(counts.sum()), D, requires_grad=True)
    gemm_s = _median_time(lambda: ex(xg, counts).sum().backward(), 10)
    tflops = 2 * 3 * D * F * int(counts.sum()) * 3 / gemm_s / 1e12

    # 2. the MoE stack, timed
    class MoEStack(nn.Module):
        def __init__(self):
            super().__init__()
            self.moes = nn.ModuleList(MoE(D, MoEConfig(num_experts=E, top_k=K, ffn_dim=F)) for _ in range(L))

        def moe_layers(self):
            return list(self.moes)

        def forward(self, x):
            for m in self.moes:
                x = x + m(x)[0]
            return x

    x = torch.randn(T, D, generator=torch.Generator().manual_seed(100 + rank))
    plans = {"contiguous": make_plan("contiguous", E, W, num_layers=L),
             "replicated": make_plan("replicated", E, W, seed=2, num_layers=L)}
    cases = [("no communication (all experts local)", None, "local"), ("EP, contiguous plan", "contiguous", "ep"),
             ("EP, replicated plan", "replicated", "ep"), ("FSSDP, replicated plan", "replicated", "fssdp")]
    report = {"machine": {"a2a_send_GBps": send_gbs, "a2a_latency_s": latency_s, "expert_tflops": tflops,
                          "world": W}, "shape": {"dim": D, "ffn": F, "experts": E, "top_k": K, "layers": L,
                                                 "tokens_per_rank": T}, "cases": []}
    for name, plan_name, mode in cases:
        torch.manual_seed(0)
        model = MoEStack()
        if mode == "ep":
            apply_expert_parallel(model, mesh, plans[plan_name])
        elif mode == "fssdp":
            apply_fssdp(model, mesh, plans[plan_name])

        def step():
            model(x).sum().backward()
            if mode == "fssdp":
                fssdp_reduce_scatter(model)

        measured = _median_time(step, a.reps)
        ids = [m.last_route.expert_ids_TK.tolist() for m in model.moe_layers()]
        every = [None] * W
        dist.all_gather_object(every, ids)
        report["cases"].append({"case": name, "plan": plans[plan_name].to_dict() if plan_name else None,
                                "mode": mode, "measured_s": measured,
                                "trace": every if rank == 0 else None})
    if rank == 0:
        Path(a.worker).write_text(json.dumps(report))
    finish_rank(0)


def simulate_report(r: dict) -> list[dict]:
    import numpy as np

    from moesaic.parallel.fssdp import even_owners
    from moesaic.placement.plan import Placement
    from moesaic.placement.simulate import Cluster, Shape, simulate

    m, s = r["machine"], r["shape"]
    W = m["world"]
    cluster = Cluster(gpus_per_node=W, intra_gbs=m["a2a_send_GBps"], inter_gbs=m["a2a_send_GBps"],
                      expert_tflops=m["expert_tflops"])
    shape = Shape(dim=s["dim"], ffn=s["ffn"], bytes_per_el=4)
    rows = []
    for c in r["cases"]:
        trace = np.concatenate([np.array(ids).transpose(1, 0, 2) for ids in c["trace"]])  # (T, L, K), rank order
        if c["plan"] is None:  # every expert on every GPU: no traffic, the same compute
            plan = Placement(W, W, [[tuple(range(W))] * s["experts"]] * s["layers"], {"method": "everywhere"})
        else:
            plan = Placement.from_dict(c["plan"])
        owners = np.tile(even_owners(s["experts"], W), (s["layers"], 1))
        sim = simulate(trace, plan, cluster, shape, fssdp=c["mode"] == "fssdp", owners_LE=owners)
        if c["plan"] is None:  # the measured stack reduces no gradients: compute only
            sim = dict(sim, param_s=0.0, step_s=sim["compute_s"])
        exchanges = 4 * s["layers"] + (3 * s["layers"] if c["mode"] == "fssdp" else 0) if c["plan"] else 0
        rows.append({"case": c["case"], "measured (ms)": 1e3 * c["measured_s"], "simulated (ms)": 1e3 * sim["step_s"],
                     "simulated / measured": sim["step_s"] / c["measured_s"], "sim a2a (ms)": 1e3 * sim["a2a_s"],
                     "sim params (ms)": 1e3 * sim["param_s"], "sim compute (ms)": 1e3 * sim["compute_s"],
                     "latency not modelled (ms)": 1e3 * exchanges * m["a2a_latency_s"],
                     "(simulated + latency) / measured": (sim["step_s"] + exchanges * m["a2a_latency_s"]) / c["measured_s"]})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--nproc", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=2048, help="tokens per rank")
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--ffn", type=int, default=256)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    if a.worker:
        worker(a)  # ends in finish_rank
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "r.json"
        args = [f"--{k.replace('_', '-')}={v}" for k, v in vars(a).items() if k not in ("worker", "json", "nproc")]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(a.nproc),
               str(Path(__file__).resolve()), *args, f"--worker={out}"]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
        if proc.returncode:
            sys.exit(f"worker failed:\n{proc.stderr[-3000:]}")
        r = json.loads(out.read_text())
    rows = simulate_report(r)
    mach = r["machine"]
    print(f"# Simulator time calibration, {a.nproc} gloo ranks on {machine()['cpu']} ({machine()['cores']} cores)\n")
    print(f"measured machine: all-to-all send {mach['a2a_send_GBps']:.3f} GB/s per rank, one-element all-to-all "
          f"{1e3 * mach['a2a_latency_s']:.3f} ms, expert grouped GEMM {mach['expert_tflops'] * 1e3:.1f} GFLOP/s "
          f"(fwd+bwd, fp32, all ranks computing); shape {r['shape']}\n")
    print(table(rows))
    write_json(a.json, {"machine": machine(), "measured_machine": mach, "shape": r["shape"], "rows": rows})


if __name__ == "__main__":
    main()
