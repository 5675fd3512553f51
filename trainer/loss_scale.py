"""Loss scaling for `parallel.mixed_precision=fp16` (Micikevicius et al., "Mixed Precision Training",
2018; DeepSpeed's `fp16` block and torch's GradScaler do the same).

fp16 holds magnitudes from 6e-8 (subnormal) to 65504 only, so under fp16 autocast many of the
backward pass's activation gradients would round to zero. The loss is multiplied by `scale` before
backward, which lifts every gradient by the same factor; the gradients are divided by it again
before clipping and the update (`Parallel.clip_grad_norm(..., unscale=1 / scale)`), so the master
weights see the true gradients. A scale too large makes some gradient overflow: the global
gradient norm, which every rank computes alike, is then not finite, the step is skipped on every
rank, and the scale is halved (dynamic scaling); after `window` steps in a row without an overflow
it is doubled again. With DeepSpeed's `hysteresis` h > 1, the first h - 1 overflows only skip their
steps; then each overflow halves the scale until a doubling (or, `consecutive_hysteresis`, any step
without an overflow) gives the h back. Powers of two keep the scaling exact: x * 2**k / 2**k == x
in floating point.

The scaler is pure bookkeeping: no tensors, no collectives (`unscale_and_clip_` then multiplies the
gradients by the unscaling and the clipping coefficient together, in one pass). Its state goes into
each checkpoint's manifest, so that a resumed run continues with the scale, and the count towards
the next doubling, that it had.
Under engine=deepspeed the same scale is ZeRO's for each step (`Parallel._clip_with_zero`), so that
ZeRO unscales its fp32 partitions of the dense gradients as moesaic does the experts'.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch


@dataclass
class LossScaler:
    scale: float
    """What the loss is multiplied by before backward."""
    dynamic: bool = True
    """False (parallel.loss_scale > 0): the scale never changes, and an overflow only skips the step."""
    window: int = 1000
    """Steps in a row without an overflow after which a dynamic scale doubles."""
    min_scale: float = 1.0
    """A dynamic scale's floor: an overflow at it stops the run (FloatingPointError) instead of
    skipping steps without end."""
    hysteresis: int = 1
    """Overflows that it takes to halve the scale (DeepSpeed's hysteresis; 1: each one halves it)."""
    consecutive: bool = False
    """A step without an overflow refills the hysteresis (else only a doubling does)."""
    good_steps: int = 0
    """Steps since the last overflow or doubling."""
    overflows: int = 0
    """Steps skipped for an overflow so far (in this run and the runs it resumes)."""
    hysteresis_left: int | None = None
    """Overflows left before the next one halves the scale (None: `hysteresis`, full)."""

    def __post_init__(self) -> None:
        if self.hysteresis_left is None:
            self.hysteresis_left = self.hysteresis

    @classmethod
    def from_config(cls, pc) -> "LossScaler | None":
        """The scaler for a `ParallelConfig`: None unless mixed_precision=fp16."""
        if pc.mixed_precision != "fp16":
            return None
        if pc.loss_scale > 0:
            return cls(scale=float(pc.loss_scale), dynamic=False, window=pc.loss_scale_window)
        return cls(scale=2.0 ** pc.initial_scale_power, window=pc.loss_scale_window, min_scale=pc.min_loss_scale,
                   hysteresis=pc.hysteresis, consecutive=pc.consecutive_hysteresis)

    def update(self, overflow: bool, step: int) -> None:
        """After a step: halve on an overflow once the hysteresis is spent (or stop at the minimum),
        double after `window` good steps."""
        if overflow:
            self.overflows += 1
            self.good_steps = 0
            if not self.dynamic:
                return
            if self.hysteresis_left > 1:  # an overflow that the hysteresis absorbs: the step is skipped, the scale kept
                self.hysteresis_left -= 1
                return
            if self.scale <= self.min_scale:
                raise FloatingPointError(
                    f"the gradients overflowed fp16 at step {step + 1} with the loss scale at its minimum "
                    f"(parallel.min_loss_scale={self.min_scale:g}); stopping. The last checkpoint is kept; "
                    "parallel.mixed_precision=bf16 has fp32's range")
            self.scale = max(self.scale / 2, self.min_scale)
            return
        self.good_steps += 1
        if self.consecutive:
            self.hysteresis_left = self.hysteresis
        if self.dynamic and self.good_steps >= self.window:
            self.scale *= 2
            self.good_steps = 0
            self.hysteresis_left = self.hysteresis

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        """Take the saved scale and counters; the policy (dynamic, window, minimum, hysteresis) stays the
        config's. The hysteresis left is capped by the config's (full for checkpoints from before it)."""
        self.scale, self.good_steps, self.overflows = float(state["scale"]), int(state["good_steps"]), int(state["overflows"])
        self.hysteresis_left = min(int(state.get("hysteresis_left") or self.hysteresis), self.hysteresis)


def unscale_and_clip_(params: list, norm: torch.Tensor, max_norm: float, unscale: float) -> torch.Tensor:
    """`norm` (of the scaled gradients) times `unscale`; the gradients multiplied by `unscale` and, if
    that norm exceeds max_norm > 0, by max_norm / norm (DeepSpeed's combined scale), in one pass."""
    norm = norm * unscale
    coef = grad_multiplier(float(norm), max_norm, unscale)
    if coef != 1.0:
        for p in params:
            p.grad.mul_(coef)
    return norm.float()


def grad_multiplier(norm: float, max_norm: float, unscale: float) -> float:
    """What the gradients are multiplied by, given their unscaled global `norm`: `unscale` times, where
    the norm exceeds max_norm > 0, max_norm / norm. 1 for a non-finite norm (that step is skipped)."""
    if not math.isfinite(norm):
        return 1.0
    if max_norm > 0 and max_norm / (norm + 1e-6) < 1:
        return unscale * (max_norm / (norm + 1e-6))
    return unscale
