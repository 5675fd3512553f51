"""Activation memory per micro-batch, counted rather than modelled: `moesaic-estimate`'s activation
column.

The model's forward runs under FakeTensorMode (shapes only: nothing is allocated or computed), with
the trainer's autocast (`parallel.mixed_precision`), FSDP2's bf16 compute weights
(`parallel.dense_gather_dtype=bf16`), activation checkpointing and `parallel.recompute_moe_act`, and
every tensor that autograd keeps for backward is counted once per storage, parameters left out: the
same count as `bench/activation_memory.py` makes of a real forward, and the tests check that the two
agree byte for byte. Two token counts separate what grows with the tokens (the activations) from
what does not (autocast's bf16 copies of the weights).

What it assumes:
- Dropless routing (or a capacity that drops nothing): every rank's experts receive tokens x top-k
  rows. Under expert parallelism and FSSDP that is the balanced case; a rank that receives twice its
  share keeps twice the experts' part. (A 2-rank EP forward of a d-64 model kept 0.999x and 1.005x
  of the count, the difference being the routing's imbalance.)
- Eager kernels as the CPU runs them. On a GPU, fused RMSNorm and flash attention keep somewhat less
  (the norm's normalized copy, for one), and under `compile=true` inductor's partitioner chooses what
  to keep (it recomputes element-wise steps such as silu): read the count as an upper bound there.
- The bytes kept when the forward ends. Backward adds its working set: gradients of one block's
  activations at a time, and with checkpointing one block's recomputed activations.
"""

from __future__ import annotations

import contextlib

import torch

from moesaic.trainer.config import TrainConfig


class _GroupedMmShape(torch.autograd.Function):
    """`torch._grouped_mm` (2-D rows by 3-D weights) on fake tensors of a dtype that its meta kernel
    refuses (it takes bf16 only; the CPU kernel takes fp32 and fp16 too): the output's shape, and
    the tensors that its backward keeps (both operands, the offsets)."""

    @staticmethod
    def forward(ctx, a, b, offs):
        ctx.save_for_backward(a, b, offs)
        return a.new_empty(a.shape[0], b.shape[-1])

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError("moesaic-estimate counts the forward only")


@contextlib.contextmanager
def _grouped_mm_any_dtype():
    real = torch._grouped_mm

    def grouped_mm(a, b, offs=None, **kwargs):
        if a.dtype == torch.bfloat16 or a.dim() != 2 or b.dim() != 3:
            return real(a, b, offs=offs, **kwargs)
        return _GroupedMmShape.apply(a, b, offs)

    torch._grouped_mm = grouped_mm
    try:
        yield
    finally:
        torch._grouped_mm = real


def forward_kept(model: torch.nn.Module, forward) -> tuple:
    """(forward(), bytes of the tensors that autograd keeps for backward meanwhile): each storage
    once, `model`'s parameters left out. Inside a checkpointed region torch's own hooks take the
    tensors, which is what checkpointing drops. Real or fake tensors alike (bench/activation_memory.py
    counts real forwards with it)."""
    params = {p.untyped_storage()._cdata for p in model.parameters()}
    kept: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        if st._cdata not in params:
            kept[st._cdata] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = forward()
    return out, sum(kept.values())


def kept_for_backward(cfg: TrainConfig, batch: int) -> int:
    """Bytes that autograd keeps after the forward of `batch` sequences of data.seq_len tokens: each
    storage once, parameters left out, counted on fake tensors."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from moesaic.trainer.model import Transformer
    from moesaic.trainer.parallelize import apply_activation_checkpoint

    pc = cfg.parallel
    with torch.device("meta"):
        model = Transformer(cfg.model)
    apply_activation_checkpoint(model, pc.activation_checkpoint, recompute_moe_act=pc.recompute_moe_act)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(pc.mixed_precision)
    with FakeTensorMode(allow_non_fake_inputs=True), _grouped_mm_any_dtype():
        model.materialize("cpu", init=False)
        if dtype is torch.bfloat16 and pc.dense_sharding == "fsdp" and pc.dense_gather_dtype == "bf16":
            for name, p in model.named_parameters():  # FSDP2 computes with bf16 copies: a bf16 residual stream
                if ".experts." not in name:
                    p.data = p.data.to(torch.bfloat16)
        idx = torch.zeros(batch, cfg.data.seq_len, dtype=torch.int64)
        with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            return forward_kept(model, lambda: model(idx, idx))[1]


def activation_bytes(cfg: TrainConfig) -> dict:
    """{"activations": bytes kept for backward that grow with the tokens, for one micro-batch of
    batch_size x data.seq_len (what does not grow: autocast's copies of the weights); "note"}. A
    capacity factor is counted as dropless (an upper bound). Where the rows' sizes depend on the
    routing (the per-expert loop of dims that `torch._grouped_mm` cannot take), the activations are
    None and the note says why."""
    import copy

    from torch._subclasses.fake_tensor import DataDependentOutputException

    note = ""
    if cfg.model.moe.capacity_factor > 0:
        cfg = copy.deepcopy(cfg)  # (not dataclasses.replace: TrainConfig's checks are the trainer's)
        cfg.model.moe.capacity_factor = 0.0
        note = "capacity counted as dropless (an upper bound)"
    try:
        one, two = kept_for_backward(cfg, cfg.batch_size), kept_for_backward(cfg, 2 * cfg.batch_size)
    except DataDependentOutputException:
        return {"activations": None,
                "note": "not counted: the experts run as a per-expert loop (model.dim or model.moe.ffn_dim breaks "
                        "torch._grouped_mm's 16-byte rule), whose sizes depend on the routing"}
    return {"activations": two - one, "note": note}
