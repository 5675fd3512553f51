"""The expert layer's three kinds of grouped GEMM, one at a time: `torch._grouped_mm` against
bench/triton_grouped.py, beside the dense rate measured in the same run (issue #4's layer, taken apart).

    python bench/gpu_grouped_gemm.py [--json out.json]
    TRITON_INTERPRET=1 python bench/gpu_grouped_gemm.py --device cpu --tiny   # the CPU smoke test

For each shape (T tokens, top-k, E experts, d, f; rows sorted by expert, loads from a random router):
- forward: h = x @ w13[e]^T, ragged M (rows per expert), N = 2f, K = d;
- input gradient: dx = dh @ w13[e], ragged M, N = d, K = 2f;
- weight gradient: dw13[e] = dh_e^T @ x_e, ragged K (the expert's rows), output (E, 2f, d).
Each is timed alone (median of `--iters`), as TFLOP/s and % of dense. Also: the Triton kernels'
output and gradients against the per-expert loop in bf16 (`check_against_loop`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import dense_rate, ensure_importable, machine, table, timeit, write_json  # noqa: E402

ensure_importable()
import torch  # noqa: E402

from gpu_moe_layer import SHAPES  # noqa: E402  (the same shapes as the layer benchmark)
from triton_grouped import check_against_loop, ragged_k_mm, ragged_m_mm  # noqa: E402

TINY = {"tiny": dict(dim=64, ffn=48, experts=4, top_k=2)}


def run_shape(name: str, s: dict, tokens: int, device, dtype, iters: int) -> list[dict]:
    torch.manual_seed(0)
    E, D, F2 = s["experts"], s["dim"], 2 * s["ffn"]
    logits = torch.randn(tokens, E, device=device)
    ids = logits.topk(s["top_k"], dim=-1).indices.flatten()
    counts = torch.bincount(ids, minlength=E)
    offs = torch.cumsum(counts, 0).to(torch.int32)
    rows = ids.numel()
    x = torch.randn(rows, D, device=device, dtype=dtype)
    dh = torch.randn(rows, F2, device=device, dtype=dtype)
    w13 = torch.randn(E, F2, D, device=device, dtype=dtype)
    flops = 2 * rows * D * F2
    cases = {
        "forward (ragged M)": (lambda: torch._grouped_mm(x, w13.transpose(-2, -1), offs=offs),
                               lambda: ragged_m_mm(x, w13, offs, True)),
        "input grad (ragged M)": (lambda: torch._grouped_mm(dh, w13, offs=offs),
                                  lambda: ragged_m_mm(dh, w13, offs, False)),
        "weight grad (ragged K)": (lambda: torch._grouped_mm(dh.t(), x, offs=offs),
                                   lambda: ragged_k_mm(dh, x, offs)),
    }
    out = []
    for case, (ref, tri) in cases.items():
        row = {"shape": name, "gemm": case, "rows": rows, "N": D if "input" in case else F2,
               "K": F2 if "input" in case else D}
        for label, fn in (("grouped_mm", ref), ("triton", tri)):
            if label == "grouped_mm" and device.type != "cuda":
                continue  # torch._grouped_mm has no CPU kernel for this dtype here
            t = timeit(fn, device, iters)
            row[f"{label}_tflops"] = flops / t / 1e12
        if device.type == "cuda":
            a, b = ref().float(), tri().float()
            row["max_rel_diff"] = float((a - b).abs().max() / a.abs().max())
        out.append(row)
    return out


def layer_gemms(name: str, s: dict, tokens: int, device, dtype, iters: int) -> list[dict]:
    """Every grouped GEMM of one forward+backward of the layer, timed alone, and their sum: the
    library's six (w13 stored: N or K = 2f) and the nine of the layout before it (w1w3: w1, w3 and
    w2 apart, N or K = f).
    The layer's measured time minus this sum is what the non-GEMM steps cost."""
    torch.manual_seed(0)
    E, D, Fd = s["experts"], s["dim"], s["ffn"]
    ids = torch.randn(tokens, E, device=device).topk(s["top_k"], dim=-1).indices.flatten()
    offs = torch.cumsum(torch.bincount(ids, minlength=E), 0).to(torch.int32)
    N = ids.numel()
    r = lambda *shape: torch.randn(*shape, device=device, dtype=dtype)  # noqa: E731
    x, gy, h, h13 = r(N, D), r(N, D), r(N, Fd), r(N, 2 * Fd)
    w1, w2, w13 = r(E, Fd, D), r(E, D, Fd), r(E, 2 * Fd, D)
    mm = lambda a, b: (lambda: torch._grouped_mm(a, b, offs=offs))  # noqa: E731
    shared = [("w2 forward", mm(h, w2.transpose(-2, -1)), 1, Fd, D), ("w2 input grad", mm(gy, w2), 1, D, Fd),
              ("w2 weight grad", mm(gy.t(), h), 1, D, Fd)]
    layouts = {
        "library": [("w13 forward", mm(x, w13.transpose(-2, -1)), 1, D, 2 * Fd), *shared,
                    ("w13 input grad", mm(h13, w13), 1, 2 * Fd, D), ("w13 weight grad", mm(h13.t(), x), 1, 2 * Fd, D)],
        "w1w3": [("w1/w3 forward", mm(x, w1.transpose(-2, -1)), 2, D, Fd), *shared,
                 ("w1/w3 input grad", mm(h, w1), 2, Fd, D), ("w1/w3 weight grad", mm(h.t(), x), 2, Fd, D)],
    }
    out, times = [], {}
    for layout, gemms in layouts.items():
        total_ms = total_flops = 0.0
        for label, fn, count, k, n in gemms:
            if label not in times:
                times[label] = timeit(fn, device, iters)
            flops = 2 * N * k * n
            total_ms += count * times[label] * 1e3
            total_flops += count * flops
            out.append({"shape": name, "layout": layout, "gemm": f"{label}{' x2' if count > 1 else ''}",
                        "ms": count * times[label] * 1e3, "tflops": flops / times[label] / 1e12})
        out.append({"shape": name, "layout": layout, "gemm": "all (fwd+bwd)", "ms": total_ms,
                    "tflops": total_flops / total_ms / 1e9})
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--layer", action="store_true",
                    help="only torch._grouped_mm: every GEMM of the layer's forward+backward, and their sum")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    device = torch.device(a.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    shapes, tokens = (TINY, 64) if a.tiny else (SHAPES, a.tokens)
    dense = dense_rate(device, dtype, 256 if a.tiny else 8192)
    if a.layer:
        rows = [r for n, s in shapes.items() for r in layer_gemms(n, s, tokens, device, dtype, 3 if a.tiny else a.iters)]
        dense = max(dense, dense_rate(device, dtype, 256 if a.tiny else 8192))
        for r in rows:
            r["pct_of_dense"] = 100 * r["tflops"] / dense
        print(f"machine: {machine()}\ndevice {device}, dtype {dtype}, dense matmul {dense:.1f} TFLOP/s (the faster of two)")
        print(table(rows))
        write_json(a.json, {"machine": machine(), "dense_tflops": dense, "rows": rows})
        return
    check = check_against_loop(device, dtype) if device.type != "cuda" else check_against_loop(
        device, dtype, num_experts=8, dim=512, ffn=352, counts=(700, 0, 129, 1024, 64, 300, 1, 830))
    print(f"triton_w13_swiglu against the per-expert loop ({dtype}): {check}", flush=True)
    rows = [r for n, s in shapes.items() for r in run_shape(n, s, tokens, device, dtype, 3 if a.tiny else a.iters)]
    dense = max(dense, dense_rate(device, dtype, 256 if a.tiny else 8192))
    for r in rows:
        for label in ("grouped_mm", "triton"):
            if f"{label}_tflops" in r:
                r[f"{label}_pct_of_dense"] = 100 * r[f"{label}_tflops"] / dense
    info = machine()
    print(f"machine: {info}\ndevice {device}, dtype {dtype}, dense matmul {dense:.1f} TFLOP/s (the faster of two)")
    print(table(rows))
    write_json(a.json, {"machine": info, "dense_tflops": dense, "check_vs_loop": check, "rows": rows})


if __name__ == "__main__":
    main()
