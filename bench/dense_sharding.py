"""The dense parameters under DDP against FSDP (`parallel.dense_sharding`), in the real trainer.

    python bench/dense_sharding.py [--nproc 4] [--repeats 2] [--steps 20] [--experts fssdp] [--json out.json] [overrides...]
    python bench/dense_sharding.py --modes ddp fsdp fsdp-bf16 --mixed-precision bf16   # FSDP2's bf16 gathers
    python bench/dense_sharding.py --modes ddp ddp-r16 fsdp fsdp-r16   # parallel.reduce_dtype=bf16
    python bench/dense_sharding.py --modes ddp ddp-copy   # gradients as views into DDP's buckets, or copies

Each (dense_sharding) runs in its own torchrun launch of `--nproc` gloo ranks, `--repeats` times,
interleaved (ddp, fsdp, ddp, fsdp, ...). From each run's summary.json: the dense state each rank
holds (parameters and AdamW moments measured from its tensors; the gradients are as large as the
parameters, and counted so), the peak RSS per rank, the median step time, tokens/s and the final
loss. The dense collectives' bytes per rank per step are computed for ring algorithms from the
parameter counts (not counted on the wire): DDP all-reduces each gradient once, 2(W-1)/W of it;
FSDP all-gathers each block's shards for the forward and again for the backward (with
reshard_after_forward; the root's once) and reduce-scatters the gradients, (W-1)/W of it each time.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from statistics import median

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, table, write_json  # noqa: E402

# dense-heavy for an MoE: d 1024 attention and a shared expert per layer (22.6M dense parameters),
# beside 16 small routed experts per layer (100.7M)
MODEL = ["model.dim=1024", "model.num_layers=4", "model.num_heads=8", "model.moe.num_experts=16",
         "model.moe.ffn_dim=512", "model.moe.top_k=2", "model.moe.num_shared_experts=1", "model.max_seq_len=128",
         "data.seq_len=128", "batch_size=2", "eval_every=0", "eval_batches=1", "logging=quiet"]


MODES = {"ddp": ["parallel.dense_sharding=ddp"], "fsdp": ["parallel.dense_sharding=fsdp"],
         # FSDP2's mixed precision (needs parallel.mixed_precision=bf16 among the overrides)
         "fsdp-bf16": ["parallel.dense_sharding=fsdp", "parallel.dense_gather_dtype=bf16"],
         # parallel.reduce_dtype=bf16: the gradients' all-reduce (DDP) or reduce-scatter (FSDP) in bf16
         "ddp-r16": ["parallel.dense_sharding=ddp", "parallel.reduce_dtype=bf16"],
         "fsdp-r16": ["parallel.dense_sharding=fsdp", "parallel.reduce_dtype=bf16"],
         # DDP's own gradients beside its buckets (parallel.ddp_bucket_view=false), the default before
         "ddp-copy": ["parallel.dense_sharding=ddp", "parallel.ddp_bucket_view=false"]}


def dense_collective_bytes(dense_bytes: float, mode: str, world: int, reshard_after_forward: bool) -> float:
    """Bytes each rank sends per step for `dense_bytes` of fp32 dense parameters (ring algorithms);
    fsdp-bf16 gathers bf16 copies (half the bytes) and reduce-scatters fp32 gradients; the -r16 modes
    reduce bf16 gradients (half the bytes)."""
    frac = (world - 1) / world
    reduce = 0.5 if mode.endswith("-r16") else 1
    if mode.startswith("ddp"):
        return 2 * frac * dense_bytes * reduce
    gathers = (2 if reshard_after_forward else 1) * (0.5 if mode == "fsdp-bf16" else 1)
    return (gathers + reduce) * frac * dense_bytes  # the root's second gather is skipped: a small overcount


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nproc", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--experts", default="fssdp", choices=["fssdp", "ep", "ddp"], help="the parallel= group")
    ap.add_argument("--modes", nargs="+", default=["ddp", "fsdp"], choices=list(MODES),
                    help="the first is the reference of the ratios")
    ap.add_argument("--mixed-precision", default=None, choices=["none", "bf16"], help="parallel.mixed_precision, added to the overrides")
    ap.add_argument("--json", default=None)
    ap.add_argument("overrides", nargs="*", help="hydra overrides (default: the model above)")
    args = ap.parse_args()
    overrides = (args.overrides or MODEL) + ([f"parallel.mixed_precision={args.mixed_precision}"] if args.mixed_precision else [])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    runs: dict[str, list[dict]] = {m: [] for m in args.modes}
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.repeats):
            for mode in runs:  # interleaved
                name = f"{mode}-{rep}"
                cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(args.nproc),
                       "-m", "moesaic.trainer", f"parallel={args.experts}", *MODES[mode],
                       f"steps={args.steps}", "optim.warmup_steps=2", f"logging.out_dir={tmp}",
                       f"logging.run_name={name}", *overrides]
                proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp, timeout=1800)
                if proc.returncode:
                    sys.exit(f"{name} failed:\n{proc.stderr[-4000:]}")
                runs[mode].append(json.loads((Path(tmp) / name / "summary.json").read_text()))
    # DDP holds a whole copy on every rank; without a DDP run, the sum of the first mode's (padded) shards
    dense_bytes = (runs["ddp"][0]["dense_state_bytes_per_rank"][0]["params"] if "ddp" in runs
                   else sum(r["params"] for r in runs[args.modes[0]][0]["dense_state_bytes_per_rank"]))
    rows = []
    for mode, summaries in runs.items():
        held = [r for s in summaries for r in s["dense_state_bytes_per_rank"]]
        params = median(r["params"] for r in held)
        state = median(2 * r["params"] + r["optimizer"] for r in held)  # + gradients, as large as the parameters
        rows.append({"dense": mode, "params (M)": round(summaries[0]["params"]["total"] / 1e6, 1),
                     "dense params (M)": round(dense_bytes / 4 / 1e6, 2),  # fp32
                     "dense params held per rank (MiB)": round(params / 2**20, 2),
                     "dense params + grads + AdamW per rank (MiB)": round(state / 2**20, 2),
                     "peak RSS per rank (MiB)": round(median(v for s in summaries for v in s["peak_rss_mib_per_rank"])),
                     "median step s": round(median(s["median_step_s"] for s in summaries), 4),
                     "tokens/s": round(median(s["tokens_per_s"] for s in summaries)),
                     "dense collective MiB per rank per step (computed)": round(
                         dense_collective_bytes(dense_bytes, mode, args.nproc,
                                                summaries[0]["config"]["parallel"]["reshard_after_forward"]) / 2**20, 4),
                     "final loss": round(median(s["final_train_loss"] for s in summaries), 4)})
    first = rows[0]
    for r in rows[1:]:  # against the first mode
        r[f"state ratio (vs {first['dense']})"] = round(r["dense params + grads + AdamW per rank (MiB)"]
                                                        / first["dense params + grads + AdamW per rank (MiB)"], 3)
        r[f"step time ratio (vs {first['dense']})"] = round(r["median step s"] / first["median step s"], 3)
    print(f"{args.nproc} gloo ranks, parallel={args.experts}, {args.steps} steps, {args.repeats} launches per row "
          f"(interleaved), overrides: {' '.join(overrides)}")
    print(table(rows, list(dict.fromkeys(c for r in rows for c in r))))
    result = {"machine": machine(), "nproc": args.nproc, "repeats": args.repeats, "steps": args.steps,
              "experts": args.experts, "overrides": overrides, "rows": rows,
              "raw": {m: [{k: s[k] for k in ("dense_state_bytes_per_rank", "peak_rss_mib_per_rank", "median_step_s",
                                             "tokens_per_s", "final_train_loss")} for s in v] for m, v in runs.items()}}
    print(json.dumps(result["machine"]))
    write_json(args.json, result)


if __name__ == "__main__":
    main()
