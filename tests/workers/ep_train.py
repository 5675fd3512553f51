"""torchrun worker: a few optimizer steps of a tiny model under expert parallelism against the
single-process reference with the same seed and weights.

The reference's loss is the mean over the ranks' micro-batches of each micro-batch's loss (what DDP
optimises). AdamW runs with eps=1e-6: at eps=1e-8 a gradient within rounding of zero can flip a whole
lr-sized first step (see shared/DESIGN.md); the tolerance itself is not widened.
Writes a JSON report (rank 0) to the path given by --out. `--cases FILE` runs several cases (a JSON
list of argument lists, each with its own --out) one after another in one launch: the ranks start
once (4 s of imports each, most of a case's time), and every case builds its own model, groups,
plan and optimizer from its seed.
"""

import argparse
import contextlib
import copy
import dataclasses
import hashlib
import json

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from moesaic.parallel.config import ParallelConfig
from moesaic.parallel.dense_fsdp import local
from moesaic.parallel.process import finish_rank
from moesaic.parallel.doctor import make_plan
from moesaic.parallel.moe import MoEConfig
from moesaic.parallel.recorder import RoutingRecorder
from moesaic.parallel.router import RouterConfig
from moesaic.placement.stats import RoutingStats
from moesaic.trainer.dist import DistInfo
from moesaic.trainer.model import ModelConfig, Transformer, held_expert_ids
from moesaic.trainer.parallelize import parallelize

from ep_report import (ExpertAllocations, _bytes, _expected_gather_bytes, _half_share, _moe_index, assemble,
                       bf16_weights)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ep", type=int, required=True)
    ap.add_argument("--plan", default="random")
    ap.add_argument("--router", default="softmax", choices=["softmax", "sigmoid", "grouped"])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--sharding", default="resident", choices=["resident", "fssdp"])
    ap.add_argument("--no-remat", action="store_true")
    ap.add_argument("--change-plan-after", type=int, default=0, help="adopt a new (random) plan after this step")
    ap.add_argument("--reshard-after", type=int, default=0, help="move expert owners (Hecate Alg. 2) after this step")
    ap.add_argument("--align", action="store_true", help="FSSDP owners follow the plan (placement.align_owners)")
    ap.add_argument("--micro", type=int, default=1, help="gradient accumulation: micro-batches per step")
    ap.add_argument("--bf16", action="store_true", help="forward passes (both sides) under bf16 autocast")
    ap.add_argument("--fp16", action="store_true", help="forward passes (both sides) under fp16 autocast")
    ap.add_argument("--loss-scale", type=float, default=1.0,
                    help="both sides: backward from loss x this, the gradients unscaled before clipping (fp16's static scale)")
    ap.add_argument("--gather-dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                    help="parallel.gather_dtype (FSSDP): auto gathers bf16 (fp16) under --bf16 (--fp16)")
    ap.add_argument("--ffn-dim", type=int, default=16, help="10: breaks torch._grouped_mm's 16-byte rule (the loop path)")
    ap.add_argument("--num-experts", type=int, default=8, help="2 at 4 ranks: ranks that own and compute none")
    ap.add_argument("--dedup", action="store_true", help="parallel.token_dedup: each token once per destination rank")
    ap.add_argument("--node-dispatch", type=int, default=0,
                    help="parallel.node_dispatch with nodes of this many ranks (implies --dedup)")
    ap.add_argument("--meta", action="store_true", help="build the model on the meta device, as the trainer does")
    ap.add_argument("--fsdp", action="store_true", help="parallel.dense_sharding=fsdp: the dense parameters FSDP2-sharded")
    ap.add_argument("--fsdp-shard", type=int, default=0, help="with --fsdp: parallel.dense_shard_size (HSDP)")
    ap.add_argument("--fsdp-bf16", action="store_true",
                    help="with --fsdp --bf16: parallel.dense_gather_dtype=bf16; the reference then computes each rank's "
                         "batch with bf16 copies of its weights and sums the fp32 casts of their gradients")
    ap.add_argument("--reduce-bf16", action="store_true",
                    help="parallel.reduce_dtype=bf16; the reference then rounds each rank's gradient to bf16 and sums "
                         "them in bf16, in rank order")
    ap.add_argument("--reduce-fp16", action="store_true", help="with --fp16: parallel.reduce_dtype=fp16, as --reduce-bf16")
    ap.add_argument("--moe-every", type=int, default=1,
                    help="model.moe_every: dense blocks between the MoE ones (2 MoE layers, 1 + 2N blocks)")
    ap.add_argument("--global-balance", action="store_true",
                    help="aux_loss_scope=global_batch; the reference then computes each micro-batch of all ranks in one forward")
    ap.add_argument("--out", required=True)
    return ap


def main():
    first = argparse.ArgumentParser(add_help=False)
    first.add_argument("--cases", default=None)
    known, rest = first.parse_known_args()
    if known.cases:
        with open(known.cases) as f:
            cases = [parser().parse_args([str(x) for x in case]) for case in json.load(f)]
    else:
        cases = [parser().parse_args(rest)]
    dist.init_process_group("gloo")
    for a in cases:
        run(a)
    finish_rank(0)


def run(a: argparse.Namespace) -> None:
    W, rank = dist.get_world_size(), dist.get_rank()
    reduce = torch.bfloat16 if a.reduce_bf16 else torch.float16 if a.reduce_fp16 else None  # parallel.reduce_dtype
    router = {"softmax": RouterConfig(),
              "sigmoid": RouterConfig(score_func="sigmoid", bias_update_rate=0.01),
              # DeepSeek-V3's router: 4 groups of 2 experts, each token in its best 2, weights x2.5,
              # the balance loss per sequence
              "grouped": RouterConfig(score_func="sigmoid", bias_update_rate=0.01, route_scale=2.5,
                                      num_expert_groups=4, num_limited_groups=2, aux_loss_scope="sequence")}[a.router]
    if a.global_balance:  # (the reference computes each rank's gradient alone under --reduce-* and --fsdp-bf16)
        assert not (reduce or a.fsdp_bf16), "--global-balance computes all ranks in one forward"
        router = dataclasses.replace(router, aux_loss_scope="global_batch")
    mcfg = ModelConfig(dim=32, num_layers=1 + 2 * a.moe_every, num_heads=2, max_seq_len=32, num_dense_layers=1,
                       moe_every=a.moe_every,
                       moe=MoEConfig(num_experts=a.num_experts, top_k=2, ffn_dim=a.ffn_dim, num_shared_experts=1, router=router))
    torch.manual_seed(0)
    model = Transformer(mcfg)
    ref = copy.deepcopy(model)
    allocations = ExpertAllocations(mcfg)
    if a.meta:  # as the trainer builds it: on the meta device, materialized by parallelize once sharded
        torch.manual_seed(0)
        with torch.device("meta"):
            model = Transformer(mcfg)
        allocations.__enter__()
    plan = make_plan(a.plan, a.num_experts, a.ep, seed=3, num_layers=mcfg.num_moe_layers)

    class _Cfg:  # the fields parallelize reads
        parallel = ParallelConfig(ep_size=a.ep, expert_sharding=a.sharding, reshard_after_forward=not a.no_remat,
                                  token_dedup=a.dedup or a.node_dispatch > 0, node_dispatch=a.node_dispatch > 0,
                                  gpus_per_node=a.node_dispatch, dense_sharding="fsdp" if a.fsdp else "ddp",
                                  dense_shard_size=a.fsdp_shard, mixed_precision="bf16" if a.bf16 else "fp16" if a.fp16 else "none",
                                  gather_dtype=a.gather_dtype, dense_gather_dtype="bf16" if a.fsdp_bf16 else "fp32",
                                  reduce_dtype="bf16" if a.reduce_bf16 else "fp16" if a.reduce_fp16 else "fp32")

        class placement:
            align_owners = a.align

        class model:
            moe_impl = "moesaic"

            class moe:
                capacity_factor = 0.0

    import moesaic.trainer.parallelize as parallelize_module

    sharded_on = []  # --fsdp: the device of the dense weights when FSDP shards them (meta: nothing whole)
    real_apply_fsdp = parallelize_module.apply_fsdp

    def apply_fsdp(m, *args, **kwargs):
        sharded_on.append(m.embed.weight.device.type)
        return real_apply_fsdp(m, *args, **kwargs)

    parallelize_module.apply_fsdp = apply_fsdp
    try:
        par = parallelize(model, _Cfg, DistInfo(rank, W, rank, torch.device("cpu"), "gloo"), plan)
    finally:
        parallelize_module.apply_fsdp = real_apply_fsdp
    if a.meta:
        allocations.__exit__(None, None, None)
        held = max(len(held_expert_ids(m)) for m in model.moe_layers())
        excess = torch.tensor([allocations.most_experts - held, allocations.most_experts], dtype=torch.int64)
        dist.all_reduce(excess, op=dist.ReduceOp.MAX)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, eps=1e-6, weight_decay=0.1)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, eps=1e-6, weight_decay=0.1)
    recorder = RoutingRecorder(mcfg.num_moe_layers, a.num_experts, 2)
    ref_ids = []

    def batch(r, step):
        g = torch.Generator().manual_seed(1000 * step + r)
        x = torch.randint(0, 256, (2, 16), generator=g)
        return x, torch.randint(0, 256, (2, 16), generator=g)

    def amp():  # parallel.mixed_precision=bf16 or fp16, as the trainer's step does it
        if a.bf16 or a.fp16:
            return torch.autocast("cpu", dtype=torch.bfloat16 if a.bf16 else torch.float16)
        return contextlib.nullcontext()

    report = {"steps": [], "fsdp_sharded_on": sharded_on}
    seen_dtypes, weight_dtypes = set(), set()  # what the experts compute on, and with which weights

    def seen(m, args):
        seen_dtypes.add(str(args[0].dtype))
        weight_dtypes.add(str((m.weights()[0] if hasattr(m, "weights") else m.w13_EGD).dtype))

    for m in model.moe_layers():
        m.experts.register_forward_pre_hook(seen)
    dense_dtypes = set()  # what a dense module computes with: its weight, and its input (the residual stream)
    model.layers[-1].ffn_norm.register_forward_pre_hook(
        lambda m, args: dense_dtypes.update({f"weight {m.weight.dtype}", f"input {args[0].dtype}"}))
    for step in range(a.steps):
        if a.change_plan_after and step == a.change_plan_after:
            from moesaic.parallel.fssdp import set_fssdp_plan

            new_plan = make_plan("replicated", a.num_experts, a.ep, seed=11, num_layers=mcfg.num_moe_layers)
            owners = None
            if a.align:  # as the re-planner does: owners move to GPUs that compute their experts
                from moesaic.parallel.fssdp import reshard_owners
                from moesaic.placement.dynamic import aligned_owners

                owners = aligned_owners(new_plan, np.stack([m.experts.owners for m in model.moe_layers()]))
                report["align_bytes"] = reshard_owners(model, opt, owners)
            set_fssdp_plan(model, new_plan)
            report["expected_gather_bytes_new_plan"] = a.micro * _expected_gather_bytes(
                new_plan, mcfg, W // a.ep, not a.no_remat, owners)  # every micro-batch gathers
        if step == 0 and a.align:
            owners = np.stack([m.experts.owners for m in model.moe_layers()])
            report["expected_gather_bytes_start"] = a.micro * _expected_gather_bytes(plan, mcfg, W // a.ep,
                                                                                     not a.no_remat, owners)
            report["start_owner_computes"] = all(int(own[e]) in gs for layer, own in zip(plan.placement, owners)
                                                 for e, gs in enumerate(layer))
        if a.reshard_after and step == a.reshard_after:
            from moesaic.parallel.fssdp import reshard_owners
            from moesaic.placement.dynamic import hecate_owners

            loads = np.random.default_rng(5).random((mcfg.num_moe_layers, a.num_experts))
            report["reshard_bytes"] = reshard_owners(model, opt, [hecate_owners(lo, a.ep, 2) for lo in loads])
        gather_before, rs_before = _bytes(model, "gather"), _bytes(model, "reduce_scatter")
        x, y = batch(rank, step)
        losses, counts = [], 0
        for i in range(a.micro):  # the rank's batch in micro-batches; their mean loss is the batch's
            with par.no_sync() if i < a.micro - 1 else contextlib.nullcontext():
                with amp():
                    out = par.train_model(x.chunk(a.micro)[i], y.chunk(a.micro)[i])
                (out.loss * a.loss_scale / a.micro).backward()
            for m in model.moe_layers():  # as the trainer's step does (global_batch's running total)
                m.router.end_micro_batch(i == a.micro - 1)
            recorder.observe_model(model)
            losses.append(out.loss.item())
            counts = counts + out.tokens_per_expert_LE.double()
        par.reduce_grads()
        if step == 0:
            report["reduced_grads_in_bf16"] = _half_share(model, W // a.ep, a.sharding == "resident")
            if a.reduce_fp16:
                report["reduced_grads_in_fp16"] = _half_share(model, W // a.ep, a.sharding == "resident", torch.float16)
            if reduce:  # the reduced (and still loss-scaled) gradients, whole, for the check against the reference below
                grads0 = assemble(model, ref, a, grads=True)[:2]
        norm = par.clip_grad_norm(0.5, 1 / a.loss_scale)
        opt.step()
        opt.zero_grad()
        dist.all_reduce(counts)
        for m, c in zip(model.moe_layers(), counts):
            m.router.update_bias(c)
        moved = torch.tensor([[m.dispatcher.counters.get(k, 0) for k in ("tokens_sent", "slots_sent", "a2a_inter_node_bytes")]
                              for m in model.moe_layers()], dtype=torch.float64).sum(0)
        dist.all_reduce(moved)  # rows and token-slots that left their rank (the last micro-batch's)
        loss = torch.tensor([sum(losses) / a.micro], dtype=torch.float64)
        dist.all_reduce(loss)
        gbytes = torch.tensor([_bytes(model, "gather") - gather_before,
                               _bytes(model, "reduce_scatter") - rs_before], dtype=torch.float64)
        dist.all_reduce(gbytes)
        dense, experts, replica_diff = assemble(model, ref, a)
        if rank == 0:
            total, outs = 0.0, []
            # --fsdp-bf16: FSDP2's mixed precision, rank by rank: the forward with bf16 copies of the
            # weights (buffers stay fp32), each rank's bf16 gradients cast to fp32 and summed
            fwd = bf16_weights(ref) if a.fsdp_bf16 else ref
            summed, magnitude = {}, {}  # --reduce-bf16/fp16: each parameter's half sum over the ranks, and of |.|
            ranks = range(W)  # each rank's micro-batches on their own (the aux loss is per micro-batch)
            if a.global_balance:  # each micro-batch of all ranks in one forward: f_e over all of them
                total, ranks = _global_batch_reference(fwd, batch, step, W, a, amp, outs, ref_ids), []
            for r in ranks:
                xr, yr = batch(r, step)
                ids_r = []
                for i in range(a.micro):  # the same micro-batches (the aux loss is per micro-batch)
                    with amp():
                        o = fwd(xr.chunk(a.micro)[i], yr.chunk(a.micro)[i])
                    total = total + o.loss / (W * a.micro)
                    outs.append(o)
                    ids_r.append([mm.last_route.expert_ids_TK.clone() for mm in fwd.moe_layers()])
                ref_ids.append([torch.cat([ids[l] for ids in ids_r]) for l in range(mcfg.num_moe_layers)])
                if reduce:  # this rank's gradient rounded to bf16 (fp16), added to the others in it
                    # backward from the rank's own mean loss (x the scale), as on the rank: under fp16
                    # autocast a smaller gradient would round otherwise in fp16's subnormal range;
                    # then divided by the world size in fp32, as DDP's hook does before the cast
                    (total * (a.loss_scale * W)).backward()
                    for p in ref.parameters():
                        if p.grad is not None:
                            g, p.grad = (p.grad / W).to(reduce), None
                            summed[p] = g if p not in summed else summed[p] + g
                            magnitude[p] = g.float().abs() + magnitude.get(p, 0)
                    total = total.detach()
                if a.fsdp_bf16:  # this rank's gradient, as FSDP reduce-scatters it (fp32)
                    (total * a.loss_scale).backward()
                    for p, q in zip(ref.parameters(), fwd.parameters()):
                        if q.grad is not None:
                            p.grad = q.grad.float() if p.grad is None else p.grad + q.grad.float()
                            q.grad = None
                    total = total.detach()
            for p, g in summed.items():
                p.grad = g.float()
            if not (a.fsdp_bf16 or reduce):
                (total * a.loss_scale).backward()
            if step == 0 and reduce:  # the reduced gradients against the reference's, in units of
                # sum_r |g_r| (the size of a half-precision rounding of the sum); 0/0 counts as 0
                ratio = {}
                for n, p in ref.named_parameters():
                    li, w = (n.split(".")[1], n.split(".")[-1]) if ".experts." in n else (None, None)
                    got = grads0[0][n] if li is None else grads0[1][(_moe_index(ref, int(li)), w)]
                    err = (got - p.grad).abs()
                    # fp16: below its smallest normal number a rounding is absolute (2**-25), not relative
                    tiny = torch.finfo(reduce).tiny if reduce == torch.float16 else 1e-30
                    ratio[n] = float((err / magnitude[p].clamp_min(tiny)).max()) if p in magnitude else float(err.max())
                report["grad_err_over_magnitude"] = max(ratio.values())
                report["dense_grad_err_over_magnitude"] = max(v for n, v in ratio.items() if ".experts." not in n)
                report["grad_err_worst"] = max(ratio, key=ratio.get)
            for p in ref.parameters():  # the loss scale divided out (1: nothing changes)
                if p.grad is not None:
                    p.grad.mul_(1 / a.loss_scale)
            ref_norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.5)
            ref_opt.step()
            ref_opt.zero_grad()
            all_counts = sum(o.tokens_per_expert_LE.double() for o in outs)
            for m, c in zip(ref.moe_layers(), all_counts):
                m.router.update_bias(c)
            diffs = {n: float((dense[n] - p.detach()).abs().max()) for n, p in ref.named_parameters() if ".experts." not in n}
            for (li, n), full in experts.items():
                diffs[f"moe{li}.{n}"] = float((full - getattr(ref.moe_layers()[li].experts, n).detach()).abs().max())
            report["steps"].append({"loss": float(loss) / W, "ref_loss": float(total.detach()), "norm": float(norm),
                                    "ref_norm": float(ref_norm), "max_param_diff": max(diffs.values()),
                                    "gather_bytes": float(gbytes[0]), "reduce_scatter_bytes": float(gbytes[1]),
                                    "param_sha": hashlib.sha256(b"".join(
                                        t.numpy().tobytes() for t in [*dense.values(), *experts.values()])).hexdigest(),
                                    "rows_sent": float(moved[0]),
                                    "slots_sent": float(moved[1]), "inter_node_bytes": float(moved[2]),
                                    "replica_diff": replica_diff, "worst": max(diffs, key=diffs.get)})
    report["expert_input_dtypes"] = sorted(seen_dtypes)
    report["expert_weight_dtypes"] = sorted(weight_dtypes)  # FSSDP: as gathered
    report["dense_compute_dtypes"] = sorted(dense_dtypes)
    report["param_dtypes"] = sorted({str(p.dtype) for p in model.parameters()})
    # the share of the dense parameters' elements that this rank holds (1/W under FSDP, 1 under DDP)
    held = [(local(p).numel(), p.numel()) for n, p in model.named_parameters() if ".experts." not in n]
    share = torch.tensor([sum(h for h, _ in held) / sum(n for _, n in held)], dtype=torch.float64)
    dist.all_reduce(share, op=dist.ReduceOp.MAX)
    report["dense_share_max"], report["dense_shard_size"] = float(share), a.fsdp_shard or W
    report["dense_dtensors"] = all(isinstance(p, DTensor) for n, p in model.named_parameters() if ".experts." not in n)
    stats = recorder.stats(all_reduce=True)
    owned = torch.tensor([sum(p.numel() for m in model.moe_layers() for p in m.experts.parameters())])
    dist.all_reduce(owned)
    if rank == 0:
        ids = [torch.stack([torch.cat([step_ids[l] for step_ids in ref_ids[s * W:(s + 1) * W]]) for l in range(mcfg.num_moe_layers)], 1)
               for s in range(a.steps)]
        full = RoutingStats.from_experts(torch.cat(ids).numpy(), a.num_experts)
        report["recorder_P_diff"] = float(np.abs(stats.P - full.P).max())
        report["recorder_W_diff"] = float(np.abs(stats.W - full.W).max())
        report["recorder_tokens"] = [stats.num_tokens, full.num_tokens]
        report["expert_params_local"] = [len(m.layer_plan.local_experts) for m in model.moe_layers()]
        report["expert_numel_all_ranks"] = int(owned)
        report["expert_numel_one_copy"] = mcfg.num_moe_layers * a.num_experts * 3 * mcfg.dim * mcfg.moe.ffn_dim
        report["num_domains"] = W // a.ep
        if a.meta:  # over all ranks: the most experts one allocated tensor held, beyond the rank's own
            report["expert_rows_allocated_beyond_held"], report["expert_rows_allocated"] = excess.tolist()
        with open(a.out, "w") as f:
            json.dump(report, f)
    dist.barrier()  # the next case starts on every rank together


def _global_batch_reference(ref, batch, step, W, a, amp, outs, ref_ids) -> torch.Tensor:
    """The reference under aux_loss_scope=global_batch: micro-batch i of every rank in one forward, in
    rank order. Its mean CE and z-loss are the ranks' mean, and so is its balance loss, whose f_e the
    ranks all-reduce and whose p_e they average through DDP. Returns the step's loss; appends the
    outputs and each rank's routed ids, as the per-rank reference does."""
    total, per_rank = 0.0, [[] for _ in range(W)]
    for i in range(a.micro):
        x, y = (torch.cat([batch(r, step)[j].chunk(a.micro)[i] for r in range(W)]) for j in (0, 1))
        with amp():
            o = ref(x, y)
        total = total + o.loss / a.micro
        outs.append(o)
        n = x.numel() // W  # each rank's tokens
        for r in range(W):
            per_rank[r].append([m.last_route.expert_ids_TK[r * n:(r + 1) * n].clone() for m in ref.moe_layers()])
        for m in ref.moe_layers():  # no recompute here: the running total may move on before backward
            m.router.end_micro_batch(i == a.micro - 1)
    ref_ids.extend([torch.cat([ids[l] for ids in rank_ids]) for l in range(len(rank_ids[0]))] for rank_ids in per_rank)
    return total


if __name__ == "__main__":
    main()  # ends in finish_rank
