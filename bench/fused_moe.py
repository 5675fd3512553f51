"""The library's Triton layer (`model.moe.kernels=triton`, moesaic/parallel/kernels.py) checked
against the fp32 per-expert loop, and one more candidate: the weight gradients as one dense mm per
expert (`loop_dw`).

On an H200 the DeepSeekMoE-like layer (T 8,192, top-6, d 2,048, f 1,408) took 6.6-7.3 ms, of which
the grouped GEMMs, at the rates measured alone, take about 4.3 ms (bench/RESULTS.md). Counted op by
op (`python bench/gpu_moe_layer.py --traffic`), the torch path moves 5.3 GB outside the GEMMs and
the Triton path 2.3 GB.

    python bench/fused_moe.py        # on a GPU: bf16, including the DeepSeekMoE-like shape
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ensure_importable  # noqa: E402

ensure_importable()
import torch  # noqa: E402
from torch import nn  # noqa: E402

from moesaic.parallel.experts import (_offsets, autocast_cast, combine_slots, gather_slots, grouped_swiglu,
                                      looped_swiglu)  # noqa: E402
from moesaic.parallel.kernels import swiglu13  # noqa: E402


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


def loop_dw_swiglu(x_TD, counts_E, w13_EGD, w2_EDF):
    """`grouped_swiglu(..., kernels="triton")` with the weight gradients by `_LoopWeightGrad` (one
    host sync for the split sizes)."""
    offs, splits = _offsets(counts_E), counts_E.tolist()
    x_TD, w13_EGD, w2_EDF = autocast_cast(x_TD, w13_EGD, w2_EDF)
    h = swiglu13(_LoopWeightGrad.apply(x_TD.contiguous(), w13_EGD, offs, splits))
    return _LoopWeightGrad.apply(h, w2_EDF, offs, splits)


class LoopDWExperts(nn.Module):
    """A GroupedExperts' own weights, computed by `loop_dw_swiglu` (with the Triton layer around it)."""

    kernels = "triton"

    def __init__(self, experts):
        super().__init__()
        self.experts = experts
        self.num_experts = experts.num_experts

    def forward(self, x_TD, counts_E):
        return loop_dw_swiglu(x_TD, counts_E, self.experts.w13_EGD, self.experts.w2_EDF)


def check_against_loop(device, dtype, tokens=37, top_k=2, num_experts=4, dim=32, ffn=24, drop=0.0, seed=0,
                       loop_dw=False) -> dict:
    """Max relative differences of the Triton layer's output and gradients (x, router weights, w13,
    w2) from the torch path's gather, per-expert loop and combine in fp32, on random data; with
    `drop`, that share of the token-slots is dropped (as over capacity)."""
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
    rows = gather_slots(x, order, top_k, "triton")
    h = loop_dw_swiglu(rows, counts, w13, w2) if loop_dw else grouped_swiglu(rows, counts, w13, w2, kernels="triton")
    y = combine_slots(h, order, w, "triton")
    got = [y, *torch.autograd.grad(y, (x, w, w13, w2), dy)]
    rows = looped_swiglu(gather_slots(x.float(), order, top_k), counts.cpu(), w13.float(), w2.float())
    y_ref = combine_slots(rows, order, w.float())
    ref = [y_ref, *torch.autograd.grad(y_ref, (x, w, w13, w2), dy.float())]
    names = ("out", "grad_x", "grad_weights", "grad_w13", "grad_w2")
    return {n: float((a.detach().float() - b.detach().float()).abs().max() / b.detach().float().abs().max())
            for n, a, b in zip(names, got, ref)}


if __name__ == "__main__":  # python bench/fused_moe.py: the layer against the fp32 loop on this machine's device
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    cases = [dict(), dict(tokens=4096, top_k=2, num_experts=8, dim=1024, ffn=512, drop=0.2),
             dict(tokens=4096, top_k=2, num_experts=8, dim=1024, ffn=512, loop_dw=True)]
    if dev.type == "cuda":  # the DeepSeekMoE-like layer itself
        cases.append(dict(tokens=8192, top_k=6, num_experts=64, dim=2048, ffn=1408))
    for kw in cases:
        errs = check_against_loop(dev, dtype, **kw)
        print(f"{dtype} {kw}: max rel. error against the fp32 loop: " + ", ".join(f"{k} {v:.2e}" for k, v in errs.items()))
