"""Tier 1/4: the `moesaic-place` CLI end to end, and the solver's quality on the real Mixtral traces."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from moesaic.placement import Topology, evaluate, solve, stats_from_traces

TRACES = Path(__file__).resolve().parents[2] / "shared" / "data" / "traces" / "mixtral-8x7b"
DOMAINS = ["coding", "math", "stem", "writing"]


def place(*args, check=True):
    proc = subprocess.run([sys.executable, "-m", "moesaic.placement.cli", *map(str, args)], capture_output=True, text=True, timeout=300)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def test_cli_synth_solve_eval_compare_plot(tmp_path):
    t = tmp_path / "t.npz"
    place("synth", "--preset", "mixtral", "--tokens", 1500, "--seed", 1, "--out", t)
    plan = tmp_path / "plan.json"
    out = place("solve", "--trace", t, "--gpus", 4, "--method", "affinity", "--time-limit", 20, "--out", plan).stdout
    assert "status local-optimum" in out
    d = json.loads(plan.read_text())
    assert d["format"] == "moesaic.placement/v1" and d["meta"]["method"] == "affinity" and d["meta"]["seconds"] > 0
    rows = json.loads(place("eval", "--trace", t, "--plan", plan, "--json").stdout)
    assert rows[0]["cross_gpu_share"] < 0.76 and rows[0]["load_max"] >= 1.0
    rows = json.loads(place("compare", "--fit", t, "--eval", t, "--gpus", 4, "--time-limit", 10, "--json").stdout)
    assert [r["method"] for r in rows] == ["affinity", "moetuner", "eplb", "contiguous", "round_robin"]
    assert all("solve_seconds" in r for r in rows)
    figs = tmp_path / "figs"
    place("plot", "--plan", plan, "--trace", t, "--out", figs)
    names = sorted(p.name for p in figs.iterdir())
    assert names == ["affinity.png", "cross_gpu_share.png", "loads.png", "plan_map_plan.png"]
    assert all((figs / n).stat().st_size > 2000 for n in names)


def test_cli_expert_groups(tmp_path):
    """Group-limited synthetic routing, then eplb with and without the groups on 4 nodes: the plan
    that packs whole groups onto nodes serves each token from at most its 2 groups' nodes. Then
    the affinity solver with the groups."""
    t = tmp_path / "g.npz"
    place("synth", "--preset", "olmoe", "--tokens", 1500, "--seed", 1, "--expert-groups", 8, "--limited-groups", 2, "--out", t)
    common = ["--fit", t, "--eval", t, "--gpus", 16, "--gpus-per-node", 4, "--methods", "eplb", "contiguous", "--json"]
    flat = {r["method"]: r for r in json.loads(place("compare", *common).stdout)}
    grouped = {r["method"]: r for r in json.loads(place("compare", *common, "--expert-groups", 8).stdout)}
    assert grouped["eplb"]["nodes_per_token"] <= 2 < flat["eplb"]["nodes_per_token"]
    grouped["contiguous"].pop("solve_seconds"), flat["contiguous"].pop("solve_seconds")
    assert grouped["contiguous"] == flat["contiguous"]  # a fixed layout does not read the groups
    plan = tmp_path / "p.json"  # the affinity solver puts whole groups onto nodes too
    place("solve", "--trace", t, "--gpus", 16, "--gpus-per-node", 4, "--method", "affinity", "--time-limit", 4,
          "--expert-groups", 8, "--out", plan)
    meta = json.loads(plan.read_text())["meta"]
    assert meta["policy"] == "hierarchical" and meta["method"] == "affinity" and len(meta["statuses"]) == 5
    bad = place("synth", "--preset", "olmoe", "--tokens", 10, "--expert-groups", 7, "--limited-groups", 1, "--out", t, check=False)
    assert bad.returncode == 2 and "expert_groups (7) must divide the experts (64)" in bad.stderr


@pytest.mark.parametrize(
    "content,args,message",
    [
        ('{"0": [[1, 2]], "1": [[1, 2, 3]]}', ["--gpus", 2], "inconsistent k across layers"),
        ("[1, 2", ["--gpus", 2], "is not valid JSON"),
        ('{"0": [[0, 1], [2, 3]], "1": [[0, 1], [2, 3]]}', ["--gpus", 2, "--slots-per-gpu", 1], "cannot hold 4 experts"),
    ],
)
def test_cli_bad_input_is_named_without_traceback(tmp_path, content, args, message):
    t = tmp_path / "t.json"
    t.write_text(content)
    proc = place("solve", "--trace", t, *args, "--out", tmp_path / "p.json", check=False)
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr
    proc = place("synth", "--preset", "nope", "--tokens", 5, "--out", tmp_path / "x.npz", check=False)
    assert proc.returncode == 2 and "unknown preset 'nope'" in proc.stderr


@pytest.mark.slow
@pytest.mark.parametrize("held_out", ["math", "writing"])
def test_quality_on_real_traces_rotating(held_out):
    """Fit on three domains of the real Mixtral traces, measure on the fourth. Two of the four
    rotations (each costs 45 s of the suite's 2 cores under load); bench/placement_quality.py runs
    all four, and its tiny test holds out coding."""
    fit = stats_from_traces([TRACES / f"{d}.json" for d in DOMAINS if d != held_out])
    ev = stats_from_traces([TRACES / f"{held_out}.json"])
    topo = Topology(num_gpus=4)
    m = {k: evaluate(solve(k, fit, topo, time_limit=60), ev, topo) for k in ("contiguous", "eplb", "affinity")}
    assert m["contiguous"]["cross_gpu_share"] > 0.74
    assert m["affinity"]["cross_gpu_share"] <= 0.68
    assert m["affinity"]["load_max"] <= m["eplb"]["load_max"] + 0.05
    lifted = evaluate(solve("affinity", fit, topo, epsilon=1.0, time_limit=60), ev, topo)
    assert lifted["cross_gpu_share"] <= 0.66
    topo8 = Topology(num_gpus=8)
    e8 = evaluate(solve("eplb", fit, topo8, slots_per_gpu=2), ev, topo8)
    a8 = evaluate(solve("affinity", fit, topo8, slots_per_gpu=2, time_limit=60), ev, topo8)
    assert a8["cross_gpu_share"] <= e8["cross_gpu_share"] - 0.10
    assert a8["load_max"] <= e8["load_max"] + 0.05
