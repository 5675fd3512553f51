"""Tier 2, in half precision: bf16 and fp16 autocast, half-precision gathers and gradient sums,
under expert parallelism and FSSDP against the single-process reference (the cases: tests/ep_cases.py)."""

import json

import pytest
import torch

from conftest import read_metrics, torchrun
from ep_cases import FSDP16, GATHER, HALF, REDUCE16, _check_fsdp, _check_meta, cases, ep_report


@pytest.mark.slow
@pytest.mark.dist
@pytest.mark.parametrize("nproc,args", **cases(HALF))
def test_half_autocast_steps_track_single_process(tmp_path_factory, nproc, args):
    """parallel.mixed_precision=bf16 or fp16: both sides under autocast, fp32 master weights; fp16
    with a static loss scale, which the clipping pass divides out. Half precision rounds differently
    for one rank's batch than for the whole batch (a token may route differently), so the bounds are
    bf16's, not fp32's: observed loss 5e-5, norm 2e-4 relative, parameters 8e-4 after one AdamW step
    (lr 1e-2) and 9e-3 after three (fp16's 10 mantissa bits land well inside). Without the unscaling
    the norm would be the scale (1024, 65536) times the reference's."""
    report = ep_report(tmp_path_factory, nproc, args)
    _check_meta(report, args)
    _check_fsdp(report, args)
    half = "torch.float16" if "--fp16" in args else "torch.bfloat16"
    assert report["expert_input_dtypes"] == [half] and report["param_dtypes"] == ["torch.float32"]
    if "fssdp" in args and "--gather-dtype" not in args:  # parallel.gather_dtype=auto: the autocast dtype
        assert report["expert_weight_dtypes"] == [half], report["expert_weight_dtypes"]
    steps = report["steps"]
    assert len(steps) == 3
    for s in steps:
        assert abs(s["loss"] - s["ref_loss"]) < 3e-4, s
        assert abs(s["norm"] - s["ref_norm"]) < 1e-3 * s["ref_norm"], s
    assert steps[0]["max_param_diff"] < 5e-3 and steps[-1]["max_param_diff"] < 3e-2, steps


@pytest.mark.slow
@pytest.mark.dist
@pytest.mark.parametrize("nproc,args", **cases(REDUCE16))
def test_half_gradient_reduction_sums_in_half(tmp_path_factory, nproc, args):
    """parallel.reduce_dtype=bf16 (and fp16, on fp16 autocast's loss-scaled gradients: each rounding
    2**-12 of the magnitude, or 2**-25 below fp16's smallest normal number, and 2**-7 allowed; the
    rest as for bf16): DDP's all-reduce, FSDP's reduce-scatter (and HSDP's all-reduce), the resident experts' replica and expert-data-parallel sums, and FSSDP's gradients on their way
    to the owners (summed there in fp32) and across expert domains run in bf16. After the first
    step's reduction every such gradient fits a bf16 exactly (the world size is a power of 2; under
    fp32 sums about 2**-16 of them do), and it equals the reference's bf16 sum of the ranks' bf16
    gradients: bit for bit for the dense ones at 2 ranks (one sum, whichever order), and within a few
    of bf16's roundings (2**-9 of the summands' magnitude each; 0.0145 measured, 2**-5 allowed) where
    4 ranks add in the ring's order, or a replica's partial sums mix ranks. A lost or doubled rank's
    share would be about 1. Losses and norms then track the reference within bf16's bounds, and
    every copy of an expert stays the same."""
    report = ep_report(tmp_path_factory, nproc, args)
    _check_fsdp(report, args)
    fp16 = "--reduce-fp16" in args  # fp16 sums of loss-scaled gradients: 11 significant bits, not 8
    shares = report["reduced_grads_in_fp16" if fp16 else "reduced_grads_in_bf16"]
    assert shares["dense"] == 1.0, shares
    ep = args[args.index("--ep") + 1]
    shared_experts = ep < nproc or ("--sharding" not in args and "replicated" in args)
    assert shares["experts"] == (1.0 if shared_experts else None), shares
    if "--sharding" in args:  # FSSDP: fp32 weights out, bf16 gradients back (once, or twice with re-gathers)
        gathers = 1 if "--no-remat" in args else 2
        assert all(s["gather_bytes"] == gathers * 2 * s["reduce_scatter_bytes"] > 0 for s in report["steps"]), report["steps"]
    if nproc == 2:  # one sum of two roundings, whichever order
        assert report["dense_grad_err_over_magnitude"] == 0, report
    bound = 2**-7 if fp16 else 2**-5  # fp16: 3.1e-3 measured (FSDP2's fp16 reduce-scatter at 4 ranks)
    assert report["grad_err_over_magnitude"] < bound, (report["grad_err_over_magnitude"], report["grad_err_worst"])
    # fp16: the forward runs under fp16 autocast too (the bf16 cases' in fp32), whose rounding differs
    # for one rank's batch; AdamW's first steps amplify it at near-zero gradients: 2.0e-3 measured
    norm_bound = 5e-3 if fp16 else 2e-3
    for s in report["steps"]:
        assert abs(s["loss"] - s["ref_loss"]) < 3e-4, s
        assert abs(s["norm"] - s["ref_norm"]) < norm_bound * s["ref_norm"], s
        assert s["replica_diff"] == 0, s


@pytest.mark.slow
@pytest.mark.dist
@pytest.mark.parametrize("nproc,args", **cases(GATHER))
def test_half_gathers_equal_fp32_gathers_bit_for_bit(tmp_path_factory, nproc, args):
    """parallel.gather_dtype=auto under bf16 (fp16) autocast: FSSDP's weights travel and stay
    materialized in bf16 (fp16), and their gradients travel back so. The layer computes in that dtype
    under autocast either way, a half-precision GEMM's weight gradient is half precision, and the
    owners sum in fp32: so every step's loss, gradient norm and parameters equal those of fp32
    gathers exactly, for half of both collectives' bytes."""
    bf16 = ep_report(tmp_path_factory, nproc, args)
    fp32 = ep_report(tmp_path_factory, nproc, [*args, "--gather-dtype", "fp32"])
    half = "torch.float16" if "--fp16" in args else "torch.bfloat16"
    assert bf16["expert_weight_dtypes"] == [half], bf16["expert_weight_dtypes"]
    assert fp32["expert_weight_dtypes"] == ["torch.float32"], fp32["expert_weight_dtypes"]
    assert bf16["param_dtypes"] == fp32["param_dtypes"] == ["torch.float32"]  # the owned master weights
    assert len(bf16["steps"]) == len(fp32["steps"]) == 3
    for b, f in zip(bf16["steps"], fp32["steps"]):
        assert (b["param_sha"], b["loss"], b["norm"]) == (f["param_sha"], f["loss"], f["norm"]), (b, f)
        assert 2 * b["gather_bytes"] == f["gather_bytes"] > 0 and 2 * b["reduce_scatter_bytes"] == f["reduce_scatter_bytes"] > 0


@pytest.mark.slow
@pytest.mark.dist
@pytest.mark.parametrize("nproc,args", **cases(FSDP16))
def test_fsdp_bf16_weights_match_a_bf16_weight_reference(tmp_path_factory, nproc, args):
    """parallel.dense_gather_dtype=bf16: the dense modules compute with bf16 weights on a bf16
    residual stream, their fp32 shards take the fp32 sum of the ranks' gradients. Where every rank
    computes its own tokens' experts (ep 1), the first step equals the reference's to fp32's last
    bits (the clipping norm's summation order); a bf16-autocast reference with fp32 weights is
    1e-3 away. Later steps, and expert parallelism (whose experts' gradients are one bf16 GEMM over
    every rank's tokens), stay within bf16's bounds: one ulp of a master weight can move its bf16
    copy, which AdamW then amplifies."""
    report = ep_report(tmp_path_factory, nproc, args)
    _check_meta(report, args)
    _check_fsdp(report, args)
    assert report["dense_compute_dtypes"] == ["input torch.bfloat16", "weight torch.bfloat16"], report["dense_compute_dtypes"]
    assert report["param_dtypes"] == ["torch.float32"]  # the fp32 shards (and experts)
    first, *rest = report["steps"]
    if args[args.index("--ep") + 1] == 1:
        assert abs(first["loss"] - first["ref_loss"]) < 1e-6 and first["max_param_diff"] < 1e-6, first
    assert len(rest) == 2 and all(abs(s["loss"] - s["ref_loss"]) < 3e-4 and s["max_param_diff"] < 3e-2 for s in rest), rest


@pytest.mark.slow
@pytest.mark.dist
def test_trainer_gathers_bf16_under_bf16_autocast(tmp_path):
    """The trainer's wiring of parallel.gather_dtype: a bf16 run of FSSDP whose owners are not the
    computing ranks (so every layer gathers), with a shared expert, full activation checkpointing
    (recomputed layers use the re-gathered weights), gradient accumulation and evaluation. With
    gather_dtype=auto it gathers bf16: the losses and every rank's parameters equal those of fp32
    gathers exactly, for half the bytes of both FSSDP collectives."""
    runs = {}
    for gather in ("auto", "fp32"):
        torchrun(2, ["experiment=smoke", "parallel=fssdp", "parallel.ep_size=2", "parallel.mixed_precision=bf16",
                     f"parallel.gather_dtype={gather}", "placement.plan=round_robin", "placement.align_owners=false",
                     "model.moe.num_shared_experts=1", "parallel.activation_checkpoint=full", "grad_accum_steps=2",
                     "steps=6", "eval_every=3", "eval_batches=2", "logging.log_every=1", "logging.dump_rank_params=true",
                     f"logging.out_dir={tmp_path}", f"logging.run_name={gather}"])
        run = tmp_path / gather
        train = [r for r in read_metrics(run) if r["kind"] == "train"]
        runs[gather] = {"losses": [r["loss"] for r in train], "val": [r["val_loss"] for r in read_metrics(run) if r["kind"] == "eval"],
                        "gather": sum(r["expert_gather_bytes"] for r in train), "grad": sum(r["expert_grad_bytes"] for r in train),
                        "summary": json.loads((run / "summary.json").read_text()),
                        "params": [torch.load(run / f"params-rank{r}.pt", weights_only=True) for r in range(2)]}
    bf16, fp32 = runs["auto"], runs["fp32"]
    assert bf16["summary"]["expert_gather_dtype"] == "bfloat16" and fp32["summary"]["expert_gather_dtype"] == "float32"
    assert len(bf16["losses"]) == 6 and bf16["losses"] == fp32["losses"] and len(bf16["val"]) == 2 and bf16["val"] == fp32["val"]
    assert 2 * bf16["gather"] == fp32["gather"] > 0 and 2 * bf16["grad"] == fp32["grad"] > 0, (bf16, fp32)
    for a, b in zip(bf16["params"], fp32["params"]):
        assert a.keys() == b.keys() and all(a[k].dtype == torch.float32 and torch.equal(a[k], b[k]) for k in a)


def _train(tmp_path, name: str, *extra: str) -> dict:
    """2 ranks, bf16, gradient accumulation and evaluations: the losses, the evaluations, what the first
    forward kept (`logging.count_kept`) and every rank's parameters."""
    torchrun(2, ["experiment=smoke", "parallel.mixed_precision=bf16", "grad_accum_steps=2", "steps=4",
                 "optim.warmup_steps=1", "eval_every=2", "eval_batches=2", "logging.log_every=1",
                 "logging.dump_rank_params=true", "logging.count_kept=true", f"logging.out_dir={tmp_path}",
                 f"logging.run_name={name}", *extra])
    run = tmp_path / name
    metrics = read_metrics(run)
    return {"losses": [r["loss"] for r in metrics if r["kind"] == "train"],
            "val": [r["val_loss"] for r in metrics if r["kind"] == "eval"],
            "kept": json.loads((run / "summary.json").read_text())["kept_for_backward_per_rank"],
            "params": [torch.load(run / f"params-rank{r}.pt", weights_only=True) for r in range(2)]}


def _same_training(a: dict, b: dict) -> None:
    assert len(a["losses"]) == 4 and a["losses"] == b["losses"] and a["val"] == b["val"]
    for x, y in zip(a["params"], b["params"]):
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


@pytest.mark.slow
@pytest.mark.dist
def test_in_place_layers_cast_their_weights_again_in_backward(tmp_path):
    """FSSDP computing in place (contiguous plan, owners aligned) under bf16 autocast: with
    reshard_after_forward (the default) each layer keeps no bf16 cast of its owned weights for
    backward and casts them again there (`recast_in_backward`); without it, it keeps them. The
    losses, the evaluations and every rank's parameters are the same bit for bit, with the
    recomputed activation (its hooks nest inside) and with full checkpointing (the block recomputed),
    and the first forward keeps the casts' bytes fewer."""
    for mode in (["parallel.recompute_moe_act=true"], ["parallel.activation_checkpoint=full"]):
        recast = _train(tmp_path, "recast" + mode[0][-4:], "parallel=fssdp", *mode)
        kept = _train(tmp_path, "kept" + mode[0][-4:], "parallel=fssdp", *mode, "parallel.reshard_after_forward=false")
        _same_training(recast, kept)
        owned = 3 * 32 * 32 * 2 * 2 * 2  # 2 of 4 experts (d 32, ffn 32) per rank, 2 layers, in bf16
        diff = [k["weight_copies"] - r["weight_copies"] for r, k in zip(recast["kept"], kept["kept"])]
        assert diff == ([owned] * 2 if mode[0].startswith("parallel.recompute") else [0, 0]), diff  # full: none kept


@pytest.mark.slow
@pytest.mark.dist
def test_resident_experts_cast_their_weights_again_in_backward(tmp_path):
    """parallel.recast_expert_weights under bf16 autocast: resident EP's held experts (with the
    recomputed activation), and every expert as an FSDP2 parameter, gathered in fp32 and resharded
    after forward, so that backward casts again from the weights that FSDP2 gathers again. The
    losses, the evaluations and every rank's parameters are those of keeping the casts, bit for bit,
    and the first forward keeps exactly the held experts' casts fewer."""
    expert = 3 * 32 * 32 * 2  # one expert (d 32, ffn 32) of one layer, in bf16
    for layout, held in ((["parallel=ep", "parallel.recompute_moe_act=true"], 2 * 2),  # 2 of 4 experts, 2 layers
                         (["parallel=ddp", "parallel.dense_sharding=fsdp", "parallel.activation_checkpoint=attention"],
                          4 * 2)):  # every expert
        recast = _train(tmp_path, "recast-" + layout[0][9:], *layout, "parallel.recast_expert_weights=true")
        kept = _train(tmp_path, "kept-" + layout[0][9:], *layout)
        _same_training(recast, kept)
        diff = [k["weight_copies"] - r["weight_copies"] for r, k in zip(recast["kept"], kept["kept"])]
        assert diff == [held * expert] * 2, (layout, diff)
