"""The MoE layer's memory-bound steps as one Triton kernel each: the candidate for #4's fine-grained shapes.

On an H200 the DeepSeekMoE-like layer (T 8,192, top-6, d 2,048, f 1,408) took 6.6-7.3 ms, of which
the grouped GEMMs, at the rates measured alone, take about 4.3 ms (bench/RESULTS.md). Counted op by op (`traffic()`), the
library's eager layer moves 5.3 GB outside the GEMMs: the combine is three passes (un-permute,
multiply, sum), the gather's backward two, SwiGLU two and its backward five, and the two input
gradients of w1 and w3 are added in a sixth. Here, with w1 and w3 stored as one w13 (E, 2f, d):

| step | kernel | bytes (rows N = T*k) |
|---|---|---|
| gather (fwd) | `index_select` of 8-byte words | read T*d (L2), write N*d |
| SwiGLU (fwd) | `swiglu13`: silu(h13[:, :f]) * h13[:, f:] | read N*2f, write N*f |
| combine (fwd) | `slot_sum`: out_t = sum_k w_tk * y[pos_tk] | read N*d, write T*d |
| combine (bwd) | `slot_sum_backward`: grad_y[pos_tk] = w_tk g_t, grad_w_tk = <g_t, y[pos_tk]> | read N*d, write N*d |
| SwiGLU (bwd) | `swiglu13_backward` | read N*3f, write N*2f |
| gather (bwd) | `slot_sum` with unit weights: grad_x_t = sum_k dx[pos_tk] | read N*d, write T*d |

2.3 GB at the DeepSeekMoE-like shape, against 5.3 GB (`python bench/gpu_moe_layer.py --traffic`). The grouped GEMMs stay `torch._grouped_mm`
(bench/triton_grouped.py's are 15-30% slower). Every op is a torch custom op with autograd, opaque
to torch.compile, and computes in fp32 registers. Without CUDA (and without TRITON_INTERPRET=1, which
the tests set) each op runs the same math in torch. `pos_TK` is the sorted row of each token-slot,
-1 for a slot dropped over capacity.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from triton_grouped import triton  # noqa: F401  (applies the interpreter's numpy shim)

if triton is not None:
    import triton.language as tl

    @triton.jit
    def _swiglu13_kernel(h13_ptr, h_ptr, dh_ptr, dh13_ptr, N, Fd, BACKWARD: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_F: tl.constexpr):
        # 1. a (BLOCK_M x BLOCK_F) tile of rows and gate columns; the up column is Fd further on
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
        mask = (rows < N)[:, None] & (cols < Fd)[None, :]
        r64 = rows.to(tl.int64)[:, None]
        gate = h13_ptr + r64 * (2 * Fd) + cols[None, :]
        a = tl.load(gate, mask=mask, other=0.0).to(tl.float32)
        b = tl.load(gate + Fd, mask=mask, other=0.0).to(tl.float32)
        sig = tl.sigmoid(a)
        if BACKWARD:
            # 2. dh13 = [dh * b * silu'(a), dh * silu(a)], silu'(a) = sig * (1 + a * (1 - sig))
            g = tl.load(dh_ptr + r64 * Fd + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            out = dh13_ptr + r64 * (2 * Fd) + cols[None, :]
            tl.store(out, (g * b * sig * (1.0 + a * (1.0 - sig))).to(dh13_ptr.dtype.element_ty), mask=mask)
            tl.store(out + Fd, (g * a * sig).to(dh13_ptr.dtype.element_ty), mask=mask)
        else:
            # 2. h = silu(a) * b, rounded once
            tl.store(h_ptr + r64 * Fd + cols[None, :], (a * sig * b).to(h_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _slot_sum_kernel(y_ptr, pos_ptr, w_ptr, out_ptr, D, K: tl.constexpr, HAS_W: tl.constexpr,
                         BLOCK_D: tl.constexpr):
        # 1. token t, columns of one block: out_t = sum_k w_tk * y[pos_tk] (a dropped slot adds nothing)
        t = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        mask = cols < D
        acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
        for k in tl.static_range(K):
            p = tl.load(pos_ptr + t * K + k).to(tl.int64)
            row = tl.load(y_ptr + p * D + cols, mask=mask & (p >= 0), other=0.0).to(tl.float32)
            if HAS_W:
                row = row * tl.load(w_ptr + t * K + k).to(tl.float32)
            acc += row
        tl.store(out_ptr + t * D + cols, acc.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _slot_sum_backward_kernel(g_ptr, y_ptr, pos_ptr, w_ptr, gy_ptr, gw_ptr, D, K: tl.constexpr,
                                  BLOCK_D: tl.constexpr):
        # 1. token t: each of its slots gets w_tk * g_t as its row's gradient, and <g_t, y[pos_tk]>
        #    as its weight's, D in BLOCK_D steps (g_t is read K times: from L1/L2 after the first)
        t = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK_D)
        for k in tl.static_range(K):
            p = tl.load(pos_ptr + t * K + k).to(tl.int64)
            w = tl.load(w_ptr + t * K + k).to(tl.float32)
            dot = tl.zeros((BLOCK_D,), dtype=tl.float32)
            for d0 in range(0, D, BLOCK_D):
                mask = (d0 + cols < D) & (p >= 0)
                g = tl.load(g_ptr + t * D + d0 + cols, mask=mask, other=0.0).to(tl.float32)
                y = tl.load(y_ptr + p * D + d0 + cols, mask=mask, other=0.0).to(tl.float32)
                tl.store(gy_ptr + p * D + d0 + cols, (w * g).to(gy_ptr.dtype.element_ty), mask=mask)
                dot += g * y
            # 2. a dropped slot's weight gets no gradient (its output was not used)
            tl.store(gw_ptr + t * K + k, tl.sum(dot, 0))


def _use_triton(t: torch.Tensor) -> bool:
    return triton is not None and (t.is_cuda or os.environ.get("TRITON_INTERPRET") == "1")


def _blocks(t: torch.Tensor, block: int) -> int:
    return block if t.is_cuda else 16  # small blocks keep the interpreter quick


# 1. SwiGLU over the stored-w13 GEMM's output (N, 2f) -> (N, f), and its backward


@torch.library.custom_op("moesaic_bench::swiglu13", mutates_args=())
def swiglu13(h13: torch.Tensor) -> torch.Tensor:
    N, Fd = h13.shape[0], h13.shape[1] // 2
    if not _use_triton(h13):
        a, b = h13.float().chunk(2, dim=-1)
        return (F.silu(a) * b).to(h13.dtype)
    h13 = h13.contiguous()
    h = h13.new_empty(N, Fd)
    bm, bf = (4, _blocks(h13, 256))
    _swiglu13_kernel[(triton.cdiv(N, bm), triton.cdiv(Fd, bf))](h13, h, h, h13, N, Fd, BACKWARD=False,
                                                                 BLOCK_M=bm, BLOCK_F=bf)
    return h


@swiglu13.register_fake
def _(h13):
    return h13.new_empty(h13.shape[0], h13.shape[1] // 2)


@torch.library.custom_op("moesaic_bench::swiglu13_backward", mutates_args=())
def swiglu13_backward(dh: torch.Tensor, h13: torch.Tensor) -> torch.Tensor:
    N, Fd = dh.shape
    if not _use_triton(h13):
        a, b = h13.float().chunk(2, dim=-1)
        sig = torch.sigmoid(a)
        g = dh.float()
        return torch.cat([g * b * sig * (1 + a * (1 - sig)), g * a * sig], dim=-1).to(h13.dtype)
    dh, h13 = dh.contiguous(), h13.contiguous()
    dh13 = torch.empty_like(h13)
    bm, bf = (4, _blocks(h13, 256))
    _swiglu13_kernel[(triton.cdiv(N, bm), triton.cdiv(Fd, bf))](h13, dh, dh, dh13, N, Fd, BACKWARD=True,
                                                                 BLOCK_M=bm, BLOCK_F=bf)
    return dh13


@swiglu13_backward.register_fake
def _(dh, h13):
    return torch.empty_like(h13)


swiglu13.register_autograd(lambda ctx, dh: swiglu13_backward(dh, ctx.saved_tensors[0]),
                           setup_context=lambda ctx, inputs, output: ctx.save_for_backward(inputs[0]))


# 2. the weighted sum of each token's slots (the combine, and the gather's backward), and its backward


def _slot_sum_torch(y, pos_TK, w_TK):
    T, K = pos_TK.shape
    rows = torch.cat([y.float(), y.new_zeros(1, y.shape[-1], dtype=torch.float32)])  # row -1: a dropped slot
    picked = rows[pos_TK.flatten().long()].view(T, K, -1)
    if w_TK is not None:
        picked = picked * w_TK.float().unsqueeze(-1)
    return picked.sum(1).to(y.dtype)


@torch.library.custom_op("moesaic_bench::slot_sum", mutates_args=())
def slot_sum(y: torch.Tensor, pos_TK: torch.Tensor, w_TK: torch.Tensor | None) -> torch.Tensor:
    T, K = pos_TK.shape
    D = y.shape[-1]
    if not _use_triton(y):
        return _slot_sum_torch(y, pos_TK, w_TK)
    y, pos_TK = y.contiguous(), pos_TK.contiguous()
    out = y.new_empty(T, D)
    bd = _blocks(y, 1024)
    w = w_TK.contiguous() if w_TK is not None else pos_TK
    _slot_sum_kernel[(T, triton.cdiv(D, bd))](y, pos_TK, w, out, D, K=K, HAS_W=w_TK is not None, BLOCK_D=bd)
    return out


@slot_sum.register_fake
def _(y, pos_TK, w_TK):
    return y.new_empty(pos_TK.shape[0], y.shape[-1])


@torch.library.custom_op("moesaic_bench::slot_sum_backward", mutates_args=())
def slot_sum_backward(g: torch.Tensor, y: torch.Tensor, pos_TK: torch.Tensor,
                      w_TK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    T, K = pos_TK.shape
    D = y.shape[-1]
    if not _use_triton(y):
        valid = (pos_TK >= 0).flatten()
        p = pos_TK.flatten().long()
        gw = torch.zeros(T * K, dtype=torch.float32, device=y.device)
        gf = g.float().repeat_interleave(K, dim=0)  # (T*K, D): slot s = t*K + k gets g_t
        gw[valid] = (gf[valid] * y[p[valid]].float()).sum(-1)
        gy = torch.zeros_like(y)
        gy[p[valid]] = (gf[valid] * w_TK.flatten()[valid].float().unsqueeze(-1)).to(y.dtype)
        return gy, gw.view(T, K).to(w_TK.dtype)
    g, y, pos_TK, w_TK = g.contiguous(), y.contiguous(), pos_TK.contiguous(), w_TK.contiguous()
    gy = torch.empty_like(y)  # every row is one kept slot's: all are written
    gw = torch.empty(T, K, dtype=torch.float32, device=y.device)
    _slot_sum_backward_kernel[(T,)](g, y, pos_TK, w_TK, gy, gw, D, K=K, BLOCK_D=_blocks(y, 1024))
    return gy, gw.to(w_TK.dtype)


@slot_sum_backward.register_fake
def _(g, y, pos_TK, w_TK):
    return torch.empty_like(y), w_TK.new_empty(pos_TK.shape)


def _slot_sum_setup(ctx, inputs, output):
    y, pos_TK, w_TK = inputs
    ctx.save_for_backward(y, pos_TK, w_TK)


def _slot_sum_grad(ctx, g):
    y, pos_TK, w_TK = ctx.saved_tensors
    if w_TK is None:  # unit weights: only the gather's backward uses them, and nothing differentiates that
        raise RuntimeError("fused_moe.slot_sum without weights has no backward (a double backward of the gather)")
    gy, gw = slot_sum_backward(g, y, pos_TK, w_TK)
    return gy, None, gw


slot_sum.register_autograd(_slot_sum_grad, setup_context=_slot_sum_setup)


# 3. the gather: rows_N = x[token of each sorted row]; its backward is slot_sum with unit weights


@torch.library.custom_op("moesaic_bench::slot_gather", mutates_args=())
def slot_gather(x: torch.Tensor, src_N: torch.Tensor, pos_TK: torch.Tensor) -> torch.Tensor:
    """x[src_N]; `pos_TK` (the inverse map) is for the backward."""
    from moesaic.parallel.experts import take_rows

    return take_rows(x.contiguous(), src_N)


@slot_gather.register_fake
def _(x, src_N, pos_TK):
    return x.new_empty(src_N.shape[0], x.shape[-1])


slot_gather.register_autograd(lambda ctx, g: (slot_sum(g, ctx.saved_tensors[0], None), None, None),
                              setup_context=lambda ctx, inputs, output: ctx.save_for_backward(inputs[2]))


def slot_positions(order_N: torch.Tensor, num_tokens: int, top_k: int) -> torch.Tensor:
    """pos_TK: the sorted row of each token-slot (`order_N[row]` is the slot), -1 where dropped."""
    pos = torch.full((num_tokens * top_k,), -1, dtype=torch.int32, device=order_N.device)
    pos[order_N] = torch.arange(order_N.numel(), dtype=torch.int32, device=order_N.device)
    return pos.view(num_tokens, top_k)


# 4. the layer's pieces with the library's signatures (bench/gpu_variants.py swaps them in)


def gather_slots(x_TD, order_N, top_k):
    """`moesaic.parallel.experts.gather_slots`, with a one-pass backward."""
    return slot_gather(x_TD, order_N // top_k, slot_positions(order_N, x_TD.shape[0], top_k))


def combine_slots(y_ND, order_N, weights_TK):
    """`moesaic.parallel.experts.combine_slots` in one pass each way."""
    T, K = weights_TK.shape
    return slot_sum(y_ND, slot_positions(order_N, T, K), weights_TK.to(y_ND.dtype))


class _LoopWeightGrad(torch.autograd.Function):
    """y = x @ w[e]^T over each expert's rows (`torch._grouped_mm`), whose weight gradient is one
    dense `torch.mm` per expert instead of the ragged-K grouped GEMM (77% of dense for the
    Mixtral-like shape on the H200). Needs the split sizes on the host: for few, large experts."""

    @staticmethod
    def forward(ctx, x, w, offs, splits):
        ctx.save_for_backward(x, w, offs)
        ctx.splits = splits
        return torch._grouped_mm(x, w.transpose(-2, -1), offs=offs)

    @staticmethod
    def backward(ctx, g):
        x, w, offs = ctx.saved_tensors
        g = g.contiguous()
        gx = torch._grouped_mm(g, w, offs=offs) if ctx.needs_input_grad[0] else None
        gw = None
        if ctx.needs_input_grad[1]:
            gw = torch.empty_like(w)
            for e, (g_e, x_e) in enumerate(zip(g.split(ctx.splits), x.split(ctx.splits))):
                torch.mm(g_e.t(), x_e, out=gw[e])  # an expert without rows: K = 0, zeros
        return gx, gw, None, None


def fused_swiglu13(x_TD, counts_E, w13_EGD, w2_EDF, loop_dw: bool = False):
    """`bench/gpu_variants.fused_w13_swiglu` with SwiGLU one kernel each way; `loop_dw`: the weight
    gradients by `_LoopWeightGrad` (one host sync for the split sizes)."""
    from moesaic.parallel.experts import _offsets, autocast_cast

    offs = _offsets(counts_E)
    x_TD, w13_EGD, w2_EDF = autocast_cast(x_TD, w13_EGD, w2_EDF)
    if loop_dw:
        splits = counts_E.tolist()
        h = swiglu13(_LoopWeightGrad.apply(x_TD.contiguous(), w13_EGD, offs, splits))
        return _LoopWeightGrad.apply(h, w2_EDF, offs, splits)
    h = swiglu13(torch._grouped_mm(x_TD.contiguous(), w13_EGD.transpose(-2, -1), offs=offs))
    return torch._grouped_mm(h, w2_EDF.transpose(-2, -1), offs=offs)


class FusedExperts:
    """A GroupedExperts' weights as the fused layer computes them: [w1; w3] stored as one w13
    (built once here, as a stored parameter would be), SwiGLU one kernel each way."""

    def __init__(self, experts, loop_dw: bool = False):
        self.num_experts, self.w2, self.loop_dw = experts.num_experts, experts.w2_EDF, loop_dw
        self.w13 = torch.cat([experts.w1_EFD, experts.w3_EFD], dim=1).detach().requires_grad_()

    def __call__(self, x_TD, counts_E):
        return fused_swiglu13(x_TD, counts_E, self.w13, self.w2, self.loop_dw)


def fused_layer(x_TD, route, experts) -> torch.Tensor:
    """`moesaic.parallel.moe.LocalDispatcher` (dropless) with the fused gather and combine, the slots'
    rows computed once for both."""
    T, K = route.expert_ids_TK.shape
    order = torch.argsort(route.expert_ids_TK.flatten(), stable=True)
    pos = slot_positions(order, T, K)
    y = experts(slot_gather(x_TD, order // K, pos), route.tokens_per_expert_E)
    return slot_sum(y, pos, route.weights_TK.to(y.dtype))


def check_against_loop(device, dtype, tokens=37, top_k=2, num_experts=4, dim=32, ffn=24, drop=0.0, seed=0,
                       loop_dw=False) -> dict:
    """Max relative differences of the fused layer's output and gradients (x, router weights, w13,
    w2) from the library's gather, per-expert loop and combine in fp32, on random data; with `drop`,
    that share of the token-slots is dropped (as over capacity)."""
    from moesaic.parallel import experts as lib

    g = torch.Generator(device="cpu").manual_seed(seed)
    ids = torch.randn(tokens, num_experts, generator=g).topk(top_k, dim=-1).indices.flatten()
    order = torch.argsort(ids, stable=True)
    if drop:
        order = order[torch.rand(order.numel(), generator=g) >= drop]
    counts = torch.bincount(ids[order], minlength=num_experts)
    rand = lambda *shape, scale=1.0: (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)  # noqa: E731
    x, w = rand(tokens, dim).requires_grad_(), rand(tokens, top_k).abs().requires_grad_()
    w13, w2 = rand(num_experts, 2 * ffn, dim, scale=0.2).requires_grad_(), rand(num_experts, dim, ffn, scale=0.2).requires_grad_()
    dy = rand(tokens, dim)
    order, counts = order.to(device), counts.to(device)
    y = combine_slots(fused_swiglu13(gather_slots(x, order, top_k), counts, w13, w2, loop_dw), order, w)
    got = [y, *torch.autograd.grad(y, (x, w, w13, w2), dy)]
    w1, w3 = w13.float().chunk(2, dim=1)
    rows = lib.looped_swiglu(lib.gather_slots(x.float(), order, top_k), counts.cpu(), w1, w2.float(), w3)
    y_ref = lib.combine_slots(rows, order, w.float())
    ref = [y_ref, *torch.autograd.grad(y_ref, (x, w, w13, w2), dy.float())]
    names = ("out", "grad_x", "grad_weights", "grad_w13", "grad_w2")
    return {n: float((a.detach().float() - b.detach().float()).abs().max() / b.detach().float().abs().max())
            for n, a, b in zip(names, got, ref)}


if __name__ == "__main__":  # python bench/fused_moe.py: the layer against the fp32 loop on this machine's device
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from common import ensure_importable

    ensure_importable()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    cases = [dict(), dict(tokens=4096, top_k=2, num_experts=8, dim=1024, ffn=512, drop=0.2),
             dict(tokens=4096, top_k=2, num_experts=8, dim=1024, ffn=512, loop_dw=True)]
    if dev.type == "cuda":  # the DeepSeekMoE-like layer itself
        cases.append(dict(tokens=8192, top_k=6, num_experts=64, dim=2048, ffn=1408))
    for kw in cases:
        errs = check_against_loop(dev, dtype, **kw)
        print(f"{dtype} {kw}: max rel. error against the fp32 loop: " + ", ".join(f"{k} {v:.2e}" for k, v in errs.items()))

