"""`train(cfg)`: config -> checks -> process group -> model -> parallelism -> (resume) -> loop.

Run it through Hydra (`moesaic-train`, `python -m moesaic.trainer`) or call it with a `TrainConfig`.
Everything that can be checked without a process group (data, plan, checkpoint to resume from) is
checked before one forms, so that bad input fails on every rank with one named error.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from moesaic.parallel.recorder import RoutingRecorder
from moesaic.placement.plan import Placement, PlanError, check_fits
from moesaic.trainer import checkpoint as ckpt
from moesaic.trainer.async_checkpoint import AsyncCheckpointer
from moesaic.trainer.config import TrainConfig
from moesaic.trainer.data import check_vocab, load_corpus
from moesaic.trainer.dist import DistInfo, all_gather_object, all_reduce_, init_distributed, shutdown
from moesaic.trainer.loss_scale import LossScaler
from moesaic.trainer.metrics import RunLogger, make_run_dir, peak_rss_mib
from moesaic.trainer.model import Transformer
from moesaic.trainer.parallelize import (apply_activation_checkpoint, apply_compile, compile_stats, parallelize,
                                        resolve_plan, world_size_from_env)
from moesaic.trainer.preempt import Preemption
from moesaic.trainer.profile import StepProfiler
from moesaic.trainer.replan import DynamicReplicas, Replanner, Resharder
from moesaic.trainer.step import device_peak_tflops, evaluate, flops_per_token, load_stats, train_step

log = logging.getLogger(__name__)
LN2 = math.log(2.0)


def checkpoint_root(cfg: TrainConfig, run_dir: Path | None = None) -> Path | None:
    if cfg.checkpoint.dir:
        return Path(cfg.checkpoint.dir).expanduser()
    if run_dir is not None:
        return run_dir / "checkpoints"
    if cfg.logging.run_name:
        return Path(cfg.logging.out_dir).expanduser() / cfg.logging.run_name / "checkpoints"
    return None


def train(cfg: TrainConfig) -> dict:
    """Train as configured; returns the summary (on every rank)."""
    corpus = load_corpus(cfg.data)
    check_vocab(corpus, cfg.model.vocab_size)
    world = world_size_from_env()
    plan = resolve_plan(cfg, world)
    resume = None
    if cfg.checkpoint.resume != "none":
        root = checkpoint_root(cfg)
        resume = ckpt.find_resume(root, cfg.checkpoint.resume, cfg.model, report=_report_rank0)
        if resume is not None and plan is not None and (resume[0] / "plan.json").is_file():
            saved = Placement.load(resume[0] / "plan.json")
            try:  # the plan in force when saved, if it fits this world; else the configured one
                check_fits(saved, num_layers=plan.num_layers, num_experts=plan.num_experts(), num_gpus=plan.num_gpus)
                plan = saved
            except PlanError:
                pass
    info = init_distributed(cfg.parallel)
    try:
        with Preemption(cfg.checkpoint.on_signal, info) as preempt:
            result = _train(cfg, corpus, info, plan, resume, preempt)
    except BaseException:
        # no barrier: the other ranks may wait in a collective that this one will never join, and
        # the launcher (torchrun, srun) stops them once this rank's error ends its process
        shutdown(info, barrier=False)
        raise
    shutdown(info)
    return result


def _report_rank0(msg: str) -> None:
    import os

    if os.environ.get("RANK", "0") == "0":
        print(f"moesaic: {msg}", flush=True)


def _train(cfg: TrainConfig, corpus, info: DistInfo, plan, resume, preempt: Preemption) -> dict:
    run_dir = make_run_dir(cfg.logging.out_dir, cfg.logging.run_name, info)
    if info.is_main:
        from omegaconf import OmegaConf

        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    # built on the meta device: `parallelize` shards the experts first, then allocates and initializes
    # only what this rank holds (DeepSpeed-MoE's layer copies moesaic's experts: that model is built whole)
    with torch.device("meta" if cfg.model.moe_impl == "moesaic" else info.device):
        model = Transformer(cfg.model)
    counts = model.num_params()
    par = parallelize(model, cfg, info, plan)
    apply_activation_checkpoint(model, cfg.parallel.activation_checkpoint, recompute_moe_act=cfg.parallel.recompute_moe_act,
                                recast_expert_weights=cfg.parallel.recast_expert_weights)
    if cfg.compile:
        apply_compile(model)
    mc = cfg.model.moe
    recorder = RoutingRecorder(cfg.model.num_moe_layers, mc.num_experts, mc.top_k)
    optimizer, scheduler = par.build_optimizer(cfg)
    logger = RunLogger(run_dir, cfg, info, total_steps=cfg.steps, start_step=resume[1]["step"] if resume else 0)
    replanner = Replanner(cfg.placement, par, recorder, optimizer, run_dir, info, logger)
    dynamic = DynamicReplicas(cfg.placement, par, info)
    resharder = Resharder(cfg.parallel, par, recorder, optimizer, logger)
    scaler = LossScaler.from_config(cfg.parallel)  # parallel.mixed_precision=fp16
    start, tokens_done = 0, 0
    if resume is not None:
        path, manifest = resume
        ckpt.load(path, manifest, model=model, optimizer=optimizer, scheduler=scheduler, info=info, engine=par.ds_engine,
                  scaler=scaler)
        start, tokens_done = manifest["step"], manifest["tokens"]
        ckpt.restore_extras(path, recorder=recorder, replanner=replanner, info=info, dynamic=dynamic)
        logger.progress(start)
        logger.message(f"resumed from {path} at step {start} (written at world size {manifest['world_size']}, "
                       f"ep_size {manifest['ep_size']}, {manifest['expert_sharding']})")

    unigram = corpus.unigram_bpb()
    unit = "bits/byte" if corpus.is_bytes else "bits/token"
    ep = cfg.parallel.ep_size or info.world_size
    logger.message(
        f"moesaic: {info.world_size} rank(s), backend={info.backend or 'none'}, device={info.device}; "
        f"model {counts['total'] / 1e6:.2f}M params ({counts['active'] / 1e6:.2f}M active); "
        f"data {corpus.name}: {len(corpus.train):,} train / {len(corpus.val):,} val tokens; "
        f"val unigram entropy {unigram:.3f} {unit}; "
        + (f"experts: {cfg.parallel.expert_sharding} over ep_size {ep}, plan {cfg.placement.plan}; " if plan
           else f"experts: deepspeed-moe over ep_size {ep}; " if par.deepspeed_moe_ep
           else "experts: every rank holds every expert; ")
        + ("dense: fsdp; " if par.dense_fsdp else "")
        + f"run dir {run_dir}"
    )
    tokens_per_step = cfg.batch_size * cfg.data.seq_len * cfg.grad_accum_steps * info.world_size
    fpt = flops_per_token(cfg, counts["active"])
    peak_tflops = _peak_tflops(cfg, info, logger)
    end = cfg.stop_at_step or cfg.steps
    ckpt_root = checkpoint_root(cfg, run_dir)
    history, best_val, val_loss, skipped, stopped_by = [], float("inf"), float("nan"), 0, None
    t_start = time.perf_counter()
    step_times: list[float] = []
    kept = None  # logging.count_kept: the first step's count

    writer = AsyncCheckpointer(info) if cfg.checkpoint.async_mode == "async" else None
    profiler = StepProfiler(cfg.logging.profile_steps, run_dir, info.rank, info.device)

    def save(step: int) -> Path:
        t0 = time.perf_counter()
        routing = recorder.stats(all_reduce=True)
        write = writer.save if writer else ckpt.save
        path = write(ckpt_root, step, model=model, optimizer=optimizer, scheduler=scheduler, cfg=cfg, info=info,
                     plan=par.plan, routing=routing, tokens=tokens_done, keep_last=cfg.checkpoint.keep_last,
                     extra_arrays=ckpt.replan_arrays(replanner, dynamic), engine=par.ds_engine, scaler=scaler)
        logger.log({"kind": "checkpoint", "step": step, "path": str(path), "seconds": time.perf_counter() - t0,
                    "async": writer is not None})
        return path

    if resume is not None and end == start:  # nothing to run: rewrite the checkpoint in this layout
        save(start)
    for step in range(start, end):
        t0 = time.perf_counter()
        done = step + 1
        with profiler.step(done):
            dynamic.before_step()
            r = train_step(step, cfg=cfg, corpus=corpus, par=par, recorder=recorder, optimizer=optimizer,
                           scheduler=scheduler, info=info, scaler=scaler, count_kept=cfg.logging.count_kept and step == start)
            kept = r.kept or kept  # (set by the first step alone)
            dynamic.after_step(r.global_counts(info) if dynamic.enabled else None)
        tokens_done += tokens_per_step
        skipped += int(r.skipped)
        dt = time.perf_counter() - t0
        step_times.append(dt)
        tok_s = tokens_per_step / dt
        logger.progress(1, loss=f"{r.ce:.3f}", tok_s=f"{tok_s:,.0f}")
        if done % cfg.logging.log_every == 0 or done == end:
            record = _train_record(r, done, dt, tokens_done, tok_s, fpt, peak_tflops, cfg, info, par, t_start,
                                   skipped)
            logger.log(record)
            history.append(r.ce)
        if (cfg.eval_every and done % cfg.eval_every == 0) or done == cfg.steps:
            val_loss = evaluate(model, corpus, cfg, info)
            best_val = min(best_val, val_loss)
            logger.log({"kind": "eval", "step": done, "val_loss": val_loss, "val_bpb": val_loss / LN2})
            logger.message(f"step {done}: val {val_loss / LN2:.4f} {unit} (unigram {unigram:.4f})")
        replanner.after_step(done)
        resharder.after_step(done)
        every = cfg.checkpoint.every_n_steps
        stopped_by = preempt.agreed() if done < end else None
        can_save = not par.deepspeed_moe_ep  # DeepSpeed-MoE's checkpoints are refused by the config
        if (every and done % every == 0) or (done == end and (every or cfg.stop_at_step)) or (stopped_by and can_save):
            path = save(done)
        if stopped_by:
            logger.message(f"stopped by {stopped_by} after step {done} of {cfg.steps}; "
                           + (f"checkpoint {path}; resume with checkpoint.resume=auto" if can_save
                              else "no checkpoint (not supported with model.moe_impl=deepspeed)"))
            end = done
            break

    profiler.close()  # a run that stopped inside the window writes what it recorded
    if writer:
        writer.wait()  # the last checkpoint is complete before the run says it has stopped
    wall = time.perf_counter() - t_start
    gpu_mib = round(torch.cuda.max_memory_allocated(info.device) / 2**20, 1) if info.device.type == "cuda" else None
    from moesaic.parallel.dense_fsdp import state_bytes

    # what this rank holds (its shards under FSDP); under DeepSpeed, ZeRO holds the dense AdamW state
    held = state_bytes(model, optimizer, par.expert_names) if par.ds_engine is None else {"dense": None, "experts": None}
    from moesaic.parallel.fssdp import WORKING_SET

    # FSSDP: the peak bytes of gathered expert weights, and of them with their gradients
    gathered = {"weights": WORKING_SET["peak"], "with_grads": WORKING_SET["peak_total"]} if par.fssdp else None
    rss, gpu_peak, dense, experts, gathered, kept = zip(*all_gather_object(
        (round(peak_rss_mib(), 1), gpu_mib, held["dense"], held["experts"], gathered, kept), info))  # one collective
    routing = recorder.stats(all_reduce=True)
    if info.is_main:
        np.savez(run_dir / "routing_stats.npz", **routing.to_npz_dict())
    steady = sorted(step_times[1:] or step_times) or [float("nan")]
    ran = max(end - start, 1)
    summary = {
        "val_bpb": val_loss / LN2, "best_val_bpb": best_val / LN2, "unigram_bpb": unigram,
        "val_vs_unigram": (val_loss / LN2) / unigram, "tokens_are_bytes": corpus.is_bytes,
        "final_train_loss": history[-1] if history else float("nan"),
        "steps": cfg.steps, "steps_this_run": end - start, "start_step": start, "stopped_at": end, "stopped_by": stopped_by,
        "skipped_steps": skipped, "tokens": tokens_done, "wall_s": wall,
        "loss_scale": scaler.state_dict() if scaler is not None else None,  # fp16: the last scale, overflows
        "tokens_per_s": ran * tokens_per_step / wall, "median_step_s": steady[len(steady) // 2],
        "world_size": info.world_size, "backend": info.backend, "device": str(info.device), "params": counts,
        "ep_size": ep if plan or par.deepspeed_moe_ep else 1,
        "expert_sharding": cfg.parallel.expert_sharding if plan else "deepspeed-moe" if par.deepspeed_moe_ep else "replicated",
        "dense_sharding": "fsdp" if par.dense_fsdp else "zero" if par.ds_engine is not None else "ddp",
        "expert_gather_dtype": str(cfg.parallel.expert_gather_dtype()).removeprefix("torch.") if par.fssdp else None,
        "plan": par.plan.to_dict() if par.plan is not None else None,
        "placement_history": replanner.history, "reshard_history": resharder.history, "peak_rss_mib_per_rank": list(rss),
        "peak_gpu_mib_per_rank": list(gpu_peak),  # torch.cuda.max_memory_allocated; None on CPU
        "peak_tflops": peak_tflops,  # what the records' mfu divides by (0: no MFU)
        "dense_state_bytes_per_rank": list(dense),  # dense parameters and AdamW moments held, from the tensors
        "expert_state_bytes_per_rank": list(experts),  # EP's and FSSDP's experts (without a plan: in dense)
        "fssdp_gathered_peak_bytes_per_rank": list(gathered),
        "kept_for_backward_per_rank": list(kept),  # logging.count_kept: bytes (copies among them), FSDP2's gathered
        "dynamic_replicas_added_mean": float(np.mean(dynamic.replicas_added)) if dynamic.replicas_added else 0.0,
        "run_dir": str(run_dir), "config": asdict(cfg), "compile": compile_stats() if cfg.compile else None,
    }
    if cfg.logging.dump_rank_params:
        from moesaic.parallel.dense_fsdp import full_state_dict

        torch.save(full_state_dict(model), run_dir / f"params-rank{info.rank}.pt")  # FSDP's shards gathered whole
    if end == cfg.steps:
        gain = 100 * (1 - summary["val_vs_unigram"])
        logger.message(
            f"done: {end - start} steps in {wall:.1f}s, {summary['tokens_per_s']:,.0f} tokens/s; "
            f"val {summary['val_bpb']:.4f} {unit} vs unigram {unigram:.4f} "
            f"({abs(gain):.1f}% {'below' if gain >= 0 else 'above'}); summary {run_dir / 'summary.json'}"
        )
        if cfg.compile:
            c = summary["compile"]
            logger.message(f"torch.compile: {c['graphs']} graphs, {c['graph_breaks']} graph breaks"
                           + (f", {c['recompile_limit_hits']} frames over the recompile limit (run eagerly)"
                              if c["recompile_limit_hits"] else ""))
    elif stopped_by is None:
        logger.message(f"stopped at step {end} of {cfg.steps} (stop_at_step); resume with checkpoint.resume=auto")
    logger.close(summary)
    return summary


def _peak_tflops(cfg: TrainConfig, info: DistInfo, logger: RunLogger) -> float:
    """The peak that MFU divides by: logging.peak_tflops, or else, for a bf16/fp16 run on a GPU that
    PEAK_BF16_TFLOPS knows, its data sheet's dense bf16 peak (0: no MFU)."""
    if cfg.logging.peak_tflops or info.device.type != "cuda" or cfg.parallel.mixed_precision == "none":
        return cfg.logging.peak_tflops
    name = torch.cuda.get_device_name(info.device)
    peak = device_peak_tflops(name)
    logger.message(f"MFU against the {name}'s dense bf16 peak, {peak:g} TFLOP/s (logging.peak_tflops sets another)"
                   if peak else f"no MFU: the {name}'s bf16 peak is not known; set logging.peak_tflops")
    return peak


def _train_record(r, done, dt, tokens_done, tok_s, fpt, peak_tflops, cfg, info, par, t_start, skipped) -> dict:
    comm = all_reduce_(torch.tensor([r.comm["a2a_bytes"], r.comm["dropped"], r.comm["expert_grad_bytes"],
                                     r.comm["expert_gather_bytes"], r.comm["a2a_inter_node_bytes"]], dtype=torch.float64,
                                    device="cpu"), info)  # host counters (NCCL: all_reduce_ goes through the GPU)
    gpu = info.device.type == "cuda"
    received, rss, gpu_mib = zip(*all_gather_object((  # one collective: the ranks' tokens and memory peaks so far
        sum(m.dispatcher.counters.get("tokens_received", 0) for m in par.model.moe_layers()), peak_rss_mib(),
        torch.cuda.max_memory_allocated(info.device) / 2**20 if gpu else 0.0), info))
    record = {
        "kind": "train", "step": done, "loss": r.ce, "aux_loss": r.aux, "z_loss": r.z, "lr": r.lr,
        "grad_norm": r.grad_norm, "tokens_per_s": tok_s, "step_s": dt, "tokens": tokens_done,
        "elapsed_s": time.perf_counter() - t_start, "skipped_steps": skipped,
        **({"loss_scale": r.loss_scale, "overflow": r.overflow} if r.loss_scale is not None else {}),
        "a2a_bytes": int(comm[0]), "dropped_tokens": int(comm[1]), "expert_grad_bytes": int(comm[2]),
        "expert_gather_bytes": int(comm[3]), "tokens_received_per_rank": list(received),
        "peak_rss_mib": round(max(rss), 1), **({"peak_gpu_mib": round(max(gpu_mib), 1)} if gpu else {}), **r.phase_s,
    }
    if par.plan is not None and par.gpus_per_node < par.plan.num_gpus:  # EP over several nodes
        record["a2a_inter_node_bytes"] = int(comm[4])  # the part of a2a_bytes that crossed nodes
    if peak_tflops > 0:
        record["mfu"] = fpt * tok_s / info.world_size / (peak_tflops * 1e12)
    if r.counts_LE is not None:
        record["load_max_over_mean"] = load_stats(r.global_counts(info))
    return record
