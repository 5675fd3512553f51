"""`moesaic-doctor`: checks a cluster's collectives and moesaic's expert-parallel layer against a
one-process reference (the same seed and weights; rank 0 recomputes the whole batch).

    torchrun --nproc_per_node N -m moesaic.parallel.doctor [--json] [--suite full] [--backend nccl] [--kernels triton]

The backend defaults to NCCL where CUDA is available (one GPU per rank, by LOCAL_RANK), else gloo.

Prints a table (or JSON with the max abs differences) and exits non-zero on any mismatch beyond the
tolerance (fp32: 1e-5, relative to the largest reference value).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import sys
from dataclasses import replace

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from moesaic.parallel.all_to_all import all_gather_single
from moesaic.parallel.expert_parallel import apply_expert_parallel, reduce_expert_grads
from moesaic.parallel.experts import EXPERT_WEIGHTS, KERNELS
from moesaic.parallel.kernels import unavailable
from moesaic.parallel.fssdp import apply_fssdp, fssdp_reduce_scatter
from moesaic.parallel.moe import MoE, MoEConfig
from moesaic.parallel.node_dispatch import NodeGroups, node_groups
from moesaic.parallel.router import RouterConfig
from moesaic.placement.plan import Placement


class _OneLayer(nn.Module):
    def __init__(self, moe: MoE):
        super().__init__()
        self.moe = moe

    def moe_layers(self):
        return [self.moe]


def make_plan(kind: str, num_experts: int, ep: int, seed: int = 0, num_layers: int = 1) -> Placement:
    """Test plans: contiguous, random (uneven counts), replicated (hot experts on several ranks),
    and zero-rank (the last rank computes nothing)."""
    rng = np.random.default_rng(seed)
    layers = []
    for _ in range(num_layers):
        if kind == "contiguous":
            block = -(-num_experts // ep)
            layer = [(e // block,) for e in range(num_experts)]
        elif kind == "random":
            layer = [(int(rng.integers(ep)),) for _ in range(num_experts)]
        elif kind == "replicated":
            layer = [(e % ep,) for e in range(num_experts)]
            for e in range(min(2, num_experts)):
                extra = rng.choice(ep, size=min(ep, 2 + e), replace=False)
                layer[e] = tuple(sorted(set(layer[e]) | {int(g) for g in extra}))
        elif kind == "zero-rank":
            layer = [(e % max(ep - 1, 1),) for e in range(num_experts)]
        else:
            raise ValueError(f"plan kind ({kind!r}) must be contiguous, random, replicated or zero-rank")
        layers.append(layer)
    return Placement(ep, ep, layers, {"method": f"test-{kind}"})


def _mesh(world: int, device: torch.device):
    """One ("edp", "ep") mesh for every check: each rank one EP rank, no expert data parallelism."""
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device.type, (1, world), mesh_dim_names=("edp", "ep"))


def _device(backend: str) -> torch.device:
    """NCCL: this rank's GPU (LOCAL_RANK); gloo: the CPU."""
    if backend != "nccl":
        return torch.device("cpu")
    dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    torch.cuda.set_device(dev)
    return dev


def _diff(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    d = float((a - b).abs().max()) if a.numel() else 0.0
    return d, d / max(1.0, float(b.abs().max()) if b.numel() else 1.0)


def ep_layer_check(name: str, plan_kind: str, cfg: MoEConfig, mesh, *, dim: int = 32, tokens: int = 24, seed: int = 0,
                   bias: str | None = None, tol: float = 1e-5, inject_fault: bool = False,
                   sharding: str = "resident", remat: bool = True, token_dedup=False) -> dict:
    """One EP (or FSSDP) layer against the reference: outputs, input gradients, expert and gate
    gradients. Under FSSDP the expert gradients are read at the owners after sparse_reduce_scatter."""
    world, rank = dist.get_world_size(), dist.get_rank()
    device = torch.device(mesh.device_type)  # "cuda": this rank's current GPU
    torch.manual_seed(seed)
    moe = MoE(dim, cfg)
    if bias == "random":
        moe.router.bias_E.copy_(torch.randn(cfg.num_experts, generator=torch.Generator().manual_seed(seed)) * 0.1)
    elif bias == "starve-last":  # the last expert is never picked: it receives zero tokens
        moe.router.bias_E[-1] = -1e9
    moe = moe.to(device)
    ref = copy.deepcopy(moe)
    ref.experts.kernels = "torch"  # the reference is the torch path, whatever kernels are checked
    plan = make_plan(plan_kind, cfg.num_experts, world, seed)
    if sharding == "fssdp":
        apply_fssdp(_OneLayer(moe), mesh, plan, capacity_factor=cfg.capacity_factor, reshard_after_forward=remat,
                    grad_scale=1.0, token_dedup=token_dedup)  # the loss is a plain sum over ranks
    else:
        apply_expert_parallel(_OneLayer(moe), mesh, plan, capacity_factor=cfg.capacity_factor, token_dedup=token_dedup)

    def data(r):
        g = torch.Generator().manual_seed(seed * 1000 + r)
        return torch.randn(tokens, dim, generator=g).to(device), torch.randn(tokens, dim, generator=g).to(device)

    x, up = data(rank)
    x.requires_grad_(True)
    out, _ = moe(x[None])
    (out[0] * up).sum().backward()
    if sharding == "fssdp":
        fssdp_reduce_scatter(_OneLayer(moe))
    else:
        reduce_expert_grads(_OneLayer(moe), mesh, world_size=1)
    outs = torch.empty(world * tokens, dim, device=device)
    mine = out[0].detach().contiguous()
    if inject_fault and rank == world - 1:  # proves the check can fail: perturb one rank's output
        mine = mine + 1e-3
    all_gather_single(outs, mine)
    xgrads = torch.empty(world * tokens, dim, device=device)
    all_gather_single(xgrads, x.grad.contiguous())
    lp = moe.layer_plan
    full = {n: torch.zeros_like(getattr(ref.experts, n)) for n in EXPERT_WEIGHTS}
    if sharding == "fssdp":  # each expert's gradient lives at its owner only
        for i, e in enumerate(moe.experts.owned_ids):
            for n in full:
                full[n][e] = getattr(moe.experts, n).grad[i]
    else:
        for i, e in enumerate(lp.local_experts):
            if lp.holders[e][0] == rank:  # each expert contributed once, by its first holder
                for n in full:
                    full[n][e] = getattr(moe.experts, n).grad[i]
    for t in full.values():
        dist.all_reduce(t)
    gate = moe.router.gate.weight.grad.clone()
    dist.all_reduce(gate)
    dropped = torch.tensor([moe.dispatcher.counters["dropped"]], device=device)
    dist.all_reduce(dropped)
    node_path_ok = True
    if isinstance(token_dedup, NodeGroups):  # its first stage ran everywhere (the counter is that path's)
        inter = torch.tensor([moe.dispatcher.counters.get("a2a_inter_node_bytes", -1)], device=device)
        least = inter.clone()
        dist.all_reduce(least, op=dist.ReduceOp.MIN)
        dist.all_reduce(inter, op=dist.ReduceOp.MAX)  # and sent rows across nodes, where there are several
        node_path_ok = int(least) >= 0 and (token_dedup.gpus_per_node == world or int(inter) > 0)
    result = None
    if rank == 0:
        xs, ups = zip(*(data(r) for r in range(world)))
        x_all = torch.cat(xs).requires_grad_(True)
        out_ref, _ = ref(x_all[None])
        (out_ref[0] * torch.cat(ups)).sum().backward()
        diffs = {"output": _diff(outs, out_ref[0].detach()), "input_grad": _diff(xgrads, x_all.grad),
                 "gate_grad": _diff(gate, ref.router.gate.weight.grad)}
        for n in full:
            diffs[f"{n}_grad"] = _diff(full[n], getattr(ref.experts, n).grad)
        worst = max(rel for _, rel in diffs.values())
        ref_dropped = ref.dispatcher.counters["dropped"]
        result = {"check": name, "plan": plan_kind, "sharding": sharding, "world": world, "max_abs_diff": {k: v[0] for k, v in diffs.items()},
                  "max_rel_diff": worst, "dropped": int(dropped), "dropped_ref": ref_dropped,
                  "ok": bool(worst <= tol and int(dropped) == ref_dropped and node_path_ok)}
        if isinstance(token_dedup, NodeGroups):
            result["inter_node_bytes_max_rank"] = int(inter)
    box = [result]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def collectives_check(device: torch.device = torch.device("cpu")) -> list[dict]:
    """The collectives moesaic uses, with known answers, on the backend's device."""
    world, rank = dist.get_world_size(), dist.get_rank()
    out = []
    # fp32, bf16 and fp16: what parallel.mixed_precision=bf16/fp16 (tokens, FSSDP's gathers) and
    # parallel.reduce_dtype=bf16 (gradient sums) move; small integers, exact in all three
    for dtype, tag in ((torch.float32, ""), (torch.bfloat16, " (bf16)"), (torch.float16, " (fp16)")):
        t = torch.tensor([float(rank + 1)], device=device, dtype=dtype)
        dist.all_reduce(t)
        out.append({"check": "all_reduce" + tag, "ok": float(t) == world * (world + 1) / 2})
        # uneven all_to_all_single: rank r sends (d + 1) rows of value r to rank d
        send = torch.cat([torch.full((d + 1, 3), float(rank), device=device, dtype=dtype) for d in range(world)])
        recv = torch.empty(world * (rank + 1), 3, device=device, dtype=dtype)
        dist.all_to_all_single(recv, send, [rank + 1] * world, [d + 1 for d in range(world)])
        expect = torch.cat([torch.full((rank + 1, 3), float(s), device=device, dtype=dtype) for s in range(world)])
        out.append({"check": "all_to_all_single (uneven)" + tag, "ok": bool(torch.equal(recv, expect))})
    # int64 sums (the global-batch balance loss's token counts), past fp32's exact 2**24
    big = torch.tensor([2 ** 40 + rank + 1], device=device, dtype=torch.int64)
    dist.all_reduce(big)
    out.append({"check": "all_reduce (int64)", "ok": int(big) == world * 2 ** 40 + world * (world + 1) // 2})
    g = torch.empty(world, device=device)
    all_gather_single(g, torch.tensor([float(rank)], device=device))
    out.append({"check": "all_gather_single", "ok": g.tolist() == [float(r) for r in range(world)]})
    obj = [{"rank": rank}] if rank == 0 else [None]
    dist.broadcast_object_list(obj, src=0)
    out.append({"check": "broadcast_object_list", "ok": obj[0] == {"rank": 0}})
    oks = torch.tensor([int(all(c["ok"] for c in out))], device=device)
    dist.all_reduce(oks, op=dist.ReduceOp.MIN)
    for c in out:
        c["ok"] = c["ok"] and bool(oks)
    return out


def suite(kind: str) -> list[tuple]:
    """(name, plan kind, MoE config, router bias, sharding, re-materialization, token dedup)."""
    base = MoEConfig(num_experts=8, top_k=2, ffn_dim=16)
    fine = MoEConfig(num_experts=16, top_k=4, ffn_dim=8, num_shared_experts=1)
    checks = [(f"ep/{p}", p, base, None) for p in ("contiguous", "random", "replicated")]
    checks += [(f"fssdp/{p}", p, base, None, "fssdp") for p in ("contiguous", "random", "replicated")]
    checks += [("ep/token-dedup", "replicated", fine, None, None, None, True),
               ("ep/node-dispatch", "replicated", fine, None, None, None, "node")]
    if kind == "full":
        sig = replace(base, router=RouterConfig(score_func="sigmoid"))
        grouped = replace(base, router=RouterConfig(score_func="sigmoid", route_scale=2.5, num_expert_groups=4,
                                                    num_limited_groups=2))
        checks += [
            ("ep/sigmoid+bias", "random", sig, "random"),
            ("ep/groups+bias", "replicated", grouped, "random"),
            ("ep/softmax-renormalised", "random", replace(base, router=RouterConfig(route_norm=True)), None),
            ("ep/top1", "replicated", replace(base, top_k=1), None),
            ("ep/zero-token-expert", "random", base, "starve-last"),
            ("ep/zero-token-rank", "zero-rank", base, None),
            ("ep/capacity-1.0", "replicated", replace(base, capacity_factor=1.0), None),
            ("ep/capacity-0.5-top1", "random", replace(base, top_k=1, capacity_factor=0.5), None),
            ("ep/shared+fine-grained", "random", fine, None),
            ("ep/token-dedup-capacity-1.0", "random", replace(fine, capacity_factor=1.0), None, None, None, True),
            ("ep/token-dedup-zero-token-rank", "zero-rank", base, "starve-last", None, None, True),
            ("fssdp/token-dedup", "replicated", fine, None, "fssdp", None, True),
            ("ep/node-dispatch-groups+bias", "random", replace(grouped, top_k=3), "random", None, None, "node"),
            ("ep/node-dispatch-capacity-1.0", "random", replace(fine, capacity_factor=1.0), None, None, None, "node"),
            ("ep/node-dispatch-zero-token-rank", "zero-rank", base, "starve-last", None, None, "node"),
            ("fssdp/node-dispatch", "replicated", fine, None, "fssdp", None, "node"),
            ("fssdp/no-remat", "replicated", base, None, "fssdp", False),
            ("fssdp/zero-token-rank", "zero-rank", base, None, "fssdp"),
            ("fssdp/capacity-1.0", "random", replace(base, capacity_factor=1.0), None, "fssdp"),
            # beyond 2 ranks some own no expert and some compute none
            ("fssdp/2-experts", "contiguous", replace(base, num_experts=2), None, "fssdp"),
        ]
    return [c + (None,) * (7 - len(c)) for c in checks]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="moesaic-doctor", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", action="store_true", help="print machine-readable results")
    ap.add_argument("--suite", choices=("default", "full"), default="default")
    ap.add_argument("--tol", type=float, default=1e-5)
    ap.add_argument("--backend", default="auto", choices=("auto", "gloo", "nccl"),
                    help="auto: nccl where CUDA is available (a GPU per rank), else gloo")
    ap.add_argument("--inject-fault", action="store_true", help="perturb the last rank's outputs: every EP check must FAIL")
    ap.add_argument("--kernels", choices=KERNELS, default="torch",
                    help="the layer's element-wise kernels under test (model.moe.kernels); the reference is torch's")
    a = ap.parse_args(argv)
    if "RANK" not in os.environ:
        print("moesaic-doctor: error: start it with torchrun, e.g. torchrun --nproc_per_node 4 -m moesaic.parallel.doctor", file=sys.stderr)
        return 2
    if a.backend == "auto":
        a.backend = "nccl" if torch.cuda.is_available() else "gloo"
    if a.backend == "nccl" and not torch.cuda.is_available():
        print("moesaic-doctor: error: --backend nccl needs CUDA, and torch.cuda.is_available() is False", file=sys.stderr)
        return 2
    reason = unavailable(a.backend == "nccl") if a.kernels == "triton" else None
    if reason:
        print(f"moesaic-doctor: error: --kernels triton {reason} (backend {a.backend})", file=sys.stderr)
        return 2
    device = _device(a.backend)
    dist.init_process_group(a.backend, timeout=datetime.timedelta(seconds=120))
    try:
        results = collectives_check(device)
        mesh = _mesh(dist.get_world_size(), device)
        # node dispatch: nodes of 2 ranks where the world has 4 or more (of 1 at 2 ranks): both stages run
        world = dist.get_world_size()
        nodes = node_groups(mesh, 2 if world >= 4 and world % 2 == 0 else 1)
        for name, plan_kind, cfg, bias, sharding, remat, dedup in suite(a.suite):
            cfg = replace(cfg, kernels=a.kernels)
            results.append(ep_layer_check(name, plan_kind, cfg, mesh, bias=bias, tol=a.tol, inject_fault=a.inject_fault,
                                          sharding=sharding or "resident", remat=remat is not False,
                                          token_dedup=nodes if dedup == "node" else bool(dedup)))
        ok = all(r["ok"] for r in results)
        if dist.get_rank() == 0:
            if a.json:
                print(json.dumps({"world": dist.get_world_size(), "backend": a.backend, "device": device.type,
                                  "kernels": a.kernels, "ok": ok, "results": results}))
            else:
                print(f"moesaic-doctor: {dist.get_world_size()} ranks, backend {a.backend}, device {device.type}, "
                      f"kernels {a.kernels}")
                for r in results:
                    extra = f"  max rel diff {r['max_rel_diff']:.2e}" if "max_rel_diff" in r else ""
                    print(f"  {'ok  ' if r['ok'] else 'FAIL'}  {r['check']}{extra}")
        dist.barrier()
        return 0 if ok else 1
    finally:
        dist.destroy_process_group()


def main_cli() -> None:
    """The `moesaic-doctor` entry point: a finished rank skips the interpreter's teardown."""
    from moesaic.parallel.process import exit_rank

    exit_rank(main() or 0)


if __name__ == "__main__":
    main_cli()
