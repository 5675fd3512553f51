"""Tier 4: a run told to stop by its scheduler (SIGTERM from torchrun, SLURM or Kubernetes; SIGUSR1
from `sbatch --signal`) finishes the step in progress on every rank, writes a checkpoint of it, and
resumes from it as if it had never stopped."""

import json
import signal
import subprocess
import sys
import time

import pytest

from conftest import child_env, torchrun, train_losses

SMOKE = ["experiment=smoke", "logging.log_every=1", "eval_every=0", "logging.progress=false"]


def _start(nproc: int, args: list[str]) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--standalone",
           "-m", "moesaic.trainer", *args]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env())


def _wait_for_step(proc: subprocess.Popen, run_dir, step: int, timeout: float = 120) -> None:
    metrics, deadline = run_dir / "metrics.jsonl", time.time() + timeout
    while time.time() < deadline:
        if metrics.exists() and any(json.loads(line).get("step", 0) >= step for line in metrics.read_text().splitlines()):
            return
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.05)
    proc.kill()
    raise AssertionError(f"the run never reached step {step}")


def _workers(proc: subprocess.Popen) -> list:
    import psutil

    return sorted((p for p in psutil.Process(proc.pid).children(recursive=True) if "moesaic.trainer" in " ".join(p.cmdline())),
                  key=lambda p: p.environ().get("RANK", ""))


def _stopped_at(err: str, name: str) -> int:
    line = next(ln for ln in err.splitlines() if ln.startswith(f"stopped by {name} after step "))
    return int(line.split("after step ")[1].split()[0])


@pytest.mark.slow
@pytest.mark.dist
def test_a_signal_to_one_rank_stops_every_rank_after_the_same_step_and_the_resume_is_exact(tmp_path):
    """SIGUSR1 reaches rank 1 only (as `sbatch --signal=USR1@T` does with one srun task per rank, in
    whatever order). Both ranks stop after the same step N, rank 0 writes the checkpoint of step N, and
    each rank exits with 128 + 10. Resumed from it, the run's losses equal those of a run that never
    stopped, bit for bit (2 ranks: resume is bit-exact there; see test_checkpoint)."""
    base = [*SMOKE, "steps=3000", f"logging.out_dir={tmp_path}"]
    proc = _start(2, [*base, "logging.run_name=stopped"])
    _wait_for_step(proc, tmp_path / "stopped", 4)
    _workers(proc)[1].send_signal(signal.SIGUSR1)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode != 0 and "exitcode  : 138" in err, err[-3000:]
    n = _stopped_at(out + err, "SIGUSR1")
    assert 4 <= n < 3000
    assert sorted(p.name for p in (tmp_path / "stopped/checkpoints").iterdir()) == [f"step-{n:08d}"]
    summary = json.loads((tmp_path / "stopped/summary.json").read_text())
    assert summary["stopped_by"] == "SIGUSR1" and summary["stopped_at"] == n
    assert max(train_losses(tmp_path / "stopped")) == n  # no rank ran a step past N

    torchrun(2, [*base, "logging.run_name=stopped", "checkpoint.resume=auto", f"stop_at_step={n + 3}"])
    torchrun(2, [*base, "logging.run_name=straight", f"stop_at_step={n + 3}"])
    resumed, straight = train_losses(tmp_path / "stopped"), train_losses(tmp_path / "straight")
    assert json.loads((tmp_path / "stopped/summary.json").read_text())["start_step"] == n
    assert [resumed[s] for s in range(1, n + 4)] == [straight[s] for s in range(1, n + 4)]


@pytest.mark.slow
@pytest.mark.dist
def test_sigterm_to_torchrun_stops_every_rank_with_a_checkpoint(tmp_path):
    """torchrun forwards its SIGTERM to each worker's process group (and kills them 30 s later): the 4
    ranks, under EP with affinity re-placement every 2 steps (a solver process may be running and
    receives the SIGTERM too), stop after one step with a checkpoint (written asynchronously: the run
    waits for it before it ends), and nothing is left running."""
    run = tmp_path / "r"
    proc = _start(4, [*SMOKE, "steps=3000", "parallel=ep", "placement=affinity", "placement.every_n_steps=2",
                      "checkpoint.async_mode=async", f"logging.out_dir={tmp_path}", "logging.run_name=r"])
    _wait_for_step(proc, run, 5)
    workers = _workers(proc)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert time.monotonic() - t0 < 30, err[-3000:]  # before torchrun's SIGKILL
    n = _stopped_at(out + err, "SIGTERM")
    assert (run / f"checkpoints/step-{n:08d}/manifest.json").is_file()
    assert json.loads((run / "summary.json").read_text())["stopped_by"] == "SIGTERM"
    assert "in the solver process" not in err, err[-3000:]
    assert not [w for w in workers if w.is_running() and w.status() != "zombie"]


def test_repeated_signals_are_one_request_and_the_handlers_are_restored():
    """SLURM signals every process of a step and torchrun forwards its own SIGTERM to each worker, so a
    rank may receive a signal twice, or two kinds: the first one is the request, the rest change
    nothing (they must not kill a rank that is writing its checkpoint). Outside the run, the handlers
    are the ones that were there before."""
    code = """
import os, signal, torch
from moesaic.trainer.dist import DistInfo
from moesaic.trainer.preempt import Preemption
info = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), backend=None)
with Preemption(["SIGUSR1", "SIGTERM"], info) as p:
    assert p.agreed() is None
    for sig in (signal.SIGUSR1, signal.SIGUSR1, signal.SIGTERM):
        os.kill(os.getpid(), sig)
    assert p.agreed() == "SIGUSR1"
assert signal.getsignal(signal.SIGUSR1) == signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
print("alive", flush=True)
os.kill(os.getpid(), signal.SIGUSR1)
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=child_env())
    assert proc.returncode == -signal.SIGUSR1 and proc.stdout == "alive\n", proc.stderr
    assert proc.stderr.count("received") == 1, proc.stderr


def test_signal_names_are_checked_before_a_rank_starts(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "moesaic.trainer", *SMOKE, "checkpoint.on_signal=[SIGTERM,SIGKILL]",
                           f"logging.out_dir={tmp_path}"], capture_output=True, text=True, timeout=60, env=child_env())
    assert proc.returncode == 2
    assert "checkpoint.on_signal (['SIGTERM', 'SIGKILL']): 'SIGKILL' is not one of SIGTERM" in proc.stderr


@pytest.mark.slow
@pytest.mark.dist
def test_deepspeed_engine_stops_on_sigterm_with_a_checkpoint_and_resumes_exactly(tmp_path):
    """parallel.engine=deepspeed (ZeRO-2 over the dense parameters) with async checkpoints: a SIGTERM
    stops every rank after step N with a checkpoint, which holds ZeRO's moments gathered whole. The
    resumed run's losses equal, bit for bit, those of a run that never stopped."""
    base = [*SMOKE, "steps=3000", "parallel.engine=deepspeed", "parallel.zero_stage=2", "checkpoint.async_mode=async",
            f"logging.out_dir={tmp_path}"]
    proc = _start(2, [*base, "logging.run_name=ds"])
    _wait_for_step(proc, tmp_path / "ds", 3, timeout=300)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    n = _stopped_at(out + err, "SIGTERM")
    assert f"after step {n} of 3000; checkpoint " in out + err, err[-3000:]
    assert (tmp_path / f"ds/checkpoints/step-{n:08d}/manifest.json").is_file()
    torchrun(2, [*base, "logging.run_name=ds", "checkpoint.resume=auto", f"stop_at_step={n + 3}"], timeout=600)
    torchrun(2, [*base, "logging.run_name=straight", f"stop_at_step={n + 3}"], timeout=600)
    resumed, straight = train_losses(tmp_path / "ds"), train_losses(tmp_path / "straight")
    assert [resumed[s] for s in range(1, n + 4)] == [straight[s] for s in range(1, n + 4)]


@pytest.mark.slow
@pytest.mark.dist
def test_deepspeed_moe_stops_on_sigterm_without_a_checkpoint(tmp_path):
    """model.moe_impl=deepspeed (the comparison baseline) has no checkpoints (its config refuses them):
    a SIGTERM still stops every rank after the same step, and says that nothing was written."""
    proc = _start(2, [*SMOKE, "steps=3000", "parallel=deepspeed_moe", "model.moe_impl=deepspeed",
                      f"logging.out_dir={tmp_path}", "logging.run_name=ds"])
    _wait_for_step(proc, tmp_path / "ds", 3, timeout=300)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    n = _stopped_at(out + err, "SIGTERM")
    assert f"after step {n} of 3000; no checkpoint (not supported with model.moe_impl=deepspeed)" in out + err
    assert not (tmp_path / "ds/checkpoints").exists()
    assert json.loads((tmp_path / "ds/summary.json").read_text())["stopped_at"] == n


@pytest.mark.slow
@pytest.mark.dist
def test_sigusr1_to_the_torchrun_wrapper_is_passed_on(tmp_path):
    """torchrun dies of a SIGUSR1 unless PET_SIGNALS_TO_HANDLE (--signals-to-handle) names it, leaving its workers
    orphaned; launch/torchrun.sh (and train.sbatch) name it, so `--signal=USR1@T` stops the run with a
    checkpoint like SIGTERM does."""
    from conftest import REPO

    env = child_env(NPROC_PER_NODE="2", PYTHON=sys.executable)
    env.pop("PET_SIGNALS_TO_HANDLE", None)
    proc = subprocess.Popen(["bash", str(REPO / "launch/torchrun.sh"), *SMOKE, "steps=3000", f"logging.out_dir={tmp_path}",
                             "logging.run_name=w"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        _wait_for_step(proc, tmp_path / "w", 3)
        workers = _workers(proc)
        proc.send_signal(signal.SIGUSR1)
        out, err = proc.communicate(timeout=60)
        n = _stopped_at(out + err, "SIGUSR1")
        assert (tmp_path / f"w/checkpoints/step-{n:08d}/manifest.json").is_file()
    finally:
        for w in workers if "workers" in locals() else []:
            if w.is_running():
                w.kill()
        proc.kill()
