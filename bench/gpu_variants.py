"""Candidate speed-ups, measured against the library's code before any of them moves into it.

`bench/gpu_train.py --variant NAME ...` swaps them into moesaic's model for one run. Each computes
the same function as the code it replaces (tests/test_bench.py checks that on CPU):

- `w13`: the experts' gate and up projections stored as one (E, 2F, D) parameter and computed as
  one grouped GEMM (N = 2F rather than two GEMMs of N = F; fine-grained experts have small F).
  The backward then runs one GEMM for the input gradient (K = 2F) and one for both weights.
- `triton-experts`: `w13`, with the grouped GEMMs of bench/triton_grouped.py instead of
  `torch._grouped_mm` (checked against the per-expert loop on CPU by Triton's interpreter).
- `fused`: `w13`, with the layer's memory-bound steps (SwiGLU, the combine, the gather's backward)
  one Triton kernel each way (bench/fused_moe.py; the GEMMs stay `torch._grouped_mm`).
- `complex-rotary`: the rotary embedding as one complex multiply in fp32, against the
  library's eight bf16 element-wise passes per tensor.

The H200 profile in bench/RESULTS.md motivates both: in eager mode `aten::mul` takes 40 ms per step
(rotary, SwiGLU, combine), and the grouped GEMMs run at about 71% of the dense rate.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F

VARIANTS = ("w13", "complex-rotary", "triton-experts", "fused")


def fused_w13_swiglu(x_TD, counts_E, w13_EGD, w2_EDF):
    """`moesaic.parallel.experts.grouped_swiglu` with w1 and w3 stacked as w13 = [w1; w3] (E, 2F, D)."""
    from moesaic.parallel.experts import _ContiguousGrad, _offsets, autocast_cast

    offs = _offsets(counts_E)
    x_TD, w13_EGD, w2_EDF = autocast_cast(x_TD, w13_EGD, w2_EDF)
    x_TD = _ContiguousGrad.apply(x_TD)
    h1_TF, h3_TF = torch._grouped_mm(x_TD, w13_EGD.transpose(-2, -1), offs=offs).chunk(2, dim=-1)
    out_TD = torch._grouped_mm(F.silu(h1_TF) * h3_TF, w2_EDF.transpose(-2, -1), offs=offs)
    return _ContiguousGrad.apply(out_TD)


def _w13_forward(self, x_TD, counts_E):
    return fused_w13_swiglu(x_TD, counts_E, self.w13_EGD, self.w2_EDF)


def _triton_forward(self, x_TD, counts_E):
    from triton_grouped import triton_w13_swiglu

    return triton_w13_swiglu(x_TD, counts_E, self.w13_EGD, self.w2_EDF)


def _fused_forward(self, x_TD, counts_E):
    from fused_moe import fused_swiglu13

    return fused_swiglu13(x_TD, counts_E, self.w13_EGD, self.w2_EDF)


def fuse_w13(model: torch.nn.Module, forward=_w13_forward) -> int:
    """Replace each GroupedExperts' w1 and w3 by one stored w13 parameter (same values); returns how
    many modules changed. Call before the optimizer is built."""
    from moesaic.parallel.experts import GroupedExperts

    n = 0
    for mod in model.modules():
        if isinstance(mod, GroupedExperts):
            w13 = torch.cat([mod.w1_EFD.detach(), mod.w3_EFD.detach()], dim=1)
            del mod.w1_EFD, mod.w3_EFD
            mod.w13_EGD = torch.nn.Parameter(w13)
            mod.forward = types.MethodType(forward, mod)
            n += 1
    return n


def complex_rotary(x_BHSDh, cos_SD, sin_SD):
    """`moesaic.trainer.model.apply_rotary` (adjacent pairs rotate) as a complex multiply in fp32."""
    S, half = x_BHSDh.shape[-2], x_BHSDh.shape[-1] // 2
    xc = torch.view_as_complex(x_BHSDh.float().reshape(*x_BHSDh.shape[:-1], half, 2))
    rot = torch.complex(cos_SD[:S].float(), sin_SD[:S].float())
    return torch.view_as_real(xc * rot).flatten(-2).type_as(x_BHSDh)


def use(variants) -> None:
    """Swap the function-level variants into moesaic's modules (for this process); the `w13`
    variant changes parameters, so it is applied to each model by `apply(model, variants)`."""
    import moesaic.parallel.moe as moe
    import moesaic.trainer.model as model

    for v in variants:
        if v == "complex-rotary":
            model.apply_rotary = complex_rotary
        elif v == "fused":
            import fused_moe

            moe.gather_slots, moe.combine_slots = fused_moe.gather_slots, fused_moe.combine_slots
        elif v not in ("w13", "triton-experts"):
            raise ValueError(f"--variant ({v!r}) must be one of {', '.join(VARIANTS)}")


def apply(model: torch.nn.Module, variants) -> None:
    if "fused" in variants:
        fuse_w13(model, _fused_forward)
    elif "triton-experts" in variants:
        fuse_w13(model, _triton_forward)
    elif "w13" in variants:
        fuse_w13(model)


def check_w13(device, dtype, tokens=16384, experts=16, top_k=4, dim=2048, ffn=1408, seed=0) -> dict:
    """`fused_w13_swiglu` and the library's `grouped_swiglu` against the fp32 per-expert loop, on the
    same data: max relative error of the output and of each gradient (x, w1 | w3 as w13, w2). At the
    defaults, gpu_train's expert shape. The w13 variant's loss curve on a GPU ran higher than the
    library's (bench/RESULTS.md); this tells a kernel problem from chaotic training."""
    from moesaic.parallel.experts import grouped_swiglu, looped_swiglu

    g = torch.Generator(device="cpu").manual_seed(seed)
    ids = torch.randn(tokens, experts, generator=g).topk(top_k, dim=-1).indices.flatten()
    counts = torch.bincount(ids, minlength=experts)
    rows = int(counts.sum())
    make = lambda *s, scale=1.0: (torch.randn(*s, generator=g) * scale)  # noqa: E731
    x0, w1, w3, w2, dy = make(rows, dim), make(experts, ffn, dim, scale=0.02), make(experts, ffn, dim, scale=0.02), \
        make(experts, dim, ffn, scale=0.02), make(rows, dim)
    leaves = lambda ts, dt: [t.to(device=device, dtype=dt).requires_grad_() for t in ts]  # noqa: E731
    x, a1, a3, a2 = leaves([x0, w1, w3, w2], torch.float32)
    ref = looped_swiglu(x, counts, a1, a2, a3)
    ref_g = torch.autograd.grad(ref, (x, a1, a3, a2), dy.to(device))
    ref_g = [ref_g[0], torch.cat([ref_g[1], ref_g[2]], 1), ref_g[3]]
    out = {}
    x, b1, b3, b2 = leaves([x0, w1, w3, w2], dtype)
    lib = grouped_swiglu(x, counts.to(device), b1, b2, b3)
    lib_g = torch.autograd.grad(lib, (x, b1, b3, b2), dy.to(device, dtype))
    lib_g = [lib_g[0], torch.cat([lib_g[1], lib_g[2]], 1), lib_g[3]]
    x, w13, c2 = leaves([x0, torch.cat([w1, w3], 1), w2], dtype)
    fused = fused_w13_swiglu(x, counts.to(device), w13, c2)
    fused_g = torch.autograd.grad(fused, (x, w13, c2), dy.to(device, dtype))
    rel = lambda a, b: float((a.detach().float() - b.detach().float()).abs().max() / b.detach().float().abs().max())  # noqa: E731
    for name, y, gs in (("library", lib, lib_g), ("w13", fused, fused_g)):
        out[name] = {"out": rel(y, ref), **{k: rel(a, b) for k, a, b in zip(("grad_x", "grad_w13", "grad_w2"), gs, ref_g)}}
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
