"""The trainer's runs under a folder side by side, from each run's summary.json.

    python bench/trainer_runs.py OUT_DIR [--json out.json]

One row per run: its name, device and backend, parallelism, compile (graphs, breaks, frames over
dynamo's recompile limit), mixed precision and the gradient sums' dtype, steps, the steps skipped
(fp16's overflows, on_nan=skip) and the last fp16 loss scale, the final train loss,
the validation bits per byte, tokens/s, the median step time, the largest rank's peak GPU memory and the
median logged MFU (bf16/fp16 runs on a known card); for runs with `logging.count_kept=true`, the bytes
the first forward kept for backward beside `moesaic-estimate`'s count. `bash bench/gpu_check.sh trainer`
prints it after its runs (eager against compiled: the losses should agree within bf16 noise).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, table, write_json  # noqa: E402


def rows(out_dir: Path) -> list[dict]:
    out = []
    for path in sorted(Path(out_dir).glob("*/summary.json")):
        s = json.loads(path.read_text())
        compiled = s.get("compile") or {}
        par = (s.get("config") or {}).get("parallel", {})
        out.append({"run": path.parent.name, "device": s.get("device"), "backend": s.get("backend"),
                    "experts": s.get("expert_sharding"), "compile": bool(compiled),
                    "graphs": compiled.get("graphs") if isinstance(compiled, dict) else None,
                    "graph_breaks": compiled.get("graph_breaks") if isinstance(compiled, dict) else None,
                    "over_recompile_limit": compiled.get("recompile_limit_hits") if isinstance(compiled, dict) else None,
                    "precision": par.get("mixed_precision"), "reduce": par.get("reduce_dtype"),
                    "steps": s.get("steps"), "skipped": s.get("skipped_steps"),
                    "loss_scale": (s.get("loss_scale") or {}).get("scale"),
                    "final_train_loss": s.get("final_train_loss"),
                    "val_bpb": s.get("val_bpb"), "tokens_per_s": s.get("tokens_per_s"),
                    "median_step_s": s.get("median_step_s"),
                    "peak_gpu_MiB": max(s.get("peak_gpu_mib_per_rank") or [None], key=lambda v: v or 0),
                    "mfu_median": _median_mfu(path.parent / "metrics.jsonl"), **_kept(s, path.parent)})
    return out


def _kept(s: dict, run: Path) -> dict:
    """logging.count_kept: the largest rank's bytes kept for backward after its first forward, as
    this device's kernels keep them, beside `moesaic-estimate`'s count of the run's config (the CPU's
    eager kernels): MiB, and the weights' copies among them."""
    kept = [k for k in s.get("kept_for_backward_per_rank") or [] if k]
    if not kept:
        return {}
    from moesaic.trainer.config import load_config_yaml
    from moesaic.trainer.estimate import estimate

    try:
        est = estimate(load_config_yaml(run / "config.yaml"), s["world_size"])
        counted = max(r["activations"] + r["weight_copies"] for r in est)
        copies = max(r["weight_copies"] for r in est)
    except (ValueError, TypeError) as e:  # a layout it refuses, or dims it cannot count (None)
        counted = copies = None
        print(f"{run.name}: no estimate ({e})", file=sys.stderr)
    mib = 2**20
    return {"kept_MiB": round(max(k["total"] for k in kept) / mib, 2),
            "kept_copies_MiB": round(max(k["weight_copies"] for k in kept) / mib, 2),
            "estimated_MiB": None if counted is None else round(counted / mib, 2),
            "estimated_copies_MiB": None if copies is None else round(copies / mib, 2)}


def _median_mfu(metrics: Path) -> float | None:
    """The median MFU of the logged steps after the first (the trainer's, against logging.peak_tflops
    or the card's data-sheet peak; None where the run logged none)."""
    records = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.is_file() else []
    mfu = sorted([r["mfu"] for r in records if r.get("kind") == "train" and "mfu" in r][1:])
    return round(mfu[len(mfu) // 2], 4) if mfu else None


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out_dir")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    found = rows(Path(a.out_dir))
    print(table(found) if found else f"no summary.json under {a.out_dir}")
    write_json(a.json, {"machine": machine(), "rows": found})  # the machine that read them (and, as a rule, ran them)


if __name__ == "__main__":
    main()
