"""Tier 1/4: Hydra composition of every config group, overrides, and named errors for bad input."""

from pathlib import Path

import pytest
from hydra import compose, initialize_config_module

from moesaic.trainer.config import TrainConfig, register_configs, to_train_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
GROUPS = ["model", "data", "optim", "parallel", "placement", "logging", "launcher", "experiment"]

register_configs()


def _compose(*overrides: str):
    with initialize_config_module(config_module="moesaic.configs", version_base=None):
        return compose(config_name="config", overrides=list(overrides))


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIGS / group).glob("*.yaml"))


def test_every_group_has_options():
    for g in GROUPS:
        assert _options(g), f"configs/{g}/ is empty"


@pytest.mark.parametrize(
    "group,option", [(g, o) for g in GROUPS for o in _options(g)], ids=lambda v: str(v)
)
def test_compose_every_option(group, option, tmp_path):
    overrides = [f"{group}={option}"]
    if group == "data" and option in ("text", "bin"):
        f = tmp_path / "corpus.bin"
        f.write_bytes(bytes(range(256)) * 64)
        overrides.append(f"data.path={f}")
    cfg = to_train_config(_compose(*overrides))
    assert isinstance(cfg, TrainConfig)


def test_default_composes_to_the_demo():
    cfg = to_train_config(_compose())
    assert cfg.data.source == "stdlib" and cfg.model.vocab_size == 256
    assert cfg.model.moe.num_experts == 8
    assert cfg.parallel.expert_sharding == "fssdp" and cfg.parallel.ep_size == 0  # the whole world


def test_override_changes_a_field():
    cfg = to_train_config(_compose("model.moe.num_experts=16", "optim.lr=1e-4", "model=tiny"))
    assert cfg.model.moe.num_experts == 16 and cfg.optim.lr == 1e-4 and cfg.model.dim == 32


def test_experiment_overrides_root_values():
    cfg = to_train_config(_compose("experiment=smoke"))
    assert cfg.steps == 30 and cfg.model.dim == 32 and cfg.logging.wandb_mode == "disabled"


@pytest.mark.parametrize(
    "overrides,match",
    [
        (["model.moe.top_k=3", "model.moe.num_experts=2"], r"model\.moe\.top_k \(3\) must be <= model\.moe\.num_experts \(2\)"),
        (["model.dim=100", "model.num_heads=3"], r"model\.dim \(100\) must be divisible by model\.num_heads \(3\)"),
        (["data.seq_len=512"], r"data\.seq_len \(512\) must be <= model\.max_seq_len \(256\)"),
        (["data=text", "data.path=/no/such/corpus"], r"data\.path \('/no/such/corpus'\) does not exist"),
        (["model.moe.router.score_func=relu"], r"model\.moe\.router\.score_func \('relu'\) must be one of"),
        (["optim.lr=-1"], r"optim\.lr \(-1\.0\) must be > 0"),
        (["parallel.backend=mpi"], r"parallel\.backend \('mpi'\) must be one of"),
        (["logging.wandb_mode=sometimes"], r"logging\.wandb_mode \('sometimes'\) must be one of"),
        (["model.num_dense_layers=9"], r"model\.num_dense_layers \(9\) must be in \[0, model\.num_layers \(4\)\]"),
        (["logging.profile_steps=[5,3]"], r"logging\.profile_steps \(\[5, 3\]\) must be \[first, last\] with 1 <= first <= last <= steps \(250\)"),
        (["logging.profile_steps=[1,300]"], r"logging\.profile_steps \(\[1, 300\]\) must be"),
        (["optim.decay_type=step"], r"optim\.decay_type \('step'\) must be one of 'cosine', 'linear', 'sqrt'"),
        (["optim.decay_ratio=1.5"], r"optim\.decay_ratio \(1\.5\) must be in \[0, 1\]"),
        (["optim.implementation=apex"], r"optim\.implementation \('apex'\) must be one of 'auto', 'for-loop', 'foreach', 'fused'"),
        (["parallel.engine=deepspeed", "optim.implementation=fused"],
         r"optim\.implementation \('fused'\) with parallel\.engine \('deepspeed'\)"),
        (["parallel.engine=deepspeed", "+parallel.zero_config.offload_optimizer={device: cpu}"],
         r"parallel\.zero_config has 'offload_optimizer': its keys must be among reduce_bucket_size, "),
        (["+parallel.zero_config.overlap_comm=true"],
         r"parallel\.zero_config \(\{'overlap_comm': True\}\) needs parallel\.engine=deepspeed, not 'torch'"),
        (["parallel.mixed_precision=fp16", "parallel.hysteresis=0"], r"parallel\.hysteresis \(0\) must be >= 1"),
        (["logging.count_kept=true", "compile=true"],
         r"logging\.count_kept \(True\) with compile \(True\): the count runs a dispatch mode"),
    ],
)
def test_bad_config_gets_a_named_error(overrides, match):
    with pytest.raises(ValueError, match=match):
        to_train_config(_compose(*overrides))


def test_unknown_field_is_refused():
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException, match="num_expertz"):
        _compose("model.moe.num_expertz=4")


def test_help_names_the_app_and_its_groups():
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "moesaic.trainer", "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.startswith("moesaic-train: train a Mixture-of-Experts"), proc.stdout[:300]
    assert "placement: affinity, contiguous, replan" in proc.stdout and "on_signal:" in proc.stdout


def test_requeue_defaults_name_the_run_and_resume_a_requeued_start(monkeypatch):
    from moesaic.trainer.config import CheckpointConfig, LauncherConfig, LoggingConfig, TrainConfig
    from moesaic.trainer.preempt import requeue_defaults

    cfg = TrainConfig(launcher=LauncherConfig(name="slurm", requeue=True))
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    assert requeue_defaults(cfg) is cfg  # not under SLURM: nothing to do
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "0")
    first = requeue_defaults(cfg)
    assert first.logging.run_name == "slurm-77" and first.checkpoint.resume == "none"
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    again = requeue_defaults(cfg)
    assert again.logging.run_name == "slurm-77" and again.checkpoint.resume == "auto"
    named = TrainConfig(launcher=LauncherConfig(name="slurm", requeue=True), logging=LoggingConfig(run_name="mine"),
                        checkpoint=CheckpointConfig(resume="none"))
    assert requeue_defaults(named).logging.run_name == "mine"
    off = TrainConfig(launcher=LauncherConfig(name="slurm"))
    assert requeue_defaults(off) is off


def test_bad_input_is_one_line_and_hydra_full_error_adds_the_traceback(tmp_path):
    import subprocess
    import sys

    from conftest import child_env

    cmd = [sys.executable, "-m", "moesaic.trainer", "experiment=smoke", "optim.lr=-1", f"logging.out_dir={tmp_path}"]
    plain = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=child_env(HYDRA_FULL_ERROR="0"))
    assert plain.returncode == 2 and plain.stderr.strip() == "moesaic-train: error: optim.lr (-1.0) must be > 0", plain.stderr
    full = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=child_env(HYDRA_FULL_ERROR="1"))
    assert full.returncode == 1 and "Traceback" in full.stderr and "ValueError: optim.lr (-1.0) must be > 0" in full.stderr
