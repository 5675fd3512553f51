"""torch.compile under expert parallelism with a solved (uneven) plan: graphs, breaks, recompiles.

    python bench/compile_dispatch.py [--nproc 2] [--layers 12] [--steps 30] [--rounds 1]
                                     [--shardings resident fssdp] [--dispatches slots node] [--replan-every 0]
                                     [--json out.json]

A solved plan gives each MoE layer its own experts on each rank, so a dispatcher that dynamo traces
sees different Python values in every layer. Each one is a recompile, and past dynamo's recompile
limit (8) the frame runs eagerly for the rest of the run. This runs the trainer under torchrun (gloo
ranks) on a model of `--layers` MoE layers, with a random plan (uneven expert counts per rank and
layer, the same for every run), eager and `compile=true`, for each expert sharding and dispatch
(`slots`: a row per token-slot; `node`: `parallel.node_dispatch`, the ranks as nodes of one).
Per run: graphs compiled, graph breaks, frames over the recompile limit, the wall time from start
to exit (compiling is most of the difference), the median step time after the first 5 steps, and
the last loss against the eager run's. `--replan-every N` re-plans from live statistics every N
steps (EPLB, with replicas: `placement.slots_per_gpu` = experts / ranks + 1), starting from the
random plan: each adopted plan is new to every layer.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, machine, table, write_json  # noqa: E402

DISPATCH = {"slots": [], "node": ["parallel.token_dedup=true", "parallel.node_dispatch=true", "parallel.gpus_per_node=1"]}


def write_plan(path: Path, layers: int, experts: int, ranks: int) -> list[list[int]]:
    """A random plan (seeded): each expert on one rank, uneven counts. Returns experts per rank per layer."""
    from moesaic.parallel.doctor import make_plan

    plan = make_plan("random", experts, ranks, seed=5, num_layers=layers)
    plan.save(path)
    return [[sum(1 for g in layer if g[0] == r) for r in range(ranks)] for layer in plan.placement]


def train(name: str, args: list[str], a, out_dir: Path) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(a.nproc),
           "-m", "moesaic.trainer", "experiment=smoke", f"steps={a.steps}", f"model.num_layers={a.layers}",
           f"model.moe.num_experts={a.experts}", f"placement.plan={out_dir / 'plan.json'}", "logging.log_every=1",
           f"logging.out_dir={out_dir}", f"logging.run_name={name}", *args]
    if a.replan_every:
        cmd += ["placement=replan", f"placement.every_n_steps={a.replan_every}",
                f"placement.slots_per_gpu={a.experts // a.nproc + 1}"]
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_SILENT="true")
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(f"{name} failed:\n{proc.stderr[-3000:]}")
    summary = json.loads((out_dir / name / "summary.json").read_text())
    rows = [json.loads(x) for x in (out_dir / name / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if r["kind"] == "train"]
    return {"wall_s": wall, "steps_s": [r["step_s"] for r in train_rows[5:]], "loss": train_rows[-1]["loss"],
            "compile": summary["compile"], "plans": len(summary["placement_history"])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--shardings", nargs="+", choices=["resident", "fssdp"], default=["resident", "fssdp"])
    ap.add_argument("--dispatches", nargs="+", choices=list(DISPATCH), default=list(DISPATCH))
    ap.add_argument("--replan-every", type=int, default=0)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        runs: dict = {}
        counts = write_plan(Path(tmp) / "plan.json", a.layers, a.experts, a.nproc)
        print(f"experts per rank in each of the {a.layers} layers: {counts}")
        for r in range(a.rounds):
            for sharding in a.shardings:
                for dispatch in a.dispatches:
                    for comp in ("false", "true") if r % 2 == 0 else ("true", "false"):
                        key = (sharding, dispatch, comp)
                        args = ["parallel=ep" if sharding == "resident" else "parallel=fssdp", f"compile={comp}",
                                *DISPATCH[dispatch]]
                        runs.setdefault(key, []).append(train("-".join(key) + f"-{r}", args, a, Path(tmp)))
    for sharding in a.shardings:
        for dispatch in a.dispatches:
            eager, comp = runs[(sharding, dispatch, "false")], runs[(sharding, dispatch, "true")]
            e_step = statistics.median(s for g in eager for s in g["steps_s"])
            for label, rs in (("eager", eager), ("compiled", comp)):
                c = rs[0]["compile"] or {}
                step = statistics.median(s for g in rs for s in g["steps_s"])
                out.append({"experts": sharding, "dispatch": dispatch, "run": label, "graphs": c.get("graphs", "-"),
                            "graph breaks": c.get("graph_breaks", "-"),
                            "over recompile limit": c.get("recompile_limit_hits", "-"),
                            "plans adopted": rs[0]["plans"], "wall s": statistics.median(g["wall_s"] for g in rs),
                            "median step s": step,
                            "step vs eager": step / e_step, "last loss": rs[0]["loss"],
                            "loss - eager": rs[0]["loss"] - eager[0]["loss"]})
    replan = f", re-planned every {a.replan_every} steps" if a.replan_every else ""
    print(f"\n## {a.nproc} gloo ranks, {a.layers} MoE layers of {a.experts} experts, a random plan{replan}, {a.steps} steps"
          f" x {a.rounds} rounds")
    print(table(out))
    write_json(a.json, {"machine": machine(), "args": vars(a), "experts_per_rank": counts, "runs": out})


if __name__ == "__main__":
    main()
