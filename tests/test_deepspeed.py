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
