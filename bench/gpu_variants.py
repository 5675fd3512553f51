"""Candidate speed-ups, measured against the library's code before any of them moves into it.

`bench/gpu_train.py --variant NAME ...` swaps them into moesaic's model for one run. Each computes
the same function as the code it replaces (tests/test_bench_kernels.py checks that on CPU):

- `fused`: the library's `model.moe.kernels=triton` (SwiGLU, the gather's backward and the combine
  one Triton kernel each way; moesaic/parallel/kernels.py) in every MoE layer.
- `triton-experts`: the grouped GEMMs of bench/triton_grouped.py instead of `torch._grouped_mm`
  (checked against the per-expert loop on CPU by Triton's interpreter).
- `w1w3`: the layout the library had before it stored w13 = [w1; w3] (E, 2F, D): w1 and w3 as two
  parameters and two grouped GEMMs of N = F. It is the control for the stored w13's loss and time.
- `complex-rotary`: the rotary embedding as one complex multiply in fp32, against the
  library's eight bf16 element-wise passes per tensor.
- `moe-act`: the library's `parallel.recompute_moe_act` (the experts keep h13 alone and recompute
  their activation in backward): what it saves in peak memory, and costs in time.

The H200 profile in bench/RESULTS.md motivates them: in eager mode `aten::mul` takes 40 ms per step
(rotary, SwiGLU, combine), and the grouped GEMMs run at about 71% of the dense rate.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F

VARIANTS = ("w1w3", "complex-rotary", "triton-experts", "fused", "moe-act")


def split_swiglu(x_TD, counts_E, w1_EFD, w2_EDF, w3_EFD):
    """The library's `grouped_swiglu` as it was with w1 and w3 stored apart: three grouped GEMMs."""
    from moesaic.parallel.experts import _ContiguousGrad, _offsets, autocast_cast

    offs = _offsets(counts_E)
    x_TD, w1_EFD, w2_EDF, w3_EFD = autocast_cast(x_TD, w1_EFD, w2_EDF, w3_EFD)
    x_TD = _ContiguousGrad.apply(x_TD)
    h1_TF = torch._grouped_mm(x_TD, w1_EFD.transpose(-2, -1), offs=offs)
    h3_TF = torch._grouped_mm(x_TD, w3_EFD.transpose(-2, -1), offs=offs)
    out_TD = torch._grouped_mm(F.silu(h1_TF) * h3_TF, w2_EDF.transpose(-2, -1), offs=offs)
    return _ContiguousGrad.apply(out_TD)


def _split_forward(self, x_TD, counts_E):
    return split_swiglu(x_TD, counts_E, self.w1_split, self.w2_EDF, self.w3_split)


def _triton_forward(self, x_TD, counts_E):
    from triton_grouped import triton_w13_swiglu

    return triton_w13_swiglu(x_TD, counts_E, self.w13_EGD, self.w2_EDF)


def split_w13(model: torch.nn.Module) -> int:
    """Store each GroupedExperts' w13 as two parameters w1, w3 again (same values), computed by
    `split_swiglu`; returns how many modules changed. Call before the optimizer is built."""
    from moesaic.parallel.experts import GroupedExperts

    n = 0
    for mod in model.modules():
        if isinstance(mod, GroupedExperts):
            w1, w3 = (t.detach().clone() for t in mod.w13_EGD.chunk(2, dim=1))
            del mod.w13_EGD
            mod.w1_split, mod.w3_split = torch.nn.Parameter(w1), torch.nn.Parameter(w3)
            mod.forward = types.MethodType(_split_forward, mod)
            n += 1
    return n


def complex_rotary(x_BHSDh, cos_SD, sin_SD):
    """`moesaic.trainer.model.apply_rotary` (adjacent pairs rotate) as a complex multiply in fp32."""
    S, half = x_BHSDh.shape[-2], x_BHSDh.shape[-1] // 2
    xc = torch.view_as_complex(x_BHSDh.float().reshape(*x_BHSDh.shape[:-1], half, 2))
    rot = torch.complex(cos_SD[:S].float(), sin_SD[:S].float())
    return torch.view_as_real(xc * rot).flatten(-2).type_as(x_BHSDh)


def use(variants) -> None:
    """Swap the function-level variants into moesaic's modules (for this process); the others change
    modules or parameters, so they are applied to each model by `apply(model, variants)`."""
    import moesaic.trainer.model as model

    for v in variants:
        if v == "complex-rotary":
            model.apply_rotary = complex_rotary
        elif v not in VARIANTS:
            raise ValueError(f"--variant ({v!r}) must be one of {', '.join(VARIANTS)}")


def apply(model: torch.nn.Module, variants) -> None:
    from moesaic.parallel.experts import GroupedExperts

    if "w1w3" in variants and ("fused" in variants or "triton-experts" in variants):
        raise ValueError("--variant w1w3 is the old layout: it does not combine with fused or triton-experts")
    for mod in model.modules():
        if isinstance(mod, GroupedExperts):
            if "fused" in variants:
                mod.kernels = "triton"
            if "triton-experts" in variants:
                mod.forward = types.MethodType(_triton_forward, mod)
    if "moe-act" in variants:  # as apply_activation_checkpoint(model, "none", recompute_moe_act=True) sets them
        for moe in model.moe_layers():
            moe.experts.recompute_act = True
            if moe.shared is not None:
                moe.shared.recompute_act = True
    if "w1w3" in variants:
        split_w13(model)


def check_w13(device, dtype, tokens=16384, experts=16, top_k=4, dim=2048, ffn=1408, seed=0) -> dict:
    """The library's `grouped_swiglu` (stored w13; torch and, where they run, Triton element-wise
    kernels) and `split_swiglu` (w1, w3 apart) against the fp32 per-expert loop, on the same data:
    max relative error of the output and of each gradient (x, w13 or w1 | w3, w2). At the defaults,
    gpu_train's expert shape. The w13 layout's loss curve on a GPU ran higher than the w1, w3
    layout's (bench/RESULTS.md); this tells a kernel problem from chaotic training."""
    from moesaic.parallel import kernels
    from moesaic.parallel.experts import grouped_swiglu, looped_swiglu

    g = torch.Generator(device="cpu").manual_seed(seed)
    ids = torch.randn(tokens, experts, generator=g).topk(top_k, dim=-1).indices.flatten()
    counts = torch.bincount(ids, minlength=experts)
    rows = int(counts.sum())
    make = lambda *s, scale=1.0: (torch.randn(*s, generator=g) * scale)  # noqa: E731
    x0, w13, w2, dy = make(rows, dim), make(experts, 2 * ffn, dim, scale=0.02), make(experts, dim, ffn, scale=0.02), \
        make(rows, dim)
    leaves = lambda ts, dt: [t.to(device=device, dtype=dt).requires_grad_() for t in ts]  # noqa: E731
    x, a13, a2 = leaves([x0, w13, w2], torch.float32)
    ref = looped_swiglu(x, counts, a13, a2)
    ref_g = torch.autograd.grad(ref, (x, a13, a2), dy.to(device))
    rel = lambda a, b: float((a.detach().float() - b.detach().float()).abs().max() / b.detach().float().abs().max())  # noqa: E731
    out = {}
    runs = ["torch"] + (["triton"] if kernels.available() and device.type == "cuda" else [])
    for kn in runs:
        x, b13, b2 = leaves([x0, w13, w2], dtype)
        y = grouped_swiglu(x, counts.to(device), b13, b2, kernels=kn)
        gs = torch.autograd.grad(y, (x, b13, b2), dy.to(device, dtype))
        out[f"w13 ({kn})"] = {"out": rel(y, ref), **{k: rel(a, b) for k, a, b in zip(("grad_x", "grad_w13", "grad_w2"), gs, ref_g)}}
    x, c1, c3, c2 = leaves([x0, *(c.contiguous() for c in w13.chunk(2, dim=1)), w2], dtype)
    y = split_swiglu(x, counts.to(device), c1, c2, c3)
    gs = torch.autograd.grad(y, (x, c1, c3, c2), dy.to(device, dtype))
    gs = [gs[0], torch.cat([gs[1], gs[2]], 1), gs[3]]
    out["w1w3"] = {"out": rel(y, ref), **{k: rel(a, b) for k, a, b in zip(("grad_x", "grad_w13", "grad_w2"), gs, ref_g)}}
    return out


if __name__ == "__main__":  # python bench/gpu_variants.py: check_w13 on this machine's device
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from common import ensure_importable

    ensure_importable()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    kw = {} if dev.type == "cuda" else dict(tokens=512, experts=4, top_k=2, dim=64, ffn=48)
    for name, errs in check_w13(dev, torch.bfloat16, **kw).items():
        print(f"{name:8s} bf16 against the fp32 loop, max rel. error: " + ", ".join(f"{k} {v:.2e}" for k, v in errs.items()))
