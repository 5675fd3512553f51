"""Tier 4: launch paths. torchrun across two "nodes" on loopback, a real local SLURM cluster (sbatch
with torchrun per node, srun with one task per rank, a Hydra sweep through hydra-submitit-launcher),
and named errors for misconfigured launches."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO, child_env, free_port, read_metrics, train_losses

CLUSTER = REPO / "launch" / "slurm" / "local_cluster.sh"
SMOKE = ["experiment=smoke", "logging.log_every=5"]


def _slurm_ok(env) -> bool:
    try:
        out = subprocess.run(["sinfo", "-h", "-N", "-o", "%t"], capture_output=True, text=True, timeout=20, env=env)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return out.returncode == 0 and out.stdout.count("idle") >= 2


@pytest.fixture(scope="module")
def slurm():
    """The SLURM cluster that .ci/run started (SLURM_CONF), or one this fixture starts and stops."""
    env = child_env()
    if env.get("SLURM_CONF") and _slurm_ok(env):
        yield env
        return
    if shutil.which("bash") is None:
        pytest.skip("no bash to start the local SLURM cluster")
    up = subprocess.run(["bash", str(CLUSTER), "up"], capture_output=True, text=True, timeout=300)
    if up.returncode != 0:
        reason = f"could not start a local SLURM cluster: {up.stderr.strip()[-500:]}"
        print(reason)
        pytest.skip(reason)
    env["SLURM_CONF"] = up.stdout.strip().splitlines()[-1]
    try:
        yield env
    finally:
        subprocess.run(["bash", str(CLUSTER), "down"], capture_output=True, timeout=60)


def _wait(job_id: str, env, timeout=400) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        out = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True, env=env)
        if not out.stdout.strip():
            return
        time.sleep(1)
    subprocess.run(["scancel", job_id], env=env)
    raise AssertionError(f"SLURM job {job_id} did not finish in {timeout} s")


def _sbatch(script: str, sbatch_args: list[str], overrides: list[str], env, cwd: Path) -> str:
    env = dict(env, PYTHON=sys.executable)
    out = subprocess.run(["sbatch", "--parsable", f"--chdir={cwd}", *sbatch_args, str(REPO / "launch" / "slurm" / script),
                          *overrides], capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().split(";")[0]


def _dense_equal_across(run: Path, ranks: int) -> None:
    dumps = [torch.load(run / f"params-rank{r}.pt", weights_only=True) for r in range(ranks)]
    dense = [k for k in dumps[0] if ".experts." not in k and ".dispatcher." not in k]
    assert len(dense) > 10
    for k in dense:
        for d in dumps[1:]:
            assert torch.equal(dumps[0][k], d[k]), k


@pytest.mark.slow
@pytest.mark.dist
def test_two_node_torchrun_on_loopback(tmp_path):
    port = free_port()
    args = [*SMOKE, "steps=10", f"logging.out_dir={tmp_path}", "logging.run_name=mn", "logging.dump_rank_params=true"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "2",
           "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", "mn", "-m", "moesaic.trainer", *args]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env()) for _ in range(2)]
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
    summary = json.loads((tmp_path / "mn/summary.json").read_text())
    assert summary["world_size"] == 4 and summary["expert_sharding"] == "fssdp"
    _dense_equal_across(tmp_path / "mn", 4)


@pytest.mark.slow
@pytest.mark.dist
def test_sbatch_two_nodes_torchrun_per_node(slurm, tmp_path):
    job = _sbatch("train.sbatch", ["--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=2"],
                  [*SMOKE, f"logging.out_dir={tmp_path}", "logging.run_name=sb"], dict(slurm, NPROC_PER_NODE="2"), tmp_path)
    _wait(job, slurm)
    log = (tmp_path / f"moesaic-{job}.out").read_text()
    assert "2 nodes x 2 ranks" in log, log[-3000:]
    summary = json.loads((tmp_path / "sb/summary.json").read_text())
    assert summary["world_size"] == 4 and summary["config"]["launcher"]["name"] == "slurm"
    train = [r for r in read_metrics(tmp_path / "sb") if r["kind"] == "train"]
    assert train[-1]["loss"] < train[0]["loss"] - 0.3


@pytest.mark.slow
@pytest.mark.dist
def test_srun_one_task_per_rank(slurm, tmp_path):
    job = _sbatch("train_srun.sbatch", ["--nodes=2", "--ntasks-per-node=2"],
                  [*SMOKE, f"logging.out_dir={tmp_path}", "logging.run_name=sr", "logging.dump_rank_params=true"], slurm, tmp_path)
    _wait(job, slurm)
    summary_path = tmp_path / "sr/summary.json"
    assert summary_path.is_file(), (tmp_path / f"moesaic-{job}.out").read_text()[-3000:]
    summary = json.loads(summary_path.read_text())
    assert summary["world_size"] == 4
    _dense_equal_across(tmp_path / "sr", 4)


@pytest.mark.slow
@pytest.mark.dist
@pytest.mark.parametrize("script,sbatch_args", [
    ("train.sbatch", ["--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=2"]),  # torchrun per node
    ("train_srun.sbatch", ["--nodes=2", "--ntasks-per-node=2"]),  # the ranks themselves are the tasks
])
def test_scancel_stops_the_job_with_a_checkpoint_and_a_new_job_resumes_it(slurm, tmp_path, script, sbatch_args):
    """`scancel` (as a preemption or the time limit) sends SIGTERM to every process of the step, and
    SIGKILL KillWait (5 s on this cluster) later: the 4 ranks on 2 nodes stop after the same step with
    its checkpoint, and a job submitted after it resumes from there."""
    args = [*SMOKE, "steps=3000", "logging.log_every=1", "eval_every=0", f"logging.out_dir={tmp_path}", "logging.run_name=pre"]
    env = dict(slurm, NPROC_PER_NODE="2")
    job = _sbatch(script, sbatch_args, args, env, tmp_path)
    metrics, deadline = tmp_path / "pre/metrics.jsonl", time.time() + 300
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 5) and time.time() < deadline:
        time.sleep(0.2)
    subprocess.run(["scancel", job], env=slurm, check=True)
    _wait(job, slurm, timeout=60)
    log = (tmp_path / f"moesaic-{job}.out").read_text()
    stopped = [ln for ln in log.splitlines() if ln.startswith("stopped by SIGTERM after step ")]
    assert stopped, log[-3000:]
    n = int(stopped[0].split("after step ")[1].split()[0])
    assert [p.name for p in (tmp_path / "pre/checkpoints").iterdir()] == [f"step-{n:08d}"]
    if script == "train_srun.sbatch":  # srun reports each rank's own exit code: 128 + SIGTERM
        assert "Exited with exit code 143" in log, log[-3000:]
    job = _sbatch(script, sbatch_args, [*args, "checkpoint.resume=auto", f"stop_at_step={n + 2}"], env, tmp_path)
    _wait(job, slurm)
    summary = json.loads((tmp_path / "pre/summary.json").read_text())
    assert summary["start_step"] == n and summary["stopped_at"] == n + 2 and summary["world_size"] == 4


@pytest.mark.slow
@pytest.mark.dist
def test_a_job_stopped_by_its_time_limit_signal_requeues_itself_and_finishes(slurm, tmp_path):
    """launcher.requeue=true. `scancel --signal=TERM` signals the job's steps only, as the time
    limit's `--signal=TERM@120` does: the ranks stop with a checkpoint, rank 0 requeues the job, and
    the requeued job (same script, same overrides) resumes under the same run name and finishes.
    SLURM holds a requeued job until the credentials of its last run expire (`cred_expire`: 120 s by
    default, 15 s in the local cluster). Releasing it sooner (`scontrol update StartTime=now`), as
    this test once did, let SLURM start it on a node that still refused the revoked credential, and
    SLURM ended it ("Killing non-startable batch job: Job credential revoked")."""
    steps = 150  # the signal comes after step 5: 145 steps of margin (60 ms each at 4 quiet ranks)
    args = [*SMOKE, f"steps={steps}", "logging.log_every=1", "eval_every=0", f"logging.out_dir={tmp_path}",
            "launcher.requeue=true"]
    job = _sbatch("train.sbatch", ["--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=2", "--requeue"], args,
                  dict(slurm, NPROC_PER_NODE="2"), tmp_path)
    run = tmp_path / f"slurm-{job}"
    deadline = time.time() + 300
    while not ((run / "metrics.jsonl").exists() and len((run / "metrics.jsonl").read_text().splitlines()) >= 5):
        assert time.time() < deadline, (tmp_path / f"moesaic-{job}.out").read_text()[-3000:]
        time.sleep(0.2)
    subprocess.run(["scancel", "--signal=TERM", job], env=slurm, check=True)
    pending = False
    while time.time() < deadline:
        state = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T %r"], capture_output=True, text=True, env=slurm).stdout.split()
        if not state:
            break
        pending |= state[0] == "PENDING"
        time.sleep(0.5)
    log = (tmp_path / f"moesaic-{job}.out").read_text()
    assert pending and f"requeueing SLURM job {job}" in log, log[-3000:]
    n = int(next(ln for ln in log.splitlines() if ln.startswith("stopped by SIGTERM after step ")).split()[5])
    summary = json.loads((run / "summary.json").read_text())
    assert 0 < n < steps and summary["start_step"] == n and summary["stopped_at"] == steps, (n, summary["start_step"])
    assert summary["stopped_by"] is None and f"resumed from {run}/checkpoints/step-{n:08d}" in log


@pytest.mark.slow
@pytest.mark.dist
def test_hydra_sweep_through_submitit_on_slurm(slurm, tmp_path):
    cmd = [sys.executable, "-m", "moesaic.trainer", "-m", "launcher=submitit_slurm", *SMOKE,
           "model.moe.num_experts=4,8", f"logging.out_dir={tmp_path / 'runs'}", f"hydra.sweep.dir={tmp_path / 'sweep'}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=slurm, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summaries = [json.loads(p.read_text()) for p in (tmp_path / "runs").glob("*/summary.json")]
    assert len(summaries) == 2
    assert sorted(s["config"]["model"]["moe"]["num_experts"] for s in summaries) == [4, 8]
    assert all(s["world_size"] == 2 and s["config"]["launcher"]["name"] == "submitit" for s in summaries)


def _final_summary(run: Path, steps: int) -> bool:
    try:
        return json.loads((run / "summary.json").read_text())["stopped_at"] == steps
    except (OSError, ValueError, KeyError):  # not written yet, or being written
        return False


@pytest.mark.slow
@pytest.mark.dist
def test_a_submitit_job_stopped_by_its_signal_requeues_itself_and_the_sweep_finishes(slurm, tmp_path):
    """launcher=submitit_slurm: submitit's time-limit signal (SIGUSR2; `scancel --signal=USR2` here)
    stops both ranks after the same step with a checkpoint, rank 0 requeues the job, and the requeued
    job (the same point of the sweep) resumes as slurm-<job id> and finishes; the sweep returns 0."""
    steps = 250  # the signal comes after step 5: 245 steps of margin (24 ms each at 2 quiet ranks)
    cmd = [sys.executable, "-m", "moesaic.trainer", "-m", "launcher=submitit_slurm", *SMOKE, f"steps={steps}",
           "logging.log_every=1", "eval_every=0", f"logging.out_dir={tmp_path / 'runs'}", f"hydra.sweep.dir={tmp_path / 'sweep'}"]
    sweep = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=slurm, cwd=tmp_path)
    deadline = time.time() + 400
    while True:
        found = list((tmp_path / "runs").glob("slurm-*/metrics.jsonl"))
        if found and len(found[0].read_text().splitlines()) >= 5:
            break
        assert time.time() < deadline and sweep.poll() is None, sweep.communicate()[1][-3000:]
        time.sleep(0.2)
    run = found[0].parent
    job = run.name.split("-", 1)[1]
    subprocess.run(["scancel", "--signal=USR2", job], env=slurm, check=True)
    pending, finished = False, None
    while sweep.poll() is None:
        state = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], capture_output=True, text=True, env=slurm).stdout.split()
        pending |= bool(state) and state[0] == "PENDING"  # held until cred_expire (the sbatch test says why)
        if finished is None and _final_summary(run, steps):
            finished = time.time()
        # a safeguard: in 8 of 9 reproductions the sweep returned within 1 s of the job's final summary;
        # the ninth job had been released early and ended by SLURM (the sbatch test says why). Asserted below
        if time.time() > deadline or (finished and time.time() > finished + 60):
            sweep.kill()
            subprocess.run(["scancel", job], env=slurm)
            break
        time.sleep(0.5)
    out, err = sweep.communicate()
    logs = "".join(f.read_text(errors="replace") for f in (tmp_path / "sweep").rglob("*_log.*"))
    n = int(next(ln for ln in logs.splitlines() if ln.startswith("stopped by SIGUSR2 after step ")).split()[5])
    assert pending and f"requeueing SLURM job {job}" in logs, logs[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert 0 < n < steps and summary["start_step"] == n and summary["stopped_at"] == steps, (n, summary["start_step"])
    assert sorted(train_losses(run)) == list(range(1, steps + 1))
    assert sweep.returncode == 0, ("the sweep did not return within 60 s of the job's end", err[-3000:])


def test_missing_master_addr_is_named(tmp_path):
    env = child_env(WORLD_SIZE="2", RANK="0")
    for var in ("MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID", "SLURM_NTASKS"):
        env.pop(var, None)
    proc = subprocess.run([sys.executable, "-m", "moesaic.trainer", *SMOKE, f"logging.out_dir={tmp_path}"],
                          capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    assert proc.returncode == 2 and "MASTER_ADDR is not set" in proc.stderr


def test_rendezvous_times_out_with_a_message(tmp_path):
    env = child_env(WORLD_SIZE="2", RANK="0", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    proc = subprocess.run([sys.executable, "-m", "moesaic.trainer", *SMOKE, "parallel.timeout_s=5",
                           f"logging.out_dir={tmp_path}"], capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    assert proc.returncode == 4, proc.stderr[-2000:]
    assert "timed out after parallel.timeout_s (5) s as rank 0 of WORLD_SIZE 2" in proc.stderr


def test_torchrun_wrapper_single_node_and_named_multinode_error(tmp_path):
    wrapper = str(REPO / "launch" / "torchrun.sh")
    env = child_env(PYTHON=sys.executable, NPROC_PER_NODE="2")
    proc = subprocess.run(["bash", wrapper, "experiment=smoke", "steps=5", "optim.warmup_steps=1",
                           f"logging.out_dir={tmp_path}", "logging.run_name=w"], capture_output=True, text=True,
                          timeout=180, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((tmp_path / "w/summary.json").read_text())["world_size"] == 2
    env = child_env(PYTHON=sys.executable, NNODES="2")
    env.pop("MASTER_ADDR", None)
    proc = subprocess.run(["bash", wrapper], capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode != 0 and "MASTER_ADDR must be set for a multi-node launch" in proc.stderr
