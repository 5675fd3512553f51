"""AdamW and the learning-rate schedule (linear warmup, an optional stable phase, then a decay)."""

from __future__ import annotations

import math

import torch

from moesaic.trainer.config import OptimConfig


def build_optimizer(model: torch.nn.Module, ocfg: OptimConfig) -> torch.optim.AdamW:
    """AdamW over this rank's parameters (dense, and the expert shard it holds); weight decay on
    matrices only (norm gains are exempt), as in nanoGPT."""
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
    """Linear warmup to 1; then 1 until the last `decay_ratio` of the remaining steps (a
    warmup-stable-decay schedule, WSD, when decay_ratio < 1); then `decay_type` down to min_lr_ratio at
    the last step. The default (cosine, decay_ratio 1) decays from the end of warmup on."""
    decay_steps = round(ocfg.decay_ratio * max(0, total_steps - ocfg.warmup_steps))
    decay_start = total_steps - decay_steps
    shape = {"cosine": lambda p: 0.5 * (1 + math.cos(math.pi * p)), "linear": lambda p: 1 - p,
             "sqrt": lambda p: 1 - math.sqrt(p)}[ocfg.decay_type]

    def fn(step: int) -> float:
        if step < ocfg.warmup_steps:
            return (step + 1) / ocfg.warmup_steps
        if step < decay_start:
            return 1.0
        progress = min(1.0, (step - decay_start) / max(1, decay_steps))
        return ocfg.min_lr_ratio + (1 - ocfg.min_lr_ratio) * shape(progress)

    return fn
