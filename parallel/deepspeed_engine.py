"""`engine: deepspeed`: the dense (non-expert) parameters train through `deepspeed.initialize` with
ZeRO stage 1 or 2 and a torch AdamW; the experts stay on moesaic's own resident-EP or FSSDP path.

DeepSpeed is handed a view of the model that registers only the dense parameters, so that it never
broadcasts, all-reduces or partitions an expert: its forward calls the whole model. deepspeed is
imported here only (its first initialisation JIT-compiles a communication op, ~50 s on a 2-core
machine; point TORCH_EXTENSIONS_DIR at a cache folder).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

log = logging.getLogger(__name__)


class DenseView(nn.Module):
    """Registers the dense parameters of `model` (shared, not copied); forward runs the whole model."""

    def __init__(self, model: nn.Module, dense_names: list[str]):
        super().__init__()
        self.__dict__["full"] = model  # not a submodule: its experts stay invisible to DeepSpeed
        params = dict(model.named_parameters())
        self.names = dense_names
        for i, name in enumerate(dense_names):
            self.register_parameter(f"p{i}", params[name])

    def forward(self, *args, **kwargs):
        return self.full(*args, **kwargs)

    def train(self, mode: bool = True):
        self.full.train(mode)
        return super().train(mode)


def deepspeed_config(*, zero_stage: int, micro_batch: int, grad_accum: int, grad_clip: float) -> dict:
    """The DeepSpeed config moesaic passes to `deepspeed.initialize` (its own loop logs and times)."""
    return {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": grad_accum,
        "zero_optimization": {"stage": zero_stage},
        "gradient_clipping": grad_clip,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": True,
    }


def apply_deepspeed(model: nn.Module, expert_names: list[str], dense_optimizer: torch.optim.Optimizer, dense_scheduler, *,
                    zero_stage: int, micro_batch: int, grad_accum: int, grad_clip: float):
    """Returns the DeepSpeed engine over the dense parameters."""
    import deepspeed

    ignored = set(expert_names)
    dense = [n for n, _ in model.named_parameters() if n not in ignored]
    view = DenseView(model, dense)
    config = deepspeed_config(zero_stage=zero_stage, micro_batch=micro_batch, grad_accum=grad_accum, grad_clip=grad_clip)
    engine, _, _, _ = deepspeed.initialize(model=view, optimizer=dense_optimizer, lr_scheduler=dense_scheduler,
                                           config=config, dist_init_required=False)
    log.info("applied deepspeed: ZeRO stage %d over %d dense parameter tensors", zero_stage, len(dense))
    return engine
