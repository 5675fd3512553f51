"""Token-deduplicated dispatch (`parallel.token_dedup`): the rows it saves, and what it costs.

    python bench/token_dedup.py [--nproc 4] [--steps 20] [--rounds 2] [--models default fine_grained grouped]
                                [--dispatches slots dedup node] [--skip-train] [--json out.json]

1. Rows per token-slot from routing alone (numpy): for each token and layer, the distinct ranks that
   hold its experts under a contiguous plan, over the slots. 1 means no saving. On the real Mixtral
   traces in ../shared (if present) and on the synthetic presets at several EP sizes.
2. The trainer side by side (torchrun, gloo ranks, FSSDP over all ranks): each model with a row per
   token-slot (`slots`), `parallel.token_dedup` (`dedup`), and `parallel.node_dispatch` with the
   ranks as 2 nodes (`node`), rounds interleaved. Per run: the median step time, the all-to-all bytes
   per step and the part that crossed the 2 nodes (the dispatcher's counters, all ranks), and the
   last train loss.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, TRACES, machine, table, write_json  # noqa: E402


def rows_per_slot(experts_TLK: np.ndarray, num_experts: int, num_ranks: int) -> float:
    """Distinct ranks per (token, layer) over top-k, under a contiguous plan."""
    rank = experts_TLK.astype(np.int64) // -(-num_experts // num_ranks)
    rank.sort(axis=-1)
    distinct = 1 + (rank[..., 1:] != rank[..., :-1]).sum(-1)
    return float(distinct.mean() / experts_TLK.shape[-1])


def routing_rows() -> list[dict]:
    from moesaic.placement.traces import PRESETS, load_trace, synth

    out = []
    if TRACES.is_dir():
        experts = np.concatenate([load_trace(p) for p in sorted(TRACES.glob("*.json"))])
        for P in (2, 4, 8):
            out.append({"routing": "Mixtral-8x7B traces (real)", "experts": 8, "top_k": 2, "ranks": P,
                        "rows per slot": rows_per_slot(experts, 8, P)})
    for name in ("olmoe", "qwen3-moe", "deepseek-v3"):
        pre = PRESETS[name]
        experts = synth(name, 4096, seed=0)[:, :4]
        for P in (8, 16, 64):
            if P <= pre.num_experts:
                out.append({"routing": f"synthetic {name}", "experts": pre.num_experts, "top_k": pre.top_k, "ranks": P,
                            "rows per slot": rows_per_slot(experts, pre.num_experts, P)})
    return out


DISPATCH = {"slots": ["parallel.token_dedup=false"], "dedup": ["parallel.token_dedup=true"],
            "node": ["parallel.token_dedup=true", "parallel.node_dispatch=true"]}
LABEL = {"slots": "per slot", "dedup": "token_dedup", "node": "node_dispatch"}


def train(model: str, dispatch: str, a, out_dir: Path) -> dict:
    name = f"{model}-{dispatch}"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(a.nproc),
           "-m", "moesaic.trainer", f"model={model}", f"steps={a.steps}", "eval_every=0", "eval_batches=1",
           "logging=quiet", "logging.log_every=1", f"logging.out_dir={out_dir}", f"logging.run_name={name}",
           *DISPATCH[dispatch], f"parallel.gpus_per_node={max(1, a.nproc // 2)}", f"optim.warmup_steps={min(5, a.steps)}",
           *a.extra]
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_SILENT="true")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    if proc.returncode:
        raise SystemExit(f"{name} failed:\n{proc.stderr[-3000:]}")
    train_rows = [json.loads(x) for x in (out_dir / name / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in train_rows if r["kind"] == "train"]
    return {"steps_s": [r["step_s"] for r in train_rows[2:]], "a2a_bytes": [r["a2a_bytes"] for r in train_rows],
            "inter_bytes": [r.get("a2a_inter_node_bytes") for r in train_rows], "losses": [r["loss"] for r in train_rows]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nproc", type=int, default=4)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--models", nargs="+", default=["default", "fine_grained", "grouped"])
    ap.add_argument("--dispatches", nargs="+", choices=list(DISPATCH), default=list(DISPATCH))
    ap.add_argument("--extra", nargs="*", default=[], help="more trainer overrides for every run")
    ap.add_argument("--skip-train", action="store_true")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    routing = routing_rows()
    print("## rows per token-slot with token_dedup (contiguous plans; 1 = no saving)")
    print(table(routing))
    trained = []
    if not a.skip_train:
        with tempfile.TemporaryDirectory() as tmp:
            runs: dict = {}
            for r in range(a.rounds):
                for model in a.models:
                    for dispatch in (a.dispatches if r % 2 == 0 else a.dispatches[::-1]):
                        got = train(model, dispatch, a, Path(tmp) / f"round{r}")
                        runs.setdefault((model, dispatch), []).append(got)
        for model in a.models:
            base = None
            for dispatch in a.dispatches:
                rs = runs[(model, dispatch)]
                step = statistics.median([s for g in rs for s in g["steps_s"]])
                mib = statistics.mean([b for g in rs for b in g["a2a_bytes"]]) / 2**20
                inter = [b for g in rs for b in g["inter_bytes"] if b is not None]
                base = base or (step, mib)
                trained.append({"model": model, "dispatch": LABEL[dispatch],
                                "median step (s)": step, "vs first": step / base[0], "a2a MiB/step": mib,
                                "bytes vs first": mib / base[1],
                                "across nodes MiB/step": statistics.mean(inter) / 2**20 if inter else "-",
                                "last loss": rs[0]["losses"][-1], "losses": rs[0]["losses"], "a2a_bytes": rs[0]["a2a_bytes"]})
        print(f"\n## the trainer, {a.nproc} gloo ranks, FSSDP, {a.steps} steps x {a.rounds} rounds (interleaved)")
        print(table(trained, [k for k in trained[0] if k not in ("losses", "a2a_bytes")]))
    write_json(a.json, {"machine": machine(), "args": vars(a), "routing": routing, "train": trained})


if __name__ == "__main__":
    main()
