"""Expert memory and bytes per step at 4 CPU ranks: FSSDP (with and without re-materialization),
resident EP, and plain DDP (every expert everywhere), on the demo model, measured from the tensors.

    python bench/fssdp_memory.py [--nproc 4] [--steps 5] [--json out.json]

Per rank: expert parameters + gradients + AdamW states held between steps, and FSSDP's peak of
materialized (gathered) expert weights, alone and with their gradients. Per step: the bytes each
collective sends to other ranks. FSSDP's owners follow the plan (placement.align_owners, the
default) except in `fssdp-fixed-owners`.
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
from common import machine, table, write_json  # noqa: E402

MODES = {
    "ddp": dict(ep=1, sharding="resident", remat=True),
    "resident-ep4": dict(ep=4, sharding="resident", remat=True),
    "resident-ep2": dict(ep=2, sharding="resident", remat=True),
    "fssdp": dict(ep=4, sharding="fssdp", remat=True),
    "fssdp-no-remat": dict(ep=4, sharding="fssdp", remat=False),
    "fssdp-fixed-owners": dict(ep=4, sharding="fssdp", remat=True, align=False),
    # parallel.mixed_precision=bf16: the gathers in bf16 (gather_dtype auto) and in fp32
    "fssdp-bf16": dict(ep=4, sharding="fssdp", remat=True, bf16=True),
    "fssdp-bf16-fp32-gather": dict(ep=4, sharding="fssdp", remat=True, bf16=True, gather="fp32"),
}


def worker(a) -> None:
    import torch
    import torch.distributed as dist

    from moesaic.parallel import fssdp as fs
    from moesaic.parallel.config import ParallelConfig
    from moesaic.parallel.doctor import make_plan
    from moesaic.parallel.process import finish_rank
    from moesaic.placement.config import PlacementConfig
    from moesaic.trainer.config import TrainConfig
    from moesaic.trainer.data import DataConfig, load_corpus, sample_batch
    from moesaic.trainer.dist import DistInfo
    from moesaic.trainer.model import Transformer
    from moesaic.trainer.parallelize import parallelize, resolve_plan
    from moesaic.trainer.step import precision

    dist.init_process_group("gloo")
    W, rank = dist.get_world_size(), dist.get_rank()
    m = MODES[a.mode]
    cfg = TrainConfig(parallel=ParallelConfig(ep_size=m["ep"], expert_sharding=m["sharding"], reshard_after_forward=m["remat"],
                                              mixed_precision="bf16" if m.get("bf16") else "none",
                                              gather_dtype=m.get("gather", "auto")), data=DataConfig(max_bytes=3_000_000),
                      placement=PlacementConfig(align_owners=m.get("align", True)))
    corpus = load_corpus(cfg.data)
    plan = resolve_plan(cfg, W)
    if plan is not None and a.plan != "contiguous":
        plan = make_plan(a.plan, cfg.model.moe.num_experts, plan.num_gpus, seed=0, num_layers=plan.num_layers)
    torch.manual_seed(cfg.seed)
    model = Transformer(cfg.model)
    par = parallelize(model, cfg, DistInfo(rank, W, rank, torch.device("cpu"), "gloo"), plan)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    fs.WORKING_SET.update(live=0, peak=0, grads=0, peak_total=0)
    per_step, times = [], []
    for step in range(a.steps):
        dist.barrier()
        t0 = time.perf_counter()
        gather0 = sum(getattr(mm.experts, "bytes", {}).get("gather", 0) for mm in model.moe_layers())
        a2a = 0
        x, y = sample_batch(corpus.train, cfg.batch_size, cfg.data.seq_len, seed=0, stream=(0, rank, step))
        with precision(cfg, torch.device("cpu")):
            loss = par.train_model(x, y).loss
        loss.backward()
        for mm in model.moe_layers():
            a2a += mm.dispatcher.counters.get("a2a_bytes", 0)
        par.reduce_grads()
        opt.step()
        opt.zero_grad(set_to_none=False)
        times.append(time.perf_counter() - t0)
        gather = sum(getattr(mm.experts, "bytes", {}).get("gather", 0) for mm in model.moe_layers()) - gather0
        per_step.append({"token_a2a": a2a, "expert_gather": gather, "expert_grad": par.counters.get("expert_grad_bytes", 0)})
    expert_params = [p for n, p in model.named_parameters() if ".experts." in n]
    nbytes = lambda ts: sum(t.numel() * t.element_size() for t in ts)  # noqa: E731
    params_b = nbytes(expert_params)
    grads_b = nbytes([p.grad for p in expert_params if p.grad is not None])
    states_b = nbytes([v for p in expert_params for v in opt.state[p].values() if torch.is_tensor(v) and v.ndim > 0])
    dense_grad = nbytes([p for n, p in model.named_parameters() if ".experts." not in n])  # DDP all-reduce payload
    last = per_step[-1]
    row = {"mode": a.mode, "rank": rank, "expert_params_MiB": params_b / 2**20, "expert_grads_MiB": grads_b / 2**20,
           "adamw_states_MiB": states_b / 2**20, "resident_MiB": (params_b + grads_b + states_b) / 2**20,
           "working_set_peak_MiB": fs.WORKING_SET["peak"] / 2**20,
           "working_set_peak_with_grads_MiB": fs.WORKING_SET["peak_total"] / 2**20,
           "token_a2a_MiB": last["token_a2a"] / 2**20, "expert_gather_MiB": last["expert_gather"] / 2**20,
           "expert_grad_MiB": last["expert_grad"] / 2**20, "dense_allreduce_MiB": dense_grad / 2**20,
           "ddp_expert_allreduce_MiB": params_b / 2**20 if a.mode == "ddp" else 0.0,
           "step_ms_median": 1e3 * sorted(times[1:] or times)[len(times[1:] or times) // 2]}  # the first step left out
    rows = [None] * W
    dist.all_gather_object(rows, row)
    if rank == 0:
        Path(a.out).write_text(json.dumps(rows))
    finish_rank(0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--nproc", type=int, default=4)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--plan", default="contiguous", help="contiguous, random or replicated")
    ap.add_argument("--modes", nargs="+", default=list(MODES))
    ap.add_argument("--json", default=None)
    ap.add_argument("--worker", action="store_true")
    ap.add_argument("--mode", default=None)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    if a.worker:
        worker(a)  # ends in finish_rank
    print("machine:", machine())
    rows = []
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for mode in a.modes:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "r.json"
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(a.nproc),
                   __file__, "--worker", "--mode", mode, "--steps", str(a.steps), "--plan", a.plan, "--out", str(out)]
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if proc.returncode:
                sys.exit(f"{mode} failed:\n{proc.stderr[-3000:]}")
            rows += json.loads(out.read_text())
    F = 2 ** 20
    # a dense FSDP-style alternative gathers every non-owned expert to every rank (twice with
    # re-materialization) and reduce-scatters as much: computed from the measured FSSDP shard size.
    fs_rows = [r for r in rows if r["mode"] == "fssdp"]
    if fs_rows:
        owned = fs_rows[0]["expert_params_MiB"]
        total = sum(r["expert_params_MiB"] for r in fs_rows)
        for r in rows:
            if r["mode"] == "fssdp":
                r["dense_fsdp_gather_MiB (computed)"] = 2 * (total - owned)
    print(f"\n## per rank, plan {a.plan}, {a.nproc} ranks, demo model\n")
    print(table(rows, ["mode", "rank", "expert_params_MiB", "expert_grads_MiB", "adamw_states_MiB", "resident_MiB",
                       "working_set_peak_MiB", "working_set_peak_with_grads_MiB", "step_ms_median"]))
    print("\n## bytes each rank sends per step (last measured step)\n")
    print(table(rows, ["mode", "rank", "token_a2a_MiB", "expert_gather_MiB", "expert_grad_MiB", "ddp_expert_allreduce_MiB",
                       "dense_allreduce_MiB"] + (["dense_fsdp_gather_MiB (computed)"] if fs_rows else [])))
    write_json(a.json, {"machine": machine(), "plan": a.plan, "rows": rows, "MiB": F})


if __name__ == "__main__":
    main()
