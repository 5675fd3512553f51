"""How a run is parallelised. Read by the trainer; holds no process groups or devices."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

ACTIVATION_CHECKPOINT = ("none", "attention", "full")
ZERO_TUNING = ("reduce_bucket_size", "allgather_bucket_size", "overlap_comm", "contiguous_gradients", "reduce_scatter",
               "allgather_partitions", "round_robin_gradients", "use_multi_rank_bucket_allreduce")
"""The keys of DeepSpeed's `zero_optimization` block (stages 1 and 2) that parallel.zero_config passes on."""


@dataclass(kw_only=True)
class ParallelConfig:
    """Process layout and the expert-parallel mode."""

    backend: str = "auto"
    """torch.distributed backend: `auto` picks nccl when every rank has a GPU, else gloo."""
    device: str = "auto"
    """`auto` (cuda:LOCAL_RANK when available, else cpu), `cpu` or `cuda`."""
    ep_size: int = 1
    """Ranks of one expert-parallel domain, which share one copy of the experts (1: every rank holds
    every expert, plain DDP; 0: the whole world)."""
    expert_sharding: str = "resident"
    """`resident` (each rank keeps the full weights of the experts it computes) or `fssdp` (Hecate:
    each expert has one owner; the computing ranks gather it every step)."""
    token_dedup: bool = False
    """Expert parallelism and FSSDP: send each token once to each rank that computes any of its experts
    (DeepEP's dispatch), and sum its experts' weighted outputs there before one row goes back, instead
    of one row per token-slot each way (Megatron's and DeepSpeed's all-to-all). Fewer bytes where a
    token's experts share ranks; the same math (parallel/token_dedup.py)."""
    node_dispatch: bool = False
    """With token_dedup, across nodes in two stages (DeepSeek-V3's dispatch, DeepEP's internode
    kernels): each token once over the network to each node that computes any of its experts, to the
    GPU there with its own in-node index, which forwards it once to each GPU of its node that needs it;
    the results return the same way (parallel/node_dispatch.py)."""
    gpus_per_node: int = 0
    """GPUs per node of the expert-parallel domain, for node_dispatch and the placement solvers (0:
    torchrun's LOCAL_WORLD_SIZE, or SLURM's tasks per node). With the router's expert groups, eplb
    packs whole groups onto nodes."""
    reshard_after_forward: bool = True
    """FSSDP re-materialization: free gathered expert weights after a layer's forward pass and gather
    them again for its backward pass; a layer that computes in place under autocast keeps no cast of
    its owned weights either, and casts them again (under compile=true, inductor decides)."""
    prefetch: bool = True
    """FSSDP: gather the next layer's experts asynchronously while this one computes."""
    reshard_every_n_steps: int = 0
    """FSSDP heterogeneous sharding (Hecate's Algorithm 2): every N steps, re-assign expert owners
    from the loads since the last re-shard, equal expert counts per rank (0: keep the even owners)."""
    dense_sharding: str = "ddp"
    """How the torch engine keeps the dense parameters (attention, norms, routers, shared experts,
    embedding, head): `ddp` (every rank holds all of them, their gradients and AdamW state; DDP
    all-reduces the gradients) or `fsdp` (FSDP2, torchtitan's way: each rank holds 1/world of each,
    all-gathers a block's weights for its forward and backward, and reduce-scatters its gradients;
    parallel/dense_fsdp.py). The routed experts are placed by ep_size and expert_sharding either way.
    The math is the same; reshard_after_forward also frees each block's gathered dense weights."""
    dense_shard_size: int = 0
    """With dense_sharding=fsdp: the ranks that shard one copy of the dense parameters. 0: the whole
    world (FSDP). A divisor of the world (e.g. the GPUs of a node) gives HSDP: shard within each group
    of that many consecutive ranks, replicate across the groups (all-gathers stay in the group; the
    gradients are reduce-scattered in it and all-reduced across the copies)."""
    engine: str = "torch"
    """Engine for the dense parameters: `torch` (DDP) or `deepspeed` (ZeRO; the experts stay on
    moesaic's path, and DeepSpeed clips the dense gradients, moesaic the expert ones)."""
    zero_stage: int = 2
    """ZeRO stage for engine=deepspeed: 1 (optimizer states) or 2 (and gradients) partitioned."""
    zero_config: dict[str, Any] = field(default_factory=dict)
    """engine=deepspeed (and the DeepSpeed-MoE baseline): more keys of DeepSpeed's `zero_optimization`
    block, passed to it as they are, for tuning its communication: one of ZERO_TUNING (bucket sizes,
    overlap_comm, contiguous_gradients, ...), e.g. `+parallel.zero_config.reduce_bucket_size=5e7`.
    The stage is zero_stage; offloading and ZeRO-3's keys are refused."""
    timeout_s: float = 300.0
    """Rendezvous and collective timeout, seconds."""
    activation_checkpoint: str = "none"
    """Recompute activations in backward instead of keeping them: `none`; `attention` (each block's
    norm and attention; the block input is kept); `full` (the whole block, the MoE layer and its
    dispatch all-to-alls included, which then run twice; under FSSDP with reshard_after_forward the
    layer's backward re-gather serves the recomputation too). The math is unchanged."""
    recompute_moe_act: bool = False
    """Recompute the experts' SwiGLU activation in backward (Megatron's `--recompute-modules moe_act`):
    each MoE layer's routed experts keep their first grouped GEMM's output h13 (token-slots x 2
    ffn_dim) and drop the activation h (x ffn_dim), and in eager torch silu(h1) too; the shared
    experts likewise keep w1 x and w3 x alone. One more element-wise pass in backward; the gradients
    are the same, bit for bit. With activation_checkpoint=full the whole block is recomputed anyway,
    and this has no effect."""
    recast_expert_weights: bool = False
    """Under autocast, keep no cast of the routed experts' weights that a rank holds as parameters
    (resident EP's held experts; every expert without a plan) from a layer's forward to its
    backward: autograd keeps the fp32 weight itself, and backward casts it again (one more pass over
    the held weights, 6 bytes a parameter). It saves their bf16 copies, e.g. 4.1 GiB of the 2.62B
    model of bench/gpu_train.py on one GPU. The same gradients, bit for bit; eager only
    (`compile=true` leaves it to inductor's partitioner). FSSDP does the same for the layers that it
    computes in place, under reshard_after_forward (the shared experts, dense MLPs, keep autocast's)."""
    mixed_precision: str = "none"
    """`none` (fp32), `bf16` or `fp16`: forward and backward run under torch.autocast in bfloat16 or
    float16 (matmuls, attention, the experts' grouped GEMMs, and the tokens that the all-to-all
    moves), while the parameters, gradients, their reductions and AdamW's state stay fp32 (the
    master weights). `fp16` (GPUs without bf16, such as V100 and T4) adds loss scaling, as DeepSpeed's
    fp16 mode does: the loss_scale fields below, and trainer/loss_scale.py."""
    loss_scale: float = 0.0
    """mixed_precision=fp16: 0 scales dynamically (start at 2**initial_scale_power; an overflowing
    step is skipped on every rank and halves the scale; loss_scale_window good steps in a row double
    it); a value > 0 is a static scale (an overflowing step is skipped). DeepSpeed's names."""
    initial_scale_power: int = 16
    """mixed_precision=fp16, dynamic scaling: the first scale is 2**initial_scale_power."""
    loss_scale_window: int = 1000
    """mixed_precision=fp16, dynamic scaling: steps without an overflow before the scale doubles."""
    min_loss_scale: float = 1.0
    """mixed_precision=fp16, dynamic scaling: the scale's floor; an overflow there stops the run."""
    hysteresis: int = 1
    """mixed_precision=fp16, dynamic scaling: the overflows that it takes to halve the scale (each one
    is skipped); after that, every overflow halves it until the scale doubles again, which refills
    them. 1 halves at every overflow (torch's GradScaler); DeepSpeed's default is 2."""
    consecutive_hysteresis: bool = False
    """mixed_precision=fp16, with hysteresis > 1: a step without an overflow refills the hysteresis
    too (DeepSpeed's consecutive_hysteresis), so that only overflows in a row halve the scale."""
    gather_dtype: str = "auto"
    """FSSDP: the dtype in which the experts' weights are gathered (and computed with) and their
    gradients returned to the owners: `fp32`, `bf16`, `fp16`, or `auto` (mixed_precision's dtype:
    bf16 or fp16 under autocast, else fp32). Under autocast the layer computes in that dtype either
    way, and the owners sum the returned gradients in fp32, so a half-precision gather moves half the
    bytes and holds half the working set for the same result, bit for bit (the dense weights:
    dense_gather_dtype)."""
    dense_gather_dtype: str = "fp32"
    """With dense_sharding=fsdp and mixed_precision=bf16: `bf16` is FSDP2's mixed precision
    (torchtitan's mixed_precision_param): the dense weights are all-gathered in bf16 (half the
    bytes) and computed with as bf16, norms and embedding included, so the residual stream is bf16
    too; the gradients are reduce-scattered in fp32 into the fp32 shards. `fp32` gathers fp32 and
    leaves the casts to autocast (the residual stream stays fp32)."""
    reduce_dtype: str = "fp32"
    """The dtype in which gradients are summed across data-parallel copies (DeepSpeed's
    communication_data_type, Megatron's --grad-reduce-in-bf16): `fp32`, or `bf16` (half the bytes;
    each sum rounds to bf16's 8 significant bits), or `fp16` with mixed_precision=fp16 (11 bits, on
    the loss-scaled gradients; a sum that overflows is a skipped step, as any overflow). Under
    bf16 (fp16), DDP's all-reduce runs through a communication hook (parallel/dense_ddp.py), FSDP2
    reduce-scatters (and, under HSDP, all-reduces) in it, the resident experts' replicas and
    expert-data-parallel copies are summed in it, and FSSDP's expert gradients travel to their
    owners in it (the owners sum them in fp32) and are all-reduced across expert domains in it;
    each rank keeps fp32 gradients and fp32 master weights."""
    ddp_bucket_view: bool = True
    """DDP's `gradient_as_bucket_view`: each dense gradient is a view into DDP's all-reduce bucket, so
    a rank holds the dense gradients once, not twice (false: DDP's default, a gradient and a bucket,
    and a copy between them each step). The sums are the same."""
    ddp_bucket_order: str = "fixed"
    """The order in which DDP packs the dense gradients into its buckets (engine=torch). `fixed`: the
    parameters' reverse registration order, which backward roughly follows, set by one all-zero
    backward before the first step, so that every step of every run, resumed or not, uses the same
    buckets. `backward`: DDP's own, one bucket for a run's first backward and then the order that
    backward produced. A sum over more than 2 ranks depends on where an element sits in its bucket,
    so under `backward` a resumed run is not bit-identical to an uninterrupted one (an ulp apart)."""

    def expert_gather_dtype(self):
        """`gather_dtype` resolved to a torch dtype."""
        import torch

        name = self.mixed_precision if self.gather_dtype == "auto" else self.gather_dtype
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(name, torch.float32)

    def __post_init__(self) -> None:
        if self.backend not in ("auto", "gloo", "nccl"):
            raise ValueError(f"parallel.backend ({self.backend!r}) must be one of 'auto', 'gloo', 'nccl'")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"parallel.device ({self.device!r}) must be one of 'auto', 'cpu', 'cuda'")
        if self.ep_size < 0:
            raise ValueError(f"parallel.ep_size ({self.ep_size}) must be >= 1, or 0 for the whole world")
        if self.expert_sharding not in ("resident", "fssdp"):
            raise ValueError(
                f"parallel.expert_sharding ({self.expert_sharding!r}) must be one of 'resident', 'fssdp'"
            )
        if self.engine not in ("torch", "deepspeed"):
            raise ValueError(f"parallel.engine ({self.engine!r}) must be one of 'torch', 'deepspeed'")
        if self.dense_sharding not in ("ddp", "fsdp"):
            raise ValueError(f"parallel.dense_sharding ({self.dense_sharding!r}) must be one of 'ddp', 'fsdp'")
        if self.dense_sharding == "fsdp" and self.engine != "torch":
            raise ValueError(f"parallel.dense_sharding ({self.dense_sharding!r}) needs parallel.engine (torch), not "
                             f"{self.engine!r}: under DeepSpeed, ZeRO (parallel.zero_stage) shards the dense state")
        if self.dense_shard_size < 0:
            raise ValueError(f"parallel.dense_shard_size ({self.dense_shard_size}) must be >= 0 (0: the whole world)")
        if self.dense_shard_size and self.dense_sharding != "fsdp":
            raise ValueError(f"parallel.dense_shard_size ({self.dense_shard_size}) needs parallel.dense_sharding=fsdp, "
                             f"not {self.dense_sharding!r}")
        if self.gpus_per_node < 0:
            raise ValueError(f"parallel.gpus_per_node ({self.gpus_per_node}) must be >= 0 (0: from the launcher)")
        if self.node_dispatch and not self.token_dedup:
            raise ValueError(f"parallel.node_dispatch ({self.node_dispatch}) needs parallel.token_dedup (true): "
                             "both stages send a token once per destination")
        if self.reshard_every_n_steps < 0:
            raise ValueError(f"parallel.reshard_every_n_steps ({self.reshard_every_n_steps}) must be >= 0")
        unknown = sorted(set(self.zero_config) - set(ZERO_TUNING))
        if unknown:
            raise ValueError(f"parallel.zero_config has {', '.join(map(repr, unknown))}: its keys must be among "
                             f"{', '.join(ZERO_TUNING)} (the stage is parallel.zero_stage; no offloading, no ZeRO-3)")
        if self.zero_config and self.engine != "deepspeed":
            raise ValueError(f"parallel.zero_config ({dict(self.zero_config)}) needs parallel.engine=deepspeed, "
                             f"not {self.engine!r}")
        if self.zero_stage not in (0, 1, 2):
            raise ValueError(f"parallel.zero_stage ({self.zero_stage}) must be 0, 1 or 2 (ZeRO-3 would partition the experts)")
        if self.activation_checkpoint not in ACTIVATION_CHECKPOINT:
            raise ValueError(f"parallel.activation_checkpoint ({self.activation_checkpoint!r}) must be one of "
                             f"{', '.join(map(repr, ACTIVATION_CHECKPOINT))}")
        if self.mixed_precision not in ("none", "bf16", "fp16"):
            raise ValueError(f"parallel.mixed_precision ({self.mixed_precision!r}) must be one of 'none', 'bf16', 'fp16'")
        if self.loss_scale < 0 or (self.loss_scale > 0 and self.mixed_precision != "fp16"):
            raise ValueError(f"parallel.loss_scale ({self.loss_scale}) must be 0 (dynamic), or > 0 (static) with "
                             f"parallel.mixed_precision=fp16, not {self.mixed_precision!r}")
        if not 0 <= self.initial_scale_power <= 64:
            raise ValueError(f"parallel.initial_scale_power ({self.initial_scale_power}) must be in 0..64")
        if self.loss_scale_window < 1:
            raise ValueError(f"parallel.loss_scale_window ({self.loss_scale_window}) must be >= 1")
        if self.hysteresis < 1:
            raise ValueError(f"parallel.hysteresis ({self.hysteresis}) must be >= 1 (1: every overflow halves the scale)")
        if not 0 < self.min_loss_scale <= 2.0 ** self.initial_scale_power:
            raise ValueError(f"parallel.min_loss_scale ({self.min_loss_scale}) must be > 0 and <= "
                             f"2**parallel.initial_scale_power ({2.0 ** self.initial_scale_power:g})")
        if self.recast_expert_weights and self.mixed_precision == "none":
            raise ValueError(f"parallel.recast_expert_weights ({self.recast_expert_weights}) needs parallel.mixed_precision="
                             "bf16 or fp16: in fp32 the experts compute with their weights themselves, and keep no cast")
        if self.recast_expert_weights and self.expert_sharding == "fssdp":
            raise ValueError(f"parallel.recast_expert_weights ({self.recast_expert_weights}) is for resident experts, not "
                             "parallel.expert_sharding ('fssdp'), whose in-place layers cast again in backward under "
                             "parallel.reshard_after_forward and whose gathered experts are cast as they are gathered")
        if self.gather_dtype not in ("auto", "fp32", "bf16", "fp16"):
            raise ValueError(f"parallel.gather_dtype ({self.gather_dtype!r}) must be one of 'auto', 'fp32', 'bf16', 'fp16'")
        if self.gather_dtype in ("bf16", "fp16") and self.mixed_precision != self.gather_dtype:
            raise ValueError(f"parallel.gather_dtype ({self.gather_dtype!r}) needs parallel.mixed_precision="
                             f"{self.gather_dtype}, not {self.mixed_precision!r}: the experts would compute "
                             f"{'fp32' if self.mixed_precision == 'none' else self.mixed_precision} tokens with "
                             f"{self.gather_dtype} weights")
        if self.dense_gather_dtype not in ("fp32", "bf16"):
            raise ValueError(f"parallel.dense_gather_dtype ({self.dense_gather_dtype!r}) must be one of 'fp32', 'bf16'")
        if self.dense_gather_dtype == "bf16" and (self.dense_sharding != "fsdp" or self.mixed_precision != "bf16"):
            raise ValueError(f"parallel.dense_gather_dtype ({self.dense_gather_dtype!r}) needs parallel.dense_sharding=fsdp "
                             f"and parallel.mixed_precision=bf16, not {self.dense_sharding!r} and {self.mixed_precision!r}")
        if self.reduce_dtype not in ("fp32", "bf16", "fp16"):
            raise ValueError(f"parallel.reduce_dtype ({self.reduce_dtype!r}) must be one of 'fp32', 'bf16', 'fp16'")
        if self.reduce_dtype == "fp16" and self.mixed_precision != "fp16":
            raise ValueError(f"parallel.reduce_dtype ('fp16') needs parallel.mixed_precision=fp16, not "
                             f"{self.mixed_precision!r}: only loss-scaled gradients keep their small values in fp16")
        if self.ddp_bucket_order not in ("fixed", "backward"):
            raise ValueError(f"parallel.ddp_bucket_order ({self.ddp_bucket_order!r}) must be one of 'fixed', 'backward'")
        if self.timeout_s <= 0:
            raise ValueError(f"parallel.timeout_s ({self.timeout_s}) must be > 0")
