"""The cases of tests/workers/ep_train.py, which tests/test_expert_parallel.py (fp32) and
tests/test_mixed_precision.py (bf16, fp16) check: expert parallelism and FSSDP against the
single-process reference, on 2 and 4 gloo ranks. Every case of one world size runs in one launch."""

import json
import sys
from pathlib import Path

from conftest import launch_once

WORKERS = Path(__file__).resolve().parent / "workers"

# The ep_train cases: every case of one world size runs in one torchrun launch (`--cases`), since
# the ranks' start (4 s of imports each) is most of a case's time; each test reads its own case's
# report. Their ids start with `launch<N>-`, so that one pytest-xdist worker runs all the cases of
# a launch (tests/conftest.py).
ADAMW = [
    (2, ["--ep", 2, "--plan", "random", "--meta"]),  # built on meta as the trainer does (see _check_meta)
    (4, ["--ep", 4, "--plan", "random"]),
    (4, ["--ep", 2, "--plan", "replicated"]),  # expert data parallelism (edp 2) and replicas
    (4, ["--ep", 4, "--plan", "replicated", "--router", "sigmoid"]),  # aux-loss-free bias updates
    (4, ["--ep", 4, "--plan", "random", "--router", "grouped"]),  # group-limited routing, scaled weights
    (4, ["--ep", 4, "--plan", "replicated", "--num-experts", 16, "--dedup"]),  # each token once per rank
    (4, ["--ep", 2, "--plan", "random", "--dedup", "--micro", 2, "--meta"]),  # edp 2, accumulation
    # 2 nodes of 2 ranks: once per node across, once per rank within (DeepEP); grouped routing
    (4, ["--ep", 4, "--plan", "replicated", "--num-experts", 16, "--router", "grouped", "--node-dispatch", 2]),
    (4, ["--ep", 2, "--plan", "replicated", "--micro", 2]),  # gradient accumulation
    (2, ["--ep", 2, "--plan", "replicated", "--ffn-dim", 10]),  # experts computed by the loop (unaligned)
    (2, ["--ep", 2, "--plan", "random", "--fsdp"]),  # the dense parameters FSDP2-sharded (see _check_fsdp)
    (4, ["--ep", 2, "--plan", "replicated", "--micro", 2, "--fsdp", "--meta"]),  # edp 2, accumulation
    # aux_loss_scope=global_batch: f_e over every rank's tokens (and the step's micro-batches so far)
    (2, ["--ep", 2, "--plan", "random", "--global-balance"]),
    (4, ["--ep", 2, "--plan", "replicated", "--micro", 2, "--router", "sigmoid", "--global-balance"]),
]
HALF = [  # parallel.mixed_precision=bf16 (fp16: FP16 below)
    (2, ["--ep", 2, "--plan", "replicated", "--bf16"]),
    (4, ["--ep", 2, "--plan", "replicated", "--sharding", "fssdp", "--bf16", "--meta"]),
    (4, ["--ep", 4, "--plan", "replicated", "--sharding", "fssdp", "--bf16", "--fsdp"]),
    (2, ["--ep", 2, "--plan", "replicated", "--num-experts", 16, "--dedup", "--bf16"]),  # weights travel in float64
]
# FSSDP under bf16 autocast gathers bf16 weights (parallel.gather_dtype=auto); each case runs twice,
# the second time with fp32 gathers, which must give the same parameters bit for bit
GATHER = [
    (4, ["--ep", 2, "--plan", "replicated", "--sharding", "fssdp", "--bf16", "--micro", 2, "--change-plan-after", 2]),
    (2, ["--ep", 2, "--plan", "random", "--sharding", "fssdp", "--bf16", "--dedup", "--no-remat"]),
    # the loop path (unaligned ffn dim), owners moved after the first step (Hecate Alg. 2)
    (4, ["--ep", 4, "--plan", "replicated", "--sharding", "fssdp", "--bf16", "--ffn-dim", 10, "--reshard-after", 1]),
    (4, ["--ep", 4, "--plan", "random", "--sharding", "fssdp", "--fp16", "--loss-scale", 4096, "--micro", 2]),
]
# FSDP2's mixed precision for the dense parameters (parallel.dense_gather_dtype=bf16); the reference
# computes each rank's batch with bf16 copies of the weights and sums the fp32 casts of the gradients
FSDP16 = [
    (2, ["--ep", 1, "--plan", "contiguous", "--fsdp", "--bf16", "--fsdp-bf16"]),  # each rank its own experts too
    (4, ["--ep", 1, "--plan", "contiguous", "--fsdp", "--bf16", "--fsdp-bf16"]),
    (4, ["--ep", 2, "--plan", "replicated", "--sharding", "fssdp", "--fsdp", "--bf16", "--fsdp-bf16", "--fsdp-shard", 2]),
]
HALF += FSDP16
# parallel.mixed_precision=fp16: both sides under fp16 autocast, backward from the loss times a static
# scale, the gradients unscaled in the clipping pass (Parallel.clip_grad_norm's `unscale`)
FP16 = [
    (2, ["--ep", 2, "--plan", "replicated", "--fp16", "--loss-scale", 1024]),
    (4, ["--ep", 2, "--plan", "replicated", "--sharding", "fssdp", "--fp16", "--loss-scale", 1024, "--meta"]),
    (4, ["--ep", 4, "--plan", "random", "--fp16", "--loss-scale", 65536, "--micro", 2, "--fsdp"]),
]
HALF += FP16
# parallel.reduce_dtype=bf16: the reference rounds each rank's gradient to bf16 and sums them in bf16
REDUCE16 = [
    (2, ["--ep", 2, "--plan", "random", "--reduce-bf16"]),  # DDP; no expert held twice
    (2, ["--ep", 1, "--plan", "contiguous", "--fsdp", "--reduce-bf16"]),  # FSDP; every expert on both ranks (edp 2)
    (4, ["--ep", 2, "--plan", "replicated", "--micro", 2, "--reduce-bf16"]),  # replicas, edp 2, accumulation
    (4, ["--ep", 4, "--plan", "replicated", "--fsdp", "--reduce-bf16"]),
    (4, ["--ep", 2, "--plan", "replicated", "--sharding", "fssdp", "--fsdp", "--fsdp-shard", 2, "--reduce-bf16"]),  # HSDP
    (2, ["--ep", 2, "--plan", "replicated", "--sharding", "fssdp", "--no-remat", "--reduce-bf16"]),
    # parallel.reduce_dtype=fp16 under fp16 autocast: the loss-scaled gradients summed in fp16
    (2, ["--ep", 2, "--plan", "random", "--fp16", "--loss-scale", 16384, "--reduce-fp16"]),
    (4, ["--ep", 2, "--plan", "replicated", "--micro", 2, "--fsdp", "--fp16", "--loss-scale", 16384, "--reduce-fp16"]),
    (4, ["--ep", 2, "--plan", "replicated", "--sharding", "fssdp", "--gather-dtype", "fp32", "--fp16",
         "--loss-scale", 16384, "--reduce-fp16"]),
]
HALF += [case for n, args in GATHER for case in ((n, args), (n, [*args, "--gather-dtype", "fp32"]))]
F = ["--sharding", "fssdp", "--steps", 5]
FSSDP = [
    (2, [*F, "--ep", 2, "--plan", "contiguous"]),
    (2, [*F, "--ep", 2, "--plan", "random", "--change-plan-after", 2, "--meta"]),
    (4, [*F, "--ep", 4, "--plan", "random", "--no-remat", "--change-plan-after", 2]),
    (4, [*F, "--ep", 4, "--plan", "replicated", "--change-plan-after", 2]),
    (4, [*F, "--ep", 2, "--plan", "replicated", "--router", "sigmoid", "--change-plan-after", 2]),  # two expert domains
    (2, [*F, "--ep", 2, "--plan", "replicated", "--router", "grouped", "--change-plan-after", 2, "--dedup"]),
    (4, [*F, "--ep", 4, "--plan", "replicated", "--router", "grouped", "--change-plan-after", 2, "--node-dispatch", 2]),
    (4, [*F, "--ep", 4, "--plan", "replicated", "--reshard-after", 2]),  # owners move (Hecate Alg. 2)
    (4, [*F, "--ep", 4, "--plan", "replicated", "--micro", 2]),  # gradient accumulation: nothing left unsent
    (4, [*F, "--ep", 2, "--plan", "contiguous", "--micro", 2]),  # every expert at its owner: computed in place
    (4, [*F, "--ep", 4, "--plan", "replicated", "--align", "--change-plan-after", 2, "--meta"]),  # owners follow the plan
    (2, [*F, "--ep", 2, "--plan", "random", "--align", "--micro", 2]),
    (4, [*F, "--ep", 4, "--plan", "replicated", "--ffn-dim", 10, "--change-plan-after", 2]),  # unaligned: the loop
    # 2 experts on 4 ranks: rank 2 owns one and computes none, rank 3 owns and computes none
    (4, [*F, "--ep", 4, "--plan", "contiguous", "--num-experts", 2, "--change-plan-after", 2, "--micro", 2]),
    (4, [*F, "--ep", 4, "--plan", "contiguous", "--num-experts", 2, "--reshard-after", 2]),
    (4, [*F, "--ep", 4, "--plan", "replicated", "--change-plan-after", 2, "--fsdp"]),  # FSSDP experts, FSDP dense
    (4, [*F, "--ep", 4, "--plan", "random", "--micro", 2, "--fsdp", "--fsdp-shard", 2, "--meta"]),  # HSDP: 2 x 2
    (2, [*F, "--ep", 2, "--plan", "random", "--micro", 2, "--fsdp", "--meta"]),
    (4, [*F, "--ep", 4, "--plan", "random", "--micro", 2, "--fsdp", "--global-balance"]),
    # model.moe_every=2: blocks dense, dense, MoE, dense, MoE; the prefetch reaches across a dense block
    (4, [*F, "--ep", 4, "--plan", "random", "--change-plan-after", 2, "--moe-every", 2, "--meta"]),
]
def cases(table):
    """parametrize's arguments for a case table, with ids that name their launch."""
    ids = [f"launch{n}-" + "_".join(str(x).lstrip("-") for x in (args[len(F):] if args[:len(F)] == F else args))
           for n, args in table]
    return {"argvalues": table, "ids": ids}


def _check_meta(report: dict, args: list) -> None:
    """`--meta`: the model was built on the meta device and sharded before anything was allocated (the
    trainer's way), so no rank allocated a tensor of more experts than it holds; the steps' match with
    the reference (built whole, initialized at once) shows that each rank initialized its experts
    to the whole model's values."""
    if "--meta" in args:
        assert report["expert_rows_allocated_beyond_held"] == 0, report
        assert 0 < report["expert_rows_allocated"] < 8, report  # 8 experts: no rank held them all


def _check_fsdp(report: dict, args: list) -> None:
    """`--fsdp`: every dense parameter is a DTensor shard, and no rank holds more than its 1/W of
    their elements (1/N under HSDP with groups of N; FSDP2 pads dim 0 to a multiple); under DDP
    each rank holds them all. With
    `--meta` the shards are made on meta, so no rank allocates the dense part whole."""
    if "--fsdp" in args:  # FSDP shards over the world; HSDP (--fsdp-shard) within each group
        shard = report["dense_shard_size"]
        assert report["dense_dtensors"] and report["dense_share_max"] <= 1.0 / shard + 0.02, report
        # built on meta, FSDP shards the dense weights there: each rank allocates only its shards
        assert report["fsdp_sharded_on"] == ["meta" if "--meta" in args else "cpu"], report
    else:
        assert not report["dense_dtensors"] and report["dense_share_max"] == 1.0, report


def ep_report(tmp_path_factory, nproc: int, args: list) -> dict:
    """The report of one case, from the one launch that runs every case of its world size."""
    todo = [a for n, a in ADAMW + HALF + REDUCE16 + FSSDP if n == nproc]
    folder = tmp_path_factory.getbasetemp() / f"ep_train{nproc}"
    if not folder.is_dir():
        folder.mkdir()
        spec = [[*a, "--out", folder / f"case{i}.json"] for i, a in enumerate(todo)]
        (folder / "cases.json").write_text(json.dumps(spec, default=str))
    proc = launch_once(("ep_train", nproc), [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", nproc,
                                             "--standalone", WORKERS / "ep_train.py", "--cases", folder / "cases.json"])
    out = folder / f"case{todo.index(args)}.json"
    assert out.is_file(), f"no report for {args} (launch exit {proc.returncode}):\n{proc.stderr[-3000:]}"
    return json.loads(out.read_text())
