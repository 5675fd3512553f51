"""One contender of `bench/compare.py` on every rank (run under torchrun): the trainer's own model,
parallelisation, optimizer and `train_step`, from the warm-start weights, timed step by step.

    torchrun --standalone --nproc_per_node 4 bench/compare_worker.py --warm W.pt --out R.json -- OVERRIDES...

Measured here, per rank:
- step time: wall time of `train_step` (and the re-planner's hook), after a barrier; the step's time
  is the slowest rank's;
- bytes per step of every collective, by what it carries (tokens, expert parameters, gradients,
  other), counted at the torch.distributed call (DDP's gradient all-reduce is routed through the
  Python all-reduce hook so that it is counted too);
- expert-state memory from the tensors: expert parameters, their gradients and optimizer state
  (for DeepSpeed, the ZeRO fp32 partitions, their gradients and Adam moments), the largest of three
  readings: at the end of backward (for DeepSpeed, before ZeRO reduces the local experts' full
  gradients), just before and just after the optimizer step; plus FSSDP's gathered working set at
  its peak (weights and their gradients);
- peak RSS.
"""

from __future__ import annotations

import argparse
import inspect
import json
import resource
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch
import torch.distributed as dist

# ring-algorithm bytes each rank sends, as a multiple of the tensor's bytes, for a group of P ranks
_COLLECTIVES = {
    "all_reduce": lambda P: 2 * (P - 1) / P,
    "reduce_scatter_tensor": lambda P: (P - 1) / P,
    "all_gather_into_tensor": lambda P: float(P - 1),  # of the input (one shard)
    "all_gather_single": lambda P: float(P - 1),  # the same, under its torch 2.13 name
    "broadcast": lambda P: 1.0,
    "reduce": lambda P: 1.0,
}
_PARAM_FNS = {"_issue_gather", "regather", "sparse_all_gather"}
_GRAD_FNS = {"sparse_reduce_scatter", "finish_reduce_scatter", "reduce_expert_grads", "direct_grads"}


def _kind(frame) -> str:
    """What a collective carries, from who called it."""
    files = []
    for _ in range(16):
        if frame is None:
            break
        name, fn = Path(frame.f_code.co_filename).name, frame.f_code.co_name
        if fn in _PARAM_FNS:
            return "expert_params"
        if fn in _GRAD_FNS:
            return "expert_grads"
        if fn == "allreduce_hook":
            return "dense_grads"
        if fn in ("reshard_owners", "migrate_resident"):  # a re-plan moving experts and their moments
            return "expert_migration"
        files.append((name, fn))
        frame = frame.f_back
    for name, fn in files:
        if name in ("sharded_moe.py", "all_to_all.py", "expert_parallel.py"):
            return "tokens"
        if name == "stage_1_and_2.py":  # ZeRO: gradients reduced, then the updated partitions gathered
            return "zero_params" if "gather" in fn or fn == "step" else "zero_grads"
    return "other"


class CommCounter:
    """Wraps torch.distributed's collectives; counts bytes sent per (kind, collective) while `on`."""

    def __init__(self):
        self.on = False
        self.bytes: dict = defaultdict(float)
        self.seconds: dict = defaultdict(float)
        self.rank = dist.get_rank()
        self.expert_groups: set = set()  # ids of DeepSpeed's expert-data-parallel groups

    def install(self) -> None:
        for name in ("all_to_all_single", *_COLLECTIVES):
            if not hasattr(dist, name):  # all_gather_single is new in torch 2.13
                continue
            orig = getattr(dist, name)
            setattr(dist, name, self._wrap(name, orig))

    def _wrap(self, name, orig):
        sig = inspect.signature(orig)

        def counted(*args, **kwargs):
            if not self.on:
                return orig(*args, **kwargs)
            a = sig.bind(*args, **kwargs).arguments
            group = a.get("group")
            P = dist.get_world_size(group)
            kind = _kind(sys._getframe(1))
            if kind.startswith("zero_") and id(group) in self.expert_groups:
                kind = kind.replace("zero_", "zero_expert_")
            key = (kind, name)
            if name == "all_to_all_single":
                inp, in_splits = a["input"], a.get("input_split_sizes")
                rows = inp.shape[0] if inp.dim() else 1
                row_bytes = inp.numel() * inp.element_size() // max(rows, 1)
                me = dist.get_rank(group) if group is not None else self.rank
                if in_splits:
                    sent = row_bytes * sum(n for d, n in enumerate(in_splits) if d != me)
                else:
                    sent = inp.numel() * inp.element_size() * (P - 1) / P
            else:
                t = a.get("input_tensor", a.get("input", a.get("tensor")))
                sent = t.numel() * t.element_size() * _COLLECTIVES[name](P)
            t0 = time.perf_counter()
            work = orig(*args, **kwargs)
            self.seconds[key] += time.perf_counter() - t0  # issue time (and the wait, when synchronous)
            self.bytes[key] += sent
            return work

        return counted


def tensor_bytes(tensors) -> int:
    """Bytes of distinct tensors (views of one buffer are counted by their own extent)."""
    seen = {}
    for t in tensors:  # 0-dim tensors are AdamW's step counters, 4 bytes each: left out
        if isinstance(t, torch.Tensor) and t.dim():
            seen[(t.data_ptr(), t.numel())] = t.numel() * t.element_size()
    return sum(seen.values())


def moesaic_expert_state(par, optimizer) -> int:
    names = set(par.expert_names)
    params = [p for n, p in par.model.named_parameters() if n in names]
    state = [t for p in params for t in optimizer.state.get(p, {}).values()]
    return tensor_bytes(params + [p.grad for p in params] + state)


def deepspeed_expert_state(engine) -> int:
    from deepspeed.moe.utils import is_moe_param

    zo = engine.optimizer
    params = [p for p in engine.module.parameters() if is_moe_param(p)]
    tensors = params + [p.grad for p in params]
    for i, group in enumerate(zo.optimizer.param_groups):
        if not zo.is_moe_group(group):
            continue
        fp32 = zo.single_partition_of_fp32_groups[i]
        tensors += [fp32, fp32.grad, *zo.optimizer.state.get(fp32, {}).values()]
        avg = zo.averaged_gradients.get(i)
        tensors += list(avg) if isinstance(avg, (list, tuple)) else [avg]
    return tensor_bytes(tensors)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--warm", required=True, help="full-model state dict to start from")
    ap.add_argument("--out", required=True)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()

    from hydra import compose, initialize_config_module

    from moesaic.parallel import fssdp
    from moesaic.parallel.recorder import RoutingRecorder
    from moesaic.trainer.config import register_configs, to_train_config
    from moesaic.trainer.data import load_corpus
    from moesaic.trainer.dist import all_gather_object, init_distributed, shutdown
    from moesaic.trainer.metrics import RunLogger
    from moesaic.trainer.model import Transformer
    from moesaic.trainer.parallelize import parallelize, resolve_plan, world_size_from_env
    from moesaic.trainer.replan import Replanner
    from moesaic.trainer.step import evaluate, load_stats, train_step

    register_configs()
    with initialize_config_module(config_module="moesaic.configs", version_base=None):
        cfg = to_train_config(compose("config", overrides=args.overrides + ["logging=quiet"]))
    total = args.warmup + args.steps
    cfg.steps = total
    corpus = load_corpus(cfg.data)
    plan = resolve_plan(cfg, world_size_from_env())
    info = init_distributed(cfg.parallel)
    counter = CommCounter()
    counter.install()  # before DeepSpeed starts, which keeps references to the collectives it uses
    try:
        torch.manual_seed(cfg.seed)
        model = Transformer(cfg.model)
        model.load_state_dict(torch.load(args.warm, map_location="cpu"))
        par = parallelize(model, cfg, info, plan)
        if isinstance(par.train_model, torch.nn.parallel.DistributedDataParallel):
            from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

            par.train_model.register_comm_hook(None, allreduce_hook)  # the same all-reduce, seen from Python
        optimizer, scheduler = par.build_optimizer(cfg)
        if par.deepspeed_moe_ep:
            from deepspeed.utils import groups

            counter.expert_groups = {id(g) for g in groups._get_expert_data_parallel_group_dict().values()}
        mc = cfg.model.moe
        recorder = RoutingRecorder(cfg.model.num_moe_layers, mc.num_experts, mc.top_k)
        run_dir = Path(tempfile.mkdtemp(prefix="moesaic-compare-"))
        replanner = Replanner(cfg.placement, par, recorder, optimizer, run_dir, info,
                              RunLogger(run_dir, cfg, info, total_steps=total))
        memory = {"after_backward": 0, "before_step": 0, "after_step": 0}
        measuring = {"on": False}

        def measure(key):
            if measuring["on"]:
                b = deepspeed_expert_state(par.ds_engine) if par.deepspeed_moe_ep else moesaic_expert_state(par, optimizer)
                memory[key] = max(memory[key], b)

        stepper = par.ds_engine if par.deepspeed_moe_ep else optimizer
        orig_step = stepper.step

        def step_and_measure(*a, **k):
            measure("before_step")
            out = orig_step(*a, **k)
            measure("after_step")
            return out

        stepper.step = step_and_measure
        if par.deepspeed_moe_ep:  # ZeRO-2 holds the local experts' full gradients until its epilogue reduces them
            zo = par.ds_engine.optimizer
            orig_epilogue = zo.independent_gradient_partition_epilogue

            def epilogue_and_measure(*a, **k):
                measure("after_backward")
                return orig_epilogue(*a, **k)

            zo.independent_gradient_partition_epilogue = epilogue_and_measure
        times, phases, losses, loads = [], defaultdict(list), [], []
        for step in range(total):
            on = step >= args.warmup
            dist.barrier()
            if on and step == args.warmup:
                fssdp.WORKING_SET.update(peak=fssdp.WORKING_SET["live"], peak_total=fssdp.WORKING_SET["live"])
            measuring["on"] = counter.on = on
            t0 = time.perf_counter()
            r = train_step(step, cfg=cfg, corpus=corpus, par=par, recorder=recorder, optimizer=optimizer,
                           scheduler=scheduler, info=info)
            replanner.after_step(step + 1)
            dt = time.perf_counter() - t0
            counter.on = False
            if on:
                times.append(dt)
                for k, v in r.phase_s.items():
                    phases[k].append(v)
                losses.append(r.ce)
                loads.append(load_stats(r.global_counts(info)))
        if replanner.thread is not None:
            replanner.thread.join()
        val = evaluate(model, corpus, cfg, info)
        t = torch.tensor(times, dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)  # a step ends when its slowest rank does
        ws = fssdp.WORKING_SET["peak_total"] if par.fssdp else 0
        per_rank = {
            "expert_state_bytes": max(memory.values()) + ws, "working_set_bytes": ws,
            "expert_state_detail": dict(memory), "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "bytes_per_step": {f"{k}/{c}": v / args.steps for (k, c), v in counter.bytes.items()},
            "comm_seconds_per_step": {f"{k}/{c}": v / args.steps for (k, c), v in counter.seconds.items()},
            "phase_s_median": {k: sorted(v)[len(v) // 2] for k, v in phases.items()},
        }
        ranks = all_gather_object(per_rank, info)
        if info.is_main:
            tokens = cfg.batch_size * cfg.data.seq_len * cfg.grad_accum_steps * info.world_size
            step_s = t.tolist()
            out = {
                "overrides": args.overrides, "world_size": info.world_size, "tokens_per_step": tokens,
                "step_s": step_s, "median_step_s": sorted(step_s)[len(step_s) // 2],
                "final_train_loss": losses[-1], "val_loss": val, "load_max_over_mean_last": loads[-1],
                "replans": len(replanner.history), "ranks": ranks,
            }
            Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    finally:
        shutdown(info)


if __name__ == "__main__":
    from moesaic.parallel.process import exit_rank

    main()
    exit_rank(0)  # as moesaic-train: no interpreter teardown
