"""Candidate speed-ups, measured against the library's code before any of them moves into it.

`bench/gpu_train.py --variant NAME ...` swaps them into moesaic's model for one run. Each computes
the same function as the code it replaces (tests/test_bench.py checks that on CPU):

- `w13`: the experts' gate and up projections as one grouped GEMM over the stacked (E, 2F, D)
  weights (N = 2F rather than two GEMMs of N = F; fine-grained experts have small F). Here the
  stack is built at each call, which a stored fused parameter would avoid.
- `complex-rotary`: the rotary embedding as one complex multiply in fp32, against the
  library's eight bf16 element-wise passes per tensor.

The H200 profile in bench/RESULTS.md motivates both: in eager mode `aten::mul` takes 40 ms per step
(rotary, SwiGLU, combine), and the grouped GEMMs run at about 71% of the dense rate.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

VARIANTS = ("w13", "complex-rotary")


def fused_w13_swiglu(x_TD, counts_E, w1_EFD, w2_EDF, w3_EFD):
    """`moesaic.parallel.experts.grouped_swiglu` with w1 and w3 as one grouped GEMM."""
    from moesaic.parallel.experts import _ContiguousGrad, _offsets

    offs = _offsets(counts_E)
    x_TD = _ContiguousGrad.apply(x_TD)
    w13 = torch.cat([w1_EFD, w3_EFD], dim=1)  # (E, 2F, D)
    h1_TF, h3_TF = torch._grouped_mm(x_TD, w13.transpose(-2, -1), offs=offs).chunk(2, dim=-1)
    out_TD = torch._grouped_mm(F.silu(h1_TF) * h3_TF, w2_EDF.transpose(-2, -1), offs=offs)
    return _ContiguousGrad.apply(out_TD)


def complex_rotary(x_BHSDh, cos_SD, sin_SD):
    """`moesaic.trainer.model.apply_rotary` (adjacent pairs rotate) as a complex multiply in fp32."""
    S, half = x_BHSDh.shape[-2], x_BHSDh.shape[-1] // 2
    xc = torch.view_as_complex(x_BHSDh.float().reshape(*x_BHSDh.shape[:-1], half, 2))
    rot = torch.complex(cos_SD[:S].float(), sin_SD[:S].float())
    return torch.view_as_real(xc * rot).flatten(-2).type_as(x_BHSDh)


def use(variants) -> None:
    """Swap the named variants into moesaic's modules (for this process)."""
    import moesaic.parallel.experts as experts
    import moesaic.trainer.model as model

    for v in variants:
        if v == "w13":
            experts.grouped_swiglu = fused_w13_swiglu
        elif v == "complex-rotary":
            model.apply_rotary = complex_rotary
        else:
            raise ValueError(f"--variant ({v!r}) must be one of {', '.join(VARIANTS)}")
