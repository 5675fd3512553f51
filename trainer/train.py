"""`train(cfg)`: config -> process group -> model -> parallelism -> data -> loop.

Run it through Hydra (`moesaic-train`, `python -m moesaic.trainer`) or call it with a `TrainConfig`.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict

import numpy as np
import torch

from moesaic.parallel.recorder import RoutingRecorder
from moesaic.trainer.config import OptimConfig, TrainConfig
from moesaic.trainer.data import TRAIN_STREAM, VAL_STREAM, check_vocab, load_corpus, sample_batch
from moesaic.trainer.dist import DistInfo, all_gather_object, all_reduce_, init_distributed, shutdown
from moesaic.trainer.metrics import RunLogger, make_run_dir, peak_rss_mib
from moesaic.trainer.model import Transformer
from moesaic.trainer.parallelize import Parallel, parallelize, resolve_plan, world_size_from_env

log = logging.getLogger(__name__)
LN2 = math.log(2.0)


def build_optimizer(model: torch.nn.Module, ocfg: OptimConfig) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices only (norm gains are exempt), as in nanoGPT."""
    params = {id(p): p for p in model.parameters() if p.requires_grad}.values()
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": ocfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=ocfg.lr,
        betas=(ocfg.beta1, ocfg.beta2),
        eps=ocfg.eps,
    )


def lr_lambda(ocfg: OptimConfig, total_steps: int):
    """Linear warmup to 1, then cosine to min_lr_ratio at the last step."""

    def fn(step: int) -> float:
        if step < ocfg.warmup_steps:
            return (step + 1) / ocfg.warmup_steps
        span = max(1, total_steps - ocfg.warmup_steps)
        progress = min(1.0, (step - ocfg.warmup_steps) / span)
        return ocfg.min_lr_ratio + (1 - ocfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return fn


@torch.no_grad()
def evaluate(model: Transformer, corpus, cfg: TrainConfig, info: DistInfo) -> float:
    """Mean next-token cross-entropy (nats) over the fixed validation batches of all ranks."""
    model.eval()
    total = torch.zeros(2, dtype=torch.float64)
    for i in range(cfg.eval_batches):
        x, y = sample_batch(corpus.val, cfg.batch_size, cfg.data.seq_len, seed=cfg.seed, stream=(VAL_STREAM, info.rank, i))
        out = model(x.to(info.device), y.to(info.device))
        total += torch.tensor([out.ce_loss.item() * y.numel(), y.numel()], dtype=torch.float64)
    model.train()
    all_reduce_(total, info)
    return float(total[0] / total[1])


def _load_stats(counts_LE: torch.Tensor) -> dict:
    """Per-layer max/mean of token-slots per expert (1.0 is perfect balance)."""
    c = counts_LE.double()
    ratio = c.max(dim=1).values / c.mean(dim=1).clamp_min(1e-9)
    return {"load_max_over_mean": [round(float(r), 4) for r in ratio]}


def train(cfg: TrainConfig) -> dict:
    """Train as configured; returns the summary (on every rank)."""
    corpus = load_corpus(cfg.data)  # bad paths and plans fail here, before any process group forms
    check_vocab(corpus, cfg.model.vocab_size)
    plan = resolve_plan(cfg, world_size_from_env())
    info = init_distributed(cfg.parallel)
    try:
        return _train(cfg, corpus, info, plan)
    finally:
        shutdown(info)


def _train(cfg: TrainConfig, corpus, info: DistInfo, plan) -> dict:
    run_dir = make_run_dir(cfg.logging.out_dir, cfg.logging.run_name, info)
    if info.is_main:
        from omegaconf import OmegaConf

        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))

    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    model = Transformer(cfg.model).to(info.device)
    counts = model.num_params()
    par = parallelize(model, cfg, info, plan)
    mc = cfg.model.moe
    recorder = RoutingRecorder(cfg.model.num_moe_layers, mc.num_experts, mc.top_k)
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.optim, cfg.steps))

    logger = RunLogger(run_dir, cfg, info, total_steps=cfg.steps)
    unigram = corpus.unigram_bpb()
    unit = "bits/byte" if corpus.is_bytes else "bits/token"
    logger.message(
        f"moesaic: {info.world_size} rank(s), backend={info.backend or 'none'}, device={info.device}; "
        f"model {counts['total'] / 1e6:.2f}M params ({counts['active'] / 1e6:.2f}M active); "
        f"data {corpus.name}: {len(corpus.train):,} train / {len(corpus.val):,} val tokens; "
        f"val unigram entropy {unigram:.3f} {unit}; "
        f"ep_size {cfg.parallel.ep_size} ({'plan ' + cfg.placement.plan if plan else 'every rank holds every expert'}); "
        f"run dir {run_dir}"
    )

    tokens_per_step = cfg.batch_size * cfg.data.seq_len * cfg.grad_accum_steps * info.world_size
    history, best_val, val_loss = [], float("inf"), float("nan")
    t_start = time.perf_counter()
    step_times = []
    for step in range(cfg.steps):
        t0 = time.perf_counter()
        stats = torch.zeros(3, dtype=torch.float64)  # ce, aux, z (summed over micro-steps)
        counts_LE = None
        comm = {"a2a_bytes": 0, "dropped": 0}
        for micro in range(cfg.grad_accum_steps):
            x, y = sample_batch(
                corpus.train, cfg.batch_size, cfg.data.seq_len, seed=cfg.seed, stream=(TRAIN_STREAM, info.rank, step, micro)
            )
            last = micro == cfg.grad_accum_steps - 1
            with (par.no_sync() if not last else _null()):
                out = par.train_model(x.to(info.device), y.to(info.device))
                (out.loss / cfg.grad_accum_steps).backward()
            stats += torch.tensor([out.ce_loss.item(), out.aux_loss.item(), out.z_loss.item()], dtype=torch.float64)
            c = out.tokens_per_expert_LE
            counts_LE = c.cpu() if counts_LE is None else counts_LE + c.cpu()
            recorder.observe_model(model)
            for moe in model.moe_layers():
                comm["a2a_bytes"] += moe.dispatcher.counters.get("a2a_bytes", 0)
                comm["dropped"] += moe.dispatcher.counters.get("dropped", 0)
        par.reduce_grads()
        grad_norm = par.clip_grad_norm(cfg.optim.grad_clip)
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()

        if any(m.router.cfg.bias_update_rate > 0 for m in model.moe_layers()):
            global_LE = all_reduce_(counts_LE.to(torch.float64), info)
            for moe, c in zip(model.moe_layers(), global_LE):
                moe.router.update_bias(c)

        stats /= cfg.grad_accum_steps
        all_reduce_(stats, info)
        stats /= info.world_size
        ce, aux, z = stats.tolist()
        if not math.isfinite(ce):
            raise FloatingPointError(f"non-finite loss ({ce}) at step {step + 1}; stopping (lr {lr:.3g})")
        dt = time.perf_counter() - t0
        step_times.append(dt)
        tok_s = tokens_per_step / dt
        logger.progress(1, loss=f"{ce:.3f}", tok_s=f"{tok_s:,.0f}")

        done = step + 1
        if done % cfg.logging.log_every == 0 or done == cfg.steps:
            counts_all = all_reduce_(counts_LE.to(torch.float64), info) if counts_LE is not None else None
            comm_all = all_reduce_(torch.tensor([comm["a2a_bytes"], comm["dropped"], par.counters.get("expert_grad_bytes", 0),
                                                 par.counters.get("expert_gather_bytes", 0)], dtype=torch.float64), info)
            record = {
                "kind": "train", "step": done, "loss": ce, "aux_loss": aux, "z_loss": z, "lr": lr,
                "grad_norm": float(grad_norm), "tokens_per_s": tok_s, "step_s": dt,
                "tokens": done * tokens_per_step, "elapsed_s": time.perf_counter() - t_start,
                "a2a_bytes": int(comm_all[0]), "dropped_tokens": int(comm_all[1]), "expert_grad_bytes": int(comm_all[2]),
                "expert_gather_bytes": int(comm_all[3]),
            }
            if counts_all is not None:
                record.update(_load_stats(counts_all))
            logger.log(record)
            history.append(ce)
        if (cfg.eval_every and done % cfg.eval_every == 0) or done == cfg.steps:
            val_loss = evaluate(model, corpus, cfg, info)
            best_val = min(best_val, val_loss)
            logger.log({"kind": "eval", "step": done, "val_loss": val_loss, "val_bpb": val_loss / LN2})
            logger.message(f"step {done}: val {val_loss / LN2:.4f} {unit} (unigram {unigram:.4f})")

    wall = time.perf_counter() - t_start
    rss = all_gather_object(round(peak_rss_mib(), 1), info)
    routing = recorder.stats(all_reduce=True)
    if info.is_main:
        np.savez(run_dir / "routing_stats.npz", **routing.to_npz_dict())
    steady = sorted(step_times[1:] or step_times)
    summary = {
        "val_bpb": val_loss / LN2,
        "best_val_bpb": best_val / LN2,
        "unigram_bpb": unigram,
        "val_vs_unigram": (val_loss / LN2) / unigram,
        "tokens_are_bytes": corpus.is_bytes,
        "final_train_loss": history[-1] if history else float("nan"),
        "steps": cfg.steps,
        "tokens": cfg.steps * tokens_per_step,
        "wall_s": wall,
        "tokens_per_s": cfg.steps * tokens_per_step / wall,
        "median_step_s": steady[len(steady) // 2],
        "world_size": info.world_size,
        "backend": info.backend,
        "device": str(info.device),
        "params": counts,
        "ep_size": cfg.parallel.ep_size,
        "plan": plan.to_dict() if plan is not None else None,
        "peak_rss_mib_per_rank": rss,
        "run_dir": str(run_dir),
        "config": asdict(cfg),
    }
    if cfg.logging.dump_rank_params:
        torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, run_dir / f"params-rank{info.rank}.pt")
        if par.expert_parallel:
            local = {i: m.layer_plan.local_experts for i, m in enumerate(model.moe_layers())}
            torch.save(local, run_dir / f"local-experts-rank{info.rank}.pt")
    logger.message(
        f"done: {cfg.steps} steps in {wall:.1f}s, {summary['tokens_per_s']:,.0f} tokens/s; "
        f"val {summary['val_bpb']:.4f} {unit} vs unigram {unigram:.4f} "
        f"({100 * (1 - summary['val_vs_unigram']):.1f}% below); summary {run_dir / 'summary.json'}"
    )
    logger.close(summary)
    return summary


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
