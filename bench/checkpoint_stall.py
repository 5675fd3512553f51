"""How long training stops for a checkpoint: blocking saves against `checkpoint.async_mode=async`,
the same run side by side.

    python bench/checkpoint_stall.py [--nproc 2] [--steps 30] [--every 10] [--reps 2] [--json out.json]
        [--engines torch deepspeed] [--model-args model.dim=256 model.num_layers=6 ...]

For each mode (alternated `--reps` times) it trains the same model for `--steps` steps with a
checkpoint every `--every`, and reports from the run's metrics: the checkpoint's size, the time the
training thread spent in each save (the stall; for async that is the staging copy), the median
time of the steps that follow a save (an async write competes with them for the cores), the
median of the other steps, and the run's wall time. With `--engines torch deepspeed`, each mode also
runs under `parallel.engine=deepspeed` (ZeRO-1), where a save first gathers the dense AdamW moments
from ZeRO's partitions.
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

BIGGER = ["model.dim=256", "model.num_layers=6", "model.num_heads=8", "model.moe.num_experts=8",
          "model.moe.ffn_dim=1024", "data.seq_len=128", "batch_size=4"]


def _run(nproc: int, args: list[str]) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           "-m", "moesaic.trainer", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1",
                                                                        WANDB_SILENT="true"))
    if proc.returncode != 0:
        raise SystemExit(f"torchrun failed:\n{proc.stderr[-3000:]}")


def _size_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--every", type=int, default=10)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--engines", nargs="+", default=["torch"], choices=["torch", "deepspeed"])
    ap.add_argument("--model-args", nargs="*", default=BIGGER)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(a.reps):
            for engine, mode in [(e, m) for e in a.engines for m in ("disabled", "async")]:
                name = f"{engine}-{mode}-{rep}"
                _run(a.nproc, [*a.model_args, f"parallel.engine={engine}", f"steps={a.steps}", "optim.warmup_steps=2",
                               "eval_every=0", "logging=quiet", "logging.log_every=1", f"logging.out_dir={tmp}",
                               f"logging.run_name={name}", f"checkpoint.every_n_steps={a.every}",
                               f"checkpoint.async_mode={mode}", "checkpoint.keep_last=1"])
                run = Path(tmp) / name
                lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
                saves = {r["step"]: r["seconds"] for r in lines if r["kind"] == "checkpoint"}
                steps = {r["step"]: r["step_s"] for r in lines if r["kind"] == "train"}
                after = [steps[s + 1] for s in saves if s + 1 in steps]
                other = [t for s, t in steps.items() if s > 1 and s not in saves and s - 1 not in saves]
                summary = json.loads((run / "summary.json").read_text())
                rows.append({"run": name, "engine": engine, "mode": mode, "checkpoint_MiB": _size_mb(next((run / "checkpoints").iterdir())),
                             "stall_s_median": statistics.median(saves.values()),
                             "step_after_save_s": statistics.median(after) if after else float("nan"),
                             "other_steps_s": statistics.median(other), "wall_s": summary["wall_s"],
                             "final_train_loss": summary["final_train_loss"]})
    keys = ("stall_s_median", "step_after_save_s", "other_steps_s", "wall_s")
    summaries = []
    for engine in a.engines:
        med = {m: {k: statistics.median(r[k] for r in rows if r["mode"] == m and r["engine"] == engine) for k in keys}
               for m in ("disabled", "async")}
        summaries.append({"engine": engine, "nproc": a.nproc, "steps": a.steps, "every": a.every, "reps": a.reps,
                          **{f"{k}_{m}": v for m in med for k, v in med[m].items()},
                          "stall_ratio_async_over_blocking": med["async"]["stall_s_median"] / med["disabled"]["stall_s_median"],
                          "wall_ratio_async_over_blocking": med["async"]["wall_s"] / med["disabled"]["wall_s"]})
    print(f"machine: {machine()}")
    print(f"model: {' '.join(a.model_args)}")
    print(table(rows))
    print(table(summaries))
    write_json(a.json, {"machine": machine(), "model_args": a.model_args, "rows": rows, "summaries": summaries})


if __name__ == "__main__":
    main()
