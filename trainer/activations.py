"""Activation memory per micro-batch, counted rather than modelled: `moesaic-estimate`'s activation
column.

The model's forward runs under FakeTensorMode (shapes only: nothing is allocated or computed), with
the trainer's autocast (`parallel.mixed_precision`), FSDP2's bf16 compute weights
(`parallel.dense_gather_dtype=bf16`), activation checkpointing and `parallel.recompute_moe_act`, and
every tensor that autograd keeps for backward is counted once per storage, parameters left out: the
same count as `bench/activation_memory.py` makes of a real forward, and the tests check that the two
agree byte for byte. The weights' copies in the autocast dtype, which the GEMMs keep until their
backward, are counted apart: a dispatch mode notes each cast of a weight, the experts' apart from
the dense ones, since a rank keeps the casts of only the experts it computes.

What it assumes:
- Dropless routing (or a capacity that drops nothing): every rank's experts receive tokens x top-k
  rows. Under expert parallelism and FSSDP that is the balanced case; a rank that receives twice its
  share keeps twice the experts' part. (A 2-rank EP forward of a d-64 model kept 0.999x and 1.005x
  of the count, the difference being the routing's imbalance.)
- Eager kernels as the CPU runs them. On a GPU, fused RMSNorm and flash attention keep somewhat less
  (the norm's normalized copy, for one), and under `compile=true` inductor's partitioner chooses what
  to keep (it recomputes element-wise steps such as silu): read the count as an upper bound there.
- The bytes kept when the forward ends. Backward adds its working set: gradients of one block's
  activations at a time, and with checkpointing one block's recomputed activations. `step_bytes`
  counts it too, running the backward on the same fake tensors, with `LiveBytes` following every
  storage from the op that creates it to its last reference (the tests check the count against real
  steps byte for byte, and `LiveBytes` against torch's own MemTracker).
"""

from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

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
    def backward(ctx, grad):  # as `torch._grouped_mm`'s backward allocates: both operands' gradients
        a, b, _ = ctx.saved_tensors
        return grad.new_empty(a.shape), grad.new_empty(b.shape), None


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


class LiveBytes(TorchDispatchMode):
    """The bytes of the storages that ops allocate while it is on, live at once, at every op's end:
    each storage once (views share it), from the op that creates it (an output whose storage no
    input has) until its last reference goes (a weakref on the storage). Real or fake tensors alike.
    `peak(leave_out)` replays the timeline without the given storages (the parameters' gradients,
    counted apart), so that the order in which they were recognized does not matter."""

    def __init__(self):
        super().__init__()
        self.events: list[tuple[int, int]] = []  # (allocation serial, +bytes or -bytes); (-1, 0) ends an op
        self.alive: dict[int, tuple[int, int]] = {}  # storage key -> (serial, bytes)
        self._refs: dict[int, weakref.ref] = {}
        self._serial = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = {t.untyped_storage()._cdata for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                st = t.untyped_storage()
                if st._cdata not in inputs and st._cdata not in self.alive:
                    self._alloc(st)
        self.events.append((-1, 0))
        return out

    def _alloc(self, st) -> None:
        key, n = st._cdata, st.nbytes()
        self._serial += 1
        self.alive[key] = (self._serial, n)
        self.events.append((self._serial, n))
        self._refs[key] = weakref.ref(st, lambda _, key=key: self._free(key))

    def _free(self, key: int) -> None:
        serial, n = self.alive.pop(key)
        self._refs.pop(key, None)
        self.events.append((serial, -n))

    def serials(self, tensors) -> set[int]:
        """The allocation serials of these tensors' storages (those allocated under the mode)."""
        keys = {t.untyped_storage()._cdata for t in tensors}
        return {self.alive[k][0] for k in keys if k in self.alive}

    def peak(self, leave_out: set[int] = frozenset()) -> int:
        live = top = 0
        for serial, delta in self.events:
            if serial < 0:
                top = max(top, live)
            elif serial not in leave_out:
                live += delta
        return top

    def now(self, leave_out: set[int] = frozenset()) -> int:
        return sum(n for s, n in self.alive.values() if s not in leave_out)


@dataclass(frozen=True)
class Kept:
    """Bytes that autograd keeps for backward after a forward, each storage once, the weights
    themselves left out (the parameters, and any leaf that requires grad: FSDP2's unsharded
    parameters, FSSDP's gathered experts)."""

    total: int
    weight_copies: int
    """of which: the weights' copies in another dtype (autocast's casts, the experts' `autocast_cast`),
    which the GEMMs keep until their backward"""
    expert_copies: int
    """of which: those of the model's expert parameters (names with ".experts.")"""


def _weight_of(t: torch.Tensor) -> torch.Tensor | None:
    """The weight that `t` is or views: a leaf that requires grad."""
    base = t._base if t._base is not None else t
    return base if base.is_leaf and base.requires_grad else None


class _WeightCopies(TorchDispatchMode):
    """Notes every dtype cast of a weight (aten._to_copy; autocast's casts reach the dispatcher as it),
    holding the copies so that their storages cannot be reused by other tensors meanwhile."""

    def __init__(self, experts: set[int]):
        super().__init__()
        self.experts, self.copies = experts, {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is torch.ops.aten._to_copy.default and isinstance(out, torch.Tensor):
            w = _weight_of(args[0])
            if w is not None and out.dtype != args[0].dtype:
                self.copies[out.untyped_storage()._cdata] = (out, w.untyped_storage()._cdata in self.experts)
        return out


def forward_kept(model: torch.nn.Module, forward, *, copies: bool = True) -> tuple:
    """(forward(), `Kept`): the tensors that autograd keeps for backward meanwhile. Inside a
    checkpointed region torch's own hooks take the tensors, which is what checkpointing drops. Real
    or fake tensors alike (bench/activation_memory.py counts real forwards with it). `copies=False`
    leaves the weights' copies among the rest (Kept's two parts 0) and runs no dispatch mode, under
    which torch.compile'd code would run eagerly."""
    experts = {getattr(p, "_local_tensor", p).untyped_storage()._cdata  # (a DTensor: its local shard)
               for n, p in model.named_parameters() if ".experts." in n}
    kept: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if _weight_of(t) is None:
            st = t.untyped_storage()
            kept[st._cdata] = st.nbytes()
        return t

    casts = _WeightCopies(experts)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), casts if copies else contextlib.nullcontext():
        out = forward()
    kept_casts = {k: n for k, n in kept.items() if k in casts.copies}
    expert = sum(n for k, n in kept_casts.items() if casts.copies[k][1])
    return out, Kept(sum(kept.values()), sum(kept_casts.values()), expert)


def step_bytes(model: torch.nn.Module, forward) -> tuple[Kept, int]:
    """Runs `forward()` (a `ModelOutput`; the caller's autocast inside it) and the backward of its loss,
    as the trainer does (the logits are not kept through backward), real or fake tensors alike:
    (`Kept` after the forward, the working set). The working set is the most bytes that the
    forward and backward hold at once beyond what autograd keeps, the parameters' gradients aside
    (`moesaic-estimate` counts every gradient apart): a block's transients, the gradients of its
    activations, under checkpointing its recomputed activations. Kept tensors free as backward goes,
    so the working set is what backward needs on top of them, 0 where it frees faster than it
    allocates."""
    with LiveBytes() as live:
        out, kept = forward_kept(model, forward)
        loss = out.loss
        del out
        loss.backward()
    return kept, working_set(live, model, kept)


def working_set(live: LiveBytes, model: torch.nn.Module, kept: Kept) -> int:
    """What `live` saw held at once beyond `kept`, the parameters' gradients (FSDP2's: their local
    shards) left out."""
    grads = live.serials(getattr(p.grad, "_local_tensor", p.grad) for p in model.parameters() if p.grad is not None)
    return max(0, live.peak(grads) - kept.total)


def kept_for_backward(cfg: TrainConfig, batch: int, *, fsdp_experts: bool = False) -> Kept:
    """What autograd keeps after the forward of `batch` sequences of data.seq_len tokens, every expert
    local, counted on fake tensors. `fsdp_experts`: without a plan, FSDP shards (and gathers) the
    experts as dense parameters."""
    return count_step(cfg, batch, fsdp_experts=fsdp_experts, backward=False)[0]


def count_step(cfg: TrainConfig, batch: int, *, fsdp_experts: bool = False,
               backward: bool = True) -> tuple[Kept, int | None]:
    """`kept_for_backward`, and with `backward` the working set of `step_bytes`, on fake tensors."""
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
                if fsdp_experts or ".experts." not in name:
                    p.data = p.data.to(torch.bfloat16)
        idx = torch.zeros(batch, cfg.data.seq_len, dtype=torch.int64)

        def forward():
            with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
                return model(idx, idx)

        if not backward:
            return forward_kept(model, forward)[1], None
        return step_bytes(model, forward)


def activation_bytes(cfg: TrainConfig, *, fsdp_experts: bool = False) -> dict:
    """What one micro-batch of batch_size x data.seq_len keeps for backward, apart:
    - "activations": everything but the weights' copies (the rotary tables' casts among it);
    - "dense_copies": the dense weights' copies in the autocast dtype (none where FSDP2 gathers them
      in bf16, or without autocast);
    - "expert_copy": the copy of one expert's weights in one MoE layer: a rank keeps one for every
      expert whose fp32 weights it computes with under autocast (`estimate` counts them per rank);
    - "working": the forward's and backward's working set beyond these (`step_bytes`);
    - "note".
    A capacity factor is counted as dropless (an upper bound). Where the rows' sizes depend on the
    routing (the per-expert loop of dims that `torch._grouped_mm` cannot take), the figures are None
    and the note says why."""
    import copy

    from torch._subclasses.fake_tensor import DataDependentOutputException

    note = ""
    if cfg.model.moe.capacity_factor > 0:
        cfg = copy.deepcopy(cfg)  # (not dataclasses.replace: TrainConfig's checks are the trainer's)
        cfg.model.moe.capacity_factor = 0.0
        note = "capacity counted as dropless (an upper bound)"
    try:
        kept, working = count_step(cfg, cfg.batch_size, fsdp_experts=fsdp_experts)
    except DataDependentOutputException:
        return {"activations": None, "dense_copies": None, "expert_copy": None, "working": None,
                "note": "not counted: the experts run as a per-expert loop (model.dim or model.moe.ffn_dim breaks "
                        "torch._grouped_mm's 16-byte rule), whose sizes depend on the routing"}
    slots = cfg.model.num_moe_layers * cfg.model.moe.num_experts
    return {"activations": kept.total - kept.weight_copies, "dense_copies": kept.weight_copies - kept.expert_copies,
            "expert_copy": kept.expert_copies // slots if slots else 0, "working": working, "note": note}
