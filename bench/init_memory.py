"""Host memory and time to build a sharded model: the whole model first (moesaic until the nineteenth
session, and DeepSpeed-MoE's way) against the trainer's deferred init (built on the meta device,
experts sharded, then each rank allocates and initializes only what it holds).

    python bench/init_memory.py [--nproc 4] [--repeats 2] [--parallel fssdp ep] [--json out.json] [hydra overrides...]

Each (mode, sharding) runs in a fresh torchrun launch of `--nproc` gloo ranks, `--repeats` times,
interleaved. Per rank it measures the resident set before the build, its peak during the build
(ru_maxrss), the seconds from the first byte of the model to DDP-wrapped, and the bytes of the
parameters the rank ends up holding. Prints the medians over ranks and repeats, and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from statistics import median

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, table  # noqa: E402

# experts dominate: 4 MoE layers of 16 experts (d 1024, ffn 1408) are 277M of the 294M parameters
MODEL = ["model.dim=1024", "model.num_layers=4", "model.num_heads=8", "model.moe.num_experts=16",
         "model.moe.ffn_dim=1408", "model.moe.top_k=2", "model.max_seq_len=256", "data.seq_len=256"]


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def worker(mode: str, out: str, overrides: list[str]) -> None:
    """One rank: build the model as `mode` says, apply the config's parallelism, report."""
    import torch
    from hydra import compose, initialize_config_module

    from moesaic.parallel.process import finish_rank
    from moesaic.trainer.config import register_configs, to_train_config
    from moesaic.trainer.dist import all_gather_object, init_distributed
    from moesaic.trainer.model import Transformer
    from moesaic.trainer.parallelize import parallelize, resolve_plan, world_size_from_env

    register_configs()
    with initialize_config_module(config_module="moesaic.configs", version_base=None):
        cfg = to_train_config(compose("config", overrides=overrides + ["logging=quiet"]))
    plan = resolve_plan(cfg, world_size_from_env())
    info = init_distributed(cfg.parallel)
    torch.distributed.barrier()
    before, t0 = _rss_mib(), time.perf_counter()
    torch.manual_seed(cfg.seed)
    with torch.device("meta" if mode == "meta" else info.device):
        model = Transformer(cfg.model)
    par = parallelize(model, cfg, info, plan)
    seconds = time.perf_counter() - t0
    from moesaic.parallel.dense_fsdp import local

    held = sum(local(p).numel() * p.element_size() for p in par.model.parameters()) / 2**20  # FSDP: the shard
    row = {"rss_before_MiB": before, "peak_rss_MiB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
           "build_s": seconds, "params_held_MiB": held}
    rows = all_gather_object(row, info)
    if info.is_main:
        Path(out).write_text(json.dumps(rows))
    finish_rank(0)  # no teardown: see moesaic.parallel.process (it aborted there in 5 of 60 fssdp/meta launches)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nproc", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--json", default=None)
    ap.add_argument("--parallel", nargs="+", default=["fssdp", "ep"], choices=["fssdp", "ep"])
    ap.add_argument("--worker", nargs=2, metavar=("MODE", "OUT"), help=argparse.SUPPRESS)
    ap.add_argument("overrides", nargs="*", help="hydra overrides (default: the 294M model above)")
    args = ap.parse_args()
    if args.worker:
        worker(*args.worker, args.overrides)  # ends in finish_rank
    overrides = args.overrides or MODEL
    runs: dict[tuple[str, str], list[list[dict]]] = {}
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.repeats):
            for sharding in args.parallel:
                for mode in ("whole", "meta"):
                    out = Path(tmp) / f"{sharding}_{mode}_{rep}.json"
                    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                           str(args.nproc), __file__, "--worker", mode, str(out), f"parallel={sharding}", *overrides]
                    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp, timeout=900)
                    if proc.returncode:
                        sys.exit(f"{sharding}/{mode} failed:\n{proc.stderr[-4000:]}")
                    runs.setdefault((sharding, mode), []).append(json.loads(out.read_text()))
    rows = []
    for (sharding, mode), reps in runs.items():
        ranks = [r for rep in reps for r in rep]
        rows.append({"parallel": sharding, "build": "whole model, then shard" if mode == "whole" else "meta, shard, materialize",
                     "params held per rank (MiB)": round(median([r["params_held_MiB"] for r in ranks]), 1),
                     "peak RSS per rank (MiB)": round(median([r["peak_rss_MiB"] for r in ranks])),
                     "RSS growth in build (MiB)": round(median([r["peak_rss_MiB"] - r["rss_before_MiB"] for r in ranks])),
                     "build s (median)": round(median([max(r["build_s"] for r in rep) for rep in reps]), 2)})
    for sharding in args.parallel:
        whole, meta = (next(r for r in rows if r["parallel"] == sharding and r["build"].startswith(w))
                       for w in ("whole", "meta"))
        meta["growth ratio (meta / whole)"] = round(meta["RSS growth in build (MiB)"] / whole["RSS growth in build (MiB)"], 3)
        meta["build time ratio"] = round(meta["build s (median)"] / whole["build s (median)"], 3)
    print(f"{args.nproc} gloo ranks, {args.repeats} launches per row (interleaved), overrides: {' '.join(overrides)}")
    print(table(rows, list(dict.fromkeys(c for r in rows for c in r))))
    result = {"machine": machine(), "nproc": args.nproc, "repeats": args.repeats, "overrides": overrides,
              "rows": rows, "raw": {f"{s}/{m}": v for (s, m), v in runs.items()}}
    print(json.dumps(result["machine"]))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
