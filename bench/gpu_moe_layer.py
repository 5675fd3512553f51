"""One-GPU forward+backward of moesaic's expert computation (router top-k, gather, grouped GEMM
SwiGLU via torch._grouped_mm, weighted scatter) in bf16, against the dense bf16 matmul rate measured
in the same run, beside the same grouped GEMM with plain indexing (x[token] in, atomic index_add
out) and a per-expert loop.

    python bench/gpu_moe_layer.py [--tokens 8192] [--json out.json]
    python bench/gpu_moe_layer.py --device cpu --tiny      # the CPU smoke test

Useful TFLOP/s counts only the routed tokens' FLOPs: forward = 2*T*k*d*f*3, fwd+bwd = 3x forward.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import dense_rate, ensure_importable, machine, profile_to, table, timeit, traffic, write_json  # noqa: E402

ensure_importable()
import torch  # noqa: E402

from fused_moe import FusedExperts, fused_layer  # noqa: E402
from gpu_variants import fused_w13_swiglu  # noqa: E402
from triton_grouped import triton, triton_w13_swiglu  # noqa: E402
from moesaic.parallel.experts import GroupedExperts, grouped_swiglu, looped_swiglu  # noqa: E402
from moesaic.parallel.moe import LocalDispatcher  # noqa: E402
from moesaic.parallel.router import RouterConfig, TopKRouter  # noqa: E402

SHAPES = {
    "mixtral": dict(dim=4096, ffn=14336, experts=8, top_k=2),
    "deepseekmoe-16b": dict(dim=2048, ffn=1408, experts=64, top_k=6),
    "olmoe": dict(dim=2048, ffn=1024, experts=64, top_k=8),
    "gpu_train-model": dict(dim=2048, ffn=1408, experts=16, top_k=4),  # the experts of bench/gpu_train.py
}
TINY = {"tiny": dict(dim=64, ffn=96, experts=8, top_k=2)}


class _FusedW13:
    """The same experts computed by the `w13` candidate (bench/gpu_variants.py): w1 and w3 stored as
    one (E, 2F, D) weight, built once here as a stored parameter would be."""

    def __init__(self, experts):
        self.num_experts, self.w2 = experts.num_experts, experts.w2_EDF
        self.w13 = torch.cat([experts.w1_EFD, experts.w3_EFD], dim=1).detach().requires_grad_()

    def __call__(self, x, counts):
        return fused_w13_swiglu(x, counts, self.w13, self.w2)


class _TritonW13(_FusedW13):
    """The same, with bench/triton_grouped.py's grouped GEMMs instead of torch._grouped_mm."""

    def __call__(self, x, counts):
        return triton_w13_swiglu(x, counts, self.w13, self.w2)


def _layer(s, tokens, device, dtype):
    """The shape's experts, a local dispatcher, random tokens and their (fixed) route, seed 0."""
    torch.manual_seed(0)
    router = TopKRouter(s["dim"], s["experts"], s["top_k"], RouterConfig()).to(device)
    experts = GroupedExperts(s["experts"], s["dim"], s["ffn"]).to(device=device, dtype=dtype)
    x = torch.randn(tokens, s["dim"], device=device, dtype=dtype, requires_grad=True)
    with torch.no_grad():
        route = router(x.float())
    route.weights_TK = route.weights_TK.to(dtype)
    return experts, LocalDispatcher(), x, route


def run_compiled(name, s, tokens, device, dtype, iters, profile=None) -> dict:
    """The layer eager and under torch.compile: the library, the stored w13 weight, and the fused
    candidate (bench/fused_moe.py; also with the weight gradients one mm per expert). The grouped
    GEMMs stay torch._grouped_mm in all of them."""
    experts, dispatch, x, route = _layer(s, tokens, device, dtype)
    flops = 3 * 2 * tokens * s["top_k"] * s["dim"] * s["ffn"] * 3
    row = {"shape": name, **s, "tokens": tokens}
    fused = FusedExperts(experts)
    for label, ex in (("eager", experts), ("compiled", experts), ("compiled_w13", _FusedW13(experts)),
                      ("fused", fused), ("compiled_fused", fused), ("fused_loop_dw", FusedExperts(experts, loop_dw=True))):
        def layer(inp, ex=ex, label=label):
            return fused_layer(inp, route, ex) if "fused" in label else dispatch(inp, route, ex)
        if label.startswith("compiled"):
            # each (shape, run) its own static-shape compile: the same code object compiled again for
            # another shape would be recompiled with dynamic shapes, and past dynamo's cache limit
            # (8) run eagerly
            torch._dynamo.reset()
            fn = torch.compile(layer, dynamic=False)
        else:
            fn = layer
        y = fn(x).detach().float()
        if label == "eager":
            y0 = y
        row[f"{label}_max_rel_diff_vs_eager"] = float((y - y0).abs().max() / y0.abs().max())
        row[f"{label}_fwd_bwd_tflops"] = flops / timeit(lambda: fn(x).sum().backward(), device, iters) / 1e12
        if profile:
            profile_to(f"{profile}_{name}_{label}.txt", lambda: fn(x).sum().backward(), device, steps=3)
    print(table([row]), flush=True)
    return row


def run_shape(name, s, tokens, device, dtype, iters):
    experts, dispatch, x, route = _layer(s, tokens, device, dtype)
    fwd_flops = 2 * tokens * s["top_k"] * s["dim"] * s["ffn"] * 3

    def fwd():
        with torch.no_grad():
            dispatch(x, route, experts)

    def fwd_bwd():
        dispatch(x, route, experts).sum().backward()

    def indexed(swiglu):  # the plain-indexing permutation: x[token] in, atomic index_add out
        order = torch.argsort(route.expert_ids_TK.flatten(), stable=True)
        tok = order // s["top_k"]
        y = swiglu(x[tok], route.tokens_per_expert_E, experts.w1_EFD, experts.w2_EDF, experts.w3_EFD)
        w = route.weights_TK.flatten()[order].unsqueeze(-1)
        return x.new_zeros(x.shape).index_add(0, tok, y * w)

    # the layer against the per-expert loop: same output (bf16 rounding apart)
    with torch.no_grad():
        y, y_ref = dispatch(x, route, experts).float(), indexed(looped_swiglu).float()
    rel_err = float((y - y_ref).abs().max() / y_ref.abs().max())
    t_f = timeit(fwd, device, iters)
    t_fb = timeit(fwd_bwd, device, iters)
    x.requires_grad_(False)  # as a first layer would: no input gradient (two of the six backward GEMMs)
    t_fb_nx = timeit(fwd_bwd, device, iters)
    x.requires_grad_(True)
    t_idx = timeit(lambda: indexed(grouped_swiglu).sum().backward(), device, iters)
    w13 = _FusedW13(experts)
    t_w13 = timeit(lambda: dispatch(x, route, w13).sum().backward(), device, iters)
    fused = FusedExperts(experts)  # bench/fused_moe.py: the memory-bound steps one kernel each
    with torch.no_grad():
        fused_err = float((fused_layer(x, route, fused).float() - y_ref).abs().max() / y_ref.abs().max())
    t_fused = timeit(lambda: fused_layer(x, route, fused).sum().backward(), device, iters)
    fused_loop = FusedExperts(experts, loop_dw=True)  # weight gradients as one dense mm per expert
    t_fused_loop = timeit(lambda: fused_layer(x, route, fused_loop).sum().backward(), device, iters)
    tri = {}
    if triton is not None and (device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"):
        tw = _TritonW13(experts)
        with torch.no_grad():  # the Triton layer against the per-expert loop (bf16 rounding apart)
            tri["triton_max_rel_err_vs_loop"] = float((dispatch(x, route, tw).float() - y_ref).abs().max() / y_ref.abs().max())
        t_tri = timeit(lambda: dispatch(x, route, tw).sum().backward(), device, iters)
        t_tri_f = timeit(lambda: _no_grad(dispatch, x, route, tw), device, iters)
        tri.update(triton_fwd_tflops=fwd_flops / t_tri_f / 1e12, triton_fwd_bwd_tflops=3 * fwd_flops / t_tri / 1e12)
    t_loop = timeit(lambda: indexed(looped_swiglu).sum().backward(), device, max(3, iters // 2))
    return {"shape": name, **s, "tokens": tokens, "fwd_tflops": fwd_flops / t_f / 1e12,
            "fwd_bwd_tflops": 3 * fwd_flops / t_fb / 1e12,
            "fwd_bwd_no_input_grad_tflops": 3 * fwd_flops / t_fb_nx / 1e12,
            "w13_fwd_bwd_tflops": 3 * fwd_flops / t_w13 / 1e12,
            "fused_fwd_bwd_tflops": 3 * fwd_flops / t_fused / 1e12, "fused_max_rel_err_vs_loop": fused_err,
            "fused_loop_dw_fwd_bwd_tflops": 3 * fwd_flops / t_fused_loop / 1e12,
            "index_add_fwd_bwd_tflops": 3 * fwd_flops / t_idx / 1e12,
            "loop_fwd_bwd_tflops": 3 * fwd_flops / t_loop / 1e12,
            "fwd_ms": t_f * 1e3, "fwd_bwd_ms": t_fb * 1e3, "max_rel_err_vs_loop": rel_err, **tri}


def _no_grad(fn, *args):
    with torch.no_grad():
        return fn(*args)


def row_moves(device, dtype, rows: int, dim: int, iters: int) -> list[dict]:
    """The permutation's row moves, in GB/s (bytes read + written): plain bf16 elements against the
    same rows viewed as 8-byte words, which `moesaic.parallel.experts.take_rows/put_rows` use."""
    x = torch.randn(rows, dim, device=device, dtype=dtype)
    idx = torch.randperm(rows, device=device)
    out = torch.empty_like(x)
    words, out_words = x.view(torch.int64), out.view(torch.int64)
    cases = {"x[idx]": lambda: x[idx], "index_select": lambda: x.index_select(0, idx),
             "index_select, 8-byte words": lambda: words.index_select(0, idx),
             "index_copy_": lambda: out.index_copy_(0, idx, x),
             "index_copy_, 8-byte words": lambda: out_words.index_copy_(0, idx, words)}
    nbytes = 2 * x.numel() * x.element_size()
    return [{"op": k, "rows": rows, "dim": dim, "GB_per_s": nbytes / timeit(f, device, iters) / 1e9} for k, f in cases.items()]


def traffic_rows(shapes: dict, tokens: int) -> list[dict]:
    """Bytes moved outside the grouped GEMMs by one forward+backward, library against fused, counted
    op by op on meta tensors (no GPU needed), and the time they take at the measured row-move rate."""
    from moesaic.parallel.router import RouterOutput

    rows, meta = [], torch.device("meta")
    for name, s in shapes.items():
        experts = GroupedExperts(s["experts"], s["dim"], s["ffn"]).to(device=meta, dtype=torch.bfloat16)
        x = torch.empty(tokens, s["dim"], device=meta, dtype=torch.bfloat16, requires_grad=True)
        ids = torch.empty(tokens, s["top_k"], dtype=torch.long, device=meta)
        route = RouterOutput(expert_ids_TK=ids, weights_TK=torch.empty(ids.shape, device=meta, dtype=torch.bfloat16),
                             tokens_per_expert_E=torch.empty(s["experts"], dtype=torch.long, device=meta),
                             aux_loss=None, z_loss=None)
        fused = FusedExperts(experts)
        for label, fn, ex, leaves in (("library", LocalDispatcher(), experts, [x, *experts.parameters()]),
                                      ("fused", fused_layer, fused, [x, fused.w13, fused.w2])):
            ops = traffic(fn, leaves, x, route, ex)
            total = sum(v["read"] + v["written"] for v in ops.values())
            top = sorted(ops.items(), key=lambda kv: -(kv[1]["read"] + kv[1]["written"]))[:4]
            rows.append({"shape": name, "layer": label, "GB": total / 1e9, "kernels": sum(v["calls"] for v in ops.values()),
                         "ms_at_3.1_TB_s": total / 3.1e12 * 1e3,
                         "largest": ", ".join(f"{k} {(v['read'] + v['written']) / 1e9:.2f}" for k, v in top)})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--tiny", action="store_true", help="a small CPU-sized shape (smoke test)")
    ap.add_argument("--compiled", action="store_true",
                    help="only the layer eager against torch.compile'd (library, and the stored w13 weight)")
    ap.add_argument("--profile", default=None, help="with --compiled: kernel profiles, written to PROFILE_<shape>_<run>.txt")
    ap.add_argument("--traffic", action="store_true",
                    help="only the bytes moved outside the GEMMs, library against fused, counted on meta tensors")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    if a.traffic:
        rows = traffic_rows({k: v for k, v in SHAPES.items()} if not a.tiny else TINY, 256 if a.tiny else a.tokens)
        print(table(rows))
        write_json(a.json, {"machine": machine(), "rows": rows})
        return
    device = torch.device(a.device)
    # torch._grouped_mm's compile-time (meta) check takes bf16 only, on a CPU too
    dtype = torch.bfloat16 if device.type == "cuda" or a.compiled else torch.float32
    shapes = TINY if a.tiny else SHAPES
    tokens = 256 if a.tiny else a.tokens
    dense = dense_rate(device, dtype, 256 if a.tiny else 8192)
    if a.compiled:
        rows = [run_compiled(n, s, tokens, device, dtype, 3 if a.tiny else a.iters, a.profile)
                for n, s in shapes.items() if n != "gpu_train-model"]
        dense = max(dense, dense_rate(device, dtype, 256 if a.tiny else 8192))
        for r in rows:
            r["dense_tflops"] = dense
            for k in [k for k in r if k.endswith("_fwd_bwd_tflops")]:
                r[k.replace("_tflops", "_pct_of_dense")] = 100 * r[k] / dense
        print(f"machine: {machine()}\ndevice {device}, dtype {dtype}, dense matmul {dense:.1f} TFLOP/s (the faster of two)")
        print(table(rows))
        write_json(a.json, {"machine": machine(), "dense_tflops": dense, "rows": rows})
        return
    rows = [run_shape(n, s, tokens, device, dtype, 3 if a.tiny else a.iters) for n, s in shapes.items()]
    moves = row_moves(device, dtype, 512 if a.tiny else 65536, 64 if a.tiny else 2048, 3 if a.tiny else a.iters)
    dense = max(dense, dense_rate(device, dtype, 256 if a.tiny else 8192))  # the faster of two measurements
    for r in rows:
        r["dense_tflops"] = dense
        r["fwd_bwd_pct_of_dense"] = 100 * r["fwd_bwd_tflops"] / dense
        r["fused_fwd_bwd_pct_of_dense"] = 100 * r["fused_fwd_bwd_tflops"] / dense
        r["fused_loop_dw_fwd_bwd_pct_of_dense"] = 100 * r["fused_loop_dw_fwd_bwd_tflops"] / dense
    info = machine()
    print(f"machine: {info}\ndevice {device}, dtype {dtype}, dense matmul {dense:.1f} TFLOP/s")
    print(table(rows, ["shape", "tokens", "fwd_tflops", "fwd_bwd_tflops", "fwd_bwd_pct_of_dense",
                       "fwd_bwd_no_input_grad_tflops", "w13_fwd_bwd_tflops", "fused_fwd_bwd_tflops", "triton_fwd_tflops", "triton_fwd_bwd_tflops",
                       "index_add_fwd_bwd_tflops", "loop_fwd_bwd_tflops", "fwd_bwd_ms", "max_rel_err_vs_loop",
                       "fused_fwd_bwd_pct_of_dense", "fused_loop_dw_fwd_bwd_pct_of_dense", "fused_max_rel_err_vs_loop",
                       "triton_max_rel_err_vs_loop"]))
    for r in rows:
        if "triton_fwd_bwd_tflops" in r:
            r["triton_fwd_bwd_pct_of_dense"] = 100 * r["triton_fwd_bwd_tflops"] / dense
    print(table(moves))
    write_json(a.json, {"machine": info, "dense_tflops": dense, "rows": rows, "row_moves": moves})


if __name__ == "__main__":
    main()
