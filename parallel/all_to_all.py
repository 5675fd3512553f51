"""`all_to_all` with uneven splits as an autograd op (gloo and nccl): the backward pass is the same
exchange with the splits swapped. `torch.distributed.nn.functional.all_to_all_single` does this too
but is deprecated in torch 2.13; this one is stable and small."""

from __future__ import annotations

import torch
import torch.distributed as dist


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
        ctx.out_splits, ctx.in_splits, ctx.group = out_splits, in_splits, group
        out = x.new_empty((sum(out_splits),) + tuple(x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous()
        out = grad.new_empty((sum(ctx.in_splits),) + tuple(grad.shape[1:]))
        dist.all_to_all_single(out, grad, ctx.in_splits, ctx.out_splits, group=ctx.group)
        return out, None, None, None


def all_to_all(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group=None) -> torch.Tensor:
    """Rows x[sum(in_splits[:d]) : ...] go to rank d of `group`; returns the rows received, by source."""
    return _AllToAll.apply(x, list(out_splits), list(in_splits), group)


def all_reduce_anywhere(t: torch.Tensor, group=None, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """`dist.all_reduce(t)` in place, for a tensor on any device: NCCL reduces CUDA tensors only, so
    there a host tensor (statistics, counters) goes through this rank's GPU and back."""
    if t.device.type == "cpu" and dist.get_backend(group) == "nccl":
        on_gpu = t.to(torch.device("cuda", torch.cuda.current_device()))
        dist.all_reduce(on_gpu, op=op, group=group)
        return t.copy_(on_gpu)
    dist.all_reduce(t, op=op, group=group)
    return t


def exchange_counts(send_counts: torch.Tensor, group=None) -> torch.Tensor:
    """send_counts (P, C) int64: row d is what this rank sends to rank d. Returns (P, C): row s is
    what rank s sends here. One equal-split all_to_all_single, no autograd."""
    recv = torch.empty_like(send_counts)
    dist.all_to_all_single(recv, send_counts.contiguous(), group=group)
    return recv


def all_gather_single(out: torch.Tensor, t: torch.Tensor, group=None) -> None:
    """`out` = every rank's `t`, concatenated by rank: `dist.all_gather_single` where torch has it
    (2.13, which deprecates `all_gather_into_tensor`), else `all_gather_into_tensor`."""
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out, t, group=group)
