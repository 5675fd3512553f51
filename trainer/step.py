"""One training step (micro-batches, gradient reduction, clipping, the non-finite check, the update)
and the evaluation pass. `train.py` drives them."""

from __future__ import annotations

import math
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
from torch.profiler import record_function

from moesaic.parallel.dense_fsdp import gathered_bytes, reshard
from moesaic.trainer.activations import LiveBytes, forward_kept, working_set
from moesaic.trainer.config import TrainConfig
from moesaic.trainer.data import TRAIN_STREAM, VAL_STREAM, sample_batch
from moesaic.trainer.dist import DistInfo, all_reduce_
from moesaic.trainer.loss_scale import LossScaler


@dataclass
class StepResult:
    ce: float
    aux: float
    z: float
    grad_norm: float
    lr: float
    skipped: bool
    loss_scale: float | None  # parallel.mixed_precision=fp16: the scale this step ran with
    overflow: bool  # fp16: the scaled gradients overflowed, so the step was skipped and the scale halved
    counts_LE: torch.Tensor | None  # this rank's token-slots per expert
    comm: dict = field(default_factory=dict)  # this rank's bytes and dropped tokens
    phase_s: dict = field(default_factory=dict)
    kept: dict | None = None  # count_kept: bytes the first micro-batch's forward kept for backward
    _global_LE: torch.Tensor | None = None

    def global_counts(self, info: DistInfo) -> torch.Tensor | None:
        """Token-slots per expert summed over all ranks: one all-reduce per step, however many
        consumers (bias updates, dynamic replicas, logging) ask. Every rank must ask alike."""
        if self._global_LE is None and self.counts_LE is not None:
            self._global_LE = all_reduce_(self.counts_LE.to(torch.float64), info)
        return self._global_LE


def precision(cfg: TrainConfig, device: torch.device):
    """The forward pass's context: bf16 or fp16 autocast for parallel.mixed_precision, else nothing."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.parallel.mixed_precision)
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


def inter_node_bytes(moe, gpus_per_node: int) -> int:
    """The all-to-all bytes this rank sent to EP ranks of other nodes (nodes of `gpus_per_node`)."""
    to = moe.dispatcher.counters.get("a2a_bytes_to")
    if not to or not gpus_per_node:
        return 0
    mine = moe.layer_plan.ep_rank // gpus_per_node
    return sum(b for d, b in enumerate(to) if d // gpus_per_node != mine)


def train_step(step: int, *, cfg: TrainConfig, corpus, par, recorder, optimizer, scheduler, info: DistInfo,
               scaler: LossScaler | None = None, count_kept: bool = False) -> StepResult:
    """`scaler` (parallel.mixed_precision=fp16): the loss is scaled before backward, the gradients
    unscaled before clipping, and a step whose gradients overflowed is skipped on every rank.
    `count_kept`: the first micro-batch's forward counts what autograd keeps for backward."""
    model = par.model
    scale = scaler.scale if scaler is not None else None
    t0 = time.perf_counter()
    stats = torch.zeros(3, dtype=torch.float64, device="cpu")  # ce, aux, z summed over micro-steps (host)
    counts_LE, comm, kept = None, {"a2a_bytes": 0, "dropped": 0, "a2a_inter_node_bytes": 0}, None
    with record_function("moesaic.forward_backward"):  # ranges that logging.profile_steps shows
        for micro in range(cfg.grad_accum_steps):
            x, y = sample_batch(corpus.train, cfg.batch_size, cfg.data.seq_len, seed=cfg.seed,
                                stream=(TRAIN_STREAM, step, micro), rank=info.rank, world_size=info.world_size)
            last = micro == cfg.grad_accum_steps - 1
            counting = count_kept and micro == 0
            with par.no_sync() if not last else nullcontext(), LiveBytes() if counting else nullcontext() as live:
                x, y = x.to(info.device), y.to(info.device)
                with precision(cfg, info.device):
                    if counting:
                        out, counted = forward_kept(model, lambda: par.train_model(x, y))
                        kept = {"total": counted.total, "weight_copies": counted.weight_copies,
                                "fsdp_gathered": gathered_bytes(model)}  # FSDP2's weights gathered until backward
                    else:
                        out = par.train_model(x, y)
                loss, losses, c = out.loss, (out.ce_loss, out.aux_loss, out.z_loss), out.tokens_per_expert_LE
                del out  # its logits (batch x seq x vocab, fp32) are not kept through backward and the next forward
                par.backward(loss if scale is None else loss * scale, cfg.grad_accum_steps)
            if counting:  # the forward and backward's working set, as moesaic-estimate counts it
                kept["working"] = working_set(live, model, counted)
            if par.ds_engine is not None and not last:
                par.ds_engine.step()  # not an accumulation boundary: DeepSpeed only counts the micro-step
            if cfg.model.moe.router.aux_loss_scope == "global_batch":
                for moe in model.moe_layers():
                    moe.router.end_micro_batch(last)
            stats += torch.stack([t.detach().float() for t in losses]).to("cpu", torch.float64)  # one device sync
            if c is not None:
                counts_LE = c.cpu() if counts_LE is None else counts_LE + c.cpu()
            recorder.observe_model(model)
            for moe in model.moe_layers():
                comm["a2a_bytes"] += moe.dispatcher.counters.get("a2a_bytes", 0)
                comm["dropped"] += moe.dispatcher.counters.get("dropped", 0)
                comm["a2a_inter_node_bytes"] += inter_node_bytes(moe, par.gpus_per_node)
    t1 = time.perf_counter()
    with record_function("moesaic.reduce_grads"):
        par.reduce_grads()
    with record_function("moesaic.clip"):
        grad_norm = float(par.clip_grad_norm(cfg.optim.grad_clip, 1.0 / scale if scale else 1.0))
    stats /= cfg.grad_accum_steps
    all_reduce_(stats, info)
    stats /= info.world_size
    ce, aux, z = stats.tolist()
    lr = scheduler.get_last_lr()[0]
    skipped = not (math.isfinite(ce) and math.isfinite(grad_norm))
    # fp16: a finite loss with non-finite gradients is an overflow of the scaled gradients, which the
    # scaler answers (skip, halve); a non-finite loss is a divergence, which on_nan answers
    overflow = scaler is not None and math.isfinite(ce) and not math.isfinite(grad_norm)
    if skipped and not overflow and cfg.on_nan == "stop":
        raise diverged(step, ce, grad_norm, lr)
    if scaler is not None and math.isfinite(ce):
        scaler.update(overflow, step)
    t2 = time.perf_counter()
    with record_function("moesaic.update"):
        if par.ds_engine is not None:
            from moesaic.parallel.deepspeed_engine import boundary_step

            # the dense update (ZeRO, clipped by the global norm) and its learning-rate schedule
            applied = boundary_step(par.ds_engine, skip=skipped)
            if par.deepspeed_moe_ep:  # DeepSpeed-MoE's engine owns every gradient and their norm
                grad_norm = float(par.ds_engine.get_global_grad_norm() or 0.0)
                skipped = skipped or not applied
                if skipped and cfg.on_nan == "stop":  # ZeRO's overflow check skipped it: nothing changed
                    raise diverged(step, ce, grad_norm, lr)
        if not skipped:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        with warnings.catch_warnings():  # torch warns when a run's first steps skip the optimizer: intended
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step")
            scheduler.step()
    comm["expert_grad_bytes"] = par.counters.get("expert_grad_bytes", 0)
    comm["expert_gather_bytes"] = par.counters.get("expert_gather_bytes", 0)
    result = StepResult(ce, aux, z, grad_norm, lr, skipped, scale, overflow, counts_LE, comm, kept=kept)
    if counts_LE is not None and any(m.router.cfg.bias_update_rate > 0 for m in model.moe_layers()):
        for moe, c in zip(model.moe_layers(), result.global_counts(info)):
            moe.router.update_bias(c)
    t3 = time.perf_counter()
    result.phase_s = {"forward_backward_s": t1 - t0, "reduce_clip_s": t2 - t1, "update_s": t3 - t2}
    return result


def diverged(step: int, ce: float, grad_norm: float, lr: float) -> FloatingPointError:
    return FloatingPointError(
        f"non-finite loss ({ce}) or gradient norm ({grad_norm}) at step {step + 1} (lr {lr:.3g}); stopping. "
        "The last checkpoint is kept; on_nan=skip drops such steps instead")


@torch.no_grad()
def evaluate(model, corpus, cfg: TrainConfig, info: DistInfo) -> float:
    """Mean next-token cross-entropy (nats) over the fixed validation batches of all ranks."""
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device="cpu")
    for i in range(cfg.eval_batches):
        x, y = sample_batch(corpus.val, cfg.batch_size, cfg.data.seq_len, seed=cfg.seed, stream=(VAL_STREAM, i),
                            rank=info.rank, world_size=info.world_size)
        with precision(cfg, info.device):
            out = model(x.to(info.device), y.to(info.device))
        total += torch.tensor([out.ce_loss.item() * y.numel(), y.numel()], dtype=torch.float64, device="cpu")
    model.train()
    reshard(model)  # FSDP: the root's weights stay gathered after a forward without backward
    all_reduce_(total, info)
    return float(total[0] / total[1])


def flops_per_token(cfg: TrainConfig, active_params: int) -> float:
    """Training FLOPs per token: 6 x active parameters (forward 2, backward 4), plus causal attention,
    12 * layers * dim * seq_len / 2 (QK^T and AV, forward and backward, half the square masked)."""
    m = cfg.model
    return 6.0 * active_params + 12.0 * m.num_layers * m.dim * cfg.data.seq_len / 2


# Dense (no sparsity) bf16 tensor-core peaks from the vendors' data sheets, TFLOP/s per device, for the
# MFU of mixed-precision runs when logging.peak_tflops is 0 (torchtitan's convention); fp16 is the same.
# Longest name first: "H100 NVL" and "H100 PCIe" before "H100" (SXM), "GH200" before "H200".
PEAK_BF16_TFLOPS = {"H100 NVL": 835.5, "H100 PCIe": 756.0, "GH200": 989.4, "H100": 989.4, "H200": 989.4,
                    "B200": 2250.0, "A100": 312.0, "L40S": 362.1, "MI300X": 1307.4, "MI325X": 1307.4}


def device_peak_tflops(device_name: str) -> float:
    """The bf16 dense peak of a device named as torch.cuda.get_device_name names it; 0 if unknown."""
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in device_name), 0.0)


def load_stats(counts_LE: torch.Tensor) -> list[float]:
    """Per-layer max/mean of token-slots per expert (1.0 is perfect balance)."""
    c = counts_LE.double()
    ratio = c.max(dim=1).values / c.mean(dim=1).clamp_min(1e-9)
    return [round(float(r), 4) for r in ratio]
