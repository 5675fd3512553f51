"""How much model state each rank holds, before any rank starts: `moesaic-estimate`, in the spirit of
DeepSpeed's `estimate_zero2_model_states_mem_needs`, for moesaic's own layouts.

    moesaic-estimate --world-size 64 model=fine_grained parallel=fssdp [more Hydra overrides] [--json]
    moesaic-estimate --world-size 64 --compare model=fine_grained     # DDP, EP and FSSDP side by side
    moesaic-estimate --world-size 64 --savings model=fine_grained     # each memory setting it leaves off

Per rank, from the model's shapes (built on the meta device, nothing allocated) and the same layout
code the trainer runs (the plan, FSSDP's owners, FSDP2's dim-0 shards):
- parameters (fp32: the master weights under any mixed precision) and AdamW's two moments, the
  state held between steps. The trainer measures the same from its tensors
  (`summary.json`: `dense_state_bytes_per_rank`, `expert_state_bytes_per_rank`), and the tests
  check that the two agree byte for byte;
- gradients at the end of backward, an upper bound: one fp32 gradient per held parameter (views into
  DDP's buckets; with `parallel.ddp_bucket_view=false` the buckets are a second copy of the dense ones);
- FSSDP's gathered working set: the weights of the experts a rank computes, in the gather dtype, in
  each layer that does not compute in place, for the layers in flight at once (two consecutive ones
  with prefetch, one without, every MoE layer with `parallel.reshard_after_forward=false`); the
  trainer tracks the same peak (`fssdp_gathered_peak_bytes_per_rank`). Their gradients: as many
  bytes again, an upper bound;
- activations: what autograd keeps for backward after the forward of one micro-batch (batch_size x
  data.seq_len), counted on fake tensors with the run's mixed precision and checkpointing
  (`moesaic.trainer.activations`, which says what it assumes: dropless, balanced routing, eager
  kernels);
- weight copies: under autocast, the GEMMs keep the weights' copies in the autocast dtype until
  their backward: every dense weight's, unless FSDP2 gathers them in bf16 (dense_gather_dtype), and
  those of the experts a rank computes with fp32 weights (resident EP: the experts it holds; FSSDP:
  those it gathers in fp32, and with reshard_after_forward=false those it computes in place from
  the weights it owns). Counted in the same fake forward, a dispatch mode noting each cast of a weight.
- FSDP2's gathered dense weights kept from the forward to the backward: the root's (FSDP2 keeps it
  gathered), and with reshard_after_forward=false every block's; the trainer measures the same
  (`logging.count_kept`), and the tests check that the two agree byte for byte.
- the working sets: the forward's and backward's beyond what autograd keeps, gradients aside (a
  block's transients and activation gradients, its recomputed activations under checkpointing),
  counted in the same fake forward and its backward (`moesaic.trainer.activations.step_bytes`); and
  the AdamW step's temporaries for `optim.implementation` (`auto` counted as on a GPU, where torch
  picks foreach: the square roots of a parameter group's second moments, 4 bytes a parameter of
  the rank's largest group; for-loop: a tensor's square root and quotient beside the previous
  tensor's quotient; fused: none). The tests check both against real steps, byte for byte.
The total is the step's peak: the state, every gradient, and the larger of the two phases (what the
forward and backward hold, or the optimizer step's temporaries: the activations are gone by then).
A run without torch.distributed (`python -m moesaic.trainer`, one process) applies neither EP nor
FSSDP: estimate it with parallel=ddp --world-size 1 (torchrun's one rank applies them).
Not included: collectives in flight (a DDP bucket's reduction, FSSDP's gradient reduce-scatters:
their buffers overlap the peak or not as the ranks' timing goes; `logging.count_kept` measures the
working set on every rank) and the backward's gathered dense weights under FSDP2 (a block's, and the
one prefetched, with their unsharded gradients). DeepSpeed's ZeRO engine and the
DeepSpeed-MoE baseline are refused by name: DeepSpeed pads and flattens its partitions in its own way.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from moesaic.parallel.gather_schedule import computes_in_place
from moesaic.trainer.config import TrainConfig

FP32 = 4
GIB = 2**30


def fsdp_rows(rows: int, shards: int, index: int) -> int:
    """Rows of a dim-0 shard, as FSDP2 cuts a tensor: torch.chunk into `shards`, empty chunks last."""
    chunk = -(-rows // shards) if rows else 0
    return max(0, min(chunk, rows - index * chunk))


def held_experts(ep_rank: int, plan, owners) -> list[int]:
    """Experts of each MoE layer whose parameters (and AdamW moments) the rank holds: the plan's
    (with replicas) under resident EP, the owned ones under FSSDP (`owners`, (L, E))."""
    if owners is None:
        return [len(plan.experts_on(layer, ep_rank)) for layer in range(plan.num_layers)]
    return [int((own == ep_rank).sum()) for own in owners]


def materialized_experts(ep_rank: int, plan, owners) -> list[int]:
    """FSSDP: per MoE layer, the experts whose weights the rank materializes: every expert it computes,
    owned ones included, unless the layer computes in place (`FSSDPExperts.direct`)."""
    return [0 if computes_in_place(plan.placement[layer], own) else len(plan.experts_on(layer, ep_rank))
            for layer, own in enumerate(owners)]


def in_flight(counts: list[int], *, reshard_after_forward: bool, prefetch: bool) -> int:
    """The most experts materialized at once: a layer and the next one that prefetch gathers while it
    computes (forward) or the previous one (backward); every layer when forward keeps them."""
    if not reshard_after_forward:
        return sum(counts)
    if not prefetch or len(counts) < 2:
        return max(counts, default=0)
    return max(a + b for a, b in zip(counts, counts[1:]))


def cast_experts(ep_rank: int, plan, owners, cfg: TrainConfig) -> int:
    """Under autocast: the (expert, MoE layer) pairs whose fp32 weights the rank computes with, each
    cast to the autocast dtype and kept so until backward. Without a plan every expert is a dense
    parameter (FSDP2 may gather them in bf16); FSSDP gathers in the autocast dtype by default, and a
    layer that computes in place casts the owned (fp32) weights, but keeps the casts only with
    parallel.reshard_after_forward=false (else backward casts them again, as it gathers again)."""
    pc, E = cfg.parallel, cfg.model.moe.num_experts
    if owners is None and pc.recast_expert_weights:  # resident experts cast again in backward
        return 0
    if plan is None:
        return 0 if pc.dense_sharding == "fsdp" and pc.dense_gather_dtype == "bf16" else E * cfg.model.num_moe_layers
    if owners is None:
        return sum(len(plan.experts_on(layer, ep_rank)) for layer in range(plan.num_layers))
    gathered_cast = pc.expert_gather_dtype() != {"bf16": torch.bfloat16, "fp16": torch.float16}[pc.mixed_precision]
    in_place_cast = not pc.reshard_after_forward  # else cast again in backward (FSSDPExperts.forward)
    return sum(len(plan.experts_on(layer, ep_rank)) for layer, own in enumerate(owners)
               if (in_place_cast if computes_in_place(plan.placement[layer], own) else gathered_cast))


def adamw_groups(model, moes, local, held: list[int] | None, fsdp: bool) -> list[list[int]]:
    """The numels of the rank's parameters in each of AdamW's groups (`moesaic.trainer.optim.
    param_groups`: weight decay or not, FSDP2's DTensors apart from plain tensors), in the model's
    order: `local(p)` for a dense one (its FSDP2 shard), the `held` experts (per MoE layer) of an
    expert weight, all of them sharded as dense ones without a plan (`held` None)."""
    layer_of = {id(p): i for i, m in enumerate(moes) for p in m.experts.parameters()}
    groups: dict[tuple[bool, bool], list[int]] = {}
    for p in model.parameters():
        layer = layer_of.get(id(p))
        numel = local(p) if layer is None or held is None else held[layer] * (p.numel() // p.shape[0])
        groups.setdefault((p.ndim >= 2, fsdp and (layer is None or held is None)), []).append(numel)
    return list(groups.values())


def optimizer_working(groups: list[list[int]], implementation: str) -> int:
    """Bytes of the AdamW step's temporaries (`moesaic.trainer.optim.adamw_options`) at their most,
    from the numels of the rank's fp32 parameters in each group (`adamw_groups`). `auto` is counted
    as torch picks on a GPU: foreach, the square root of a whole group's second moments at once. The
    for-loop takes one tensor's square root, then its quotient, while the previous tensor's
    quotient is still referenced; fused has none."""
    if implementation == "fused":
        return 0
    if implementation == "for-loop":
        return FP32 * max((2 * n + prev for g in groups for n, prev in zip(g, [0, *g])), default=0)
    return FP32 * max((sum(g) for g in groups), default=0)


def weight_copies(counted: dict, experts: int) -> int | None:
    """The dense weights' copies and `experts` experts' (`cast_experts`), None where not counted."""
    if counted["dense_copies"] is None:
        return None
    return counted["dense_copies"] + experts * counted["expert_copy"]


def fsdp_gathered(model, cfg: TrainConfig, shards: int, experts_in_fsdp: bool) -> int:
    """FSDP2's gathered dense weights that stay so from the forward to the backward, padding included:
    the root's (embedding, final norm, head), which FSDP2 keeps gathered, and with
    parallel.reshard_after_forward=false every block's too; in the gather dtype. A block's own,
    gathered again for its backward, is the backward's working set (not counted)."""
    pc = cfg.parallel
    if pc.dense_sharding != "fsdp":
        return 0
    size = 2 if pc.dense_gather_dtype == "bf16" else FP32
    total = 0
    for name, p in model.named_parameters():  # (a tied head is the embedding's parameter: counted once)
        if (".experts." in name and not experts_in_fsdp) or (name.startswith("layers.") and pc.reshard_after_forward):
            continue
        total += -(-p.shape[0] // shards) * shards * (p.numel() // p.shape[0]) * size
    return total


def estimate(cfg: TrainConfig, world_size: int) -> list[dict]:
    """One row per rank: bytes of parameters, gradients and AdamW moments, dense and expert, and
    FSSDP's gathered working set. Raises ValueError naming the field for a layout it cannot model."""
    from moesaic.parallel.gather_schedule import start_owners
    from moesaic.trainer.activations import activation_bytes
    from moesaic.trainer.model import Transformer
    from moesaic.trainer.parallelize import align_owners, resolve_plan

    if cfg.parallel.engine == "deepspeed" or cfg.model.moe_impl == "deepspeed":
        raise ValueError("parallel.engine (deepspeed) / model.moe_impl (deepspeed): not modelled here; DeepSpeed "
                         "partitions its own flat buffers (see deepspeed.runtime.zero.stage_1_and_2."
                         "estimate_zero2_model_states_mem_needs)")
    plan = resolve_plan(cfg, world_size)
    with torch.device("meta"):
        model = Transformer(cfg.model)
    pc = cfg.parallel
    fsdp = pc.dense_sharding == "fsdp"
    shards = (pc.dense_shard_size or world_size) if fsdp else 1
    moes = model.moe_layers()  # none in a dense model (parallel=ddp)
    per_expert = sum(p.numel() for p in moes[0].experts.parameters()) // cfg.model.moe.num_experts if moes else 0
    dense_tensors = [p for n, p in model.named_parameters() if ".experts." not in n]
    expert_tensors = [p for n, p in model.named_parameters() if ".experts." in n]  # (E, ...) per weight, per layer
    gather_bytes = torch.finfo(pc.expert_gather_dtype() or torch.float32).bits // 8
    ep = pc.ep_size or world_size
    owners = (start_owners(plan, ep, align_owners(cfg)) if plan is not None and pc.expert_sharding == "fssdp"
              else None)  # as parallelize assigns them
    counted = activation_bytes(cfg, fsdp_experts=plan is None)  # the same on every rank (balanced routing)
    activations = counted["activations"]
    casts = cfg.parallel.mixed_precision in ("bf16", "fp16")
    gathered_dense = fsdp_gathered(model, cfg, shards, plan is None)  # the same on every rank
    rows = []
    for rank in range(world_size):
        index, ep_rank = rank % shards, rank % ep  # the meshes are row-major: (dp_replicate, dp_shard), (edp, ep)

        def local(p) -> int:
            return fsdp_rows(p.shape[0], shards, index) * (p.numel() // p.shape[0]) if shards > 1 else p.numel()

        dense = sum(local(p) for p in dense_tensors) * FP32
        held = None if plan is None else held_experts(ep_rank, plan, owners)
        if held is None:  # every expert is a dense parameter: under FSDP, sharded by experts like the rest
            experts = sum(local(p) for p in expert_tensors) * FP32
        else:
            experts = sum(held) * per_expert * FP32
        groups = adamw_groups(model, moes, local, held, fsdp)
        gathered = materialized_experts(ep_rank, plan, owners) if owners is not None else []
        working = per_expert * in_flight(gathered, reshard_after_forward=pc.reshard_after_forward, prefetch=pc.prefetch)
        rows.append({
            "rank": rank, "dense_params": dense, "dense_moments": 2 * dense,
            "dense_grads": dense * (2 if not fsdp and not pc.ddp_bucket_view else 1),  # DDP's own buckets: twice
            "expert_params": experts, "expert_moments": 2 * experts, "expert_grads": experts,
            # their gradients (in the gather dtype) live from a layer's backward to its reduce-scatter:
            # at most as many bytes again (an upper bound; the trainer tracks the peak of both together)
            "gathered_weights": working * gather_bytes, "gathered_grads": working * gather_bytes,
            "activations": activations,
            "weight_copies": weight_copies(counted, cast_experts(ep_rank, plan, owners, cfg) if casts else 0),
            "fsdp_gathered": gathered_dense, "backward_working": counted["working"],
            "optimizer_working": optimizer_working(groups, cfg.optim.implementation),
        })
    for r in rows:
        r["total"] = step_peak(r)
        if counted["note"]:
            r["activations_note"] = counted["note"]
    return rows


STATE = ("dense_params", "dense_moments", "expert_params", "expert_moments", "dense_grads", "expert_grads")
FORWARD_BACKWARD = ("gathered_weights", "gathered_grads", "activations", "weight_copies", "fsdp_gathered",
                    "backward_working")


def step_peak(row: dict) -> int:
    """The state and every gradient, and the larger phase: the forward and backward's (an upper bound:
    every gradient is counted beside every activation kept), or the optimizer step's temporaries."""
    def total(keys):
        return sum(row[k] or 0 for k in keys)

    return total(STATE) + max(total(FORWARD_BACKWARD), row["optimizer_working"])


def summarize(rows: list[dict]) -> dict:
    """The largest rank's figure of each kind (ranks differ under uneven plans and FSDP padding); None
    where a figure is not counted."""
    out = {}
    for k in rows[0]:
        vals = [r[k] for r in rows]
        if k != "rank":
            out[k] = vals[0] if k == "activations_note" or None in vals else max(vals)
    return out


def _table(named: dict[str, dict], label: str = "layout") -> str:
    keys = ["dense_params", "dense_grads", "dense_moments", "expert_params", "expert_grads", "expert_moments",
            "gathered_weights", "gathered_grads", "activations", "weight_copies", "fsdp_gathered",
            "backward_working", "optimizer_working", "total"]
    unit, div = ("GiB", GIB) if max(s["total"] for s in named.values()) >= GIB else ("MiB", 2**20)
    lines = [f"| {label} | " + " | ".join(f"{k.replace('_', ' ')} ({unit})" for k in keys) + " |",
             "|---|" + "---|" * len(keys)]
    for name, s in named.items():
        lines.append(f"| {name} | " + " | ".join("n/a" if s[k] is None else f"{s[k] / div:,.2f}" for k in keys) + " |")
    notes = {s["activations_note"] for s in named.values() if s.get("activations_note")}
    return "\n".join(lines + [f"activations: {n}" for n in sorted(notes)])


COMPARE = {  # --compare: the layouts side by side, on top of the given overrides
    "ddp": ["parallel=ddp"], "ddp+fsdp": ["parallel=ddp", "parallel.dense_sharding=fsdp"],
    "ep": ["parallel=ep"], "ep+fsdp": ["parallel=ep", "parallel.dense_sharding=fsdp"],
    "fssdp": ["parallel=fssdp"], "fssdp+fsdp": ["parallel=fssdp", "parallel.dense_sharding=fsdp"],
}


def layout_overrides(overrides: list[str], layout: str) -> list[str]:
    """The given overrides with the layout's in place of theirs: the layout sets the parallel group
    and the dense sharding; a given parallel.ep_size holds for EP and FSSDP, not for DDP."""
    drop = ("parallel=", "parallel.dense_sharding=", "parallel.expert_sharding=")
    if layout.startswith("ddp"):
        drop += ("parallel.ep_size=",)
    return [o for o in overrides if not o.startswith(drop)] + COMPARE[layout]


def savings_overrides(cfg: TrainConfig, overrides: list[str]) -> dict[str, list[str]]:
    """--savings: the config, then each memory setting that it leaves off, alone, then all of them
    together, as overrides on top of the given ones (a setting the config cannot take is left out)."""
    pc, moe = cfg.parallel, cfg.model.num_moe_layers > 0 and cfg.model.moe_impl == "moesaic"
    steps = {}
    if moe and not pc.recompute_moe_act and pc.activation_checkpoint != "full":
        steps["+ recompute_moe_act"] = ["parallel.recompute_moe_act=true"]
    if pc.activation_checkpoint == "none" and cfg.model.moe_impl == "moesaic":
        steps["+ activation_checkpoint=attention"] = ["parallel.activation_checkpoint=attention"]
    if pc.activation_checkpoint != "full" and cfg.model.moe_impl == "moesaic":
        steps["+ activation_checkpoint=full"] = ["parallel.activation_checkpoint=full"]
    if (moe and pc.mixed_precision != "none" and pc.expert_sharding == "resident" and not cfg.compile
            and not pc.recast_expert_weights):
        steps["+ recast_expert_weights"] = ["parallel.recast_expert_weights=true"]
    if pc.dense_sharding == "fsdp" and pc.mixed_precision == "bf16" and pc.dense_gather_dtype != "bf16":
        steps["+ dense_gather_dtype=bf16"] = ["parallel.dense_gather_dtype=bf16"]
    if cfg.optim.implementation != "fused" and pc.engine != "deepspeed":
        steps["+ optim.implementation=fused"] = ["optim.implementation=fused"]
    # all together: full checkpointing where offered (recompute_moe_act does nothing under it), else
    # recompute_moe_act; and the weights' and the optimizer's settings
    together = [*(steps.get("+ activation_checkpoint=full") or steps.get("+ recompute_moe_act", [])),
                *steps.get("+ recast_expert_weights", []), *steps.get("+ dense_gather_dtype=bf16", []),
                *steps.get("+ optim.implementation=fused", [])]
    if len(steps) > 1:
        steps["all of them"] = together

    def on_top(more: list[str]) -> list[str]:
        keys = {o.split("=")[0] for o in more}
        return [o for o in overrides if o.split("=")[0] not in keys] + more

    return {"this config": list(overrides), **{name: on_top(more) for name, more in steps.items()}}


def compose(overrides: list[str]) -> TrainConfig:
    """The run's config. `model.moe.kernels=triton` is taken as given where the Triton kernels cannot
    run (a login node without a GPU): the estimate runs no kernel, and counts with their fake shapes."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module

    from moesaic.trainer.config import register_configs, to_train_config

    triton = "model.moe.kernels=triton" in overrides
    overrides = [o for o in overrides if o != "model.moe.kernels=triton"]
    register_configs()
    with initialize_config_module(config_module="moesaic.configs", version_base=None):
        cfg = to_train_config(hydra_compose(config_name="config", overrides=overrides))
    if triton:
        cfg.model.moe.kernels = "triton"  # (the environment check of TrainConfig is the trainer's)
    return cfg


def main_cli(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="moesaic-estimate", description=__doc__.split("\n\n")[0])
    ap.add_argument("--world-size", type=int, required=True, help="ranks (GPUs) of the run")
    ap.add_argument("--compare", action="store_true", help="DDP, EP and FSSDP, each with DDP or FSDP dense")
    ap.add_argument("--savings", action="store_true", help="this config, then each memory setting it leaves off "
                    "(checkpointing, recompute_moe_act, recast_expert_weights, FSDP2's bf16 gathers, fused AdamW), "
                    "alone and together")
    ap.add_argument("--json", action="store_true", help="every rank's figures, machine-readable")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides, as moesaic-train takes them")
    a = ap.parse_args(argv)
    try:
        if a.world_size < 1:
            raise ValueError(f"--world-size ({a.world_size}) must be >= 1")
        if a.compare and a.savings:
            raise ValueError("--compare and --savings: one at a time (--savings varies this config's settings, "
                             "--compare its layout)")
        layouts = {n: layout_overrides(a.overrides, n) for n in COMPARE} if a.compare else {"this config": a.overrides}
        if a.savings:
            layouts = savings_overrides(compose(a.overrides), a.overrides)
        configs = {n: compose(o) for n, o in layouts.items()}
        results = {n: estimate(c, a.world_size) for n, c in configs.items()}
    except ValueError as e:
        sys.stderr.write(f"moesaic-estimate: error: {e}\n")
        sys.exit(2)
    if a.json:
        print(json.dumps({n: {"largest_rank": summarize(r), "ranks": r} for n, r in results.items()}, indent=1))
        return
    m = next(iter(configs.values())).model  # the layouts share the model
    c = next(iter(configs.values()))
    print(f"model: d {m.dim}, {m.num_layers} layers ({m.num_moe_layers} MoE), {m.moe.num_experts} experts of "
          f"ffn {m.moe.ffn_dim}, top-{m.moe.top_k}; {a.world_size} ranks; the largest rank's model state per "
          f"{'setting' if a.savings else 'layout'}, and the activations of one micro-batch of {c.batch_size} x "
          f"{c.data.seq_len} tokens "
          f"(mixed_precision {c.parallel.mixed_precision}, activation_checkpoint {c.parallel.activation_checkpoint}, "
          f"recompute_moe_act {c.parallel.recompute_moe_act}, optim.implementation {c.optim.implementation}; eager "
          f"kernels, balanced routing); total: the step's peak, the state and every gradient, and the larger of the "
          f"forward-backward's columns and the optimizer's temporaries")
    print(_table({n: summarize(r) for n, r in results.items()}, "setting" if a.savings else "layout"))


if __name__ == "__main__":
    main_cli()
