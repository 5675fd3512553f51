"""Tier 4: the DeepSpeed launcher and engine=deepspeed (ZeRO for the dense parameters only)."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import child_env, flat_checkpoint, free_port, launch_once, read_metrics, torchrun, train_losses

WORKERS = Path(__file__).resolve().parent / "workers"
SMOKE = ["experiment=smoke", "logging.log_every=1", "steps=10", "optim.warmup_steps=2", "optim.grad_clip=0"]


def _losses(run):
    return [r["loss"] for r in read_metrics(run) if r["kind"] == "train"]


def _norms(run):
    return [r["grad_norm"] for r in read_metrics(run) if r["kind"] == "train"]


@pytest.mark.slow
@pytest.mark.dist
def test_deepspeed_engine_matches_torch_engine_without_clipping(tmp_path):
    """ZeRO-1 without gradient clipping: the same losses and gradient norms as the torch engine."""
    args = [*SMOKE, f"logging.out_dir={tmp_path}", "optim.grad_clip=0.0"]
    torchrun(2, [*args, "logging.run_name=torch"], timeout=600)
    torchrun(2, [*args, "logging.run_name=ds", "parallel.engine=deepspeed", "parallel.zero_stage=1"], timeout=600)
    a, b = _losses(tmp_path / "torch"), _losses(tmp_path / "ds")
    assert len(a) == len(b) == 10 and max(abs(x - y) for x, y in zip(a, b)) < 1e-5, (a, b)
    assert max(abs(x - y) for x, y in zip(_norms(tmp_path / "torch"), _norms(tmp_path / "ds"))) < 1e-5


@pytest.mark.slow
@pytest.mark.dist
def test_deepspeed_engine_at_each_zero_stage_compiled_and_checkpointed_matches_the_torch_engine(tmp_path):
    """One eager torch-engine run, clipped (the smoke model's norms are 1.3 to 2.2), against ZeRO
    stages 0, 1 and 2, compile=true (each block compiled, DeepSpeed's engine around them) and
    activation checkpointing under DeepSpeed: the same losses and gradient norms within float
    rounding (2.4e-7 measured; 1.9e-4 with a norm per group; 4.8e-7 compiled). One global norm over
    ZeRO's dense gradients and the experts scales both."""
    args = [*SMOKE, f"logging.out_dir={tmp_path}", "optim.grad_clip=1.0"]
    torchrun(2, [*args, "logging.run_name=torch"], timeout=600)
    runs = {f"zero{z}": [f"parallel.zero_stage={z}"] for z in (0, 1, 2)}
    runs.update(compiled=["compile=true"], ac=["parallel.activation_checkpoint=full"])
    for name, extra in runs.items():
        torchrun(2, [*args, f"logging.run_name={name}", "parallel.engine=deepspeed", *extra], timeout=600)
    ref, ref_norms = _losses(tmp_path / "torch"), _norms(tmp_path / "torch")
    assert len(ref) == 10 and min(ref_norms) > 1.2
    for name in runs:
        losses, norms = _losses(tmp_path / name), _norms(tmp_path / name)
        assert len(losses) == 10 and max(abs(x - y) for x, y in zip(ref, losses)) < 1e-5, (name, ref, losses)
        assert max(abs(x - y) for x, y in zip(ref_norms, norms)) < 1e-5, (name, ref_norms, norms)
    summary = json.loads((tmp_path / "compiled/summary.json").read_text())
    assert summary["compile"]["graphs"] >= 1


@pytest.mark.slow
@pytest.mark.dist
def test_bf16_gradient_reduction_is_the_same_under_deepspeed(tmp_path):
    """parallel.reduce_dtype=bf16 is DeepSpeed's communication_data_type: ZeRO-2 reduces the dense
    gradients in bf16 as the torch engine's DDP hook does (at 2 ranks, one bf16 sum of the halves),
    so the runs agree (losses equal, norms within 1.2e-7 measured), and both differ from fp32
    reduction (norms 1e-3 apart measured)."""
    args = [*SMOKE, f"logging.out_dir={tmp_path}"]
    torchrun(2, [*args, "logging.run_name=fp32"], timeout=600)
    torchrun(2, [*args, "logging.run_name=torch", "parallel.reduce_dtype=bf16"], timeout=600)
    torchrun(2, [*args, "logging.run_name=ds", "parallel.reduce_dtype=bf16", "parallel.engine=deepspeed",
                 "parallel.zero_stage=2"], timeout=600)
    fp32, torch16, ds16 = (_norms(tmp_path / n) for n in ("fp32", "torch", "ds"))
    assert len(fp32) == len(torch16) == len(ds16) == 10
    assert max(abs(x - y) for x, y in zip(_losses(tmp_path / "torch"), _losses(tmp_path / "ds"))) < 1e-6
    assert max(abs(x - y) for x, y in zip(torch16, ds16)) < 1e-5, (torch16, ds16)
    assert max(abs(x - y) for x, y in zip(fp32, torch16)) > 1e-4, (fp32, torch16)


@pytest.mark.slow
@pytest.mark.dist
def test_bf16_autocast_under_deepspeed_matches_the_torch_engine(tmp_path):
    """parallel.mixed_precision=bf16 means the same under both engines: a bf16 autocast forward over
    fp32 parameters, gradients and AdamW state (ZeRO's partitions stay fp32). The engines sum the
    gradients in another order, which bf16's rounding amplifies: 9.8e-5 measured over 10 steps."""
    args = [*SMOKE, f"logging.out_dir={tmp_path}", "optim.grad_clip=1.0", "parallel.mixed_precision=bf16"]
    torchrun(2, [*args, "logging.run_name=torch"], timeout=600)
    torchrun(2, [*args, "logging.run_name=ds", "parallel.engine=deepspeed"], timeout=600)
    a, b = _losses(tmp_path / "torch"), _losses(tmp_path / "ds")
    assert len(a) == len(b) == 10 and b[-1] < b[0] - 0.5
    assert max(abs(x - y) for x, y in zip(a, b)) < 1e-3, (a, b)


@pytest.mark.slow
@pytest.mark.dist
def test_fp16_loss_scaling_under_deepspeed_matches_the_torch_engine(tmp_path):
    """parallel.mixed_precision=fp16 under engine=deepspeed: backward from the scaled loss; for the
    step, moesaic sets ZeRO's loss scale to its own (ZeRO divides its partitions by it, in the same
    multiply as its clipping) and divides the expert gradients itself, then puts ZeRO's back to 1.
    A dynamic scale from 2**18 with a window of 3 overflows at steps 1, 2, 7 and 12: the overflows
    and scales are the torch engine's, step for step; the losses and norms agree to float rounding
    (ZeRO-0: equal; ZeRO-2: 6.7e-6 and 5.2e-5 measured). Left at the step's scale, the next backward
    would be scaled twice; unset, the dense norm would be the scale times too large and clipped. With
    parallel.reduce_dtype=fp16 (ZeRO's communication_data_type) ZeRO-2 tracks the torch engine's fp16
    sums the same way (3.1e-6 and 8.7e-5)."""
    args = [*SMOKE, "steps=16", f"logging.out_dir={tmp_path}", "optim.grad_clip=1.0", "parallel.mixed_precision=fp16",
            "parallel.initial_scale_power=18", "parallel.loss_scale_window=3"]
    r16 = ["parallel.reduce_dtype=fp16"]
    # zero2_r16 also tunes ZeRO (parallel.zero_config): buckets of 1,000 elements, no contiguous gradients
    tuned = ["+parallel.zero_config.reduce_bucket_size=1e3", "+parallel.zero_config.contiguous_gradients=false"]
    runs = {"torch": [], "zero0": ["parallel.zero_stage=0"], "zero2": ["parallel.zero_stage=2"], "torch_r16": r16,
            "zero2_r16": ["parallel.zero_stage=2", *r16, *tuned]}
    for name, extra in runs.items():
        engine = ["parallel.engine=deepspeed"] if name.startswith("zero") else []
        torchrun(2, [*args, f"logging.run_name={name}", *engine, *extra], timeout=600)
    rows = {n: [r for r in read_metrics(tmp_path / n) if r["kind"] == "train"] for n in runs}
    for name, ref_name in (("zero0", "torch"), ("zero2", "torch"), ("zero2_r16", "torch_r16")):
        ref, got = rows[ref_name], rows[name]
        assert len(ref) == 16 and sum(r["overflow"] for r in ref) >= 3 and ref[-1]["loss"] < ref[0]["loss"] - 0.5
        assert [(r["loss_scale"], r["overflow"]) for r in got] == [(r["loss_scale"], r["overflow"]) for r in ref], name
        assert max(abs(a["loss"] - b["loss"]) for a, b in zip(ref, got)) < 1e-4, (name, ref, got)
        assert max(abs(a["grad_norm"] - b["grad_norm"]) for a, b in zip(ref, got) if not a["overflow"]) < 1e-3, name


DS_SCALER = """
import json, os, sys
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1], RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
import deepspeed, torch
from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler
deepspeed.init_distributed(dist_backend="gloo")  # its scaler asks for the rank
out = []
for h, consecutive, overflows in json.loads(sys.argv[2]):
    s = DynamicLossScaler(init_scale=2.0 ** 40, scale_window=10 ** 6, min_scale=1, delayed_shift=h,
                          consecutive_hysteresis=consecutive, dtype=torch.half)
    out.append([s.update_scale(o) or s.cur_scale for o in overflows])
print(json.dumps(out))
"""


@pytest.mark.slow
def test_loss_scale_hysteresis_halves_as_deepspeeds_own_scaler():
    """parallel.hysteresis and consecutive_hysteresis against DeepSpeed's DynamicLossScaler, on random
    overflow sequences: the same scale after every step. (Its first doubling comes one good step
    later than torch's GradScaler's and moesaic's, so the window is out of reach here;
    test_loss_scale.py checks that a doubling refills the hysteresis.)"""
    import random

    from moesaic.parallel.config import ParallelConfig
    from moesaic.trainer.loss_scale import LossScaler

    rng = random.Random(7)
    cases = [(h, c, [rng.random() < 0.5 for _ in range(60)]) for h, c in ((1, False), (2, False), (3, False),
                                                                             (2, True), (3, True))]
    proc = subprocess.run([sys.executable, "-c", DS_SCALER, str(free_port()), json.dumps(cases)], capture_output=True,
                          text=True, timeout=300, env=child_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    theirs = json.loads(proc.stdout.strip().splitlines()[-1])
    for (h, consecutive, overflows), expected in zip(cases, theirs):
        ours = LossScaler.from_config(ParallelConfig(mixed_precision="fp16", initial_scale_power=40,
                                                     loss_scale_window=10 ** 6, hysteresis=h,
                                                     consecutive_hysteresis=consecutive))
        seen = []
        for step, overflow in enumerate(overflows):
            ours.update(overflow, step)
            seen.append(ours.scale)
        assert seen == expected, (h, consecutive)
        assert len(set(seen)) > 2, (h, consecutive)  # the scale moved


@pytest.mark.slow
@pytest.mark.dist
def test_deepspeed_never_holds_an_expert():
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone", str(WORKERS / "ds_engine.py"), "1", "2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=child_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    reports = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert [r["stage"] for r in reports] == [1, 2]  # ZeRO-1 and ZeRO-2, in one launch
    for report in reports:
        assert report["experts_in_engine_module"] == 0 and report["experts_in_deepspeed_optimizer"] == 0, report
        assert report["engine_module_params"] > 0 and report["expert_grads_present"], report
        assert report["dense_equal_across_ranks"], report
    tuned = {"reduce_bucket_size": 1000, "allgather_bucket_size": 2000, "contiguous_gradients": False}
    assert reports[1]["zero"] == tuned and reports[0]["zero"] != tuned  # parallel.zero_config reached ZeRO-2


NAN_CASES = [("torch", 0, "logits", "skip"), ("torch", 0, "expert_grad", "skip"), ("deepspeed", 0, "logits", "skip"),
             ("deepspeed", 1, "logits", "skip"), ("deepspeed", 2, "expert_grad", "skip"),
             ("deepspeed-moe", 0, "expert_grad", "skip"), ("deepspeed-moe", 2, "expert_grad", "skip"),
             ("deepspeed-moe", 2, "expert_grad", "stop")]
def nan_report(case: tuple) -> dict:
    """One case's report from the one launch of nan_skip.py that runs them all (the ranks' start,
    DeepSpeed's import included, is most of a case's time)."""
    proc = launch_once("nan", [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", 2, "--standalone",
                               WORKERS / "nan_skip.py", *(x for c in NAN_CASES for x in c)])
    reports = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    mine = [r for r in reports if r["case"] == list(case)]
    assert mine, f"no report for {case} (launch exit {proc.returncode}):\n{proc.stderr[-3000:]}"
    return mine[0]


@pytest.mark.slow
@pytest.mark.dist
@pytest.mark.parametrize("engine,stage,fault,on_nan", NAN_CASES,
                         ids=["launchnan-" + "-".join(map(str, c)) for c in NAN_CASES])
def test_a_skipped_step_changes_nothing_and_the_schedules_move_on(engine, stage, fault, on_nan):
    """on_nan=skip, with one rank's logits or one expert's gradient made NaN at the third of 5 steps:
    every rank skips that step; the parameters, both AdamW states and their step counts are unchanged;
    the dense and the expert learning rates follow the schedule by optimizer step; later steps train.
    Before the fix, DeepSpeed at stage 0 applied the NaN update, at ZeRO 1/2 it held the dense
    schedule back one step, and with finite dense gradients (an expert's NaN) ZeRO applied the step.
    DeepSpeed-MoE (model.moe_impl=deepspeed), whose engine owns the experts too: at stage 0 it applied
    an expert's NaN gradient, and with on_nan=stop the run went on past a step that ZeRO-2 skipped."""
    report = nan_report((engine, stage, fault, on_nan))
    assert report["params_unchanged"] and report["state_unchanged"] and report["state_entries"] > 0
    if on_nan == "stop":  # every rank stops at the poisoned step, nothing changed
        assert report["stopped"]["step"] == 2 and "non-finite" in report["stopped"]["message"], report
        assert report["skipped"] == [False, False, True]
        return
    assert report["skipped"] == [False, False, True, False, False] and report["stopped"] is None
    assert report["finite_after"]
    for lrs, expected in zip(report["lrs"], report["expected_lrs"]):
        assert lrs == pytest.approx([expected] * len(lrs), rel=1e-12), report["lrs"]


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


def test_deepspeed_moe_with_checkpoints_is_refused_by_name():
    from moesaic.parallel.config import ParallelConfig
    from moesaic.trainer.config import CheckpointConfig, TrainConfig
    from moesaic.trainer.model import ModelConfig

    with pytest.raises(ValueError, match=r"with model.moe_impl \(deepspeed\): DeepSpeed-MoE's layer is the baseline"):
        TrainConfig(model=ModelConfig(moe_impl="deepspeed"), parallel=ParallelConfig(engine="deepspeed"),
                    checkpoint=CheckpointConfig(every_n_steps=5))


def _params(run, ranks: int = 2) -> list[dict]:
    import torch

    return [torch.load(run / f"params-rank{r}.pt", weights_only=True) for r in range(ranks)]


def _max_diff(a: list[dict], b: list[dict]) -> float:
    return max(float((x[k] - y[k]).abs().max()) for x, y in zip(a, b) for k in x)


@pytest.mark.slow
@pytest.mark.dist
@pytest.mark.parametrize("stage", [0, 1])
def test_deepspeed_resume_is_exact_and_its_checkpoint_resumes_under_the_torch_engine(tmp_path, stage):
    """ZeRO-1 holds each rank's slice of the dense AdamW moments (stage 0: all of them). A checkpoint
    gathers them whole, under the torch engine's names: resumed under DeepSpeed, or under the torch
    engine, the run goes on as if it had never stopped (losses and every rank's parameters)."""
    base = [*SMOKE, f"logging.out_dir={tmp_path}", "logging.dump_rank_params=true", "parallel.engine=deepspeed",
            f"parallel.zero_stage={stage}"]
    torchrun(2, [*base, "logging.run_name=full", "checkpoint.every_n_steps=5"], timeout=600)
    step5 = tmp_path / "full/checkpoints/step-00000005"  # where a run stopped at step 5 resumes
    flat = flat_checkpoint(step5)  # both of ZeRO's groups: with weight decay, and without (norms)
    assert all(flat[k].abs().max() > 0 for k in ("optim.model.embed.weight.exp_avg", "optim.model.layers.0.ffn_norm.weight.exp_avg_sq"))
    torchrun(2, [*base, "logging.run_name=part", f"checkpoint.resume={step5}"], timeout=600)
    torchrun(2, [*SMOKE, f"logging.out_dir={tmp_path}", "logging.dump_rank_params=true", "logging.run_name=torch",
                 f"checkpoint.resume={step5}"], timeout=600)
    full = train_losses(tmp_path / "full")
    for run in ("part", "torch"):
        losses = train_losses(tmp_path / run)
        assert max(abs(full[s] - losses[s]) for s in range(6, 11)) < 1e-6, (run, full, losses)
        assert _max_diff(_params(tmp_path / "full"), _params(tmp_path / run)) < 1e-6, run


@pytest.mark.slow
@pytest.mark.dist
def test_zero2_at_4_ranks_matches_the_torch_engine_and_resumes_bit_exactly(tmp_path):
    """4 ranks, ZeRO-2, clipping on: every rank's parameters after 10 steps within float rounding of
    the torch engine's (6e-8 measured), and a run stopped at step 5 and resumed ends bit-identical to
    the uninterrupted one (ZeRO has no DDP buckets to rebuild)."""
    base = [*SMOKE, f"logging.out_dir={tmp_path}", "logging.dump_rank_params=true", "optim.grad_clip=1.0"]
    zero2 = [*base, "parallel.engine=deepspeed", "parallel.zero_stage=2"]
    torchrun(4, [*base, "logging.run_name=torch"], timeout=600)
    torchrun(4, [*zero2, "logging.run_name=full", "checkpoint.every_n_steps=5"], timeout=600)
    torchrun(4, [*zero2, "logging.run_name=part", f"checkpoint.resume={tmp_path}/full/checkpoints/step-00000005"],
             timeout=600)
    full = _params(tmp_path / "full", 4)
    assert _max_diff(_params(tmp_path / "torch", 4), full) < 1e-6
    assert _max_diff(full, _params(tmp_path / "part", 4)) == 0.0
    a, b = train_losses(tmp_path / "full"), train_losses(tmp_path / "part")
    assert sorted(b) == list(range(6, 11)) and all(a[s] == b[s] for s in b)


@pytest.mark.slow
@pytest.mark.dist
def test_a_torch_engine_checkpoint_moves_into_zero2_at_another_world_size_and_back(tmp_path):
    """A torch-engine checkpoint (2 ranks) loaded into ZeRO-2 at 4 ranks and written again holds the
    same tensors; resumed under ZeRO-2 at 2 ranks, the run goes on as the torch engine's does (with
    gradient accumulation, where DeepSpeed counts micro-steps)."""
    base = [*SMOKE, f"logging.out_dir={tmp_path}", "logging.dump_rank_params=true", "grad_accum_steps=2"]
    zero2 = ["parallel.engine=deepspeed", "parallel.zero_stage=2"]
    torchrun(2, [*base, "logging.run_name=torch", "checkpoint.every_n_steps=5"], timeout=600)
    step5 = tmp_path / "torch/checkpoints/step-00000005"
    torchrun(4, [*base, *zero2, "logging.run_name=w4", "stop_at_step=5", f"checkpoint.resume={step5}"], timeout=600)
    a, b = flat_checkpoint(step5), flat_checkpoint(tmp_path / "w4/checkpoints/step-00000005")
    assert sorted(a) == sorted(b) and any(k.startswith("optim.model.") for k in a)
    assert max(float((a[k].float() - b[k].float()).abs().max()) for k in a) == 0.0
    torchrun(2, [*base, *zero2, "logging.run_name=part", f"checkpoint.resume={step5}"], timeout=600)
    full, resumed = train_losses(tmp_path / "torch"), train_losses(tmp_path / "part")
    assert max(abs(full[s] - resumed[s]) for s in range(6, 11)) < 1e-6, (full, resumed)
    assert _max_diff(_params(tmp_path / "torch"), _params(tmp_path / "part")) < 1e-6


@pytest.mark.slow
@pytest.mark.dist
@pytest.mark.parametrize("world,eps", [(2, [2]), (4, [4, 2])])
def test_deepspeed_moe_block_matches_reference(world, eps):
    """model.moe_impl=deepspeed: DeepSpeed-MoE's layer with the weights moesaic copied into it computes
    the one-process reference (renormalised top-k), and its expert gradients sum over its EP group.
    The ep sizes of one world size run in one launch."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world), "--standalone",
           str(WORKERS / "ds_moe.py"), *map(str, eps)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=child_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    reports = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert [(r["world"], r["ep"]) for r in reports] == [(world, ep) for ep in eps]
    for r in reports:
        assert r["ids_equal"] and r["counts_equal"], r
        assert r["out_diff"] < 1e-5 and r["gate_grad_diff"] < 1e-5 and r["expert_grad_diff"] < 1e-5, r
        assert r["expert_grad_norm"] > 1e-3 and r["a2a_bytes"] > 0, r


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
    ({"parallel": {"engine": "deepspeed"}, "router": {"route_scale": 2.5}}, r"model.moe.router.route_scale \(2.5\) must be 1"),
    ({"parallel": {"engine": "deepspeed"}, "router": {"num_expert_groups": 4, "num_limited_groups": 2}},
     r"model.moe.router.num_expert_groups \(4\) must be 0"),
    ({"parallel": {"engine": "deepspeed"}, "router": {"aux_loss_scope": "sequence"}},
     r"model.moe.router.aux_loss_scope \('sequence'\) must be 'micro_batch'"),
])
def test_deepspeed_moe_refuses_what_it_cannot_do(override, field):
    from moesaic.parallel.config import ParallelConfig
    from moesaic.placement.config import PlacementConfig
    from moesaic.trainer.config import TrainConfig
    from moesaic.trainer.model import ModelConfig

    model = ModelConfig(moe_impl="deepspeed", moe={"capacity_factor": override.get("capacity", 0.0),
                                                   "router": override.get("router", {})})
    with pytest.raises(ValueError, match=field + r".* with model.moe_impl \(deepspeed\)"):
        TrainConfig(model=model, parallel=ParallelConfig(**override["parallel"]),
                    placement=PlacementConfig(plan=override.get("plan", "contiguous")))


def test_unknown_moe_impl_is_refused():
    from moesaic.trainer.model import ModelConfig

    with pytest.raises(ValueError, match=r"model.moe_impl \('tutel'\) must be one of 'moesaic', 'deepspeed'"):
        ModelConfig(moe_impl="tutel")
