"""Tier 4: parallel.dense_sharding=fsdp in the trainer (FSDP2 over the dense parameters): the
single-process reference, compile and activation checkpointing, the memory it holds, and
checkpoints that move between FSDP and DDP layouts and resume bit-exactly. The per-step match of
every parameter under expert parallelism and FSSDP is in test_expert_parallel.py (`--fsdp` cases)."""

import json

import pytest
import torch

from conftest import flat_checkpoint, read_metrics, torchrun, train_losses

# the aux and z losses are per rank's micro-batch (as DDP optimises them), so a world-1 run of the
# same global batch computes another loss: off here, on in test_expert_parallel's reference.
# AdamW's eps 1e-6 as there (shared/DESIGN.md: eps 1e-8 lets a rounding-level gradient flip a step)
REF = ["experiment=smoke", "logging.log_every=1", "eval_every=0", "steps=3", "optim.warmup_steps=1",
       "optim.grad_clip=1.0", "optim.eps=1e-6", "logging.dump_rank_params=true",
       "model.moe.router.aux_loss_coef=0", "model.moe.router.z_loss_coef=0"]


def _single(args, tmp_path):
    import subprocess
    import sys

    from conftest import child_env

    proc = subprocess.run([sys.executable, "-m", "moesaic.trainer", *args], capture_output=True, text=True,
                          timeout=300, env=child_env(), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]


def _train(run):
    return [r for r in read_metrics(run) if r["kind"] == "train"]


@pytest.mark.slow
@pytest.mark.dist
def test_whole_model_fsdp_matches_the_single_process_run(tmp_path):
    """Without expert parallelism FSDP shards every parameter, experts included (torchtitan's FSDP).
    2 ranks of batch 4 against one process of batch 8: the same losses, gradient norms and, after 3
    AdamW steps, parameters (measured: 2.4e-7, 4.8e-7, 1.7e-7), eager, and compiled with each block
    recomputed; each rank holds half of the parameters and AdamW moments."""
    out = f"logging.out_dir={tmp_path}"
    _single([*REF, out, "logging.run_name=single", "batch_size=8"], tmp_path)
    runs = {"eager": [], "compiled_recomputed": ["compile=true", "parallel.activation_checkpoint=full"]}
    for name, extra in runs.items():
        torchrun(2, [*REF, out, f"logging.run_name={name}", "batch_size=4", "parallel=ddp",
                     "parallel.dense_sharding=fsdp", *extra])
    ref, ref_params = _train(tmp_path / "single"), torch.load(tmp_path / "single/params-rank0.pt")
    one = json.loads((tmp_path / "single/summary.json").read_text())["dense_state_bytes_per_rank"][0]
    for name in runs:
        got = _train(tmp_path / name)
        assert len(got) == len(ref) == 3
        for a, b in zip(ref, got):
            assert abs(a["loss"] - b["loss"]) < 1e-5 and abs(a["grad_norm"] - b["grad_norm"]) < 1e-5, (name, a, b)
        for rank in range(2):  # gathered whole at the end of the run: equal on both ranks
            params = torch.load(tmp_path / name / f"params-rank{rank}.pt")
            assert params.keys() == ref_params.keys()
            diff = max(float((params[k] - ref_params[k]).abs().max()) for k in ref_params)
            assert diff < 1e-6, (name, rank, diff)
        summary = json.loads((tmp_path / name / "summary.json").read_text())
        assert summary["dense_sharding"] == "fsdp"
        for held in summary["dense_state_bytes_per_rank"]:  # the smoke model's dims divide by 2: no padding
            assert held["params"] * 2 == one["params"] and held["optimizer"] * 2 == one["optimizer"], (held, one)
    assert json.loads((tmp_path / "compiled_recomputed/summary.json").read_text())["compile"]["graphs"] >= 1


@pytest.mark.slow
@pytest.mark.dist
def test_fsdp_checkpoints_resume_exactly_and_move_to_ddp_and_back(tmp_path):
    """4 ranks, FSSDP experts and FSDP dense parameters: a run resumed from step 10 gives the
    uninterrupted run's losses bit for bit (the step-10 checkpoint is written right after an
    evaluation, whose forward leaves FSDP's root gathered). The same checkpoint rewritten by DDP at
    2 ranks, and that one rewritten at 4 ranks by HSDP (2 copies, each sharded over 2 ranks) under
    expert parallelism, hold the same tensors: DCP reshards the dense DTensors to any layout."""
    base = ["experiment=smoke", "logging.log_every=1", "eval_every=5", "steps=20", f"logging.out_dir={tmp_path}",
            "checkpoint.every_n_steps=10", "parallel=fssdp", "parallel.dense_sharding=fsdp"]
    torchrun(4, [*base, "logging.run_name=straight"])
    step10 = tmp_path / "straight/checkpoints/step-00000010"
    torchrun(4, [*base, "logging.run_name=resumed", f"checkpoint.resume={step10}"])
    a, b = train_losses(tmp_path / "straight"), train_losses(tmp_path / "resumed")
    assert sorted(b) == list(range(11, 21)) and [a[s] for s in b] == [b[s] for s in b]  # bit-identical
    src = flat_checkpoint(step10)
    assert any(k.startswith("optim.model.layers.") for k in src)
    moves = [("ddp2", 2, ["parallel=fssdp", "parallel.dense_sharding=ddp", "batch_size=8"], step10),
             ("hsdp4", 4, ["parallel=ep", "parallel.ep_size=2", "parallel.dense_sharding=fsdp", "parallel.dense_shard_size=2"],
              tmp_path / "ck-ddp2/step-00000010")]
    for name, nproc, par, source in moves:  # resume and stop at once: the checkpoint in the new layout
        torchrun(nproc, [*base, f"logging.run_name={name}", *par, f"checkpoint.resume={source}", "stop_at_step=10",
                         f"checkpoint.dir={tmp_path / ('ck-' + name)}"])
        moved = flat_checkpoint(tmp_path / f"ck-{name}/step-00000010")
        assert moved.keys() == src.keys()
        for k in src:
            assert torch.equal(src[k], moved[k]), (name, k)


@pytest.mark.slow
@pytest.mark.dist
def test_fsdp_bf16_weights_train_and_resume_exactly(tmp_path):
    """parallel.dense_gather_dtype=bf16 (FSDP2's mixed precision) in the trainer, 2 ranks, FSSDP
    experts: it learns, the checkpoint holds the fp32 shards (an evaluation right before it leaves
    the root gathered in bf16), and a run resumed from step 6 gives the uninterrupted run's losses
    bit for bit."""
    base = ["experiment=smoke", "logging.log_every=1", "eval_every=3", "steps=10", f"logging.out_dir={tmp_path}",
            "checkpoint.every_n_steps=6", "parallel=fssdp", "parallel.dense_sharding=fsdp",
            "parallel.mixed_precision=bf16", "parallel.dense_gather_dtype=bf16"]
    torchrun(2, [*base, "logging.run_name=straight"])
    step6 = tmp_path / "straight/checkpoints/step-00000006"
    torchrun(2, [*base, "logging.run_name=resumed", f"checkpoint.resume={step6}"])
    a, b = train_losses(tmp_path / "straight"), train_losses(tmp_path / "resumed")
    assert sorted(b) == list(range(7, 11)) and [a[s] for s in b] == [b[s] for s in b]  # bit-identical
    assert a[10] < a[1] - 0.3, a
    saved = flat_checkpoint(step6)
    dense = {k: v for k, v in saved.items() if k.startswith("model.") and ".experts." not in k and v.is_floating_point()}
    assert dense and all(v.dtype == torch.float32 for v in dense.values()), {k: v.dtype for k, v in dense.items()}
    summary = json.loads((tmp_path / "straight/summary.json").read_text())
    assert summary["config"]["parallel"]["dense_gather_dtype"] == "bf16" and summary["dense_sharding"] == "fsdp"
