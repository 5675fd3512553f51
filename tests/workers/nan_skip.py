"""torchrun worker: on_nan=skip drops a step whole. At one step, rank 1 alone turns its logits into
NaN (`logits`: every gradient follows), or one expert's weight gradient (`expert_grad`: the loss and
the dense gradients stay finite, the global norm does not). Hooks inject the fault; they stand in
for no part of the trainer. Every rank must skip that step alike: the parameters, the optimizer state
(the experts' AdamW, and the dense AdamW inside DeepSpeed's engine under engine=deepspeed) and the
step counts stay as they were, while the learning-rate schedules (the dense one and the experts')
move on together, and the steps after it train. With on_nan=stop, every rank stops at that step with
the parameters and the optimizer state as they were.

argv: engine (torch | deepspeed | deepspeed-moe, the last being model.moe_impl=deepspeed: DeepSpeed-MoE's
layer, its engine owning every parameter), ZeRO stage, fault (logits | expert_grad), on_nan (skip | stop);
several such quadruples run one after another in one launch (each with its own model, engine and
optimizer). Prints one JSON line per case on rank 0, with the case's arguments under "case"."""

import json
import math
import sys

import torch
import torch.distributed as dist

from moesaic.parallel.config import ParallelConfig
from moesaic.parallel.process import finish_rank
from moesaic.parallel.recorder import RoutingRecorder
from moesaic.trainer.config import OptimConfig, TrainConfig
from moesaic.trainer.data import DataConfig, load_corpus
from moesaic.trainer.dist import DistInfo
from moesaic.trainer.model import ModelConfig, Transformer
from moesaic.trainer.optim import lr_lambda
from moesaic.trainer.parallelize import parallelize, resolve_plan
from moesaic.trainer.step import train_step

STEPS, BAD = 5, 2  # step index 2 (the third step) is poisoned


def main():
    args = sys.argv[1:]
    if not args or len(args) % 4:
        sys.exit(f"nan_skip.py: expected quadruples of engine stage fault on_nan, got {args}")
    dist.init_process_group("gloo")
    for i in range(0, len(args), 4):
        run(args[i], int(args[i + 1]), args[i + 2], args[i + 3])
    finish_rank(0)


def run(engine: str, stage: int, fault: str, on_nan: str) -> None:
    ds_moe = engine == "deepspeed-moe"
    W, rank = dist.get_world_size(), dist.get_rank()
    cfg = TrainConfig(model=ModelConfig(dim=32, num_layers=2, num_heads=2, max_seq_len=64,
                                        moe={"num_experts": 4, "top_k": 2, "ffn_dim": 16},
                                        moe_impl="deepspeed" if ds_moe else "moesaic"),
                      data=DataConfig(seq_len=32, max_bytes=2_000_000), steps=STEPS, batch_size=2, on_nan=on_nan,
                      optim=OptimConfig(warmup_steps=2, grad_clip=1.0),
                      parallel=ParallelConfig(ep_size=0, expert_sharding="fssdp" if fault == "logits" else "resident",
                                              engine="deepspeed" if ds_moe else engine, zero_stage=stage))
    corpus = load_corpus(cfg.data)
    info = DistInfo(rank, W, rank, torch.device("cpu"), "gloo")
    torch.manual_seed(cfg.seed)
    model = Transformer(cfg.model)
    par = parallelize(model, cfg, info, resolve_plan(cfg, W))
    opt, sched = par.build_optimizer(cfg)
    recorder = RoutingRecorder(cfg.model.num_moe_layers, cfg.model.moe.num_experts, cfg.model.moe.top_k)
    poison = {"on": False}
    if fault == "logits":
        model.head.register_forward_hook(lambda m, i, out: out * float("nan") if poison["on"] and rank == 1 else out)
    else:  # resident experts: the parameter's gradient is the one reduced and clipped
        moe = model.layers[-1].moe
        w2 = moe.deepspeed.deepspeed_moe.experts.deepspeed_experts[0].w2.weight if ds_moe else moe.experts.w2_EDF
        w2.register_hook(lambda g: g * float("nan") if poison["on"] and rank == 1 else g)

    experts = set(par.expert_names)

    def snapshot():
        params = {n: p.detach().clone() for n, p in model.named_parameters()}
        state = [(k, v.clone()) for st in opt.state.values() for k, v in st.items()]
        if ds_moe:  # this rank's part of the engine's state: ZeRO's fp32 partitions and their moments
            from moesaic.parallel.deepspeed_engine import zero_optimizer

            zero = zero_optimizer(par.ds_engine)
            inner = par.ds_engine.optimizer if zero is None else zero.optimizer
            keys = list(inner.state) if zero is None else zero.single_partition_of_fp32_groups
            if zero is not None:
                state += [(f"fp32.{i}", t.clone()) for i, t in enumerate(keys)]
            state += [(f"{i}.{k}", torch.as_tensor(v).clone()) for i, t in enumerate(keys)
                      for k, v in sorted(inner.state.get(t, {}).items())]
        elif par.ds_engine is not None:
            from moesaic.parallel.deepspeed_engine import zero_moments, zero_step

            dense = {n: p for n, p in model.named_parameters() if n not in experts}
            moments = zero_moments(par.ds_engine, dense)  # a collective: every rank calls it
            state += [(f"{n}.{m}", t.clone()) for n, ms in sorted(moments.items()) for m, t in ms.items()]
            state.append(("zero_step", zero_step(par.ds_engine)))
        return params, state

    def lrs():
        out = [] if ds_moe else [sched.get_last_lr()[0]]  # DeepSpeed-MoE: the loop's optimizer is empty
        if par.ds_engine is not None:
            out.append(par.ds_engine.lr_scheduler.get_last_lr()[0])
        return out

    skipped, lr_rows, finite_after, unchanged = [], [], True, None
    before = snapshot()
    stopped = None
    for step in range(STEPS):
        poison["on"] = step == BAD
        try:
            r = train_step(step, cfg=cfg, corpus=corpus, par=par, recorder=recorder, optimizer=opt,
                           scheduler=sched, info=info)
        except FloatingPointError as e:  # on_nan=stop
            stopped, r = {"step": step, "message": str(e)}, None
        skipped.append(r is None or r.skipped)
        lr_rows.append(lrs())
        after = snapshot()
        if step == BAD:
            params_same = all(torch.equal(before[0][n], after[0][n]) for n in before[0])
            state_same = len(before[1]) == len(after[1]) and all(
                ka == kb and (a is None and b is None or torch.equal(a, b)) for (ka, a), (kb, b) in zip(before[1], after[1]))
            unchanged = {"params": params_same, "optimizer_state": state_same, "state_entries": len(after[1])}
        if stopped:
            break
        if step > BAD:
            finite_after &= all(bool(torch.isfinite(p).all()) for p in after[0].values()) and math.isfinite(r.ce)
        before = after
    expected = [cfg.optim.lr * lr_lambda(cfg.optim, cfg.steps)(s + 1) for s in range(STEPS)]
    flags = torch.tensor([int(unchanged["params"]), int(unchanged["optimizer_state"]), int(finite_after)])
    dist.all_reduce(flags, op=dist.ReduceOp.MIN)  # every rank must agree
    if rank == 0:
        print(json.dumps({"case": [engine, stage, fault, on_nan], "skipped": skipped, "params_unchanged": bool(flags[0]), "state_unchanged": bool(flags[1]),
                          "state_entries": unchanged["state_entries"], "finite_after": bool(flags[2]),
                          "lrs": lr_rows, "expected_lrs": expected, "stopped": stopped}), flush=True)
    dist.barrier()


if __name__ == "__main__":
    main()  # ends in finish_rank
