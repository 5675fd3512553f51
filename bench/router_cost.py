"""What the router options cost, and what group-limited routing does to a token's spread.

    python bench/router_cost.py [--tokens 8192] [--dim 2048] [--iters 20] [--json out.json]

For each router of `ROUTERS` at a DeepSeek-V3-like shape (256 experts, top-8, 8 groups) and a
fine-grained one (64 experts, top-6, 8 groups): the median time of the router's forward+backward
(gate GEMM, scores, selection, weights, aux and z losses), interleaved round by round so that the
ratios hold on a noisy machine; and, from the selection, the mean number of groups (DeepSeek-V3: nodes)
that a token's experts fall in. The gate's weights are random, so the spread is that of an untrained
router. Runs on CUDA where available (bf16 input), else CPU (fp32). Needs torch only.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ensure_importable, machine, sync, table, write_json  # noqa: E402

ensure_importable()
import torch  # noqa: E402

from moesaic.parallel.router import RouterConfig, TopKRouter  # noqa: E402

SHAPES = {"deepseek-v3-like": (256, 8, 8, 4), "fine-grained": (64, 6, 8, 4)}  # E, K, groups, limited
ROUTERS = {
    "softmax": {},
    "softmax, renormalised": {"route_norm": True},
    "softmax, fp32 gate": {"dtype": "fp32"},  # model.moe.router.dtype=fp32: the gate's matmul in fp32
    "sigmoid + bias": {"score_func": "sigmoid"},
    "sigmoid + bias, groups": {"score_func": "sigmoid", "route_scale": 2.5, "groups": True},
    "sigmoid + bias, groups, sequence aux": {"score_func": "sigmoid", "route_scale": 2.5, "groups": True,
                                             "aux_loss_scope": "sequence"},
}


def _router(name: str, dim: int, E: int, K: int, G: int, M: int, device) -> TopKRouter:
    opts = dict(ROUTERS[name])
    if opts.pop("groups", False):
        opts.update(num_expert_groups=G, num_limited_groups=M)
    router = TopKRouter(dim, E, K, RouterConfig(**opts)).to(device)
    if "sigmoid" in name:
        router.bias_E.copy_(torch.randn(E, generator=torch.Generator().manual_seed(1)) * 0.01)
    return router


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--dim", type=int, default=2048)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--iters", type=int, default=20, help="rounds; each times every router once")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    rows = []
    for shape, (E, K, G, M) in SHAPES.items():
        torch.manual_seed(0)
        x = torch.randn(a.tokens, a.dim, device=device, dtype=dtype, requires_grad=True)
        routers = {n: _router(n, a.dim, E, K, G, M, device) for n in ROUTERS}
        for r in routers.values():
            r.gate.to(dtype)
        times = {n: [] for n in ROUTERS}
        for i in range(a.iters + 2):  # two warm-up rounds
            for n, r in routers.items():
                sync(device)
                t0 = time.perf_counter()
                out = r(x, seq_len=a.seq_len)
                (out.weights_TK.float().sum() + out.aux_loss + out.z_loss).backward()
                sync(device)
                if i >= 2:
                    times[n].append(time.perf_counter() - t0)
        base = statistics.median(times["softmax"])
        for n, r in routers.items():
            with torch.no_grad():
                ids = r(x, seq_len=a.seq_len).expert_ids_TK
            groups = (ids // (E // G)).sort(dim=-1).values
            spread = 1 + (groups[:, 1:] != groups[:, :-1]).sum(-1)
            med = statistics.median(times[n])
            rows.append({"shape": shape, "router": n, "ms": med * 1e3, "vs softmax": med / base,
                         "groups per token": float(spread.float().mean()), "max": int(spread.max())})
    cols = ["shape", "router", "ms", "vs softmax", "groups per token", "max"]
    print(f"router forward+backward, {a.tokens} tokens x d {a.dim}, {device.type} {dtype}, median of {a.iters}")
    print(table(rows, cols))
    write_json(a.json, {"machine": machine(), "args": vars(a), "rows": rows})


if __name__ == "__main__":
    main()
