"""Loss curves of several `gpu_train.py` runs side by side (their JSON's per-step `losses`).

    python bench/loss_curves.py RUN.json [RUN.json ...] [--steps 1 5 13 30 60]

For each run (each row of each file): the loss at the chosen measured steps, the mean of the last
10, and the largest and mean step-by-step difference from the first run. Two runs of the same code
give the floor that nondeterministic kernels and chaotic early training set: a variant whose gap
to the library stays within that floor is not told apart from it by these curves.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import table  # noqa: E402


def curves(paths) -> list[tuple[str, list[float]]]:
    """(label, losses) of every row with per-step losses, in the order given."""
    out = []
    for p in paths:
        for row in json.loads(Path(p).read_text()).get("rows", []):
            if row.get("losses"):
                out.append((f"{Path(p).stem}: {row['run']}", [float(x) for x in row["losses"]]))
    return out


def compare(runs: list[tuple[str, list[float]]], steps=(1, 5, 13, 30, 60)) -> list[dict]:
    if not runs:
        return []
    ref = runs[0][1]
    rows = []
    for label, losses in runs:
        n = min(len(losses), len(ref))
        diffs = [abs(a - b) for a, b in zip(losses[:n], ref[:n])]
        row = {"run": label}
        row.update({f"step {s}": losses[s - 1] for s in steps if s <= len(losses)})
        row["mean of last 10"] = sum(losses[-10:]) / len(losses[-10:])
        row["max |diff| vs first"] = max(diffs)
        row["mean |diff| vs first"] = sum(diffs) / n
        rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("runs", nargs="+", help="gpu_train.py JSON files; the first run is the reference")
    ap.add_argument("--steps", type=int, nargs="+", default=[1, 5, 13, 30, 60], help="measured steps to show (1-based)")
    a = ap.parse_args()
    rows = compare(curves([p for p in a.runs if Path(p).exists()]), a.steps)
    print(table(rows) if rows else "no per-step losses in these files")


if __name__ == "__main__":
    main()
