"""AdamW and the learning-rate schedule (linear warmup, cosine decay)."""

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
    """Linear warmup to 1, then cosine to min_lr_ratio at the last step."""

    def fn(step: int) -> float:
        if step < ocfg.warmup_steps:
            return (step + 1) / ocfg.warmup_steps
        span = max(1, total_steps - ocfg.warmup_steps)
        progress = min(1.0, (step - ocfg.warmup_steps) / span)
        return ocfg.min_lr_ratio + (1 - ocfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return fn
