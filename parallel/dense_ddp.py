"""DDP for the dense parameters (`parallel.dense_sharding=ddp`, the default): every rank holds all
of them, and DDP all-reduces their gradients, bucket by bucket, while backward runs. The routed
experts are left out (`_set_params_and_buffers_to_ignore_for_model`): expert parallelism or FSSDP
reduces their gradients.

Per step (DDP's own sequence):
    1. backward: as a bucket's last gradient is ready, DDP divides the bucket by the world size and
       all-reduces it (asynchronously, overlapping the rest of backward); under
       `reduce_dtype=torch.bfloat16` (or `torch.float16`), `half_allreduce_hook` casts the bucket to
       bf16 (fp16) first (half the bytes; Megatron's --grad-reduce-in-bf16, DeepSpeed's
       communication_data_type);
    2. end of backward: DDP waits for the buckets; each parameter's `.grad` is a view into its
       bucket (`bucket_view`, DDP's gradient_as_bucket_view), or, without it, DDP copies the
       averaged gradients into each `.grad`.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

BUCKET_ORDERS = ("fixed", "backward")


def apply_ddp(model: torch.nn.Module, *, device: torch.device, bucket_order: str = "fixed",
              reduce_dtype: torch.dtype = torch.float32, bucket_view: bool = True) -> DDP:
    """Wrap `model` (materialized, its experts already ignored by DDP) in DDP on `device`.
    `bucket_order`: `fixed` sets the buckets once, before the first step (`fix_ddp_buckets`);
    `backward` leaves them to DDP. `reduce_dtype`: fp32, or bf16 or fp16 (the gradients travel and
    are summed in it). `bucket_view`: the gradients are views into the buckets (one copy, not two)."""
    if bucket_order not in BUCKET_ORDERS:
        raise ValueError(f"apply_ddp: bucket_order ({bucket_order!r}) must be one of {', '.join(map(repr, BUCKET_ORDERS))}")
    if reduce_dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"apply_ddp: reduce_dtype ({reduce_dtype}) must be torch.float32, torch.bfloat16 or torch.float16")
    ddp = DDP(model, device_ids=[device.index] if device.type == "cuda" else None, gradient_as_bucket_view=bucket_view)
    if reduce_dtype != torch.float32:
        ddp.register_comm_hook(reduce_dtype, half_allreduce_hook)  # the hook's state: the dtype
    if bucket_order == "fixed":
        fix_ddp_buckets(ddp)
    return ddp


def half_allreduce_hook(dtype, bucket):
    """DDP's communication hook for reduce_dtype=bf16 or fp16 (`dtype`, the hook's state; `bucket`: a
    dist.GradBucket; unannotated, as DDP checks annotations against the class and this module's are
    strings): torch's bf16_compress_hook and fp16_compress_hook, on any backend (torch's bf16 hook
    accepts only NCCL or XCCL), over the default (whole-world) group, dividing before the cast."""
    buf = bucket.buffer()
    # 1. the bucket divided by the world size (DDP's mean; first, so that an fp16 sum of loss-scaled
    #    gradients stays further from fp16's overflow, and in fp32, so that a value in fp16's
    #    subnormal range is rounded once), in bf16 (fp16)
    comm = buf.div_(dist.get_world_size()).to(dtype)
    # 2. all-reduce (sum) in bf16 (fp16), asynchronously: backward goes on
    fut = dist.all_reduce(comm, async_op=True).get_future()

    def back_to_fp32(f: torch.futures.Future) -> torch.Tensor:
        # 3. the sum, back into DDP's fp32 bucket
        buf.copy_(f.value()[0])
        return buf

    return fut.then(back_to_fp32)


def fix_ddp_buckets(ddp: DDP) -> None:
    """Set DDP's buckets before the first step, to the dense parameters in reverse registration order.

    DDP reduces a run's first backward in one bucket, and rebuilds its buckets in the order that this
    backward produced the gradients. A resumed run starts a new first backward, and a sum over more
    than 2 ranks depends on where an element sits in its bucket, so its next step differed from the
    uninterrupted run's by an ulp. Here the first backward is of an all-zero loss built so that the
    gradients come in reverse registration order: the same in every run. The model's forward does not
    run, so no routing, statistics or random numbers are touched; the cost is one all-reduce of zeros.
    """
    params = [p for n, p in ddp.module.named_parameters() if p.requires_grad and n not in ddp.parameters_to_ignore]

    def zero_loss() -> torch.Tensor:
        # autograd runs the newest node first: each term added last gives its gradient first
        loss = params[0].sum() * 0
        for p in params[1:]:
            loss = loss + p.sum() * 0
        return loss

    own = ddp.module.__dict__.get("forward")  # an instance's own forward, if it has one
    ddp.module.forward = zero_loss  # what DDP's forward calls, for this one call
    try:
        ddp().backward()
    finally:
        if own is None:
            del ddp.module.forward
        else:
            ddp.module.forward = own
    for p in params:
        p.grad = None
