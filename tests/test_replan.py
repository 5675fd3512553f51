"""Re-placement during training: a new plan changes no math (EP and FSSDP, owners aligned or fixed,
dynamic replicas, resharding), pending plans are adopted once solved, and the solver process answers,
names its errors, survives its rank's signals and never outlives its run."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from moesaic.placement.plan import Placement
from conftest import child_env, read_metrics, torchrun, train_losses

SMOKE = ["experiment=smoke", "logging.log_every=1", "eval_every=0"]


@pytest.mark.slow
@pytest.mark.dist
@pytest.mark.parametrize("parallel,align,method,wait", [("fssdp", "true", "eplb-groups", "true"), ("fssdp", "false", "eplb", "false"),
                                                        ("ep", "true", "affinity-groups", "true")])
def test_replacement_changes_no_math(tmp_path, parallel, align, method, wait):
    base = [*SMOKE, "steps=16", f"logging.out_dir={tmp_path}", f"parallel={parallel}", "parallel.ep_size=2"]
    # group-limited routing (2 groups of 2 experts, 1 per token) on 2 nodes of 1 GPU, dispatched per node
    groups = method.endswith("-groups")
    if groups:
        method = method.removesuffix("-groups")
        base += ["model.moe.router.num_expert_groups=2", "model.moe.router.num_limited_groups=1",
                 "parallel.gpus_per_node=1", "parallel.token_dedup=true", "parallel.node_dispatch=true"]
    torchrun(2, [*base, "logging.run_name=off"])
    torchrun(2, [*base, "logging.run_name=on", "placement=replan", "placement.every_n_steps=4",
                 f"placement.method={method}", "placement.time_limit=10", "placement.adopt_after_steps=1",
                 f"placement.align_owners={align}", f"placement.wait_for_plan={wait}"])
    off, on = train_losses(tmp_path / "off"), train_losses(tmp_path / "on")
    assert max(abs(off[s] - on[s]) for s in off) < 1e-5
    plans = sorted((tmp_path / "on/plans").glob("plan-*.json"))
    records = [r for r in read_metrics(tmp_path / "on") if r["kind"] == "placement"]
    assert len(plans) == len(records) and all(r["solve_s"] >= 0 for r in records)
    if wait == "true":  # solved at 4, 8, 12; adopted a step later, whatever the solver's time
        assert [r["step"] for r in records] == [5, 9, 13] and not any(r["deferred_steps"] for r in records)
    else:  # adopted once ready: from a step after the solve on, and the next solve only after that
        assert records and all(r["step"] == r["solved_at"] + 1 + r["deferred_steps"] for r in records)
        assert all(r["solved_at"] % 4 == 0 and r["deferred_steps"] >= 0 for r in records)
        assert all(a["step"] <= b["solved_at"] for a, b in zip(records, records[1:]))
    if groups:  # EPLB's and the affinity solver's hierarchical policy: each group's experts on one node;
        # node dispatch's bytes logged
        train = [r for r in read_metrics(tmp_path / "on") if r["kind"] == "train"]
        assert all(0 < r["a2a_inter_node_bytes"] <= r["a2a_bytes"] for r in train)
        for path in plans:
            plan = Placement.load(path)
            assert plan.meta["policy"] == "hierarchical" and plan.meta["expert_groups"] == 2
            for l in range(plan.num_layers):
                assert [sorted(set(np.flatnonzero(plan.holds(l)[2 * k: 2 * k + 2].any(0)))) for k in (0, 1)] in ([[0], [1]], [[1], [0]])
    # the heuristic is solved in the trainer's thread, the ILP in a spawned process
    assert {(r["method"], r["solved_in"]) for r in records} == {(method, "thread" if method == "eplb" else "process")}
    summary = json.loads((tmp_path / "on/summary.json").read_text())
    assert len(summary["placement_history"]) == len(records)
    # the run directory's statistics and plans plot
    figs = tmp_path / "figs"
    proc = subprocess.run([sys.executable, "-m", "moesaic.placement.cli", "plot", "--run", str(tmp_path / "on"),
                           "--out", str(figs)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert (figs / "loads.png").stat().st_size > 2000 and len(list(figs.glob("plan_map_plan-*.png"))) == len(records)


def test_a_pending_plan_is_adopted_once_the_solver_has_finished(tmp_path):
    """Replanner._plan_ready on one process, with wait_for_plan=false: not while rank 0's solver
    thread runs, then yes. With wait_for_plan (the default) always: the adoption waits for the thread."""
    import threading

    from moesaic.placement.config import PlacementConfig
    from moesaic.trainer.dist import DistInfo
    from moesaic.trainer.replan import Replanner

    info = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), backend=None)
    r = Replanner(PlacementConfig(every_n_steps=4, wait_for_plan=False), None, None, None, tmp_path, info, None)
    finish = threading.Event()
    r.thread = threading.Thread(target=finish.wait, daemon=True)
    r.thread.start()
    assert not r._plan_ready()
    r.cfg = PlacementConfig(every_n_steps=4, wait_for_plan=True)
    assert r._plan_ready()
    r.cfg = PlacementConfig(every_n_steps=4, wait_for_plan=False)
    finish.set()
    r.thread.join()
    assert r._plan_ready()


def test_the_solver_process_answers_and_names_its_errors():
    """Re-placement's ILPs run in a spawned process: its plan equals one solved here, and an error
    there comes back as an error that names the cause (the trainer keeps its plan and logs it)."""
    from moesaic.placement.stats import RoutingStats
    from moesaic.placement.topology import Topology
    from moesaic.placement.traces import synth
    from moesaic.trainer.replan import _solve_in_process, _solve_to_dict

    stats = RoutingStats.from_experts(synth("olmoe", 400, 3)[:, :3], 64)
    args = ("affinity", stats, Topology(num_gpus=4, gpus_per_node=4), 0.1, 20.0, "highs", 0, None)
    there, here = _solve_in_process(args), _solve_to_dict(*args)
    assert there["placement"] == here["placement"] and there["meta"]["method"] == "affinity"
    with pytest.raises(RuntimeError, match="in the solver process: .*slots"):
        _solve_in_process(("eplb", stats, Topology(num_gpus=4, gpus_per_node=4), 0.1, 20.0, "highs", 0, 3))


def test_the_solver_process_outlives_the_signals_sent_to_its_rank():
    """torchrun sends SIGTERM to a rank's whole process group, and SLURM to every process of a step:
    the solver, started from the re-plan thread, must still answer (its rank is finishing a step and
    writing a checkpoint). Signalled at once, while it still imports."""
    import os
    import threading

    import psutil

    from moesaic.placement.stats import RoutingStats
    from moesaic.placement.topology import Topology
    from moesaic.placement.traces import synth
    from moesaic.trainer.replan import _solve_in_process

    stats = RoutingStats.from_experts(synth("olmoe", 400, 3)[:, :3], 64)
    answer = {}

    def solve():
        try:
            answer.update(_solve_in_process(("affinity", stats, Topology(num_gpus=4, gpus_per_node=4), 0.1, 20.0,
                                             "highs", 0, None)))
        except RuntimeError as e:
            answer["error"] = str(e)

    solver = threading.Thread(target=solve, daemon=True)
    solver.start()
    deadline, child = time.time() + 30, None
    while child is None and time.time() < deadline:
        child = next((p for p in psutil.Process(os.getpid()).children() if "spawn_main" in " ".join(p.cmdline())), None)
    assert child is not None
    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        child.send_signal(sig)
    solver.join(timeout=60)
    assert "error" not in answer and answer["meta"]["method"] == "affinity", answer
    assert not signal.pthread_sigmask(signal.SIG_BLOCK, [])  # this thread's mask is as it was


def _run_to_files(cmd: list[str], folder: Path, mark: str) -> tuple[int, str, str]:
    """Run `cmd` with its output in files, so that the call returns when `cmd` ends, not when the last
    process that inherited its pipes does (a solver left behind would hold them open)."""
    with open(folder / "out.txt", "w") as out, open(folder / "err.txt", "w") as err:
        code = subprocess.run(cmd, stdout=out, stderr=err, timeout=120, env=child_env(MOESAIC_TEST_RUN=mark)).returncode
    return code, (folder / "out.txt").read_text(), (folder / "err.txt").read_text()


def _left_behind(mark: str, within_s: float) -> list:
    """The processes that carry the environment marker `mark` (MOESAIC_TEST_RUN) once they are all
    gone, or `within_s` seconds have passed. A solver process started just before its rank ended
    still imports for a few seconds before it can notice."""
    import psutil

    def marked(p):
        try:  # a zombie has ended; only its parent, gone too, could have reaped it
            return p.status() != psutil.STATUS_ZOMBIE and p.environ().get("MOESAIC_TEST_RUN") == mark
        except (psutil.Error, OSError):  # gone, or not ours to read
            return False

    deadline = time.time() + within_s
    while (left := [p for p in psutil.process_iter(["cmdline"]) if marked(p)]) and time.time() < deadline:
        time.sleep(0.2)
    return left


@pytest.mark.slow
@pytest.mark.dist
def test_a_run_that_ends_during_a_solve_leaves_no_solver_behind(tmp_path):
    """The affinity ILP started at step 6 (adopted at 9) is still running when the ranks exit: its process
    follows them out, quietly (no broken pipe), and nothing it spawned outlives the run. (This tiny
    solve would end within the wait by itself; the next test is the one that needs the solver's watch.)"""
    mark = f"{os.getpid()}-{time.time()}"  # every process this run starts inherits it; no other test's does
    code, out, err = _run_to_files([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
                                    "-m", "moesaic.trainer", *SMOKE, "steps=7", "placement=affinity",
                                    "placement.every_n_steps=2", f"logging.out_dir={tmp_path}", "logging.run_name=r"],
                                   tmp_path, mark)
    left = _left_behind(mark, within_s=10)
    assert code == 0, err[-3000:]
    assert "BrokenPipeError" not in err and "Traceback" not in err, err[-3000:]
    assert not left, [p.info for p in left]


@pytest.mark.slow
def test_a_solver_whose_rank_ends_mid_solve_leaves_with_it(tmp_path):
    """A rank leaves by os._exit 3 s into an affinity solve with a 60 s time limit, on routing
    statistics that keep it busy for over 30 s (33 s measured alone). The solver's watch on its rank
    (`trainer/replan.py: _exit_with`) ends it within the 10 s wait; without the watch it would solve
    on for nobody, and this test fails (checked by removing the watch)."""
    mark = f"{os.getpid()}-{time.time()}"
    worker = Path(__file__).parent / "workers" / "orphan_solver.py"
    code, out, err = _run_to_files([sys.executable, str(worker), "3", "60"], tmp_path, mark)
    left = _left_behind(mark, within_s=10)
    for p in left:
        p.kill()
    assert code == 0, err[-3000:]
    assert out.split(), f"the solver was not running when its rank left:\n{err[-3000:]}"
    assert not left, [p.info for p in left]


@pytest.mark.slow
@pytest.mark.dist
def test_dynamic_replicas_and_resharding_change_no_math(tmp_path):
    base = [*SMOKE, "steps=16", f"logging.out_dir={tmp_path}", "parallel=fssdp"]
    torchrun(4, [*base, "logging.run_name=off"])
    torchrun(4, [*base, "logging.run_name=dyn", "placement.dynamic_replicas=2", "parallel.reshard_every_n_steps=4"])
    off, dyn = train_losses(tmp_path / "off"), train_losses(tmp_path / "dyn")
    assert max(abs(off[s] - dyn[s]) for s in off) < 1e-5
    summary = json.loads((tmp_path / "dyn/summary.json").read_text())
    assert summary["dynamic_replicas_added_mean"] > 0
    gathered = [r["expert_gather_bytes"] for r in read_metrics(tmp_path / "dyn") if r["kind"] == "train"]
    assert sum(gathered) > 0  # replicas were really gathered from their owners
    reshards = [r for r in read_metrics(tmp_path / "dyn") if r["kind"] == "reshard"]
    assert [r["step"] for r in reshards] == [4, 8, 12, 16]  # owners followed the loads (Hecate Alg. 2)
