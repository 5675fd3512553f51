"""A training step's memory: `moesaic-estimate`'s step peak against real steps, and what the thirtieth
session's changes are worth on larger models.

    python bench/step_memory.py [--skip-big] [--base experiment=smoke ...] [--json out.json]

1. Measured (CPU, one process): the demo model at its default batch (8 x 128), per setting, the
   peak of a real step's tensors (torch's MemTracker over the second step: forward, backward,
   clipping, AdamW; parameters, gradients, moments and everything the step allocates; the rotary
   tables and the batch left out), beside the estimate's step peak and the estimate as it was
   before the working sets (every tensor kept and every gradient, no working set, no optimizer
   temporaries). The estimate exceeds the measurement by at most the gradients not yet produced at
   the peak.
2. Counted on fake tensors (`count_step`): gpu_train's 2.62B model, one rank, bf16, batch 8 x 2,048,
   the forward and backward's working set with each MoE layer keeping its route with its autograd
   graph (as it did) and without it (now), per activation checkpointing mode.
3. Computed: the same model's AdamW temporaries per `optim.implementation`, and the fp32 logits that
   the trainer no longer keeps through backward, for this byte vocabulary and for a 128K one.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, table, write_json  # noqa: E402

BIG = ("model.dim=2048 model.num_layers=16 model.num_heads=16 model.max_seq_len=2048 data.seq_len=2048 "
       "model.moe.num_experts=16 model.moe.top_k=4 model.moe.ffn_dim=1408 model.moe.num_shared_experts=1 "
       "batch_size=8").split()
SETTINGS = {  # part 1: name -> overrides of the demo model
    "fp32, for-loop": ["optim.implementation=for-loop"],
    "bf16, foreach": ["parallel.mixed_precision=bf16", "optim.implementation=foreach"],
    "bf16, moe_act, foreach": ["parallel.mixed_precision=bf16", "parallel.recompute_moe_act=true",
                               "optim.implementation=foreach"],
    "bf16, full checkpointing, foreach": ["parallel.mixed_precision=bf16", "parallel.activation_checkpoint=full",
                                          "optim.implementation=foreach"],
    "bf16, full checkpointing, fused": ["parallel.mixed_precision=bf16", "parallel.activation_checkpoint=full",
                                        "optim.implementation=fused"],
}
MIB, GIB = 2**20, 2**30


def storage_bytes(tensors) -> int:
    """Bytes of the tensors' storages, each once."""
    return sum(st.nbytes() for st in {t.untyped_storage()._cdata: t.untyped_storage() for t in tensors}.values())


def build(cfg) -> torch.nn.Module:
    """`cfg`'s model on CPU (seed 0), with its activation checkpointing and recompute_moe_act."""
    from moesaic.trainer.model import Transformer
    from moesaic.trainer.parallelize import apply_activation_checkpoint

    torch.manual_seed(0)
    model = Transformer(cfg.model)
    apply_activation_checkpoint(model, cfg.parallel.activation_checkpoint,
                                recompute_moe_act=cfg.parallel.recompute_moe_act)
    return model


def measure(cfg, seed: int = 1) -> dict:
    """One process, `cfg`'s model: two real steps; of the second, torch's MemTracker peak (the
    rotary tables and the batch left out), the bytes that `optimizer.step()` allocated at once, and
    the gradients' bytes."""
    from torch.distributed._tools.mem_tracker import MemTracker

    from moesaic.trainer.activations import LiveBytes
    from moesaic.trainer.optim import build_optimizer
    from moesaic.trainer.step import precision

    model = build(cfg)
    opt = build_optimizer(model, cfg.optim)
    x = torch.randint(0, cfg.model.vocab_size, (cfg.batch_size, cfg.data.seq_len),
                      generator=torch.Generator().manual_seed(seed))
    seen = {}

    def step():
        with precision(cfg, x.device):
            loss = model(x, x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        with LiveBytes() as live:
            opt.step()
        seen["optimizer_temps"], seen["grads"] = live.peak(), storage_bytes(p.grad for p in model.parameters())
        opt.zero_grad(set_to_none=True)

    step()
    tracker = MemTracker()
    tracker.track_external(model, opt, x)
    with tracker:
        step()
    outside = storage_bytes([*model.buffers(), x])
    return {"peak": tracker.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"] - outside, **seen}


def as_before(row: dict) -> int:
    """The estimate's total before the working sets: every other column summed."""
    from moesaic.trainer.estimate import FORWARD_BACKWARD, STATE

    return sum(row[k] or 0 for k in (*STATE, *FORWARD_BACKWARD) if k != "backward_working")


def part1(base: list[str]) -> list[dict]:
    from moesaic.trainer.estimate import compose, estimate

    out = []
    for name, overrides in SETTINGS.items():
        cfg = compose(["parallel=ddp", *base, *overrides])
        m, row = measure(cfg), estimate(cfg, 1)[0]
        out.append({"setting": name, "measured peak (MiB)": m["peak"] / MIB, "estimate (MiB)": row["total"] / MIB,
                    "estimate / measured": row["total"] / m["peak"], "before (MiB)": as_before(row) / MIB,
                    "before / measured": as_before(row) / m["peak"],
                    "working set (MiB)": row["backward_working"] / MIB,
                    "optimizer temps, measured = estimated (MiB)":
                        f"{m['optimizer_temps'] / MIB:.4f} = {row['optimizer_working'] / MIB:.4f}"})
    return out


def part2() -> list[dict]:
    from moesaic.parallel.router import RouterOutput
    from moesaic.trainer.activations import count_step
    from moesaic.trainer.estimate import compose

    out = []
    for mode in ("none", "attention", "full"):
        cfg = compose(["parallel=ddp", "parallel.mixed_precision=bf16", f"parallel.activation_checkpoint={mode}", *BIG])
        kept, now = count_step(cfg, cfg.batch_size)
        detached = RouterOutput.detached
        RouterOutput.detached = lambda self: self  # the route kept as it was, with its graph
        try:
            _, before = count_step(cfg, cfg.batch_size)
        finally:
            RouterOutput.detached = detached
        out.append({"activation_checkpoint": mode, "kept (GiB)": kept.total / GIB,
                    "working set, routes with graphs (GiB)": before / GIB, "working set now (GiB)": now / GIB,
                    "difference (GiB)": (before - now) / GIB})
    return out


def part3() -> list[dict]:
    from moesaic.trainer.estimate import compose, estimate

    out = []
    for impl in ("foreach", "for-loop", "fused"):
        cfg = compose(["parallel=ddp", "parallel.mixed_precision=bf16", "parallel.activation_checkpoint=full",
                       f"optim.implementation={impl}", *BIG])
        row = estimate(cfg, 1)[0]
        out.append({"optim.implementation": impl, "optimizer temporaries (GiB)": row["optimizer_working"] / GIB,
                    "step peak, full checkpointing (GiB)": row["total"] / GIB})
    tokens = 8 * 2048
    logits = [{"vocabulary": v, "fp32 logits no longer kept (GiB)": tokens * v * 4 / GIB} for v in (256, 128_256)]
    return out, logits


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", nargs="*", default=[], help="overrides of part 1's model (default: the demo model)")
    ap.add_argument("--skip-big", action="store_true", help="part 1 only")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    torch.set_num_threads(1)
    info = machine()
    print(f"machine: {info['cpu']}, {info['cores']} cores, torch {info['torch']}, {info['date']}\n")
    p1 = part1(a.base)
    print(f"## 1. The {' '.join(a.base) or 'demo model'}, one process: a real step's peak and the estimate\n")
    print(table(p1))
    if a.skip_big:
        write_json(a.json, {"machine": info, "measured": p1})
        return
    p2 = part2()
    print("\n## 2. gpu_train's 2.62B model, bf16, batch 8 x 2,048: the working set, counted on fake tensors\n")
    print(table(p2))
    p3, logits = part3()
    print("\n## 3. The same model's AdamW temporaries (computed), and the logits no longer kept (batch 8 x 2,048)\n")
    print(table(p3))
    print()
    print(table(logits))
    write_json(a.json, {"machine": info, "measured": p1, "routes": p2, "optimizer": p3, "logits": logits})


if __name__ == "__main__":
    main()
