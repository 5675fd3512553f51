"""AdamW and the learning-rate schedule (linear warmup, an optional stable phase, then a decay)."""

from __future__ import annotations

import math

import torch

from moesaic.trainer.config import OptimConfig


def adamw_options(ocfg: OptimConfig) -> dict:
    """torch AdamW's keywords for `optim.implementation` (torchtitan's names): `auto` leaves torch to
    choose (foreach on a GPU, a for-loop over the tensors on a CPU); `foreach` updates a group's
    tensors with multi-tensor kernels, through one temporary the size of the group's parameters
    (the square root of the second moments); `for-loop` one tensor at a time (temporaries of the
    largest tensor's size); `fused` one kernel per group, with no temporary."""
    return {"auto": {}, "for-loop": {"foreach": False}, "foreach": {"foreach": True},
            "fused": {"fused": True}}[ocfg.implementation]


def param_groups(params, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only (norm gains are exempt), as in nanoGPT; each group split by
    tensor type, FSDP2's DTensors apart from plain tensors (EP's and FSSDP's experts beside FSDP2's
    dense parameters): a foreach or fused kernel takes one type per call (torch picks foreach on a
    GPU), and refuses a mix."""
    from torch.distributed.tensor import DTensor

    groups = []
    for decay in (True, False):
        for dtensor in (True, False):
            ps = [p for p in params if (p.ndim >= 2) == decay and isinstance(p, DTensor) == dtensor]
            if ps:
                groups.append({"params": ps, "weight_decay": weight_decay if decay else 0.0})
    return groups


def build_optimizer(model: torch.nn.Module, ocfg: OptimConfig) -> torch.optim.AdamW:
    """AdamW over this rank's parameters (dense, and the expert shard it holds), in `param_groups`."""
    params = list({id(p): p for p in model.parameters() if p.requires_grad}.values())
    return torch.optim.AdamW(param_groups(params, ocfg.weight_decay), lr=ocfg.lr, betas=(ocfg.beta1, ocfg.beta2),
                             eps=ocfg.eps, **adamw_options(ocfg))


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
