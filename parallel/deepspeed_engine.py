"""`engine: deepspeed`: the dense (non-expert) parameters train through `deepspeed.initialize` with
ZeRO stage 1 or 2 and a torch AdamW; the experts stay on moesaic's own resident-EP or FSSDP path.

DeepSpeed is handed a view of the model that registers only the dense parameters, so that it never
broadcasts, all-reduces or partitions an expert: its forward calls the whole model. deepspeed is
imported here only (its first initialisation JIT-compiles a communication op, ~50 s on a 2-core
machine; point TORCH_EXTENSIONS_DIR at a cache folder).

Checkpoints hold the dense AdamW state unsharded, under the names the torch engine uses
(`zero_moments` gathers it from ZeRO's partitions, `load_zero_state` scatters it back), so that a
checkpoint written under either engine resumes under the other, at any world size.
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


def deepspeed_config(*, zero_stage: int, micro_batch: int, grad_accum: int, grad_clip: float,
                     reduce_dtype: str = "fp32", zero_config: dict | None = None) -> dict:
    """The DeepSpeed config moesaic passes to `deepspeed.initialize` (its own loop logs and times).
    `reduce_dtype` (parallel.reduce_dtype) is DeepSpeed's communication_data_type: what ZeRO
    all-reduces or reduce-scatters the dense gradients in. `zero_config` (parallel.zero_config):
    more keys of its zero_optimization block (bucket sizes, overlap), checked by ParallelConfig."""
    return {
        "communication_data_type": reduce_dtype,
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": grad_accum,
        "zero_optimization": {**(zero_config or {}), "stage": zero_stage},
        "gradient_clipping": grad_clip,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": True,
    }


def apply_deepspeed(model: nn.Module, expert_names: list[str], dense_optimizer: torch.optim.Optimizer, dense_scheduler, *,
                    zero_stage: int, micro_batch: int, grad_accum: int, reduce_dtype: str = "fp32",
                    zero_config: dict | None = None):
    """Returns the DeepSpeed engine over the dense parameters. It does not clip: moesaic clips the dense
    and the expert gradients by one global norm (the trainer's `Parallel.clip_grad_norm`)."""
    import deepspeed

    ignored = set(expert_names)
    dense = [n for n, _ in model.named_parameters() if n not in ignored]
    view = DenseView(model, dense)
    config = deepspeed_config(zero_stage=zero_stage, micro_batch=micro_batch, grad_accum=grad_accum, grad_clip=0.0,
                              reduce_dtype=reduce_dtype, zero_config=zero_config)
    engine, _, _, _ = deepspeed.initialize(model=view, optimizer=dense_optimizer, lr_scheduler=dense_scheduler,
                                           config=config, dist_init_required=False)
    log.info("applied deepspeed: ZeRO stage %d over %d dense parameter tensors", zero_stage, len(dense))
    return engine


def boundary_step(engine, *, skip: bool) -> bool:
    """`engine.step()` at an accumulation boundary. With `skip` (on_nan=skip dropped this step) the
    update is dropped whole: the parameters, AdamW's moments and its step count stay as they were.
    The learning-rate schedule moves on either way, one position per optimizer step, as under the
    torch engine (DeepSpeed holds its schedule back on a step that it skips). Returns whether
    DeepSpeed applied the update."""
    zero = zero_optimizer(engine)
    clip = engine._config.gradient_clipping
    if skip and zero is None:
        # 1. stage 0: DeepSpeed steps the torch AdamW, which leaves a parameter without a gradient alone.
        #    DeepSpeed's own clipping (on for DeepSpeed-MoE) has nothing to clip then, and would fail
        for p in engine.module.parameters():
            p.grad = None
        engine._config.gradient_clipping = 0.0
    elif skip:
        # 1. ZeRO: one non-finite value in a rank's gradient partition sends every rank down
        #    DeepSpeed's overflow path (an all-reduce of the flag; no update; the gradients cleared)
        grads = [g for group in zero.averaged_gradients.values() for g in group or () if g is not None and g.numel()]
        if grads:
            grads[0].view(-1)[0] = float("nan")
    # 2. the update, or DeepSpeed's skip; then ZeRO's loss scale back to 1, where fp16's scale
    #    (set for this step by the trainer's clipping pass) would scale the next backward
    try:
        engine.step()
    finally:
        engine._config.gradient_clipping = clip
        if zero is not None:
            zero.loss_scale = 1.0
    applied = bool(engine.was_step_applied())
    if skip and zero is not None and applied:
        raise RuntimeError("DeepSpeed applied a step that on_nan=skip dropped: no rank holds a ZeRO gradient partition")
    # 3. the schedule's position counts optimizer steps, skipped ones included
    if not applied and engine.lr_scheduler is not None:
        engine.lr_scheduler.step()
    return applied


MOMENTS = ("exp_avg", "exp_avg_sq")


def zero_optimizer(engine):
    """ZeRO's optimizer (stages 1 and 2), or None at stage 0, where DeepSpeed steps the torch AdamW."""
    return engine.optimizer if hasattr(engine.optimizer, "single_partition_of_fp32_groups") else None


def zero_moments(engine, params: dict[str, nn.Parameter]) -> dict[str, dict[str, torch.Tensor]]:
    """Collective over the engine's data-parallel group: {name: {moment: the whole tensor}} of the
    dense parameters (each rank holds a slice of each moment; one all-reduce per tensor assembles it,
    and it goes to host memory at once, so that a GPU holds one whole moment at a time beyond its
    slices). Empty before the first optimizer step, when ZeRO has no state yet."""
    from deepspeed.utils import safe_get_full_optimizer_state

    zero = zero_optimizer(engine)
    if zero is None:  # stage 0: every rank holds the whole state
        state = engine.optimizer.state
        return {name: {m: state[p][m] for m in MOMENTS} for name, p in params.items() if p in state}
    if any(flat not in zero.optimizer.state for flat in zero.single_partition_of_fp32_groups):
        return {}
    _link_moments(zero)
    return {name: {m: safe_get_full_optimizer_state(p, m).reshape(p.shape).cpu() for m in MOMENTS}
            for name, p in params.items()}


def zero_step(engine) -> torch.Tensor | None:
    """AdamW's step count inside ZeRO (one per flat partition, all equal), or None before the first step."""
    zero = zero_optimizer(engine)
    steps = [st["step"] for st in (zero.optimizer if zero else engine.optimizer).state.values() if "step" in st]
    return torch.as_tensor(steps[0]).clone().float() if steps else None


def load_zero_state(engine, params: dict[str, nn.Parameter], moments: dict[str, dict[str, torch.Tensor]],
                    step: torch.Tensor, global_steps: int) -> None:
    """Local (every rank keeps its own slices): after the dense parameters were loaded in place, copy
    them into ZeRO's fp32 partitions, create AdamW's state there as its first step would, fill each
    rank's slice of the moments, and set the step counts (the caller sets the schedule)."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    zero = zero_optimizer(engine)
    engine.global_steps, engine.global_samples = global_steps, global_steps * engine.train_batch_size()
    if zero is None:  # stage 0: the torch AdamW over the dense parameters, whole on every rank
        for name, p in params.items():
            engine.optimizer.state[p] = {"step": step.clone().float(), **{m: moments[name][m].to(p.device, copy=True)
                                                                         for m in MOMENTS}}
        return
    base = zero.optimizer  # torch AdamW over one flat fp32 partition per parameter group
    for name, p in params.items():
        safe_set_full_fp32_param(p, p.data)
    for flat in zero.single_partition_of_fp32_groups:
        base.state[flat] = {"step": step.clone().float(), "exp_avg": torch.zeros_like(flat),
                            "exp_avg_sq": torch.zeros_like(flat)}
    _link_moments(zero)
    for name, p in params.items():
        for m in MOMENTS:
            safe_set_full_optimizer_state(p, moments[name][m], m)


def _link_moments(zero) -> None:
    """Point each parameter's slice at AdamW's state in its flat partition. DeepSpeed links them once,
    after the step of the first parameter group, before the other groups have any state, so with
    two groups (decay and no decay) the second group's slices would have no moments."""
    zero._hp_optimizer_states_linked = False
    zero._lazy_init_hp_params_optimizer_state()
