"""moesaic against DeepSpeed-MoE, side by side: the same model, data, seed, warm-start weights and
steps on 4 gloo ranks, in two settings (DeepSpeed-MoE's ep_size = 4 and = 2).

    python bench/compare.py [--rounds 3] [--steps 20] [--warm-steps 150] [--json out.json]

Contenders (each one `torchrun` of bench/compare_worker.py, which runs the trainer's own step):
- deepspeed-moe: `model.moe_impl=deepspeed` (deepspeed.moe.layer.MoE, drop_tokens False, the
  setting's ep_size) trained by `deepspeed.initialize` with ZeRO-2 and DeepSpeed's MoE param groups;
- moesaic resident EP at the same ep_size, contiguous plan, DDP for the dense parameters;
- moesaic FSSDP sharded over all 4 ranks, with re-placement on, balance first (EPLB every 10
  steps, starting from the EPLB plan of the warm-start statistics), each rank computing E / 4 experts
  (`--fssdp-slots ds`: as many as DeepSpeed-MoE's layout, i.e. replicas in (b)). Owners follow the
  plan (`placement.align_owners`, the default): experts move once per re-plan, and an expert
  without replicas is computed in place;
- the same with fixed owners (`placement.align_owners=false`): a new plan moves nothing, and every
  step gathers the experts whose plan GPU is not their owner.

Routing skew is real: every contender starts from the demo model after `--warm-steps` steps of
training (DDP, 4 ranks), and keeps training. Rounds interleave the contenders, rotating their order;
the medians pool the measured steps of all rounds, and the per-round ratios show how stable they are.
A contender whose run does not depend on the setting (FSSDP with `--fssdp-slots min`: the same plan
and ranks in both) runs once a round, and both settings report that run.
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, machine, table, write_json  # noqa: E402

SETTINGS = {"a": 4, "b": 2}  # DeepSpeed-MoE's ep_size at world size 4
CONTENDERS = ("deepspeed-moe", "moesaic-ep", "moesaic-fssdp", "moesaic-fssdp-fixed-owners")
KINDS = ("tokens", "expert_params", "expert_grads", "expert_migration", "dense_grads", "zero_expert_grads",
         "zero_grads", "zero_expert_params", "zero_params", "other")


def torchrun(nproc: int, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="disabled")
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env)


def warm_start(a, common: list[str], cache: Path) -> tuple[Path, Path]:
    """The demo model after some training (plain DDP): its weights and its routing statistics."""
    run = cache / f"warm-{a.model}-{a.warm_steps}"
    weights, stats = run / "params-rank0.pt", run / "routing_stats.npz"
    if weights.is_file() and stats.is_file() and not a.fresh:
        return weights, stats
    proc = torchrun(a.nproc, "-m", "moesaic.trainer", *common, "parallel=ddp", f"steps={a.warm_steps}",
                    "eval_every=0", "eval_batches=2", "logging=quiet", f"logging.out_dir={cache}",
                    f"logging.run_name={run.name}", "logging.dump_rank_params=true",
                    f"optim.warmup_steps={min(20, a.warm_steps)}")
    if proc.returncode:
        sys.exit(f"warm-start training failed:\n{proc.stderr[-3000:]}")
    return weights, stats


def fssdp_plan(stats_path: Path, slots: int, nproc: int, out: Path) -> Path:
    from moesaic.placement.solve import solve
    from moesaic.placement.stats import RoutingStats
    from moesaic.placement.topology import Topology

    plan = solve("eplb", RoutingStats.load_npz(stats_path), Topology(num_gpus=nproc), slots_per_gpu=slots)
    plan.save(out)
    return out


def overrides(contender: str, ep: int, a, plans: dict) -> list[str]:
    if contender == "deepspeed-moe":
        return ["parallel=deepspeed_moe", "model.moe_impl=deepspeed", f"parallel.ep_size={ep}"]
    if contender == "moesaic-ep":
        return ["parallel=ep", f"parallel.ep_size={ep}"]
    path, slots = plans[ep]
    return ["parallel=fssdp", "placement=replan", f"placement.plan={path}", "placement.method=eplb",
            f"placement.every_n_steps={a.replan_every}", f"placement.slots_per_gpu={slots}",
            f"placement.align_owners={'false' if contender.endswith('fixed-owners') else 'true'}"]


def summarize(runs: list[dict]) -> dict:
    steps = [s for r in runs for s in r["step_s"]]
    ranks = [rk for r in runs for rk in r["ranks"]]
    n_ranks = len(runs[0]["ranks"])
    last = runs[-1]
    bytes_kind = {k: 0.0 for k in KINDS}
    for rk in ranks:
        for key, v in rk["bytes_per_step"].items():
            bytes_kind[key.split("/")[0]] += v / len(ranks)
    phases = {k: statistics.median(rk["phase_s_median"][k] for rk in ranks) for k in ranks[0]["phase_s_median"]}
    return {
        "median_step_s": statistics.median(steps), "round_medians": [r["median_step_s"] for r in runs],
        "mean_step_s": statistics.mean(steps), "step_s_by_round": [r["step_s"] for r in runs],
        "tokens_per_s": last["tokens_per_step"] / statistics.median(steps),
        "expert_state_MiB": max(rk["expert_state_bytes"] for rk in ranks) / 2**20,
        "working_set_MiB": max(rk["working_set_bytes"] for rk in ranks) / 2**20,
        "peak_rss_MiB": max(rk["peak_rss_mib"] for rk in ranks),
        "bytes_MiB_per_step": {k: v / 2**20 for k, v in bytes_kind.items() if v},
        "phases_s": phases, "final_train_loss": last["final_train_loss"], "val_loss": last["val_loss"],
        "load_max_over_mean": last["load_max_over_mean_last"], "replans": last["replans"], "ranks": n_ranks,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--nproc", type=int, default=4)
    ap.add_argument("--model", default="default", help="model config group (default: the demo model)")
    ap.add_argument("--warm-steps", type=int, default=150)
    ap.add_argument("--warmup", type=int, default=5, help="unmeasured steps at the start of each run")
    ap.add_argument("--steps", type=int, default=20, help="measured steps per run")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--replan-every", type=int, default=10)
    ap.add_argument("--fssdp-slots", default="min", choices=["min", "ds"],
                    help="experts each rank computes under FSSDP: ceil(E / ranks), or DeepSpeed-MoE's E / ep_size "
                         "(replicas of the hot experts)")
    ap.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    ap.add_argument("--extra", nargs="*", default=[], help="more overrides for every run (e.g. batch_size=4)")
    ap.add_argument("--cache", default=str(REPO / ".cache" / "compare"))
    ap.add_argument("--fresh", action="store_true", help="retrain the warm start even if cached")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    cache = Path(a.cache)
    cache.mkdir(parents=True, exist_ok=True)
    common = [f"model={a.model}", *a.extra]
    weights, stats = warm_start(a, common, cache)
    E = json.loads((weights.parent / "summary.json").read_text())["config"]["model"]["moe"]["num_experts"]
    plans = {}
    for s in a.settings:
        # the experts each rank computes: the fewest that fit, or as many as DeepSpeed-MoE's layout has
        slots = -(-E // a.nproc) if a.fssdp_slots == "min" else E // SETTINGS[s]
        plans[SETTINGS[s]] = (fssdp_plan(stats, slots, a.nproc, cache / f"plan-eplb-{a.model}-{slots}slots.json"), slots)
    runs: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        for rnd in range(a.rounds):
            k = rnd % len(CONTENDERS)
            order = CONTENDERS[k:] + CONTENDERS[:k]
            done: dict = {}  # FSSDP shards over all ranks whatever DeepSpeed's ep_size: with the same plan
            for s in a.settings:  # in both settings (--fssdp-slots min), one run a round serves both
                ep = SETTINGS[s]
                for c in order:
                    args = overrides(c, ep, a, plans)
                    if tuple(args) not in done:
                        out = Path(tmp) / f"{s}-{c}-{rnd}.json"
                        proc = torchrun(a.nproc, str(REPO / "bench" / "compare_worker.py"), "--warm", str(weights),
                                        "--out", str(out), "--warmup", str(a.warmup), "--steps", str(a.steps), "--",
                                        *common, *args)
                        if proc.returncode:
                            sys.exit(f"{c} in setting ({s}) failed:\n{proc.stderr[-4000:]}")
                        done[tuple(args)] = json.loads(out.read_text())
                    runs.setdefault((s, c), []).append(done[tuple(args)])
                    print(f"round {rnd + 1}/{a.rounds} ({s}) {c}: median step {runs[s, c][-1]['median_step_s']:.3f} s",
                          file=sys.stderr, flush=True)
    report(a, runs, stats)


def report(a, runs: dict, stats: Path) -> None:
    m = machine()
    print(f"# moesaic vs DeepSpeed-MoE, {a.nproc} gloo ranks, model={a.model}\n")
    print(f"machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']}, {m['date']}; "
          f"warm start: {a.warm_steps} DDP steps; {a.rounds} rounds x {a.steps} measured steps after {a.warmup}\n")
    result = {"machine": m, "args": vars(a), "settings": {}}
    for s in a.settings:
        summ = {c: summarize(runs[s, c]) for c in CONTENDERS}
        ds = summ["deepspeed-moe"]
        rows, brow, prow = [], [], []
        for c, x in summ.items():
            per_round = [mine / theirs for mine, theirs in zip(x["round_medians"], ds["round_medians"])]
            rows.append({"contender": c, "median step (s)": x["median_step_s"],
                         "vs DS": x["median_step_s"] / ds["median_step_s"],
                         "per-round vs DS": " ".join(f"{r:.2f}" for r in per_round),
                         "tokens/s": round(x["tokens_per_s"]), "expert state (MiB)": x["expert_state_MiB"],
                         "mem vs DS": x["expert_state_MiB"] / ds["expert_state_MiB"],
                         "of which working set": x["working_set_MiB"], "peak RSS (MiB)": round(x["peak_rss_MiB"]),
                         "final loss": x["final_train_loss"], "val loss": x["val_loss"]})
            brow.append({"contender": c, **{k: round(v, 3) for k, v in x["bytes_MiB_per_step"].items()}})
            prow.append({"contender": c, **{k: round(v, 4) for k, v in x["phases_s"].items()}})
        print(f"## ({s}) DeepSpeed-MoE ep_size = {SETTINGS[s]}\n")
        print(table(rows) + "\n")
        print("Bytes sent per rank per step (MiB, mean over ranks), by what they carry:\n")
        cols = ["contender"] + [k for k in KINDS if any(k in b for b in brow)]
        print(table(brow, cols) + "\n")
        print("Phases (median seconds per step, median over ranks):\n")
        print(table(prow) + "\n")
        result["settings"][s] = {"ep_size": SETTINGS[s], "contenders": summ}
    write_json(a.json, result)


if __name__ == "__main__":
    main()
