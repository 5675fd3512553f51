"""SwiGLU experts over tokens sorted by expert, via `torch._grouped_mm` (dropless).

Legend: T tokens (sorted by local expert), D model dim, F expert ffn dim, E local experts, G = 2F.
Weights are stored as (E, out, in): the gate and up projections stacked as one w13_EGD = [w1; w3]
(so the forward runs one grouped GEMM of N = 2F, and the backward one for the input gradient and
one for both weights, as Megatron-core's grouped MLP does), and the down projection w2_EDF. State
dicts and checkpoints keep torchtitan's three tensors w1_EFD, w2_EDF, w3_EFD.

`kernels="triton"` runs SwiGLU, the gather's backward and the combine as one Triton kernel each
way (`moesaic.parallel.kernels`); "torch" is the element-wise torch code below.
"""

from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F
from torch import nn
from torch._subclasses.fake_tensor import is_fake

from moesaic.parallel.swiglu import SavedRecipe, saved_instead, swiglu_down, swiglu_down_recomputed

log = logging.getLogger(__name__)
GROUPED_MM_ALIGN = 16
"""Bytes that each row of `torch._grouped_mm`'s operands must be a multiple of (checked since torch 2.9)."""


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous.

    `torch._grouped_mm`'s backward fails on an expanded (stride-0) gradient, as `out.sum()` produces.
    """

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        if grad.numel() == 0:  # an empty tensor counts as contiguous whatever its strides
            return grad.new_zeros(grad.shape)
        return grad.contiguous()


def _words(x: torch.Tensor) -> torch.Tensor:
    """x's rows as 8-byte words where the layout allows: the same bytes, a quarter of the elements
    (bf16) for the GPU's element-wise index kernels to move. Under torch.compile, and for a fake
    tensor (moesaic-estimate's count, which has no data pointer), x itself."""
    if (torch.compiler.is_compiling() or not x.is_contiguous() or x.dim() != 2
            or (x.shape[-1] * x.element_size()) % 8 or is_fake(x) or x.data_ptr() % 8):
        return x
    return x.view(torch.int64)


def take_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x[index] along dim 0 (no autograd; the callers define the backward)."""
    return _words(x).index_select(0, index).view(x.dtype)


def put_rows(out: torch.Tensor, index: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """out[index] = rows along dim 0, in place (distinct indices); returns out."""
    rows = rows.contiguous()
    w, w_rows = _words(out), _words(rows)
    if w.dtype != w_rows.dtype:  # one of them cannot be viewed as words
        w, w_rows = out, rows
    w.index_copy_(0, index, w_rows)
    return out


def _inverse(order_N: torch.Tensor) -> torch.Tensor:
    """The inverse of a permutation: inv[order[i]] = i."""
    return torch.empty_like(order_N).scatter_(0, order_N, torch.arange(order_N.numel(), device=order_N.device))


class _SlotGather(torch.autograd.Function):
    """rows_N = x_TD[order_N // K]: the token of each kept token-slot, in `order_N`.

    Autograd's own backward of that indexing accumulates into x with atomic adds (bf16 atomics on a
    GPU). The slots in `order_N` are distinct, so here each slot's gradient is moved to its own row
    (a gather by the inverse permutation; a copy where slots were dropped) and a token's K rows are
    summed: no atomics, deterministic.
    """

    @staticmethod
    def forward(ctx, x_TD, order_N, top_k):
        ctx.save_for_backward(order_N)
        ctx.num_tokens, ctx.top_k = x_TD.shape[0], top_k
        return take_rows(x_TD, order_N // top_k)

    @staticmethod
    def backward(ctx, grad_ND):
        (order_N,) = ctx.saved_tensors
        T, K, D = ctx.num_tokens, ctx.top_k, grad_ND.shape[-1]
        grad_ND = grad_ND.contiguous()
        if order_N.numel() == T * K:
            g = take_rows(grad_ND, _inverse(order_N))
        else:
            g = put_rows(grad_ND.new_zeros(T * K, D), order_N, grad_ND)
        return g.view(T, K, D).sum(1), None, None


class _PlaceRows(torch.autograd.Function):
    """out[order[i]] = y[i] in `num_rows` rows, zero where no row goes. Autograd's index_copy would
    keep y (N x D) for its backward; this keeps the indices alone."""

    @staticmethod
    def forward(ctx, y_ND, order_N, num_rows):
        ctx.save_for_backward(order_N)
        if order_N.numel() == num_rows:  # a full permutation: a gather by its inverse
            return take_rows(y_ND, _inverse(order_N))
        return put_rows(y_ND.new_zeros(num_rows, y_ND.shape[-1]), order_N, y_ND)

    @staticmethod
    def backward(ctx, grad_ND):
        (order_N,) = ctx.saved_tensors
        return take_rows(grad_ND.contiguous(), order_N), None, None


def place_rows(y_ND: torch.Tensor, order_N: torch.Tensor, num_rows: int) -> torch.Tensor:
    """Rows of `y_ND` to the positions `order_N` (distinct) of `num_rows` rows; zero elsewhere."""
    return _PlaceRows.apply(y_ND, order_N, num_rows)


KERNELS = ("torch", "triton")
EXPERT_WEIGHTS = ("w13_EGD", "w2_EDF")
"""The stored expert parameters, in the order that flattened rows ([w13 | w2]) use."""


def expert_weight_shapes(ffn_dim: int, dim: int) -> list[tuple[int, int]]:
    """Per-expert shapes of `EXPERT_WEIGHTS`."""
    return [(2 * ffn_dim, dim), (dim, ffn_dim)]


def gather_slots(x_TD: torch.Tensor, order_N: torch.Tensor, top_k: int, kernels: str = "torch") -> torch.Tensor:
    """The rows `x_TD[order_N // top_k]` that token-slots `order_N` (distinct, < T*top_k) send to experts."""
    if kernels == "triton":
        from moesaic.parallel import kernels as kn

        return kn.slot_gather(x_TD, order_N // top_k, kn.slot_positions(order_N, x_TD.shape[0], top_k))
    return _SlotGather.apply(x_TD, order_N, top_k)


def combine_slots(y_ND: torch.Tensor, order_N: torch.Tensor, weights_TK: torch.Tensor,
                  kernels: str = "torch") -> torch.Tensor:
    """out_t = sum_k weights[t, k] * y(slot t*K+k), where row i of `y_ND` is slot `order_N[i]`.

    Slots missing from `order_N` (dropped over capacity) add nothing. Written as row moves to slot
    order and a sum over K, so that neither direction needs atomic adds.
    """
    T, K = weights_TK.shape
    D = y_ND.shape[-1]
    if kernels == "triton":
        from moesaic.parallel import kernels as kn

        return kn.slot_sum(y_ND, kn.slot_positions(order_N, T, K), weights_TK.to(y_ND.dtype))
    y_TKD = place_rows(y_ND, order_N, T * K).view(T, K, D)
    return (y_TKD * weights_TK.to(y_ND.dtype).unsqueeze(-1)).sum(1)


def _offsets(counts_E: torch.Tensor) -> torch.Tensor:
    return torch.cumsum(counts_E, dim=0).to(torch.int32)


def autocast_cast(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The tensors in autocast's dtype where autocast is on (it does not cover _grouped_mm), else as they are."""
    device = tensors[0].device.type
    if not torch.amp.is_autocast_available(device) or not torch.is_autocast_enabled(device):
        return tensors  # (a meta tensor has no autocast: bench/fused_moe.traffic runs layers on meta)
    return tuple(t.to(torch.get_autocast_dtype(device)) for t in tensors)


class _Recast(SavedRecipe):
    """What a GEMM keeps for backward in place of its weight operand, a view of a weight's cast: the
    weight itself, cast again (into the same view) when backward unpacks it."""

    __slots__ = ("weight", "dtype", "view")

    def __init__(self, weight: torch.Tensor, saved: torch.Tensor):
        self.weight, self.dtype = weight, saved.dtype
        self.view = (saved.size(), saved.stride(), saved.storage_offset())

    def __call__(self) -> torch.Tensor:
        with torch.no_grad():
            return self.weight.to(self.dtype).as_strided(*self.view)


def recast_in_backward(weights: tuple, compute):
    """compute(*casts), the weights cast as `autocast_cast` casts them, where autograd keeps, in place
    of each cast (or a view of it), a `_Recast`: the weight, cast again in backward. The casts live
    for the forward alone, as FSSDP's gathered weights do (its layers that compute in place from the
    owned fp32 weights). The same values, bit for bit; every other tensor goes through the enclosing
    saved-tensor hooks, if any."""
    casts = autocast_cast(*weights)
    recast = {c.untyped_storage()._cdata: w for c, w in zip(casts, weights) if c.dtype != w.dtype}
    if not recast or not torch.is_grad_enabled():
        return compute(*casts)

    def recipe(t):
        weight = recast.get(t.untyped_storage()._cdata)
        return _Recast(weight, t) if weight is not None else None

    with saved_instead(recipe):
        return compute(*casts)


def store_swiglu(store, x_TD: torch.Tensor, counts_E: torch.Tensor, w13_EGD: torch.Tensor, w2_EDF: torch.Tensor, *,
                 recast: bool = False) -> torch.Tensor:
    """The experts' SwiGLU as a store (`GroupedExperts`, `FSSDPExperts`) runs it with its kernels and
    recompute_act: compiled (`store.compiled`), or eager, and with `recast` keeping no cast of the
    weights for backward (`recast_in_backward`)."""
    kw = dict(kernels=store.kernels, recompute_act=store.recompute_act)
    if store.compiled:
        return compiled_grouped_swiglu(x_TD, counts_E, w13_EGD, w2_EDF, **kw)
    if recast:
        return recast_in_backward((w13_EGD, w2_EDF), lambda w13, w2: grouped_swiglu(x_TD, counts_E, w13, w2, **kw))
    return grouped_swiglu(x_TD, counts_E, w13_EGD, w2_EDF, **kw)


def grouped_swiglu(
    x_TD: torch.Tensor,
    counts_E: torch.Tensor,
    w13_EGD: torch.Tensor,
    w2_EDF: torch.Tensor,
    *,
    kernels: str = "torch",
    recompute_act: bool = False,
) -> torch.Tensor:
    """out_t = w2[e] (silu(w1[e] x_t) * w3[e] x_t) for the expert e that token t is sorted under,
    where w13[e] = [w1[e]; w3[e]].

    `counts_E` (int, sums to T) gives how many consecutive rows of x belong to each expert; an expert
    with zero rows is fine. Runs in fp32/bf16/fp16 on CPU and bf16 on Hopper. Where D or F breaks
    `torch._grouped_mm`'s 16-byte rule (`grouped_mm_aligned`), it runs `looped_swiglu`, and says so once.
    `recompute_act`: keep only the first GEMM's output h13 for backward, and recompute the activation
    from it there (`swiglu_down_recomputed`); the same gradients, bit for bit.
    """
    x_TD, w13_EGD, w2_EDF = autocast_cast(x_TD, w13_EGD, w2_EDF)
    dim, ffn_dim = w2_EDF.shape[1:]
    if not grouped_mm_aligned(dim, ffn_dim, x_TD.dtype):
        return _unaligned_swiglu(x_TD, counts_E, w13_EGD, w2_EDF)
    if torch.compiler.is_compiling() and x_TD.dtype != torch.bfloat16:
        # torch.compile's shape check of _grouped_mm takes bf16 only (the CPU kernel takes any float):
        # other dtypes leave the compiled region for this call
        return _grouped_swiglu_eager(x_TD, counts_E, w13_EGD, w2_EDF, kernels, recompute_act)
    return _grouped_swiglu(x_TD, counts_E, w13_EGD, w2_EDF, kernels, recompute_act)


def compiled_grouped_swiglu(x_TD: torch.Tensor, counts_E: torch.Tensor, w13_EGD: torch.Tensor,
                            w2_EDF: torch.Tensor, *, kernels: str = "torch", recompute_act: bool = False) -> torch.Tensor:
    """`grouped_swiglu` under torch.compile, one compiled function per process shared by every layer:
    what the experts run where their dispatcher stays outside the compiled blocks (expert parallelism
    and FSSDP, see `apply_compile`). Only shapes and dtypes key its graphs, never a layer's plan: the
    rows and the number of experts become dynamic after their first change. The weights go in as
    views, since dynamo keeps a Parameter's shape static, and layers hold different numbers of experts.
    Fewer than 2 rows or experts run eagerly: dynamo specializes sizes 0 and 1, and a rank that
    receives 0 or 1 tokens, or holds 0 or 1 experts, in some layer would add graphs (twice with
    eval's no_grad) until the shared function reached the recompile limit and ran eagerly for all."""
    if x_TD.shape[0] < 2 or w2_EDF.shape[0] < 2:
        return grouped_swiglu(x_TD, counts_E, w13_EGD, w2_EDF, kernels=kernels, recompute_act=recompute_act)
    return _compiled_swiglu()(x_TD, counts_E, w13_EGD.view_as(w13_EGD), w2_EDF.view_as(w2_EDF), kernels=kernels,
                              recompute_act=recompute_act)


@functools.cache
def _compiled_swiglu():
    return torch.compile(grouped_swiglu)


def grouped_mm_aligned(dim: int, ffn_dim: int, dtype: torch.dtype) -> bool:
    """Whether the experts' rows (D and F elements of `dtype`) meet `torch._grouped_mm`'s 16-byte rule."""
    return dim * dtype.itemsize % GROUPED_MM_ALIGN == 0 and ffn_dim * dtype.itemsize % GROUPED_MM_ALIGN == 0


@torch.compiler.disable
def _unaligned_swiglu(x_TD, counts_E, w13_EGD, w2_EDF):
    _warn_unaligned(*w2_EDF.shape[1:], x_TD.dtype)
    return looped_swiglu(x_TD, counts_E, w13_EGD, w2_EDF)


@functools.lru_cache(maxsize=None)
def _warn_unaligned(dim: int, ffn_dim: int, dtype: torch.dtype) -> None:
    per_row = GROUPED_MM_ALIGN // dtype.itemsize
    log.warning("model.dim (%d) and model.moe.ffn_dim (%d) in %s: torch._grouped_mm needs both to be multiples "
                "of %d (16 bytes); these experts run as a per-expert loop instead (the same math, slower)",
                dim, ffn_dim, str(dtype).removeprefix("torch."), per_row)


def _grouped_swiglu(x_TD, counts_E, w13_EGD, w2_EDF, kernels, recompute_act=False):
    offs = _offsets(counts_E)
    x_TD = _ContiguousGrad.apply(x_TD)
    h13_TG = torch._grouped_mm(x_TD, w13_EGD.transpose(-2, -1), offs=offs)
    down = swiglu_down_recomputed if recompute_act and torch.is_grad_enabled() else swiglu_down
    return _ContiguousGrad.apply(down(h13_TG, w2_EDF, offs, kernels))


_grouped_swiglu_eager = torch.compiler.disable(_grouped_swiglu)


def looped_swiglu(
    x_TD: torch.Tensor,
    counts_E: torch.Tensor,
    w13_EGD: torch.Tensor,
    w2_EDF: torch.Tensor,
) -> torch.Tensor:
    """The per-expert loop that `grouped_swiglu` must equal (the reference in tests and benchmarks)."""
    outs = []
    for e, x in enumerate(torch.split(x_TD, counts_E.tolist())):
        w1, w3 = w13_EGD[e].chunk(2, dim=0)
        outs.append((F.silu(x @ w1.T) * (x @ w3.T)) @ w2_EDF[e].T)
    if not outs:
        return x_TD.new_zeros(0, w2_EDF.shape[1])
    return torch.cat(outs)


class GroupedExperts(nn.Module):
    """The weights of `num_experts` SwiGLU experts, computed together by `grouped_swiglu`.

    Under the skeleton's resident store every rank holds all of them; expert parallelism and FSSDP
    replace *which* experts a rank holds and where the weights come from, not this computation.
    `w1_EFD` and `w3_EFD` are views of the stored `w13_EGD`; the state dict holds them, not w13.
    """

    def __init__(self, num_experts: int, dim: int, ffn_dim: int, *, init_std: float = 0.02,
                 out_std: float | None = None, kernels: str = "torch", device=None, dtype=None):
        super().__init__()
        self.num_experts, self.dim, self.ffn_dim, self.kernels = num_experts, dim, ffn_dim, kernels
        self.compiled = False  # run compiled_grouped_swiglu (set by apply_compile under EP and FSSDP)
        self.recompute_act = False  # recompute the activation in backward (set by apply_activation_checkpoint)
        self.recast_weights = False  # keep no cast of the weights for backward (set by apply_activation_checkpoint)
        # device and dtype as nn.Linear's factory kwargs: None is torch's default (a `with torch.device`)
        self.w13_EGD = nn.Parameter(torch.empty(num_experts, 2 * ffn_dim, dim, device=device, dtype=dtype))
        self.w2_EDF = nn.Parameter(torch.empty(num_experts, dim, ffn_dim, device=device, dtype=dtype))
        self.init_weights(init_std, out_std if out_std is not None else init_std)
        self.register_state_dict_post_hook(_split_w13)
        self.register_load_state_dict_pre_hook(_join_w13)

    def init_weights(self, init_std: float, out_std: float) -> None:
        with torch.no_grad():  # w1, then w3, then w2: the draws of three separately stored tensors
            for half in self.w13_EGD.chunk(2, dim=1):
                half.copy_(torch.empty(half.shape, device=half.device).normal_(std=init_std))
        nn.init.normal_(self.w2_EDF, std=out_std)

    @property
    def w1_EFD(self) -> torch.Tensor:
        return self.w13_EGD[:, : self.ffn_dim]

    @property
    def w3_EFD(self) -> torch.Tensor:
        return self.w13_EGD[:, self.ffn_dim :]

    def forward(self, x_TD: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        return store_swiglu(self, x_TD, counts_E, self.w13_EGD, self.w2_EDF, recast=self.recast_weights)

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, dim={self.dim}, ffn_dim={self.ffn_dim}, kernels={self.kernels}"


def _split_w13(module, state_dict, prefix, local_metadata):
    w13 = state_dict.pop(prefix + "w13_EGD")
    state_dict[prefix + "w1_EFD"], state_dict[prefix + "w3_EFD"] = w13.chunk(2, dim=1)


def _join_w13(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
    if prefix + "w1_EFD" in state_dict and prefix + "w3_EFD" in state_dict:
        state_dict[prefix + "w13_EGD"] = torch.cat([state_dict.pop(prefix + "w1_EFD"),
                                                    state_dict.pop(prefix + "w3_EFD")], dim=1)


def swiglu_flops(num_tokens: int, dim: int, ffn_dim: int) -> int:
    """Forward FLOPs of SwiGLU over `num_tokens` routed token-slots: three (D x F) matmuls."""
    return 2 * num_tokens * dim * ffn_dim * 3


__all__ = ["EXPERT_WEIGHTS", "GroupedExperts", "KERNELS", "combine_slots", "compiled_grouped_swiglu",
           "expert_weight_shapes", "gather_slots", "grouped_swiglu", "looped_swiglu", "store_swiglu", "swiglu_flops"]
