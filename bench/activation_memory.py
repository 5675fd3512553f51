"""What activation checkpointing saves and costs (`parallel.activation_checkpoint`, and
`parallel.recompute_moe_act`, the modes ending in moe_act): the bytes that
autograd keeps for backward, per mode, counted from the tensors (each storage once, parameters left
out), and the forward+backward time of the same model on this machine, the modes interleaved.

Two models, both in bf16 autocast as `parallel.mixed_precision=bf16` runs them:
- the demo model (configs/model/default.yaml) at the demo's batch;
- gpu_train's 2.62B model (d 2048, 16 experts of ffn 1408, top-4, 1 shared expert) at batch 8 of
  2,048 tokens. It is measured at 1 and 2 layers and 1 and 2 sequences; the per-layer, per-token
  difference is extrapolated to 16 layers and 8 sequences (the layers are alike).
Activations are the bytes that grow with the tokens. What does not (autocast's bf16 copies of the
weights, alive during the forward's autocast region) is given apart for the demo model.
CPU autocast keeps what CUDA's keeps for the matmuls; its SDPA kernel may keep different statistics.
First, the experts under bf16 autocast: the casts of their fp32 weights kept for backward, or cast
again there (`parallel.recast_expert_weights`; FSSDP's in-place layers), time and bytes.

    python bench/activation_memory.py [--iters 5] [--json out.json]
    python bench/activation_memory.py --recast-only --iters 200 --recast-rows 1024 4096
"""

from __future__ import annotations

import argparse
import gc
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ensure_importable, machine, table, write_json  # noqa: E402

ensure_importable()
from moesaic.parallel.moe import MoEConfig  # noqa: E402
from moesaic.trainer.activations import forward_kept  # noqa: E402
from moesaic.trainer.model import ModelConfig, Transformer  # noqa: E402
from moesaic.trainer.parallelize import apply_activation_checkpoint  # noqa: E402

MODES = ("none", "moe_act", "attention", "attention+moe_act", "full")
"""parallel.activation_checkpoint's modes, and `+moe_act`: with parallel.recompute_moe_act."""


def kept_bytes(model: Transformer, x: torch.Tensor, y: torch.Tensor | None = None, *,
               autocast: bool = True, dtype: torch.dtype = torch.bfloat16) -> tuple:
    """(the model's output, bytes of non-parameter tensors kept for backward, each storage once:
    `moesaic-estimate`'s count, of a real forward, weight copies included). `y` defaults to x shifted
    by one; `autocast` runs the forward in `dtype` (bf16)."""
    y = torch.roll(x, -1, 1) if y is None else y
    with torch.autocast("cpu", dtype=dtype, enabled=autocast):
        out, kept = forward_kept(model, lambda: model(x, y), copies=False)  # (compiled code stays compiled)
    return out, kept.total


def build(cfg: ModelConfig, mode: str) -> Transformer:
    torch.manual_seed(0)
    model = Transformer(cfg)
    block_mode = mode.removesuffix("moe_act").rstrip("+") or "none"
    apply_activation_checkpoint(model, block_mode, recompute_moe_act=mode.endswith("moe_act"))
    return model


def activations(cfg: ModelConfig, mode: str, seq: int, batches=(1, 2)) -> tuple[float, float]:
    """(bytes kept per token, bytes kept that do not grow with the tokens). The second part holds
    autocast's bf16 copies of the weights, which live while the forward's autocast region does."""
    kept = []
    for b in batches:
        x = torch.randint(0, 256, (b, seq), generator=torch.Generator().manual_seed(1))
        kept.append(kept_bytes(build(cfg, mode), x)[1])
        gc.collect()  # free this model (and its graph) before the next one is built
    per_token = (kept[1] - kept[0]) / ((batches[1] - batches[0]) * seq)
    return per_token, kept[0] - per_token * batches[0] * seq


def demo(iters: int, batch: int, seq: int) -> list[dict]:
    cfg = ModelConfig()  # the demo model's defaults
    x = torch.randint(0, 256, (batch, seq), generator=torch.Generator().manual_seed(1))
    models = {m: build(cfg, m) for m in MODES}
    rows = {}
    for m in MODES:
        per_token, fixed = activations(cfg, m, seq, (batch, 2 * batch))
        rows[m] = {"model": f"demo, {batch} x {seq} tokens", "mode": m,
                   "activations_MiB": per_token * batch * seq / 2**20, "weight_casts_MiB": fixed / 2**20, "times": []}
    for _ in range(iters + 1):  # interleaved; the first round warms up
        for m in MODES:
            t0 = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = models[m](x, torch.roll(x, -1, 1)).loss
            loss.backward()
            rows[m]["times"].append(time.perf_counter() - t0)
    out = [{**{k: v for k, v in rows[m].items() if k != "times"}, "fwd+bwd_s": statistics.median(rows[m]["times"][1:])}
           for m in MODES]
    for r in out:
        r["activations_vs_none"] = r["activations_MiB"] / out[0]["activations_MiB"]
        r["time_vs_none"] = r["fwd+bwd_s"] / out[0]["fwd+bwd_s"]
    return out


BIG = dict(dim=2048, num_heads=16, moe=MoEConfig(num_experts=16, top_k=4, ffn_dim=1408, num_shared_experts=1))


def gpu_train_model(batch: int = 8, seq: int = 2048, layers: int = 16) -> list[dict]:
    out = []
    for m in MODES:
        per_token = {}
        for n in (1, 2):
            kept = [_in_child(m, n, b, seq) for b in (1, 2)]  # a fresh process each: 1-2 GB models
            per_token[n] = (kept[1] - kept[0]) / seq
        layer = per_token[2] - per_token[1]
        total = per_token[1] + (layers - 1) * layer
        out.append({"model": f"gpu_train (2.62B), {batch} x {seq} tokens", "mode": m,
                    "KiB_per_token_per_layer": layer / 2**10, "activations_GiB": total * batch * seq / 2**30})
    for r in out:
        r["activations_vs_none"] = r["activations_GiB"] / out[0]["activations_GiB"]
    return out


def _in_child(mode: str, layers: int, batch: int, seq: int) -> int:
    code = (f"import sys; sys.path.insert(0, {str(Path(__file__).resolve().parent)!r}); import activation_memory as a; "
            f"print(a.one({mode!r}, {layers}, {batch}, {seq}))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    if proc.returncode:
        sys.exit(proc.stderr[-2000:])
    return int(proc.stdout.split()[-1])


def one(mode: str, layers: int, batch: int, seq: int) -> int:
    cfg = ModelConfig(num_layers=layers, max_seq_len=seq, **BIG)
    x = torch.randint(0, 256, (batch, seq), generator=torch.Generator().manual_seed(1))
    return kept_bytes(build(cfg, mode), x)[1]


def recast(iters: int, tokens: int = 1024, experts: int = 2, dim: int = 128, ffn: int = 256) -> list[dict]:
    """The experts' forward+backward under bf16 autocast, keeping the casts of their fp32 weights for
    backward, against casting them again there (`recast_in_backward`: what
    `parallel.recast_expert_weights` does for resident experts, and FSSDP for the layers it computes
    in place), interleaved, median of `iters`; and the bytes each keeps. Default: a demo rank's layer
    (2 experts of d 128, ffn 256; 8 x 128 tokens, top-2)."""
    from moesaic.parallel.experts import GroupedExperts

    torch.manual_seed(0)
    store = GroupedExperts(experts, dim, ffn)
    x0 = torch.randn(tokens, dim, requires_grad=True)  # x: not a leaf, as a layer's input is
    counts = torch.full((experts,), tokens // experts, dtype=torch.int64)
    holder = torch.nn.ModuleDict({"experts": store})  # (".experts." in the names)

    def run(recast_weights: bool):
        def fwd():
            store.recast_weights = recast_weights
            return store(x0 * 1, counts)
        return fwd

    runs = {"casts kept": run(False), "cast again in backward": run(True)}
    layer = f"{experts} experts, d {dim}, ffn {ffn}, {tokens} rows"
    rows = {}
    for name, fwd in runs.items():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out, kept = forward_kept(holder, fwd)
        out.float().sum().backward()
        rows[name] = {"layer": layer, "weights": name, "kept_KiB": kept.total / 2**10,
                      "of which casts (KiB)": kept.weight_copies / 2**10, "times": []}
    for _ in range(iters + 1):  # interleaved; the first round warms up
        for name, fwd in runs.items():
            t0 = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = fwd()
            out.float().sum().backward()
            rows[name]["times"].append(time.perf_counter() - t0)
    out = [{**{k: v for k, v in r.items() if k != "times"}, "fwd+bwd_ms": 1e3 * statistics.median(r["times"][1:])}
           for r in rows.values()]
    for r in out:
        r["time_vs_kept"] = r["fwd+bwd_ms"] / out[0]["fwd+bwd_ms"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--batch", type=int, default=8, help="the demo model's batch (the demo's per-rank batch)")
    ap.add_argument("--seq", type=int, default=128, help="the demo's data.seq_len")
    ap.add_argument("--skip-big", action="store_true", help="only the demo model")
    ap.add_argument("--recast-only", action="store_true", help="only the experts' weights, casts kept or cast again")
    ap.add_argument("--recast-rows", type=int, nargs="+", default=[1024], help="the experts' rows (2 experts)")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    print("machine:", machine())
    casts = [r for rows in a.recast_rows for r in recast(max(a.iters, 30), tokens=rows)]
    print(table(casts))
    small = [] if a.recast_only else demo(a.iters, a.batch, a.seq)
    big = [] if a.skip_big or a.recast_only else gpu_train_model()
    for rows in (small, big):
        if rows:
            print(table(rows))
    write_json(a.json, {"machine": machine(), "args": vars(a), "recast": casts, "demo": small, "gpu_train_model": big})


if __name__ == "__main__":
    main()
