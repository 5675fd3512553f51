"""What re-placement during training costs: the demo model on 4 CPU ranks, with and without
re-planning every N steps, for FSSDP (adoption moves the owned state of experts whose owner changes)
and resident EP (experts and AdamW moments migrate); EPLB is solved in rank 0's thread, the
affinity ILP in a spawned process. Reads each run's metrics.jsonl.

    python bench/replan_overhead.py [--steps 60] [--every 10] [--repeats 2] [--json out.json]
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
from common import machine, table, write_json  # noqa: E402

CASES = {
    "fssdp, fixed plan": ["parallel=fssdp"],
    "fssdp, re-plan eplb": ["parallel=fssdp", "placement=replan", "placement.method=eplb"],
    "fssdp, re-plan affinity": ["parallel=fssdp", "placement=affinity", "placement.time_limit=10"],
    "fssdp, re-plan affinity, when ready": ["parallel=fssdp", "placement=affinity", "placement.time_limit=10",
                                            "placement.wait_for_plan=false"],
    "resident ep, fixed plan": ["parallel=ep"],
    "resident ep, re-plan eplb": ["parallel=ep", "placement=replan", "placement.method=eplb"],
}


def run(case: str, args: list[str], a, out: Path) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(a.nproc),
           "-m", "moesaic.trainer", *args, f"steps={a.steps}", "eval_every=0", "eval_batches=2", "logging=quiet",
           "logging.log_every=1", f"logging.out_dir={out}", "logging.run_name=r", "optim.warmup_steps=5"]
    if "placement=" in " ".join(args):
        cmd.append(f"placement.every_n_steps={a.every}")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    if proc.returncode:
        sys.exit(f"{case} failed:\n{proc.stderr[-3000:]}")
    rows = [json.loads(line) for line in (out / "r" / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step_s"] for r in rows if r["kind"] == "train"][3:]
    places = [r for r in rows if r["kind"] == "placement"]
    adopt_steps = {r["step"] for r in places}
    adopt_times = [r["step_s"] for r in rows if r["kind"] == "train" and r["step"] in adopt_steps]
    return {"case": case, "median_step_s": statistics.median(steps), "mean_step_s": statistics.mean(steps),
            "replans": len(places),
            "solve_s_mean": statistics.mean([r["solve_s"] for r in places]) if places else 0.0,
            "adopt_wait_s_max": max([r["adopt_wait_s"] for r in places], default=0.0),
            "adopt_step_s_mean": statistics.mean(adopt_times) if adopt_times else 0.0,
            "deferred_steps_mean": statistics.mean([r["deferred_steps"] for r in places]) if places else 0.0,
            "migrated_MiB_rank0": sum(r.get("migrated_bytes_rank0", 0) for r in places) / 2**20,
            "final_loss": [r for r in rows if r["kind"] == "train"][-1]["loss"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--nproc", type=int, default=4)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--every", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--cases", nargs="+", default=list(CASES))
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    print("machine:", machine())
    results = []
    for rep in range(a.repeats):  # interleaved, so that drift in the machine's load hits every case alike
        for case in a.cases:
            with tempfile.TemporaryDirectory() as tmp:
                r = run(case, CASES[case], a, Path(tmp))
                r["repeat"] = rep
                results.append(r)
    rows = []
    for case in a.cases:
        sel = [r for r in results if r["case"] == case]
        rows.append({"case": case, **{k: statistics.median([r[k] for r in sel]) for k in sel[0] if k not in ("case", "repeat")}})
    for r in rows:
        ref = next((x for x in rows if x["case"].split(",")[0] == r["case"].split(",")[0] and "fixed" in x["case"]), None)
        r["step_time_vs_fixed"] = r["median_step_s"] / ref["median_step_s"] if ref else float("nan")
    print(table(rows))
    write_json(a.json, {"machine": machine(), "args": vars(a), "runs": results, "rows": rows})


if __name__ == "__main__":
    main()
