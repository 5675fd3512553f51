"""One GPU, whole training steps of moesaic's own model and MoE layer: tokens/s and MFU.

    python bench/gpu_train.py [--batch 8 4] [--steps 10] [--compile] [--json out.json]
    python bench/gpu_train.py --device cpu --tiny          # the CPU smoke test

The model (the issue's, about 2.62B parameters, 0.96B active): d 2048, 16 layers, 16 heads, 16
experts of ffn 1408 (SwiGLU, grouped GEMM), top-4, 1 shared expert, seq 2048, byte vocabulary.

Mixed precision, as Megatron does it (bench/master_adamw.py): the model's weights, activations and
gradients are bf16; the optimizer keeps fp32 master weights and fp32 AdamW moments (bf16 moments with
`--moments bf16`, as DeepSeek-V3 trained), clips the global
gradient norm to 1.0, steps the masters and writes the bf16 weights back (one Triton kernel on a
GPU, checked against torch's AdamW at start). With `--accum N`, N micro-batches' gradients are
summed in fp32 before each step. Learning rate 3e-4, constant, or after a linear warm-up of
`--lr-warmup` steps.

FLOPs per token (as `moesaic.trainer.step.flops_per_token`): 6 x active parameters, plus causal
attention 12 * layers * d * seq / 2. MFU = FLOPs per token x tokens/s / the dense bf16 matmul rate
measured in the same run (8192^3). Needs torch alone (no hydra, wandb or pulp): the GPU image has
none of them.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import dense_rate, ensure_importable, machine, profile_to, sync, table, write_json  # noqa: E402
from gpu_variants import VARIANTS, use  # noqa: E402
from gpu_variants import apply as apply_variants  # noqa: E402
from master_adamw import MasterAdamW, check_triton  # noqa: E402

ensure_importable()
import torch  # noqa: E402

from moesaic.trainer.data import DataConfig, load_corpus  # noqa: E402
from moesaic.trainer.model import ModelConfig, Transformer  # noqa: E402

MODEL = dict(vocab_size=256, dim=2048, num_layers=16, num_heads=16, max_seq_len=2048,
             moe=dict(num_experts=16, top_k=4, ffn_dim=1408, num_shared_experts=1))
TINY = dict(vocab_size=256, dim=64, num_layers=2, num_heads=4, max_seq_len=64,
            moe=dict(num_experts=4, top_k=2, ffn_dim=32, num_shared_experts=1))


class _Mark:
    """A point in the step: a CUDA event (no sync), or the host clock on a CPU."""

    def __init__(self, device):
        self.event = torch.cuda.Event(enable_timing=True) if device.type == "cuda" else None
        if self.event is not None:
            self.event.record()
        self.t = time.perf_counter()

    def seconds_since(self, earlier: "_Mark") -> float:
        if self.event is not None:
            return earlier.event.elapsed_time(self.event) / 1e3
        return self.t - earlier.t


def _groups(model) -> list[list]:
    """The parameters in the order the forward pass uses them: the embedding, each block, the head
    (a tied head weight stays with the embedding)."""
    groups, seen = [], set()
    for mods in ([model.embed], *([b] for b in model.layers), [model.norm, model.head]):
        groups.append([p for m in mods for p in m.parameters() if id(p) not in seen])
        seen.update(id(p) for p in groups[-1])
    return groups


def _wait_hooks(model, opt) -> None:
    """Before each group's first use in the forward pass, wait for its overlapped update."""
    mods = [model.embed, *model.layers, model.norm]
    for g, mod in enumerate(mods):
        mod.register_forward_pre_hook(lambda _m, _args, g=g: opt.wait(g))


def check_overlap(device, data: torch.Tensor, steps: int = 4) -> dict:
    """The overlapped update against the plain one on a small model (eager, same seed and batches):
    the largest parameter difference after `steps` steps, beside that of two plain runs (the floor
    that nondeterministic kernels set; 0 when there are none)."""
    cfg = ModelConfig(vocab_size=256, dim=256, num_layers=4, num_heads=4, max_seq_len=256,
                      moe=dict(num_experts=8, top_k=2, ffn_dim=256, num_shared_experts=1))
    g = torch.Generator().manual_seed(1)
    starts = torch.randint(0, data.numel() - 258, (steps, 4), generator=g)
    batches = [torch.stack([data[s:s + 257] for s in row.tolist()]).long().to(device) for row in starts]

    def train(overlap: bool):
        torch.manual_seed(0)
        with device:
            model = Transformer(cfg).to(dtype=torch.bfloat16)
        model.rope_cos, model.rope_sin = model.rope_cos.float(), model.rope_sin.float()
        opt = MasterAdamW(model.parameters(), lr=1e-3, weight_decay=0.1, impl="triton")
        if overlap:
            opt.set_groups(_groups(model))
            _wait_hooks(model, opt)
        losses = []
        with torch.cuda.stream(torch.cuda.Stream(device, priority=-1)) if overlap else contextlib.nullcontext():
            for w in batches:
                out = model(w[:, :-1], w[:, 1:])
                out.loss.backward()
                opt.step(1.0, overlap=overlap)
                losses.append(out.ce_loss.detach())
            opt.finish()
        sync(device)
        return [float(x) for x in losses], [p.detach().float() for p in model.parameters()]

    ref, again, over = train(False), train(False), train(True)
    diff = lambda x, y: max(float((p - q).abs().max()) for p, q in zip(x[1], y[1]))  # noqa: E731
    return {"plain_vs_plain_max_param_diff": diff(ref, again), "overlap_vs_plain_max_param_diff": diff(ref, over),
            "plain_losses": ref[0], "overlap_losses": over[0]}


def run(cfg: ModelConfig, batch: int, a, device, data: torch.Tensor, rate: float) -> dict:
    torch.manual_seed(0)
    with device:  # allocate and initialise on the GPU (2.62B parameters would take a while on the host)
        model = Transformer(cfg).to(dtype=torch.bfloat16)
    model.rope_cos, model.rope_sin = model.rope_cos.float(), model.rope_sin.float()
    apply_variants(model, a.variant)
    counts = model.num_params()
    opt = MasterAdamW(model.parameters(), lr=3e-4, weight_decay=0.1, impl=a.optimizer, moments=a.moments)
    if opt.impl == "triton":
        opt.block, opt.num_warps = a.adamw_config
    if a.overlap_optimizer:
        opt.set_groups(_groups(model))
        _wait_hooks(model, opt)
    step_fn = model
    mode = None if a.compile_mode == "default" else a.compile_mode
    if a.compile == "model":
        step_fn = torch.compile(model, mode=mode)
    elif a.compile == "blocks":  # each block its own compiled region (as torchtitan); hooks stay eager
        for blk in model.layers:
            blk.forward = torch.compile(blk.forward, mode=mode)
    seq = cfg.max_seq_len
    g = torch.Generator().manual_seed(0)

    def batch_xy():
        starts = torch.randint(0, data.numel() - seq - 1, (batch,), generator=g)
        w = torch.stack([data[s:s + seq + 1] for s in starts.tolist()]).long().to(device)
        return w[:, :-1], w[:, 1:]

    # every batch on the device before timing: the loop below never waits for the host
    batches = [[batch_xy() for _ in range(a.accum)] for _ in range(a.warmup + a.steps)]

    def step(xys):
        """Enqueue one optimizer step over `a.accum` micro-batches; (mean loss, marks): marks at the
        start, after each forward and backward, and after the optimizer (on the main stream)."""
        if a.compile_mode == "reduce-overhead":  # CUDA graphs: a new iteration (outputs of the last may go)
            torch.compiler.cudagraph_mark_step_begin()
        marks, losses = [_Mark(device)], []
        for x, y in xys:
            out = step_fn(x, y)
            marks.append(_Mark(device))
            (out.loss / a.accum).backward()
            if a.accum > 1:
                opt.accumulate()
            marks.append(_Mark(device))
            losses.append(out.ce_loss.detach())
        if a.lr_warmup:
            opt.set_lr(3e-4 * min(1.0, (opt.steps + 1) / a.lr_warmup))
        opt.step(1.0, overlap=bool(a.overlap_optimizer))
        marks.append(_Mark(device))
        return torch.stack(losses).mean(), marks

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for xys in batches[:a.warmup]:  # compiles, and the allocator settles
        step(xys)
    sync(device)
    t0 = time.perf_counter()
    runs = [step(xys) for xys in batches[a.warmup:]]
    opt.finish()
    end = _Mark(device)
    sync(device)
    wall = (time.perf_counter() - t0) / a.steps
    # a step runs from its start mark to the next step's (the overlapped update ends inside the next forward)
    starts = [marks[0] for _, marks in runs] + [end]
    times = [b.seconds_since(s) for s, b in zip(starts, starts[1:])]
    med = sorted(times)[len(times) // 2]
    phases = []
    for _, marks in runs:
        gaps = [b.seconds_since(s) for s, b in zip(marks, marks[1:])]
        phases.append([sum(gaps[0:-1:2]), sum(gaps[1:-1:2]), gaps[-1]])
    fwd_ms, bwd_ms, opt_ms = (1e3 * sorted(p[j] for p in phases)[len(phases) // 2] for j in range(3))
    losses = [float(loss) for loss, _ in runs]
    if a.profile and batch == a.batch[0]:
        print(profile_to(a.profile, lambda: step(batches[-1]), device))
        opt.finish()
    tokens = batch * seq * a.accum
    flops_tok = 6.0 * counts["active"] + 12.0 * cfg.num_layers * cfg.dim * seq / 2
    tok_s = tokens / med
    row = {"run": _label(a, batch, opt.impl), "params_B": counts["total"] / 1e9,
           "active_B": counts["active"] / 1e9, "median_step_s": med, "mean_wall_step_s": wall,
           "tokens_per_s": round(tok_s), "tflops": flops_tok * tok_s / 1e12, "mfu": flops_tok * tok_s / (rate * 1e12),
           "forward_ms": fwd_ms, "backward_ms": bwd_ms, "optimizer_ms": opt_ms,
           "first_loss": losses[0], "last_loss": losses[-1], "optimizer_state_GiB": opt.state_bytes() / 2**30,
           "losses": losses}  # every measured step's: loss curves of two runs compare step by step
    if device.type == "cuda":
        row["peak_GiB"] = torch.cuda.max_memory_allocated() / 2**30
    del model, opt, step_fn
    return row


def _main_stream(a, device):
    """With the update in the background, the step's own work runs on a high-priority stream: the
    block scheduler gives the update's kernels only the SMs that the step leaves free."""
    if a.overlap_optimizer == "background" and device.type == "cuda":
        return torch.cuda.stream(torch.cuda.Stream(device, priority=-1))
    return contextlib.nullcontext()


def _cols(rows: list[dict]) -> list[str]:
    """The table's columns: every key, in order, but the per-step losses (they stay in the JSON)."""
    return [k for k in dict.fromkeys(k for r in rows for k in r) if k != "losses"]


def _label(a, batch: int, impl: str) -> str:
    accum = f" x {a.accum} micro-batches" if a.accum > 1 else ""
    variants = "".join(f", {v}" for v in a.variant)
    mode = {"none": "eager", "model": "compile", "blocks": "compile per block"}[a.compile]
    if a.compile != "none" and a.compile_mode != "default":
        mode += f" ({a.compile_mode})"
    overlap = f" overlapped ({a.overlap_optimizer})" if a.overlap_optimizer else ""
    warm = f", lr warm-up {a.lr_warmup}" if a.lr_warmup else ""
    moments = " (bf16 moments)" if a.moments == "bf16" else ""
    return f"{mode}, batch {batch}{accum}, {impl}{overlap} AdamW{moments}{variants}{warm}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="a small model (the CPU smoke test)")
    ap.add_argument("--batch", type=int, nargs="+", default=[8, 4], help="batch sizes to try, each one a run")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--compile", nargs="?", const="model", default="none", choices=["none", "model", "blocks"],
                    help="torch.compile the whole model, or each block separately (--compile blocks)")
    ap.add_argument("--compile-mode", default="default",
                    choices=["default", "reduce-overhead", "max-autotune-no-cudagraphs", "max-autotune"],
                    help="torch.compile's mode: reduce-overhead replays CUDA graphs (the host launches once per "
                         "region), max-autotune-* times Triton templates against cuBLAS per GEMM shape")
    ap.add_argument("--overlap-optimizer", nargs="?", const="background", default=None, choices=["background", "equal"],
                    help="run the update on a side stream, overlapped with the next forward (triton AdamW): "
                         "as background work under a high-priority main stream (default), or at equal priority")
    ap.add_argument("--moments", default="fp32", choices=["fp32", "bf16"],
                    help="AdamW moments in fp32, or in bf16 as DeepSeek-V3 trained (fp32 master weights either way)")
    ap.add_argument("--lr-warmup", type=int, default=0,
                    help="linear learning-rate warm-up over this many steps (0: constant 3e-4 from the first step)")
    ap.add_argument("--accum", type=int, default=1, help="micro-batches per optimizer step (fp32 accumulation)")
    ap.add_argument("--optimizer", default="auto", choices=["auto", "torch", "triton"],
                    help="MasterAdamW's implementation (auto: triton on CUDA where it is installed)")
    ap.add_argument("--variant", nargs="*", default=[], choices=VARIANTS,
                    help="candidate speed-ups swapped into the model (bench/gpu_variants.py)")
    ap.add_argument("--profile", default=None, help="write a kernel profile of the first batch size here")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    device = torch.device(a.device)
    use(a.variant)
    cfg = ModelConfig(**(TINY if a.tiny else MODEL))
    rate = dense_rate(device, torch.bfloat16, 256 if a.tiny else 8192, 3 if a.tiny else 50)
    # the embedded default corpus (the standard library's .py files as bytes), as the trainer reads it
    data = torch.from_numpy(load_corpus(DataConfig(max_bytes=4 << 20 if a.tiny else 64 << 20)).train.copy())
    rows, m = [], machine()
    a.adamw_config = (4096, 8)  # the triton kernel's (BLOCK, num_warps) until tuned below
    if a.optimizer != "torch" and device.type == "cuda":
        try:
            m["triton_adamw_rel_diff"] = diff = check_triton(device, moments=a.moments)
            print(f"triton AdamW ({a.moments} moments) against the torch implementation, 3 steps: "
                  f"max |master diff| / max |update| = {diff:.2e}")
            # fp32 rounding of the weights is ~2e-5 of an update of lr=1e-2; bf16 moments may round apart
            if diff > (1e-4 if a.moments == "fp32" else 2e-2):
                raise RuntimeError("the triton AdamW differs from the torch implementation")
            a.optimizer = "triton"
            probe = MasterAdamW([torch.nn.Parameter(torch.zeros(1, device=device, dtype=torch.bfloat16))], lr=1e-3,
                                weight_decay=0.0, impl="triton")
            m["adamw_configs"] = tuned = probe.tune()
            a.adamw_config = (probe.block, probe.num_warps)
            print(table(tuned), flush=True)
        except Exception as e:  # noqa: BLE001 - fall back to the torch implementation, and say so
            print(f"triton AdamW not used: {type(e).__name__}: {e}")
            m["triton_adamw_error"] = str(e)[:200]
            a.optimizer = "torch"
    if a.overlap_optimizer and a.compile == "model":
        raise SystemExit("--overlap-optimizer waits between blocks: use it with --compile blocks (or eager), not --compile")
    if a.overlap_optimizer and a.optimizer != "triton":
        raise SystemExit(f"--overlap-optimizer needs the triton AdamW (CUDA and Triton); here it is {a.optimizer!r}")
    if a.overlap_optimizer and device.type == "cuda":
        m["overlap_check"] = check = check_overlap(device, data)
        print(f"overlapped update against the plain one, small model, 4 steps: {check}", flush=True)
    for b in a.batch:
        if a.compile != "none":
            torch._dynamo.reset()  # each batch size its own compile, not a dynamic-shape recompile
        try:
            with _main_stream(a, device):
                rows.append(run(cfg, b, a, device, data, rate))
        except Exception as e:  # noqa: BLE001 - one failed run (out of memory, a compile error) keeps the others
            rows.append({"run": _label(a, b, a.optimizer),
                         "error": f"{type(e).__name__}: {str(e)[:200]}"})
        if device.type == "cuda":
            torch.cuda.empty_cache()
        print(table(rows[-1:], _cols(rows[-1:])), flush=True)  # each run as it ends: a time limit keeps the finished ones
        write_json(a.json, {"machine": m, "dense_tflops": rate, "model": MODEL if not a.tiny else TINY, "rows": rows})
    # the MFU's denominator: the faster of the dense rates measured before and after the runs
    rate = max(rate, dense_rate(device, torch.bfloat16, 256 if a.tiny else 8192, 3 if a.tiny else 50))
    for r in rows:
        if "tflops" in r:
            r["mfu"] = r["tflops"] / rate
    write_json(a.json, {"machine": m, "dense_tflops": rate, "model": MODEL if not a.tiny else TINY, "rows": rows})
    print(f"\n# moesaic, one {m.get('gpu', device.type)}: whole training steps\n")
    print(f"torch {m['torch']}, {m['date']}; dense bf16 matmul {rate:.1f} TFLOP/s (the faster of two measurements in this run)\n")
    print(table(rows, _cols(rows)) + "\n")


if __name__ == "__main__":
    main()
