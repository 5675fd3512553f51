"""The MoE layer's memory-bound steps as one Triton kernel each (`model.moe.kernels=triton`).

Outside its grouped GEMMs the layer only moves rows: the gather of each token-slot's row, SwiGLU
between the two GEMMs, and the weighted combine. In torch each is several passes over the N = T*K
rows (the combine: un-permute, multiply, sum; SwiGLU's backward: five element-wise ops). Here:

| step | kernel | bytes (rows N = T*K) |
|---|---|---|
| gather (fwd) | `index_select` of 8-byte words (as in torch) | read T*D, write N*D |
| SwiGLU (fwd) | `swiglu13`: silu(h13[:, :F]) * h13[:, F:] | read N*2F, write N*F |
| combine (fwd) | `slot_sum`: out_t = sum_k w_tk * y[pos_tk] | read N*D, write T*D |
| combine (bwd) | `slot_sum_backward`: grad_y[pos_tk] = w_tk g_t, grad_w_tk = <g_t, y[pos_tk]> | read N*D, write N*D |
| SwiGLU (bwd) | `swiglu13_backward` | read N*3F, write N*2F |
| gather (bwd) | `slot_sum` with unit weights: grad_x_t = sum_k dx[pos_tk] | read N*D, write T*D |

At the DeepSeekMoE-like shape (T 8,192, top-6, D 2,048, F 1,408, bf16) that is 2.3 GB against the
torch path's 5.3 GB (`python bench/gpu_moe_layer.py --traffic`). Each op computes in fp32 registers,
rounds once, needs no atomics, and is a torch custom op with autograd (opaque to torch.compile).
Without a CUDA tensor (and without TRITON_INTERPRET=1, which the tests set to run the kernels on
CPU) each op runs the same math in torch. `pos_TK` is the sorted row of each token-slot, -1 for a
slot dropped over capacity. Legend: T tokens, K top-k, N rows, D model dim, F expert ffn dim.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the ops run their torch math
    triton = None

if triton is not None and os.environ.get("TRITON_INTERPRET") == "1":
    # Triton 3.6's interpreter turns scalars into 1-element arrays and int()s them, which numpy >= 2.4
    # refuses (loop bounds such as range(0, D, BLOCK_D) fail): convert through .item() instead.
    import triton.runtime.interpreter as _interp

    _patch_tensor = _interp._patch_lang_tensor

    def _patch_lang_tensor(tensor, scope):
        _patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    _interp._patch_lang_tensor = _patch_lang_tensor

if triton is not None:

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


def unavailable(on_gpu: bool) -> str | None:
    """Why the Triton kernels cannot run where the ranks run (`on_gpu`: on CUDA devices), as the end
    of an error message; None where they can."""
    if triton is None:
        return "needs the triton package, which is not installed"
    if not on_gpu and os.environ.get("TRITON_INTERPRET") != "1":
        return "needs a CUDA device (or TRITON_INTERPRET=1 to run the kernels on CPU, slowly)"
    return None


def available() -> bool:
    """Whether the Triton kernels can run on this machine's default device."""
    return unavailable(torch.cuda.is_available()) is None


def _use_triton(t: torch.Tensor) -> bool:
    return triton is not None and (t.is_cuda or os.environ.get("TRITON_INTERPRET") == "1")


def _block(t: torch.Tensor, block: int) -> int:
    return block if t.is_cuda else 16  # small blocks keep the interpreter quick


# 1. SwiGLU over the stored-w13 GEMM's output (N, 2F) -> (N, F), and its backward


@torch.library.custom_op("moesaic::swiglu13", mutates_args=())
def swiglu13(h13: torch.Tensor) -> torch.Tensor:
    N, Fd = h13.shape[0], h13.shape[1] // 2
    if not _use_triton(h13) or N * Fd == 0:
        a, b = h13.float().chunk(2, dim=-1)
        return (F.silu(a) * b).to(h13.dtype)
    h13 = h13.contiguous()
    h = h13.new_empty(N, Fd)
    bm, bf = 4, _block(h13, 256)
    _swiglu13_kernel[(triton.cdiv(N, bm), triton.cdiv(Fd, bf))](h13, h, h, h13, N, Fd, BACKWARD=False,
                                                                 BLOCK_M=bm, BLOCK_F=bf)
    return h


@swiglu13.register_fake
def _(h13):
    return h13.new_empty(h13.shape[0], h13.shape[1] // 2)


@torch.library.custom_op("moesaic::swiglu13_backward", mutates_args=())
def swiglu13_backward(dh: torch.Tensor, h13: torch.Tensor) -> torch.Tensor:
    N, Fd = dh.shape
    if not _use_triton(h13) or N * Fd == 0:
        a, b = h13.float().chunk(2, dim=-1)
        sig = torch.sigmoid(a)
        g = dh.float()
        return torch.cat([g * b * sig * (1 + a * (1 - sig)), g * a * sig], dim=-1).to(h13.dtype)
    dh, h13 = dh.contiguous(), h13.contiguous()
    dh13 = torch.empty_like(h13)
    bm, bf = 4, _block(h13, 256)
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


@torch.library.custom_op("moesaic::slot_sum", mutates_args=())
def slot_sum(y: torch.Tensor, pos_TK: torch.Tensor, w_TK: torch.Tensor | None) -> torch.Tensor:
    T, K = pos_TK.shape
    D = y.shape[-1]
    if not _use_triton(y) or T == 0 or D == 0:
        return _slot_sum_torch(y, pos_TK, w_TK)
    y, pos_TK = y.contiguous(), pos_TK.contiguous()
    out = y.new_empty(T, D)
    bd = _block(y, 1024)
    w = w_TK.contiguous() if w_TK is not None else pos_TK
    _slot_sum_kernel[(T, triton.cdiv(D, bd))](y, pos_TK, w, out, D, K=K, HAS_W=w_TK is not None, BLOCK_D=bd)
    return out


@slot_sum.register_fake
def _(y, pos_TK, w_TK):
    return y.new_empty(pos_TK.shape[0], y.shape[-1])


@torch.library.custom_op("moesaic::slot_sum_backward", mutates_args=())
def slot_sum_backward(g: torch.Tensor, y: torch.Tensor, pos_TK: torch.Tensor,
                      w_TK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    T, K = pos_TK.shape
    D = y.shape[-1]
    if not _use_triton(y) or T == 0 or D == 0:
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
    _slot_sum_backward_kernel[(T,)](g, y, pos_TK, w_TK, gy, gw, D, K=K, BLOCK_D=_block(y, 1024))
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
        raise RuntimeError("moesaic::slot_sum without weights has no backward (a double backward of the gather)")
    gy, gw = slot_sum_backward(g, y, pos_TK, w_TK)
    return gy, None, gw


slot_sum.register_autograd(_slot_sum_grad, setup_context=_slot_sum_setup)


# 3. the gather: rows_N = x[token of each sorted row]; its backward is slot_sum with unit weights


@torch.library.custom_op("moesaic::slot_gather", mutates_args=())
def slot_gather(x: torch.Tensor, src_N: torch.Tensor, pos_TK: torch.Tensor) -> torch.Tensor:
    """x[src_N]; `pos_TK` (the inverse map) is for the backward."""
    from moesaic.parallel.experts import take_rows

    return take_rows(x.contiguous(), src_N)


@slot_gather.register_fake
def _(x, src_N, pos_TK):
    return x.new_empty(src_N.shape[0], x.shape[-1])


slot_gather.register_autograd(lambda ctx, g: (slot_sum(g.contiguous(), ctx.saved_tensors[0], None), None, None),
                              setup_context=lambda ctx, inputs, output: ctx.save_for_backward(inputs[2]))


def slot_positions(order_N: torch.Tensor, num_tokens: int, top_k: int) -> torch.Tensor:
    """pos_TK: the sorted row of each token-slot (`order_N[row]` is the slot), -1 where dropped."""
    pos = torch.full((num_tokens * top_k,), -1, dtype=torch.int32, device=order_N.device)
    pos[order_N] = torch.arange(order_N.numel(), dtype=torch.int32, device=order_N.device)
    return pos.view(num_tokens, top_k)


__all__ = ["available", "unavailable", "slot_gather", "slot_positions", "slot_sum", "slot_sum_backward", "swiglu13",
           "swiglu13_backward"]
