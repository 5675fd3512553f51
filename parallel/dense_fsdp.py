"""FSDP for the dense parameters (`parallel.dense_sharding=fsdp`), torchtitan's way: FSDP2's
`fully_shard` on each transformer block and then on the root, over a 1-D mesh of every rank (or,
for HSDP, a 2-D mesh: copies x shards).

What it shards: attention, norms, the router, the shared experts, the embedding and the head. Each
rank keeps 1/world of each such parameter, of its gradient and of its AdamW moments (DTensors
sharded on dim 0), where DDP keeps all of them on every rank; under HSDP (`dense_shard_size`),
1/dense_shard_size, with one copy per group of that many ranks. The routed experts are left out
(`ignored_params`): expert parallelism or FSSDP already places them, and reduces their gradients.

Per block, each step (FSDP2's own sequence; the experts' collectives run inside step 2):
    1. forward pre-hook: all-gather the block's dense shards (the next block's is prefetched);
    2. the block's forward; with reshard_after_forward the gathered weights are freed after it;
    3. backward pre-hook: all-gather them again (when freed);
    4. post-backward: reduce-scatter the block's dense gradients, averaged over the world (the
       mean that DDP's all-reduce gives), into each rank's gradient shard; under HSDP, within the
       group, then all-reduce the shard across the groups.
The math is DDP's: the same losses and parameters, up to the order of the sums.

`param_dtype=torch.bfloat16` is FSDP2's mixed precision (torchtitan's `mixed_precision_param`):
step 1 gathers bf16 copies of the fp32 shards, and every dense module computes with bf16 weights,
the norms and the embedding included, so the residual stream is bf16 too (under plain bf16
autocast it stays fp32); step 4 reduce-scatters the gradients in fp32 into the fp32 shards.
`reduce_dtype=torch.bfloat16` (parallel.reduce_dtype) reduce-scatters them in bf16 instead (half
the bytes), into the same fp32 shards.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor


def apply_fsdp(model: torch.nn.Module, mesh, *, ignored: set[torch.nn.Parameter] | None = None,
               reshard_after_forward: bool = True, param_dtype: torch.dtype | None = None,
               reduce_dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """Shard the dense parameters of `model` (a `Transformer`, on meta or materialized) over `mesh`:
    each block, then the root (the embedding, final norm and the head, tied or not). A 1-D mesh
    shards over all its ranks (FSDP); a 2-D one (replicate, shard) shards along its second dimension
    and keeps a copy per row (HSDP). Parameters in `ignored` (the routed experts) stay as they are.
    `param_dtype`: what the weights are gathered and computed in (None: their own dtype).
    `reduce_dtype`: what the gradients are reduce-scattered (and all-reduced, under HSDP) in.
    Returns the model (FSDP2 changes it in place)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if mesh.ndim not in (1, 2):
        raise ValueError(f"apply_fsdp: the mesh must be 1-D (FSDP) or 2-D (HSDP: replicate, shard), not {mesh.ndim}-D")
    ignored = set(ignored or ())
    # the blocks' float inputs (the rotary tables) stay as they are: only the weights are cast
    if reduce_dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"apply_fsdp: reduce_dtype ({reduce_dtype}) must be torch.float32, torch.bfloat16 or torch.float16")
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype, cast_forward_inputs=False)
    for block in model.layers:
        fully_shard(block, mesh=mesh, reshard_after_forward=reshard_after_forward, ignored_params=ignored, mp_policy=mp)
    # the root's parameters are needed again at once by the backward: keep them gathered (torchtitan)
    fully_shard(model, mesh=mesh, reshard_after_forward=False, ignored_params=ignored, mp_policy=mp)
    return model


def reshard(model: torch.nn.Module) -> None:
    """Free every gathered FSDP weight of `model`, leaving each parameter its shard. FSDP2 keeps the
    root's weights gathered after a forward (its backward needs them at once), so after a forward
    without backward (evaluation) they stay whole until this, and `named_parameters` lists the
    gathered copies. A no-op without FSDP, or when nothing is gathered."""
    from torch.distributed.fsdp import FSDPModule

    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def gathered_bytes(model: torch.nn.Module) -> int:
    """Bytes of FSDP2's gathered (unsharded) dense weights alive on this rank now, padding included: a
    freed buffer counts 0. 0 without FSDP. (FSDP2's own buffers: `FSDPParam.all_gather_outputs`.)"""
    from torch.distributed.fsdp import FSDPModule

    total = 0
    for m in model.modules():
        group = m._get_fsdp_state()._fsdp_param_group if isinstance(m, FSDPModule) else None
        for fp in group.fsdp_params if group is not None else ():
            total += sum(t.untyped_storage().nbytes() for t in fp.all_gather_outputs)
    return total


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor; a plain tensor as it is."""
    return t.to_local() if isinstance(t, DTensor) else t


def dense_grad_sq_norm(params, *, sharded: bool, group=None) -> torch.Tensor:
    """The squared L2 norm (float64, on the host) of the dense gradients. Sharded (FSDP): the sum
    over the shards of the ranks of `group`, one all-reduce (HSDP: the group that shares one copy;
    None: the world); replicated (DDP, whose gradients are already equal on every rank): this
    rank's sum, no collective."""
    grads = [local(p.grad) for p in params if p.grad is not None]
    # 1. this rank's sum of squares, in float64
    sq = torch.zeros((), dtype=torch.float64, device=grads[0].device if grads else "cpu")
    for g in grads:
        sq += g.double().square().sum()
    # 2. FSDP: add the other ranks' shards (each element lives on one rank of the group)
    if sharded:
        dist.all_reduce(sq, group=group)
    return sq.cpu()


@contextmanager
def no_gradient_sync(model: torch.nn.Module):
    """FSDP2's counterpart of DDP's no_sync: micro-steps that only accumulate keep their unsharded
    gradients and reduce-scatter nothing; the last micro-step reduces the sum."""
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict with each sharded tensor gathered whole, on the host (collective:
    every rank must call it; for tests and small exports, not for checkpoints, which DCP writes
    shard by shard)."""
    return {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().cpu() for k, v in model.state_dict().items()}


def state_bytes(model: torch.nn.Module, optimizer, expert_names) -> dict[str, dict[str, int]]:
    """This rank's bytes of parameters and of their AdamW moments, measured from the tensors it holds
    (a shard's local part under FSDP, the whole tensor under DDP): {"dense": ..., "experts": ...},
    each {"params", "optimizer"}. The parameters named in `expert_names` (EP's and FSSDP's) are the
    experts; tied ones count once (named_parameters lists them once)."""
    reshard(model)
    out = {"dense": {"params": 0, "optimizer": 0}, "experts": {"params": 0, "optimizer": 0}}
    experts = set(expert_names)
    for name, p in model.named_parameters():
        held = out["experts" if name in experts else "dense"]
        held["params"] += local(p).numel() * p.element_size()
        for v in optimizer.state.get(p, {}).values():
            if torch.is_tensor(v) and v.ndim:
                held["optimizer"] += local(v).numel() * v.element_size()
    return out
