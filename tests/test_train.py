"""Tier 4: the real trainer, through Hydra and torchrun, on gloo ranks."""

import json
import subprocess
import sys

import pytest
import torch

from conftest import child_env, read_metrics, torchrun


@pytest.mark.slow
@pytest.mark.dist
def test_two_rank_training_learns_and_ranks_agree(tmp_path):
    torchrun(2, ["experiment=smoke", "parallel=ddp", f"logging.out_dir={tmp_path}", "logging.run_name=r2",
                 "logging.dump_rank_params=true"])
    run = tmp_path / "r2"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["backend"] == "gloo" and summary["steps"] == 30
    train = [r for r in read_metrics(run) if r["kind"] == "train"]
    assert [r["step"] for r in train] == [5, 10, 15, 20, 25, 30]
    assert train[-1]["loss"] < train[0]["loss"] - 0.5, [r["loss"] for r in train]
    assert all(len(r["load_max_over_mean"]) == 2 for r in train)
    # memory peaks so far, the largest rank's, in every record: never falling, within the run's own peaks
    rss = [r["peak_rss_mib"] for r in train]
    assert rss == sorted(rss) and 100 < rss[-1] <= max(summary["peak_rss_mib_per_rank"]), (rss, summary)
    assert "peak_gpu_mib" not in train[-1] and "mfu" not in train[-1] and summary["peak_tflops"] == 0
    assert summary["val_bpb"] < 8.0 and summary["unigram_bpb"] > 3.0
    p0 = torch.load(run / "params-rank0.pt", weights_only=True)
    p1 = torch.load(run / "params-rank1.pt", weights_only=True)
    assert p0.keys() == p1.keys() and len(p0) > 10
    init = _initial_params()
    for k in p0:
        assert torch.equal(p0[k], p1[k]), f"{k} differs across ranks"
    moved = [k for k in init if not torch.equal(p0[k], init[k])]
    assert moved == list(init)  # every parameter trained, experts included
    assert (run / "config.yaml").is_file()


def _initial_params():
    from hydra import compose, initialize_config_module

    from moesaic.trainer.config import register_configs, to_train_config
    from moesaic.trainer.model import Transformer

    register_configs()
    with initialize_config_module(config_module="moesaic.configs", version_base=None):
        cfg = to_train_config(compose(config_name="config", overrides=["experiment=smoke"]))
    torch.manual_seed(cfg.seed)
    model = Transformer(cfg.model)
    names = {n for n, _ in model.named_parameters()}
    # the state dict's names: experts' w13 appears as its halves w1 and w3, as the trainer dumps it
    return {k: v.detach().clone() for k, v in model.state_dict().items()
            if k in names or k.endswith(("w1_EFD", "w3_EFD"))}


def _run_single(args, tmp_path):
    return subprocess.run(
        [sys.executable, "-m", "moesaic.trainer", *args], capture_output=True, text=True, timeout=120,
        env=child_env(), cwd=tmp_path,
    )


@pytest.mark.slow
@pytest.mark.dist
def test_profile_steps_write_a_trace_of_those_steps_on_every_rank(tmp_path):
    """logging.profile_steps=[3,4]: each rank's Chrome trace holds steps 3 and 4 (not 2 or 5), the
    loop's phases and the collectives; the operator table is written beside it. A run that stops
    inside the window (stop_at_step=3 of [3,5]) writes what it recorded."""
    base = ["experiment=smoke", "steps=6", "optim.warmup_steps=1", f"logging.out_dir={tmp_path}"]
    torchrun(2, [*base, "logging.run_name=p", "logging.profile_steps=[3,4]"])
    torchrun(2, [*base, "logging.run_name=s", "logging.profile_steps=[3,5]", "stop_at_step=3"])
    for run, steps in (("p", {3, 4}), ("s", {3})):
        for rank in (0, 1):
            trace = json.loads((tmp_path / run / f"profile/rank{rank}.trace.json").read_text())
            names = {e.get("name", "") for e in trace["traceEvents"]}
            assert {n for n in names if n.startswith("moesaic.step.")} == {f"moesaic.step.{s}" for s in steps}
            assert {"moesaic.forward_backward", "moesaic.reduce_grads", "moesaic.clip", "moesaic.update",
                    "gloo:all_to_all", "gloo:all_reduce"} <= names, sorted(names)[:50]
            assert "moesaic.forward_backward" in (tmp_path / run / f"profile/rank{rank}.txt").read_text()


def test_wandb_online_without_a_login_is_named(tmp_path):
    """logging.wandb_mode=online where wandb has no credentials (no key, an empty home, no terminal)."""
    env = {k: v for k, v in child_env(HOME=str(tmp_path), WANDB_CONFIG_DIR=str(tmp_path / "wandb-config")).items()
           if k != "WANDB_API_KEY"}
    proc = subprocess.run([sys.executable, "-m", "moesaic.trainer", "experiment=smoke", "logging.wandb_mode=online",
                           f"logging.out_dir={tmp_path}"], capture_output=True, text=True, timeout=120, env=env,
                          cwd=tmp_path, stdin=subprocess.DEVNULL)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "moesaic-train: error: logging.wandb_mode ('online'): wandb could not start the run" in proc.stderr
    assert "logging.wandb_mode=offline" in proc.stderr and "Traceback" not in proc.stderr


def test_single_process_run_writes_the_run_directory(tmp_path):
    proc = _run_single(["experiment=smoke", "steps=10", "logging.run_name=one", f"logging.out_dir={tmp_path}"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "one" / "summary.json").read_text())
    for key in ("val_bpb", "unigram_bpb", "tokens_per_s", "wall_s", "peak_rss_mib_per_rank"):
        assert key in summary
    assert summary["world_size"] == 1
    kinds = [r["kind"] for r in read_metrics(tmp_path / "one")]
    assert kinds.count("eval") == 1 and kinds.count("train") == 2
    above = 100 * (summary["val_vs_unigram"] - 1)  # 10 steps: still above the unigram entropy
    assert above > 0 and f"({above:.1f}% above); summary" in proc.stdout + proc.stderr

def test_a_resumed_run_continues_its_metrics_and_its_wandb_run(tmp_path):
    """A run stopped at step 8 is resumed in its run directory from step 5's checkpoint: the records
    of steps 6-8 move to metrics.superseded.jsonl, metrics.jsonl holds each step once, and the
    offline wandb segments share one run id. A later run from step 0 in that directory starts a new
    wandb run and moves every earlier record aside."""
    run = tmp_path / "r"
    base = ["experiment=smoke", "steps=10", "logging.log_every=1", "logging.wandb_mode=offline",
            "logging.run_name=r", f"logging.out_dir={tmp_path}", "checkpoint.every_n_steps=5"]

    def train(*extra):
        proc = _run_single([*base, *extra], tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc.stdout + proc.stderr

    def steps(name):
        return [r["step"] for r in map(json.loads, (run / name).read_text().splitlines()) if r["kind"] == "train"]

    def wandb_ids():
        return [p.name.rsplit("-", 1)[1] for p in sorted((run / "wandb").glob("offline-run-*"))]

    train("stop_at_step=8")
    first = {r["step"]: r["loss"] for r in read_metrics(run) if r["kind"] == "train"}
    out = train(f"checkpoint.resume={run / 'checkpoints/step-00000005'}")
    assert "metrics.jsonl: 4 record(s) after step 5" in out, out[-2000:]  # steps 6-8, and step 8's checkpoint
    assert steps("metrics.jsonl") == list(range(1, 11)) and steps("metrics.superseded.jsonl") == [6, 7, 8]
    resumed = {r["step"]: r["loss"] for r in read_metrics(run) if r["kind"] == "train"}
    assert all(resumed[s] == first[s] for s in range(1, 9))  # one process: the resume is bit-exact
    ids = wandb_ids()
    assert len(ids) == 2 and ids[0] == ids[1] == (run / "wandb_run_id").read_text().strip()

    train("steps=3", "optim.warmup_steps=1")
    assert steps("metrics.jsonl") == [1, 2, 3] and steps("metrics.superseded.jsonl") == [6, 7, 8, *range(1, 11)]
    assert len(set(wandb_ids())) == 2 and wandb_ids()[-1] == (run / "wandb_run_id").read_text().strip() != ids[0]



def test_bf16_mixed_precision_trains_like_fp32(tmp_path):
    """parallel.mixed_precision=bf16: the same run's losses within bf16's reach of fp32's, and the
    parameters (the master weights) still fp32."""
    losses = {}
    for mp in ("none", "bf16"):
        proc = _run_single(["experiment=smoke", "steps=20", f"parallel.mixed_precision={mp}", f"logging.run_name={mp}",
                            f"logging.out_dir={tmp_path}", "logging.dump_rank_params=true"], tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
        losses[mp] = [r["loss"] for r in read_metrics(tmp_path / mp) if r["kind"] == "train"]
    assert len(losses["bf16"]) == 4 and losses["bf16"][-1] < losses["bf16"][0] - 0.3, losses
    assert max(abs(a - b) for a, b in zip(losses["none"], losses["bf16"])) < 0.01, losses  # observed 0.002
    assert losses["none"] != losses["bf16"]  # bf16 did run: its rounding shows
    params = torch.load(tmp_path / "bf16" / "params-rank0.pt", weights_only=True)
    assert {v.dtype for v in params.values()} == {torch.float32}


@pytest.mark.slow
@pytest.mark.dist
def test_compiled_expert_parallel_and_fssdp_equal_eager(tmp_path):
    """compile=true under expert parallelism and FSSDP at 2 ranks: the collectives run between
    compiled regions, and training matches the eager EP run. The model has 10 MoE layers and a
    random plan, different in every layer, as a solved plan is: no frame may reach dynamo's
    recompile limit (8), past which it would run eagerly. The FSSDP run dispatches once per node
    (2 nodes of 1 rank: parallel.node_dispatch, whose row counts depend on the data)."""
    from moesaic.parallel.doctor import make_plan

    plan = make_plan("random", 8, 2, seed=5, num_layers=10)
    assert len({tuple(layer) for layer in plan.placement}) == 10
    plan.save(tmp_path / "plan.json")
    model = ["model.num_layers=10", "model.moe.num_experts=8", f"placement.plan={tmp_path / 'plan.json'}"]
    runs = {}
    node = ["parallel.token_dedup=true", "parallel.node_dispatch=true", "parallel.gpus_per_node=1"]
    for name, args in (("ep-eager", ["parallel=ep"]), ("ep-compiled", ["parallel=ep", "compile=true"]),
                       ("fssdp-compiled", ["parallel=fssdp", "compile=true", *node])):
        torchrun(2, ["experiment=smoke", "steps=20", *model, *args, f"logging.run_name={name}",
                     f"logging.out_dir={tmp_path}"], timeout=400)
        runs[name] = json.loads((tmp_path / name / "summary.json").read_text())
    assert runs["ep-eager"]["compile"] is None
    for name in ("ep-compiled", "fssdp-compiled"):
        assert runs[name]["compile"]["graphs"] >= 1 and runs[name]["ep_size"] == 2
        assert runs[name]["compile"]["recompile_limit_hits"] == 0, runs[name]["compile"]
        assert abs(runs[name]["final_train_loss"] - runs["ep-eager"]["final_train_loss"]) < 1e-5, runs[name]["final_train_loss"]
        assert abs(runs[name]["val_bpb"] - runs["ep-eager"]["val_bpb"]) < 1e-5
    train = [r for r in read_metrics(tmp_path / "fssdp-compiled") if r["kind"] == "train"]
    assert train and all(r["a2a_inter_node_bytes"] == r["a2a_bytes"] > 0 for r in train)  # every row crossed


def test_compiled_training_equals_eager(tmp_path):
    """compile=true compiles each block and trains as eager does: fp32 to float rounding (the
    grouped GEMM stays eager there), bf16 within bf16's reach (compiled grouped GEMMs)."""
    runs = {}
    for mp in ("none", "bf16"):
        for comp in ("false", "true"):
            name = f"{mp}-{comp}"
            proc = _run_single(["experiment=smoke", "steps=20", f"compile={comp}", f"parallel.mixed_precision={mp}",
                                f"logging.run_name={name}", f"logging.out_dir={tmp_path}"], tmp_path)
            assert proc.returncode == 0, proc.stderr[-3000:]
            runs[name] = (json.loads((tmp_path / name / "summary.json").read_text()),
                          [r["loss"] for r in read_metrics(tmp_path / name) if r["kind"] == "train"])
    for mp, tol in (("none", 1e-5), ("bf16", 0.01)):
        (eager, l_eager), (comp, l_comp) = runs[f"{mp}-false"], runs[f"{mp}-true"]
        assert eager["compile"] is None and comp["compile"]["graphs"] >= 1, comp["compile"]
        assert len(l_comp) == 4 and max(abs(a - b) for a, b in zip(l_eager, l_comp)) < tol, (mp, l_eager, l_comp)
        assert abs(eager["val_bpb"] - comp["val_bpb"]) < tol


@pytest.mark.parametrize(
    "args,message",
    [
        (["model.moe.top_k=9"], "model.moe.top_k (9) must be <= model.moe.num_experts (4)"),
        (["logging.out_dir=/proc/no-such"], "logging.out_dir ('/proc/no-such') is not writable"),
        (["data=text", "data.path=/nowhere"], "data.path ('/nowhere') does not exist"),
        (["parallel.mixed_precision=fp8"], "parallel.mixed_precision ('fp8') must be one of 'none', 'bf16', 'fp16'"),
        (["parallel=deepspeed_moe", "model.moe_impl=deepspeed", "parallel.mixed_precision=fp16"],
         "parallel.mixed_precision ('fp16') must be 'none' or 'bf16' with model.moe_impl (deepspeed)"),
        (["parallel.loss_scale=1024"], "parallel.loss_scale (1024.0) must be 0 (dynamic), or > 0 (static) with "
                                       "parallel.mixed_precision=fp16, not 'none'"),
        (["parallel.mixed_precision=fp16", "parallel.loss_scale=-1"], "parallel.loss_scale (-1.0) must be 0 (dynamic)"),
        (["parallel.initial_scale_power=65"], "parallel.initial_scale_power (65) must be in 0..64"),
        (["parallel.loss_scale_window=0"], "parallel.loss_scale_window (0) must be >= 1"),
        (["parallel.min_loss_scale=0"], "parallel.min_loss_scale (0.0) must be > 0 and <= 2**parallel.initial_scale_power"),
        (["parallel.ddp_bucket_order=forward"], "parallel.ddp_bucket_order ('forward') must be one of 'fixed', 'backward'"),
        (["parallel.dense_sharding=zero3"], "parallel.dense_sharding ('zero3') must be one of 'ddp', 'fsdp'"),
        (["parallel.dense_sharding=fsdp", "parallel.engine=deepspeed"],
         "parallel.dense_sharding ('fsdp') needs parallel.engine (torch), not 'deepspeed'"),
        (["parallel.dense_sharding=fsdp", "parallel.dense_shard_size=3"],
         "parallel.dense_shard_size (3) must divide the world size (1)"),
        (["parallel.dense_shard_size=2"], "parallel.dense_shard_size (2) needs parallel.dense_sharding=fsdp, not 'ddp'"),
        (["parallel.gather_dtype=fp8"], "parallel.gather_dtype ('fp8') must be one of 'auto', 'fp32', 'bf16', 'fp16'"),
        (["parallel.gather_dtype=bf16"], "parallel.gather_dtype ('bf16') needs parallel.mixed_precision=bf16, not 'none'"),
        (["parallel.gather_dtype=fp16", "parallel.mixed_precision=bf16"],
         "parallel.gather_dtype ('fp16') needs parallel.mixed_precision=fp16, not 'bf16': the experts would compute "
         "bf16 tokens with fp16 weights"),
        (["parallel.dense_gather_dtype=fp16"], "parallel.dense_gather_dtype ('fp16') must be one of 'fp32', 'bf16'"),
        (["parallel.dense_gather_dtype=bf16", "parallel.mixed_precision=bf16"],
         "parallel.dense_gather_dtype ('bf16') needs parallel.dense_sharding=fsdp and parallel.mixed_precision=bf16, "
         "not 'ddp' and 'bf16'"),
        (["parallel.reduce_dtype=fp8"], "parallel.reduce_dtype ('fp8') must be one of 'fp32', 'bf16', 'fp16'"),
        (["parallel.reduce_dtype=fp16", "parallel.mixed_precision=bf16"],
         "parallel.reduce_dtype ('fp16') needs parallel.mixed_precision=fp16, not 'bf16': only loss-scaled gradients"),
        (["compile=true", "parallel=deepspeed_moe", "model.moe_impl=deepspeed"], "compile (True) with model.moe_impl ('deepspeed')"),
        (["parallel=ep", "parallel.recast_expert_weights=true"],
         "parallel.recast_expert_weights (True) needs parallel.mixed_precision=bf16 or fp16"),
        (["parallel.recast_expert_weights=true", "parallel.mixed_precision=bf16"],
         "parallel.recast_expert_weights (True) is for resident experts, not parallel.expert_sharding ('fssdp')"),
        (["parallel=ddp", "parallel.recast_expert_weights=true", "parallel.mixed_precision=bf16", "compile=true"],
         "parallel.recast_expert_weights (True) with compile (True): eager only"),
        (["parallel=deepspeed_moe", "model.moe_impl=deepspeed", "parallel.mixed_precision=bf16",
          "parallel.recast_expert_weights=true"], "parallel.recast_expert_weights (True) with model.moe_impl ('deepspeed')"),
        (["parallel=ddp", "placement.plan=round_robin"], "placement.plan ('round_robin') needs expert parallelism"),
        (["checkpoint.async_mode=yes"], "checkpoint.async_mode ('yes') must be 'disabled' or 'async'"),
        (["seed=-1"], "seed (-1) must be in [0, 2**63)"),
        (["logging.peak_tflops=-1"], "logging.peak_tflops (-1.0) must be >= 0 (0: the GPU's own, if known)"),
        (["model.moe_every=3"], "model.num_dense_layers (0) and model.moe_every (3) leave no MoE block of "
                                "model.num_layers (2): use parallel=ddp"),
        (["launcher.requeue=true"], "launcher.requeue (True) needs launcher=slurm or launcher=submitit_slurm, not launcher.name ('local')"),
    ],
)
def test_bad_input_exits_with_one_named_line(args, message, tmp_path):
    proc = _run_single(["experiment=smoke", *args], tmp_path)
    assert proc.returncode == 2
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("decay_type,at_80", [("cosine", 0.55), ("linear", 0.55), ("sqrt", 0.1 + 0.9 * (1 - 0.5 ** 0.5))])
def test_warmup_stable_decay_schedule(decay_type, at_80):
    """decay_ratio=0.2 of 100 steps after 10 of warmup: the rate rises to 1, stays there to step 82,
    then decays over the last 18 steps to min_lr_ratio (halfway at step 91); the default (cosine,
    decay_ratio 1) is the previous schedule, value for value."""
    import math

    from moesaic.trainer.config import OptimConfig
    from moesaic.trainer.optim import lr_lambda

    fn = lr_lambda(OptimConfig(warmup_steps=10, min_lr_ratio=0.1, decay_type=decay_type, decay_ratio=0.2), 100)
    assert [fn(s) for s in (0, 9)] == [0.1, 1.0] and all(fn(s) == 1.0 for s in range(10, 82))
    assert fn(82) == 1.0 and fn(91) == pytest.approx(at_80) and fn(100) == pytest.approx(0.1)
    assert all(fn(s) > fn(s + 1) for s in range(82, 100))
    cosine = lr_lambda(OptimConfig(warmup_steps=10, min_lr_ratio=0.1), 100)
    assert [cosine(s) for s in range(10, 100)] == [0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * ((s - 10) / 90))) for s in range(10, 100)]


@pytest.mark.parametrize("name,peak", [
    ("NVIDIA H100 80GB HBM3", 989.4), ("NVIDIA H100 PCIe", 756.0), ("NVIDIA H100 NVL", 835.5), ("NVIDIA H200", 989.4),
    ("NVIDIA GH200 480GB", 989.4), ("NVIDIA A100-SXM4-80GB", 312.0), ("NVIDIA A100 80GB PCIe", 312.0),
    ("NVIDIA L40S", 362.1), ("NVIDIA B200", 2250.0), ("AMD Instinct MI300X", 1307.4), ("NVIDIA L4", 0.0),
    ("Tesla V100-SXM2-16GB", 0.0),
])
def test_a_gpu_s_bf16_peak_comes_from_its_name(name, peak):
    """The MFU's default peak for bf16/fp16 runs (logging.peak_tflops=0), by torch.cuda.get_device_name."""
    from moesaic.trainer.step import device_peak_tflops

    assert device_peak_tflops(name) == peak


_BUCKET_VIEW = """
import sys, torch, torch.distributed as dist
from moesaic.parallel.dense_ddp import apply_ddp
from moesaic.trainer.model import ModelConfig, Transformer
from moesaic.parallel.moe import MoEConfig
dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
out = {}
for view in (True, False):
    torch.manual_seed(0)
    model = Transformer(ModelConfig(dim=32, num_layers=2, num_heads=2, max_seq_len=16, moe=MoEConfig(num_experts=4, top_k=2, ffn_dim=16)))
    ddp = apply_ddp(model, device=torch.device("cpu"), bucket_view=view)
    for _ in range(2):  # the second backward after zero_grad(set_to_none=True), as the trainer's steps
        model.zero_grad(set_to_none=True)
        x = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
        ddp(x, torch.roll(x, -1, 1)).loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    out[view] = (len({g.untyped_storage().data_ptr() for g in grads}), len(grads), [g.clone() for g in grads])
(sv, n, gv), (sc, _, gc) = out[True], out[False]
assert sc == n and sv < n, (sv, sc, n)  # copies: a storage per gradient; views: the buckets' storages
assert all(torch.equal(a, b) for a, b in zip(gv, gc))
print("ok", sv, sc, n)
"""


def test_ddp_gradients_are_views_into_its_buckets(tmp_path):
    """parallel.ddp_bucket_view (default true): after a step's zero_grad(set_to_none=True) the dense
    gradients are views into DDP's buckets (a few storages for all of them, not one each), and they
    equal DDP's copied gradients bit for bit."""
    proc = subprocess.run([sys.executable, "-c", _BUCKET_VIEW], capture_output=True, text=True, timeout=120,
                          env=child_env(), cwd=tmp_path)
    assert proc.returncode == 0 and proc.stdout.startswith("ok"), proc.stderr[-3000:]
