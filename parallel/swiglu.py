"""The experts' activation, SwiGLU over the stacked gate and up projections h13 = [h1 | h3], and the
down projection after it: `swiglu_down`, and `swiglu_down_recomputed`, which keeps h13 alone for
backward and recomputes the activation there (`parallel.recompute_moe_act`); the same for a dense
SwiGLU's two projections (the shared experts), `silu_mul_down_recomputed`.

Legend: N token-slots (sorted by expert), D model dim, F expert ffn dim, E experts.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts


class _SwiGLU13(torch.autograd.Function):
    """h = silu(a) * b for h13 = [a | b] (N, 2F), with a backward that writes both halves of dh13 in
    place: autograd's own backward of the two chunks ends in a cat of their gradients, another read
    and write of N x 2F. It keeps what autograd keeps (h13 and silu(a)), or with `keep_silu` False
    only h13, recomputing silu(a) in backward."""

    @staticmethod
    def forward(ctx, h13, keep_silu=True):
        a, b = h13.chunk(2, dim=-1)
        silu_a = F.silu(a)
        ctx.save_for_backward(h13, silu_a if keep_silu else None)
        return silu_a * b

    @staticmethod
    def backward(ctx, grad_h):
        h13, silu_a = ctx.saved_tensors
        a, b = h13.chunk(2, dim=-1)
        if silu_a is None:
            silu_a = F.silu(a)
        grad_h13 = torch.empty_like(h13)
        grad_a, grad_b = grad_h13.chunk(2, dim=-1)
        torch.mul(grad_h, silu_a, out=grad_b)
        torch.ops.aten.silu_backward.grad_input(grad_h * b, a, grad_input=grad_a)
        return grad_h13, None


def swiglu13_torch(h13_TG: torch.Tensor, keep_silu: bool = True) -> torch.Tensor:
    """silu(h13[:, :F]) * h13[:, F:] in torch: `_SwiGLU13` in eager mode; under torch.compile the
    plain expression, which inductor fuses (the cat included)."""
    if torch.compiler.is_compiling():
        h1_TF, h3_TF = h13_TG.chunk(2, dim=-1)
        return F.silu(h1_TF) * h3_TF
    return _SwiGLU13.apply(h13_TG, keep_silu)


def _activation(h13_TG: torch.Tensor, kernels: str, keep_silu: bool = True) -> torch.Tensor:
    if kernels == "triton":
        from moesaic.parallel.kernels import swiglu13

        return swiglu13(h13_TG)  # keeps h13 only
    return swiglu13_torch(h13_TG, keep_silu)


def swiglu_down(h13_TG: torch.Tensor, w2_EDF: torch.Tensor, offs: torch.Tensor, kernels: str = "torch") -> torch.Tensor:
    """The experts' second half: the activation h = silu(h13[:, :F]) * h13[:, F:], then the down
    projection's grouped GEMM."""
    return torch._grouped_mm(_activation(h13_TG, kernels), w2_EDF.transpose(-2, -1), offs=offs)


class _SiluMul(torch.autograd.Function):
    """h = silu(h1) * h3 that keeps h1 and h3 alone for backward (autograd's own keeps silu(h1) too)."""

    @staticmethod
    def forward(ctx, h1, h3):
        ctx.save_for_backward(h1, h3)
        return F.silu(h1) * h3

    @staticmethod
    def backward(ctx, grad_h):
        h1, h3 = ctx.saved_tensors
        return torch.ops.aten.silu_backward(grad_h * h3, h1), grad_h * F.silu(h1)


def _silu_mul(h1, h3):
    return F.silu(h1) * h3


class SavedRecipe:
    """What autograd keeps in place of a tensor under `saved_instead`: called when backward unpacks
    it, it gives the tensor back."""

    __slots__ = ()

    def __call__(self) -> torch.Tensor:
        raise NotImplementedError


class _Recompute(SavedRecipe):
    """What a GEMM keeps for backward in place of its input h: how to recompute h, `act(*inputs)`,
    the inputs kept as the enclosing hooks keep tensors, if there are any."""

    __slots__ = ("inputs", "unpack", "act")

    def __init__(self, inputs: tuple, outer, act):
        self.inputs, self.unpack = (tuple(outer[0](t) for t in inputs), outer[1]) if outer else (inputs, None)
        self.act = act

    def __call__(self) -> torch.Tensor:
        inputs = tuple(self.unpack(t) for t in self.inputs) if self.unpack else self.inputs
        with torch.no_grad():
            return self.act(*inputs)


def _enclosing_hooks():
    """The saved-tensor (pack, unpack) hooks in force here, or None (torch's own accessor)."""
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    return top(False) if top is not None else None


class _Outer:
    __slots__ = ("packed",)

    def __init__(self, packed):
        self.packed = packed


@contextlib.contextmanager
def saved_instead(recipe_for):
    """Saved-tensor hooks under which autograd keeps `recipe_for(t)`, a `SavedRecipe`, in place of
    each tensor t for which it is not None. Hooks nest by replacing: every other tensor goes through
    the enclosing hooks (an outer checkpoint, torch.autograd.graph.save_on_cpu, a memory count) as
    it would without these."""
    outer = _enclosing_hooks()

    def pack(t):
        recipe = recipe_for(t)
        if recipe is not None:
            return recipe
        return _Outer(outer[0](t)) if outer else t

    def unpack(t):
        if isinstance(t, SavedRecipe):
            return t()
        return outer[1](t.packed) if isinstance(t, _Outer) else t

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        yield


def _consume_recomputed(h: torch.Tensor, inputs: tuple, act, consume):
    """consume(h), keeping in place of h a `_Recompute` of act(*inputs) (`saved_instead`); the
    inputs go through the enclosing hooks, as every other tensor does."""
    # h's storage (its StorageImpl: a fake tensor, as moesaic-estimate runs, has no data pointer)
    key, recipe = (h.untyped_storage()._cdata, h.shape), _Recompute(inputs, _enclosing_hooks(), act)
    with saved_instead(lambda t: recipe if (t.untyped_storage()._cdata, t.shape) == key else None):
        return consume(h)


def swiglu_down_recomputed(h13_TG: torch.Tensor, w2_EDF: torch.Tensor, offs: torch.Tensor,
                           kernels: str = "torch") -> torch.Tensor:
    """`swiglu_down` that keeps h13 alone for backward (Megatron's `--recompute-modules moe_act`):
    the activation keeps only h13, and the down GEMM, instead of its input h (N x F), a `_Recompute`
    that its backward turns back into h. Eager: saved-tensor hooks around the GEMM (selective
    checkpointing would keep the GEMM's output, N x D, in its cache). Under torch.compile:
    selective checkpointing, whose policy the partitioner applies to the graph (nothing cached)."""
    if torch.compiler.is_compiling():
        return checkpoint(swiglu_down, h13_TG, w2_EDF, offs, kernels, use_reentrant=False,
                          preserve_rng_state=False, context_fn=_recompute_context)
    act = lambda h13: _activation(h13, kernels, keep_silu=False)  # noqa: E731
    return _consume_recomputed(act(h13_TG), (h13_TG,), act,
                               lambda h: torch._grouped_mm(h, w2_EDF.transpose(-2, -1), offs=offs))


def silu_mul_down_recomputed(h1: torch.Tensor, h3: torch.Tensor, down) -> torch.Tensor:
    """down(silu(h1) * h3), keeping h1 and h3 alone for backward: a dense SwiGLU's (the shared
    experts') second half, as `swiglu_down_recomputed` does the routed experts'."""
    if torch.compiler.is_compiling():
        return checkpoint(lambda a, b: down(_silu_mul(a, b)), h1, h3, use_reentrant=False,
                          preserve_rng_state=False, context_fn=_recompute_context)
    return _consume_recomputed(_SiluMul.apply(h1, h3), (h1, h3), _silu_mul, down)


_MATMULS = {torch.ops.aten._grouped_mm.default, torch.ops.aten.mm.default, torch.ops.aten.addmm.default,
            torch.ops.aten.bmm.default}


def _keep_gemm_outputs(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    """Selective checkpointing's policy for the recomputed regions under torch.compile: the GEMMs are
    never recomputed, the activation (and any cast) always."""
    return CheckpointPolicy.MUST_SAVE if op in _MATMULS else CheckpointPolicy.MUST_RECOMPUTE


def _recompute_context():
    return create_selective_checkpoint_contexts(_keep_gemm_outputs)
