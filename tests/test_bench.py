"""The benchmark scripts run on a tiny setting and print their tables (timings are not tested)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


def run(script, *args, timeout=300):
    proc = subprocess.run([sys.executable, str(BENCH / script), *map(str, args)], capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_gpu_moe_layer_tiny_on_cpu(tmp_path):
    out = run("gpu_moe_layer.py", "--device", "cpu", "--tiny", "--json", tmp_path / "r.json")
    assert "| tiny" in out and "dense matmul" in out
    rows = json.loads((tmp_path / "r.json").read_text())["rows"]
    assert rows[0]["fwd_bwd_tflops"] > 0


def test_placement_scale_small(tmp_path):
    out = run("placement_scale.py", "--preset", "mixtral", "--tokens", 2000, "--gpus", 4, "--gpus-per-node", 2,
              "--time-limit", 10, "--json", tmp_path / "s.json")
    assert "| affinity" in out and "| eplb" in out
    rows = json.loads((tmp_path / "s.json").read_text())["rows"]
    assert {r["method"] for r in rows} == {"contiguous", "round_robin", "eplb", "moetuner", "affinity"}


@pytest.mark.slow
def test_placement_quality_one_domain(tmp_path):
    out = run("placement_quality.py", "--domains", "coding", "--epsilons", 0.05, 1.0, "--time-limit", 20,
              "--json", tmp_path / "q.json", "--plot", tmp_path / "t.png")
    assert "## 8 GPUs, 2 slots per GPU" in out and (tmp_path / "t.png").stat().st_size > 2000
