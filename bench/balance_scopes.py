"""The balance loss's scope, side by side on the demo: `micro_batch` (Switch: f_e and p_e over each
rank's micro-batch), `sequence` (DeepSeek-V3's sequence-wise loss) and `global_batch` (f_e over
every rank's tokens: Qwen3's global-batch loss, Megatron's global_aux_loss).

    python bench/balance_scopes.py [--nproc 4] [--scopes micro_batch sequence global_batch]
                                   [--out-dir DIR] [--json out.json] [OVERRIDE ...]

One torchrun per scope, the same config, seed and data otherwise (the OVERRIDES go to every run).
From each run's metrics: the final train loss and validation bits/byte, the logged aux loss (each
scope's own definition, so not comparable across rows), the global load max/mean per expert
(averaged over the layers and over the second half of the logged steps; 1.0 is balance), the
expert-parallel ranks' received tokens, max/mean (what the slowest rank of a dispatch waits for),
and the median step time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, machine, table, write_json  # noqa: E402

SCOPES = ("micro_batch", "sequence", "global_batch")


def run(scope: str, nproc: int, out_dir: Path, overrides: list[str]) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           "-m", "moesaic.trainer", f"model.moe.router.aux_loss_scope={scope}", f"logging.out_dir={out_dir}",
           f"logging.run_name={scope}", "logging=quiet", *overrides]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if proc.returncode:
        raise SystemExit(f"{scope}: exit {proc.returncode}\n{proc.stderr[-3000:]}")


def summarize(run_dir: Path) -> dict:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["kind"] == "train"]
    late = train[len(train) // 2:]
    summary = json.loads((run_dir / "summary.json").read_text())
    received = [r["tokens_received_per_rank"] for r in late if sum(r.get("tokens_received_per_rank") or [0])]
    return {
        "scope": run_dir.name,
        "final_train_loss": summary.get("final_train_loss"),
        "val_bpb": summary.get("val_bpb"),
        "aux_loss": statistics.mean(r["aux_loss"] for r in late),
        "load_max_over_mean": statistics.mean(statistics.mean(r["load_max_over_mean"]) for r in late
                                              if r.get("load_max_over_mean")),
        "rank_tokens_max_over_mean": (statistics.mean(max(t) / statistics.mean(t) for t in received)
                                      if received else None),
        "median_step_s": summary.get("median_step_s"),
        "steps": summary.get("steps"),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nproc", type=int, default=4)
    ap.add_argument("--scopes", nargs="+", default=list(SCOPES), choices=SCOPES)
    ap.add_argument("--out-dir", default=None, help="where the runs go (default: a temporary folder)")
    ap.add_argument("--json", default=None)
    ap.add_argument("overrides", nargs="*", help="Hydra overrides for every run")
    a = ap.parse_args()
    out_dir = Path(a.out_dir or tempfile.mkdtemp(prefix="balance_scopes_"))
    rows = []
    for scope in a.scopes:
        if not (out_dir / scope / "summary.json").is_file():  # a finished run is read, not rerun
            run(scope, a.nproc, out_dir, a.overrides)
        rows.append(summarize(out_dir / scope))
    print(f"{a.nproc} ranks, overrides {a.overrides or 'none'}; runs in {out_dir}")
    print(table(rows))
    write_json(a.json, {"machine": machine(), "nproc": a.nproc, "overrides": a.overrides, "rows": rows})


if __name__ == "__main__":
    main()
