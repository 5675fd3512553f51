"""What stopping on a signal costs a run that is not stopped: the per-step agreement (one all-reduce of
one integer, `checkpoint.on_signal`) against the same run with it off, side by side.

    python bench/preempt_overhead.py [--nproc 4] [--model default] [--steps 40] [--reps 2] [--json out.json]

Runs the demo model under torchrun, alternating on / off `--reps` times each, and prints each run's
median step time, then the medians over the repetitions and their ratio. Also times the agreement
alone: `--calls` calls of `Preemption.agreed()` on the same ranks.
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
from common import machine, table, write_json  # noqa: E402


def _torchrun(nproc: int, args: list[str]) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), *args]
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_SILENT="true")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"torchrun failed:\n{proc.stderr[-3000:]}")


def agreement_worker(calls: int, out: str) -> None:
    import torch

    from moesaic.parallel.config import ParallelConfig
    from moesaic.parallel.process import finish_rank
    from moesaic.trainer.dist import init_distributed
    from moesaic.trainer.preempt import Preemption

    info = init_distributed(ParallelConfig())
    with Preemption(["SIGTERM", "SIGUSR1"], info) as p:
        for _ in range(20):
            p.agreed()
        times = []
        for _ in range(calls):
            t0 = time.perf_counter()
            p.agreed()
            times.append(time.perf_counter() - t0)
    if info.rank == 0:
        Path(out).write_text(json.dumps({"median_us": 1e6 * statistics.median(times), "torch": torch.__version__}))
    finish_rank(0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--nproc", type=int, default=4)
    ap.add_argument("--model", default="default", help="a model config group: default, tiny, fine_grained")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--json", default=None)
    ap.add_argument("--agreement-worker", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.agreement_worker:
        return agreement_worker(a.calls, a.agreement_worker)
    with tempfile.TemporaryDirectory() as tmp:
        rows = []
        for rep in range(a.reps):
            for on in (True, False):
                name = f"{'on' if on else 'off'}-{rep}"
                _torchrun(a.nproc, ["-m", "moesaic.trainer", f"model={a.model}", f"steps={a.steps}", "eval_every=0", "logging=quiet",
                                    f"logging.out_dir={tmp}", f"logging.run_name={name}",
                                    "checkpoint.on_signal=[SIGTERM,SIGUSR1]" if on else "checkpoint.on_signal=[]"])
                s = json.loads((Path(tmp) / name / "summary.json").read_text())
                rows.append({"run": name, "on_signal": on, "median_step_ms": 1e3 * s["median_step_s"],
                             "tokens_per_s": s["tokens_per_s"], "final_train_loss": s["final_train_loss"]})
        _torchrun(a.nproc, [__file__, "--calls", str(a.calls), "--agreement-worker", str(Path(tmp) / "agree.json")])
        agree = json.loads((Path(tmp) / "agree.json").read_text())
    med = {on: statistics.median(r["median_step_ms"] for r in rows if r["on_signal"] == on) for on in (True, False)}
    print(f"machine: {machine()}")
    print(table(rows))
    summary = {"nproc": a.nproc, "model": a.model, "steps": a.steps, "reps": a.reps, "median_step_ms_on": med[True],
               "median_step_ms_off": med[False], "ratio_on_over_off": med[True] / med[False],
               "agreed_median_us": agree["median_us"], "agreed_share_of_step": agree["median_us"] / 1e3 / med[False]}
    print(table([summary]))
    write_json(a.json, {"machine": machine(), "rows": rows, "summary": summary})


if __name__ == "__main__":
    main()
