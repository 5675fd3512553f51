"""Helpers of tests/workers/ep_train.py: what a case's report measures (the whole model assembled
from the ranks, the share of gradients that a half-precision sum left, the bytes FSSDP moved and
must move), and the reference's bf16 weight copy."""

import copy

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from moesaic.parallel.dense_fsdp import local


def _expected_gather_bytes(plan, mcfg, num_domains, remat, owners_LE=None):
    """What one step's gathers must move for `plan`, from the plan and owners alone: every (expert,
    computing rank other than its owner) pair sends one expert (fp32 w1, w2, w3), twice with
    re-materialization. Owners: even contiguous shards unless given."""
    from moesaic.parallel.fssdp import even_owners

    if owners_LE is None:
        owners_LE = [even_owners(mcfg.moe.num_experts, plan.num_gpus)] * plan.num_layers
    pairs = sum(1 for layer, owners in zip(plan.placement, owners_LE) for e, gpus in enumerate(layer)
                for g in gpus if g != owners[e])
    return pairs * 3 * mcfg.dim * mcfg.moe.ffn_dim * 4 * num_domains * (2 if remat else 1)


class ExpertAllocations(TorchDispatchMode):
    """The most experts held by one tensor that an op creates off the meta device: tensors shaped
    like w13 (n, 2F, D) or w2 (n, D, F)."""

    def __init__(self, mcfg):
        super().__init__()
        F, D = mcfg.moe.ffn_dim, mcfg.dim
        self.shapes, self.most_experts = {(2 * F, D), (D, F)}, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and not t.is_meta and t.dim() == 3 and tuple(t.shape[1:]) in self.shapes:
                self.most_experts = max(self.most_experts, t.shape[0])
        return out


def bf16_weights(model):
    """A copy of `model` whose parameters are bf16 (its buffers as they are)."""
    copy16 = copy.deepcopy(model)
    for p in copy16.parameters():
        p.data = p.data.to(torch.bfloat16)
    return copy16


def _bytes(model, kind):
    return sum(getattr(m.experts, "bytes", {}).get(kind, 0) for m in model.moe_layers())


def _half_share(model, num_domains: int, resident: bool, dtype=torch.bfloat16) -> dict:
    """Of this rank's nonzero gradient elements that were summed across ranks (the dense ones; under
    resident expert parallelism, an expert's where another rank holds it too; under FSSDP, the owned
    experts' where there are several expert domains), the share that `dtype` (bf16, fp16)
    holds exactly: 1 when the sums ran in it (the world size is a power of 2), about 2**-16 (bf16)
    when they ran in fp32. None where there are none."""
    def share(grads):
        g = torch.cat([t.flatten() for t in grads]) if grads else torch.zeros(0)
        nz = g[g != 0]
        return float((nz.to(dtype).float() == nz).double().mean()) if nz.numel() else None

    dense = [local(p.grad) for n, p in model.named_parameters() if p.grad is not None and ".experts." not in n]
    experts = []
    for m in model.moe_layers():
        lp, ws = m.layer_plan, [w for w in (m.experts.w13_EGD, m.experts.w2_EDF) if w.grad is not None]
        if resident:
            experts += [w.grad[i] for w in ws for i, e in enumerate(lp.local_experts)
                        if num_domains > 1 or len(lp.holders[e]) > 1]
        elif num_domains > 1:  # FSSDP: the owners' gradients, all-reduced across the expert domains
            experts += [w.grad for w in ws]
    return {"dense": share(dense), "experts": share(experts)}


def _moe_index(model, layer: int) -> int:
    """The index among model.moe_layers() of block `layer`."""
    return [i for i, blk in enumerate(model.layers) if blk.is_moe].index(layer)


def assemble(model, ref, a, grads: bool = False):
    """The whole model's parameters (or, with `grads`, their gradients) on every rank, by name: dense
    from rank 0 (FSDP's shards gathered whole), each expert from its first holder, or its owner in
    the first expert domain (a collective, in the same order on every rank). Also the largest
    difference between two copies of one expert (resident: replicas, and each expert domain's)."""
    def get(t):
        g = t.grad if grads else t
        return torch.zeros_like(t) if g is None else g

    dense = {}
    for n, p in model.named_parameters():
        if ".experts." not in n:
            t = get(p)
            dense[n] = (t.full_tensor() if isinstance(t, DTensor) else t).detach().clone()
    experts, replica_diff = {}, 0.0
    for li, (m, rm) in enumerate(zip(model.moe_layers(), ref.moe_layers())):
        for n in ("w13_EGD", "w2_EDF"):
            w = get(getattr(m.experts, n))
            full = torch.zeros_like(getattr(rm.experts, n))
            if a.sharding == "fssdp":  # each expert from its owner (in the first expert domain)
                if dist.get_rank() < a.ep:
                    for i, e in enumerate(m.experts.owned_ids):
                        full[e] = w[i].detach()
            else:
                for i, e in enumerate(m.layer_plan.local_experts):
                    if m.layer_plan.holders[e][0] == dist.get_rank() % a.ep and dist.get_rank() < a.ep:
                        full[e] = w[i].detach()
                # every copy of an expert (replicas, and each expert domain's) must be the same, bit for bit
                hi, lo = torch.full_like(full, -torch.inf), torch.full_like(full, torch.inf)
                for i, e in enumerate(m.layer_plan.local_experts):
                    hi[e] = lo[e] = w[i].detach()
                dist.all_reduce(hi, op=dist.ReduceOp.MAX)
                dist.all_reduce(lo, op=dist.ReduceOp.MIN)
                replica_diff = max(replica_diff, float((hi - lo).max()))
            dist.all_reduce(full)
            experts[(li, n)] = full
    return dense, experts, replica_diff
