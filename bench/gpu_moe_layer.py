"""One-GPU forward+backward of moesaic's expert computation (router top-k, gather, grouped GEMM
SwiGLU via torch._grouped_mm, weighted scatter) in bf16, against the dense bf16 matmul rate measured
in the same run. Beside it: the same layer with `kernels="triton"` (moesaic/parallel/kernels.py),
and with its weight gradients one mm per expert (bench/fused_moe.py); the layout before w13 was
stored (w1, w3 apart: `w1w3`); plain indexing (x[token] in, atomic index_add out); Triton grouped
GEMMs (bench/triton_grouped.py); and a per-expert loop.

    python bench/gpu_moe_layer.py [--tokens 8192] [--json out.json]
    python bench/gpu_moe_layer.py --device cpu --tiny      # the CPU smoke test

Useful TFLOP/s counts only the routed tokens' FLOPs: forward = 2*T*k*d*f*3, fwd+bwd = 3x forward.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import dense_rate, ensure_importable, machine, profile_to, table, timeit, traffic, write_json  # noqa: E402

ensure_importable()
import torch  # noqa: E402

from fused_moe import LoopDWExperts  # noqa: E402
from gpu_variants import split_swiglu  # noqa: E402
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


class _Experts:
    """A GroupedExperts' weights computed another way, for a comparison column: `fn(x, counts)`."""

    def __init__(self, experts, fn, kernels="torch", leaves=None):
        self.num_experts, self.kernels, self.fn = experts.num_experts, kernels, fn
        self.leaves = leaves if leaves is not None else list(experts.parameters())

    def __call__(self, x, counts):
        return self.fn(x, counts)


def variants(experts) -> dict:
    """The layer's ways of computing the same experts (same values): name -> experts object."""
    w1, w3 = (t.detach().clone().requires_grad_() for t in experts.w13_EGD.chunk(2, dim=1))
    w13, w2 = experts.w13_EGD, experts.w2_EDF
    return {
        "library": experts,
        "triton": _Experts(experts, lambda x, c: grouped_swiglu(x, c, w13, w2, kernels="triton"), "triton"),
        "triton_loop_dw": LoopDWExperts(experts),
        "w1w3": _Experts(experts, lambda x, c: split_swiglu(x, c, w1, w2, w3), leaves=[w1, w2, w3]),
        "triton_gemm": _Experts(experts, lambda x, c: triton_w13_swiglu(x, c, w13, w2)),
    }


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


# run -> (variant, torch.compile mode or None for eager); the default runs, then the compile modes'
# runs (`--runs`): inductor's max-autotune times its Triton grouped-GEMM template (TMA, on sm90) against
# torch._grouped_mm for each GEMM, and reduce-overhead replays the layer as CUDA graphs
RUNS = {"eager": ("library", None), "compiled": ("library", "default"), "compiled_w1w3": ("w1w3", "default"),
        "triton": ("triton", None), "compiled_triton": ("triton", "default"), "triton_loop_dw": ("triton_loop_dw", None),
        "autotune": ("library", "max-autotune-no-cudagraphs"), "autotune_w1w3": ("w1w3", "max-autotune-no-cudagraphs"),
        "graphs": ("library", "reduce-overhead"), "graphs_triton": ("triton", "reduce-overhead")}
DEFAULT_RUNS = ["eager", "compiled", "compiled_w1w3", "triton", "compiled_triton", "triton_loop_dw"]


def run_compiled(name, s, tokens, device, dtype, iters, profile=None, runs=DEFAULT_RUNS) -> dict:
    """The layer eager and under torch.compile (`RUNS`): by default the library with torch and with
    Triton element-wise kernels, the layout before w13 (w1w3), and the Triton layer with loop dW.
    The grouped GEMMs are torch._grouped_mm in all of them but max-autotune's, where inductor may
    pick its own. Errors are measured against the first run (eager unless `runs` says otherwise)."""
    experts, dispatch, x, route = _layer(s, tokens, device, dtype)
    flops = 3 * 2 * tokens * s["top_k"] * s["dim"] * s["ffn"] * 3
    row = {"shape": name, **s, "tokens": tokens}
    v = variants(experts)
    y0 = None
    for label in runs:
        variant, mode = RUNS[label]

        def layer(inp, ex=v[variant]):
            return dispatch(inp, route, ex)
        if mode is not None:
            # each (shape, run) its own static-shape compile: the same code object compiled again for
            # another shape would be recompiled with dynamic shapes, and past dynamo's cache limit
            # (8) run eagerly
            torch._dynamo.reset()
            fn = torch.compile(layer, dynamic=False, mode=mode)
        else:
            fn = layer
        t0 = time.perf_counter()
        out = fn(x)  # the first call compiles (and autotunes), forward and backward
        out.sum().backward()
        y = out.detach().float()
        row[f"{label}_first_call_s"] = time.perf_counter() - t0
        y0 = y if y0 is None else y0
        row[f"{label}_max_rel_diff_vs_{runs[0]}"] = float((y - y0).abs().max() / y0.abs().max())
        row[f"{label}_fwd_bwd_tflops"] = flops / timeit(lambda: fn(x).sum().backward(), device, iters) / 1e12
        if profile:
            profile_to(f"{profile}_{name}_{label}.txt", lambda: fn(x).sum().backward(), device, steps=3)
    print(table([row]), flush=True)
    return row


def run_shape(name, s, tokens, device, dtype, iters):
    experts, dispatch, x, route = _layer(s, tokens, device, dtype)
    fwd_flops = 2 * tokens * s["top_k"] * s["dim"] * s["ffn"] * 3
    v = variants(experts)

    def fwd():
        with torch.no_grad():
            dispatch(x, route, experts)

    def fwd_bwd(ex=experts):
        dispatch(x, route, ex).sum().backward()

    def indexed(swiglu):  # the plain-indexing permutation: x[token] in, atomic index_add out
        order = torch.argsort(route.expert_ids_TK.flatten(), stable=True)
        tok = order // s["top_k"]
        y = swiglu(x[tok], route.tokens_per_expert_E, experts.w13_EGD, experts.w2_EDF)
        w = route.weights_TK.flatten()[order].unsqueeze(-1)
        return x.new_zeros(x.shape).index_add(0, tok, y * w)

    def err(ex):  # a layer against the per-expert loop: same output, bf16 rounding apart
        with torch.no_grad():
            return float((dispatch(x, route, ex).float() - y_ref).abs().max() / y_ref.abs().max())

    with torch.no_grad():
        y_ref = indexed(looped_swiglu).float()
    out = {"shape": name, **s, "tokens": tokens, "max_rel_err_vs_loop": err(experts)}
    t_f = timeit(fwd, device, iters)
    t_fb = timeit(fwd_bwd, device, iters)
    x.requires_grad_(False)  # as a first layer would: no input gradient (two of the six backward GEMMs)
    t_fb_nx = timeit(fwd_bwd, device, iters)
    x.requires_grad_(True)
    out.update(fwd_tflops=fwd_flops / t_f / 1e12, fwd_bwd_tflops=3 * fwd_flops / t_fb / 1e12,
               fwd_bwd_no_input_grad_tflops=3 * fwd_flops / t_fb_nx / 1e12, fwd_ms=t_f * 1e3, fwd_bwd_ms=t_fb * 1e3)
    triton_runs = triton is not None and (device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1")
    for label in ("w1w3", "triton", "triton_loop_dw", "triton_gemm"):
        if label.startswith("triton") and not triton_runs:
            continue
        out[f"{label}_max_rel_err_vs_loop"] = err(v[label])
        out[f"{label}_fwd_bwd_tflops"] = 3 * fwd_flops / timeit(lambda: fwd_bwd(v[label]), device, iters) / 1e12
    out["index_add_fwd_bwd_tflops"] = 3 * fwd_flops / timeit(lambda: indexed(grouped_swiglu).sum().backward(), device, iters) / 1e12
    out["loop_fwd_bwd_tflops"] = 3 * fwd_flops / timeit(lambda: indexed(looped_swiglu).sum().backward(), device,
                                                         max(3, iters // 2)) / 1e12
    return out


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
    """Bytes moved outside the grouped GEMMs by one forward+backward: the layout before w13 (w1w3),
    the library's torch path and its Triton kernels, counted op by op on meta tensors (no GPU needed), and the time they take at
    the measured row-move rate."""
    from moesaic.parallel.router import RouterOutput

    rows, meta = [], torch.device("meta")
    for name, s in shapes.items():
        with meta:  # built on meta: Mixtral's experts would take 5.6 GB of fp32 on the host, then be thrown away
            experts = GroupedExperts(s["experts"], s["dim"], s["ffn"]).to(dtype=torch.bfloat16)
        x = torch.empty(tokens, s["dim"], device=meta, dtype=torch.bfloat16, requires_grad=True)
        ids = torch.empty(tokens, s["top_k"], dtype=torch.long, device=meta)
        route = RouterOutput(expert_ids_TK=ids, weights_TK=torch.empty(ids.shape, device=meta, dtype=torch.bfloat16),
                             tokens_per_expert_E=torch.empty(s["experts"], dtype=torch.long, device=meta),
                             aux_loss=None, z_loss=None)
        v = variants(experts)
        for label, ex in (("w1w3", v["w1w3"]), ("torch", experts), ("triton", v["triton"])):
            ops = traffic(LocalDispatcher(), [x, *ex.leaves] if label == "w1w3" else [x, *experts.parameters()],
                          x, route, ex)
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
                    help="only the layer eager against torch.compile'd (library with torch and Triton kernels, w1w3)")
    ap.add_argument("--runs", nargs="+", default=DEFAULT_RUNS, choices=list(RUNS),
                    help="with --compiled: which runs, in this order (the first is the reference for the errors)")
    ap.add_argument("--shapes", nargs="+", default=None, choices=list(SHAPES), help="only these shapes")
    ap.add_argument("--profile", default=None, help="with --compiled: kernel profiles, written to PROFILE_<shape>_<run>.txt")
    ap.add_argument("--traffic", action="store_true",
                    help="only the bytes moved outside the GEMMs, torch against Triton kernels, counted on meta tensors")
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
    shapes = TINY if a.tiny else {n: SHAPES[n] for n in a.shapes} if a.shapes else SHAPES
    tokens = 256 if a.tiny else a.tokens
    dense = dense_rate(device, dtype, 256 if a.tiny else 8192)
    if a.compiled:
        rows = [run_compiled(n, s, tokens, device, dtype, 3 if a.tiny else a.iters, a.profile, a.runs)
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
        for k in [k for k in r if k.endswith("fwd_bwd_tflops")]:
            r[k.replace("_tflops", "_pct_of_dense")] = 100 * r[k] / dense
    info = machine()
    print(f"machine: {info}\ndevice {device}, dtype {dtype}, dense matmul {dense:.1f} TFLOP/s")
    pct = ["fwd_bwd", "triton_fwd_bwd", "triton_loop_dw_fwd_bwd", "w1w3_fwd_bwd", "triton_gemm_fwd_bwd"]
    print(table(rows, ["shape", "tokens", "fwd_tflops", "fwd_bwd_tflops", "fwd_bwd_no_input_grad_tflops", "fwd_bwd_ms",
                       *[f"{p}_pct_of_dense" for p in pct], "index_add_fwd_bwd_tflops", "loop_fwd_bwd_tflops"]))
    print(table(rows, ["shape", *[k for k in rows[0] if k.endswith("max_rel_err_vs_loop")]]))
    print(table(moves))
    write_json(a.json, {"machine": info, "dense_tflops": dense, "rows": rows, "row_moves": moves})


if __name__ == "__main__":
    main()
