"""Candidate speed-ups, measured against the library's code before any of them moves into it.

`bench/gpu_train.py --variant NAME ...` swaps them into moesaic's model for one run. Each computes
the same function as the code it replaces (tests/test_bench.py checks that on CPU):

- `w13`: the experts' gate and up projections stored as one (E, 2F, D) parameter and computed as
  one grouped GEMM (N = 2F rather than two GEMMs of N = F; fine-grained experts have small F).
  The backward then runs one GEMM for the input gradient (K = 2F) and one for both weights.
- `triton-experts`: `w13`, with the grouped GEMMs of bench/triton_grouped.py instead of
  `torch._grouped_mm` (checked against the per-expert loop on CPU by Triton's interpreter).
- `complex-rotary`: the rotary embedding as one complex multiply in fp32, against the
  library's eight bf16 element-wise passes per tensor.

The H200 profile in bench/RESULTS.md motivates both: in eager mode `aten::mul` takes 40 ms per step
(rotary, SwiGLU, combine), and the grouped GEMMs run at about 71% of the dense rate.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F

VARIANTS = ("w13", "complex-rotary", "triton-experts")


def fused_w13_swiglu(x_TD, counts_E, w13_EGD, w2_EDF):
    """`moesaic.parallel.experts.grouped_swiglu` with w1 and w3 stacked as w13 = [w1; w3] (E, 2F, D)."""
    from moesaic.parallel.experts import _ContiguousGrad, _offsets

    offs = _offsets(counts_E)
    if torch.is_autocast_enabled(x_TD.device.type):  # as grouped_swiglu: autocast skips _grouped_mm
        dt = torch.get_autocast_dtype(x_TD.device.type)
        x_TD, w13_EGD, w2_EDF = (t.to(dt) for t in (x_TD, w13_EGD, w2_EDF))
    x_TD = _ContiguousGrad.apply(x_TD)
    h1_TF, h3_TF = torch._grouped_mm(x_TD, w13_EGD.transpose(-2, -1), offs=offs).chunk(2, dim=-1)
    out_TD = torch._grouped_mm(F.silu(h1_TF) * h3_TF, w2_EDF.transpose(-2, -1), offs=offs)
    return _ContiguousGrad.apply(out_TD)


def _w13_forward(self, x_TD, counts_E):
    return fused_w13_swiglu(x_TD, counts_E, self.w13_EGD, self.w2_EDF)


def _triton_forward(self, x_TD, counts_E):
    from triton_grouped import triton_w13_swiglu

    return triton_w13_swiglu(x_TD, counts_E, self.w13_EGD, self.w2_EDF)


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
    import moesaic.trainer.model as model

    for v in variants:
        if v == "complex-rotary":
            model.apply_rotary = complex_rotary
        elif v not in ("w13", "triton-experts"):
            raise ValueError(f"--variant ({v!r}) must be one of {', '.join(VARIANTS)}")


def apply(model: torch.nn.Module, variants) -> None:
    if "triton-experts" in variants:
        fuse_w13(model, _triton_forward)
    elif "w13" in variants:
        fuse_w13(model)
