"""Tier 4: the DeepSpeed launcher and engine=deepspeed (ZeRO for the dense parameters only)."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import child_env, free_port, read_metrics, torchrun

WORKERS = Path(__file__).resolve().parent / "workers"
SMOKE = ["experiment=smoke", "logging.log_every=1", "steps=10", "optim.warmup_steps=2", "optim.grad_clip=0"]


def _losses(run):
    return [r["loss"] for r in read_metrics(run) if r["kind"] == "train"]


@pytest.mark.slow
@pytest.mark.dist
@pytest.mark.parametrize("stage", [1, 2])
def test_deepspeed_engine_matches_torch_engine(tmp_path, stage):
    torchrun(2, [*SMOKE, f"logging.out_dir={tmp_path}", "logging.run_name=torch"], timeout=600)
    torchrun(2, [*SMOKE, f"logging.out_dir={tmp_path}", "logging.run_name=ds", "parallel.engine=deepspeed",
                 f"parallel.zero_stage={stage}"], timeout=600)
    a, b = _losses(tmp_path / "torch"), _losses(tmp_path / "ds")
    assert len(a) == len(b) == 10
    assert max(abs(x - y) for x, y in zip(a, b)) < 1e-4, (a, b)


@pytest.mark.slow
@pytest.mark.dist
@pytest.mark.parametrize("stage", [1, 2])
def test_deepspeed_never_holds_an_expert(stage):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone", str(WORKERS / "ds_engine.py"), str(stage)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=child_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads([line for line in proc.stdout.splitlines() if line.startswith("{")][-1])
    assert report["experts_in_engine_module"] == 0 and report["experts_in_deepspeed_optimizer"] == 0
    assert report["engine_module_params"] > 0 and report["expert_grads_present"]
    assert report["dense_equal_across_ranks"]


@pytest.mark.slow
@pytest.mark.dist
def test_deepspeed_launcher_two_local_ranks(tmp_path):
    launcher = shutil.which("deepspeed") or str(Path(sys.executable).parent / "deepspeed")
    cmd = [launcher, "--num_gpus", "2", "--master_port", str(free_port()), "--module", "moesaic.trainer",
           *SMOKE, "parallel.engine=deepspeed", f"logging.out_dir={tmp_path}", "logging.run_name=dl"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=child_env(), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "dl/summary.json").read_text())
    assert summary["world_size"] == 2 and summary["config"]["parallel"]["engine"] == "deepspeed"


def test_deepspeed_with_checkpoints_is_refused_by_name():
    from moesaic.trainer.config import CheckpointConfig, TrainConfig
    from moesaic.parallel.config import ParallelConfig

    with pytest.raises(ValueError, match=r"with parallel.engine \(deepspeed\): checkpoints of DeepSpeed"):
        TrainConfig(parallel=ParallelConfig(engine="deepspeed"), checkpoint=CheckpointConfig(every_n_steps=5))


@pytest.mark.slow
@pytest.mark.dist
@pytest.mark.parametrize("world,ep", [(2, 2), (4, 4), (4, 2)])
def test_deepspeed_moe_block_matches_reference(world, ep):
    """model.moe_impl=deepspeed: DeepSpeed-MoE's layer with the weights moesaic copied into it computes
    the one-process reference (renormalised top-k), and its expert gradients sum over its EP group."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world), "--standalone",
           str(WORKERS / "ds_moe.py"), str(ep)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=child_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads([line for line in proc.stdout.splitlines() if line.startswith("{")][-1])
    assert r["ids_equal"] and r["counts_equal"], r
    assert r["out_diff"] < 1e-5 and r["gate_grad_diff"] < 1e-5 and r["expert_grad_diff"] < 1e-5, r
    assert r["expert_grad_norm"] > 1e-3 and r["a2a_bytes"] > 0


@pytest.mark.slow
@pytest.mark.dist
def test_trainer_runs_deepspeed_moe(tmp_path):
    torchrun(2, ["experiment=smoke", "logging.log_every=1", "steps=12", "optim.warmup_steps=2",
                 "parallel=deepspeed_moe", "model.moe_impl=deepspeed", f"logging.out_dir={tmp_path}",
                 "logging.run_name=dsm"], timeout=600)
    summary = json.loads((tmp_path / "dsm/summary.json").read_text())
    assert summary["expert_sharding"] == "deepspeed-moe" and summary["ep_size"] == 2
    losses = _losses(tmp_path / "dsm")
    assert len(losses) == 12 and losses[-1] < losses[0] - 0.3, losses
    rec = [r for r in read_metrics(tmp_path / "dsm") if r["kind"] == "train"][-1]
    assert rec["a2a_bytes"] > 0 and len(rec["load_max_over_mean"]) == 2


@pytest.mark.parametrize("override,field", [
    ({"parallel": {"engine": "torch"}}, r"parallel.engine \('torch'\) must be 'deepspeed'"),
    ({"parallel": {"engine": "deepspeed", "expert_sharding": "fssdp"}}, r"parallel.expert_sharding \('fssdp'\)"),
    ({"parallel": {"engine": "deepspeed"}, "capacity": 1.25}, r"model.moe.capacity_factor \(1.25\) must be 0"),
    ({"parallel": {"engine": "deepspeed"}, "plan": "round_robin"}, r"placement.plan \('round_robin'\)"),
])
def test_deepspeed_moe_refuses_what_it_cannot_do(override, field):
    from moesaic.parallel.config import ParallelConfig
    from moesaic.placement.config import PlacementConfig
    from moesaic.trainer.config import TrainConfig
    from moesaic.trainer.model import ModelConfig

    model = ModelConfig(moe_impl="deepspeed", moe={"capacity_factor": override.get("capacity", 0.0)})
    with pytest.raises(ValueError, match=field + r".* with model.moe_impl \(deepspeed\)"):
        TrainConfig(model=model, parallel=ParallelConfig(**override["parallel"]),
                    placement=PlacementConfig(plan=override.get("plan", "contiguous")))


def test_unknown_moe_impl_is_refused():
    from moesaic.trainer.model import ModelConfig

    with pytest.raises(ValueError, match=r"model.moe_impl \('tutel'\) must be one of 'moesaic', 'deepspeed'"):
        ModelConfig(moe_impl="tutel")
