"""The trainer's config: one dataclass per component, composed into `TrainConfig`, and registered
in Hydra's ConfigStore as the schema that the YAML groups in `configs/` fill in."""

from __future__ import annotations

from dataclasses import dataclass, field

from moesaic.parallel.config import ParallelConfig
from moesaic.placement.config import PlacementConfig
from moesaic.trainer.data import DataConfig
from moesaic.trainer.model import ModelConfig
from moesaic.trainer.preempt import check_signal_names
from moesaic.trainer.profile import check_profile_steps


@dataclass(kw_only=True)
class OptimConfig:
    """AdamW with linear warmup, a decay (cosine by default; WSD with decay_ratio < 1), clipping."""

    lr: float = 3e-3
    """Peak learning rate."""
    min_lr_ratio: float = 0.1
    """The decay ends at lr * min_lr_ratio at the last step."""
    warmup_steps: int = 20
    """Linear warmup from 0 to lr."""
    decay_type: str = "cosine"
    """The decay's shape: `cosine`, `linear` or `sqrt` (1 - sqrt of the progress, as MiniCPM's WSD)."""
    decay_ratio: float = 1.0
    """The fraction of the steps after warmup spent decaying, the last ones; before them the rate stays
    at lr. 1: decay from the end of warmup on; e.g. 0.2: warmup-stable-decay (WSD); 0: constant."""
    weight_decay: float = 0.1
    """Decoupled weight decay on matrices (norms and embeddings excluded)."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.95
    """AdamW beta2."""
    eps: float = 1e-8
    """AdamW epsilon."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0: off)."""
    implementation: str = "auto"
    """AdamW's kernels (torchtitan's names): `auto` (torch's choice: foreach on a GPU, for-loop on a
    CPU), `for-loop`, `foreach` (a temporary the size of a parameter group), or `fused` (none). See
    `moesaic.trainer.optim.adamw_options`; `moesaic-estimate` counts each one's temporaries."""

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ValueError(f"optim.lr ({self.lr}) must be > 0")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"optim.min_lr_ratio ({self.min_lr_ratio}) must be in [0, 1]")
        if self.warmup_steps < 0:
            raise ValueError(f"optim.warmup_steps ({self.warmup_steps}) must be >= 0")
        if self.decay_type not in ("cosine", "linear", "sqrt"):
            raise ValueError(f"optim.decay_type ({self.decay_type!r}) must be one of 'cosine', 'linear', 'sqrt'")
        if not 0 <= self.decay_ratio <= 1:
            raise ValueError(f"optim.decay_ratio ({self.decay_ratio}) must be in [0, 1]")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"optim.{name} ({getattr(self, name)}) must be in [0, 1)")
        if self.grad_clip < 0:
            raise ValueError(f"optim.grad_clip ({self.grad_clip}) must be >= 0")
        if self.implementation not in ("auto", "for-loop", "foreach", "fused"):
            raise ValueError(f"optim.implementation ({self.implementation!r}) must be one of 'auto', 'for-loop', "
                             "'foreach', 'fused'")


@dataclass(kw_only=True)
class LoggingConfig:
    """Where the run directory goes and what is written to it."""

    out_dir: str = "outputs"
    """Parent folder of run directories."""
    run_name: str | None = None
    """Run directory name (default: a timestamp chosen by rank 0)."""
    log_every: int = 10
    """Write a metrics line every N steps."""
    progress: bool = True
    """Rank-0 progress bar with loss, tokens/s and ETA."""
    wandb_mode: str = "offline"
    """`offline` (written inside the run directory), `online` or `disabled`."""
    wandb_project: str = "moesaic"
    """wandb project."""
    wandb_tags: list[str] = field(default_factory=list)
    """wandb tags."""
    dump_rank_params: bool = False
    """At the end, every rank writes its parameters to params-rank<r>.pt (a cross-rank divergence check)."""
    peak_tflops: float = 0.0
    """Dense peak of one device (TFLOP/s) for the MFU estimate. 0: a bf16 or fp16 run on a GPU whose data
    sheet `trainer/step.py` knows (A100, H100, H200, B200, L40S, MI300X) uses that; otherwise no MFU."""
    profile_steps: list[int] = field(default_factory=list)
    """[first, last]: torch.profiler records these steps on every rank and writes a Chrome trace and an
    operator table per rank to <run dir>/profile/ (trainer/profile.py). []: off."""
    count_kept: bool = False
    """The first step's first forward counts, on every rank, the bytes that autograd keeps for
    backward: the activations, and the weights' copies in the autocast dtype apart; and FSDP2's
    gathered dense weights then (summary.json's `kept_for_backward_per_rank`; `moesaic-estimate`
    predicts all three); and the forward and backward's working set beyond those, the parameters'
    gradients aside (`working`). Eager runs only."""

    def __post_init__(self) -> None:
        if self.log_every < 1:
            raise ValueError(f"logging.log_every ({self.log_every}) must be >= 1")
        if self.peak_tflops < 0:
            raise ValueError(f"logging.peak_tflops ({self.peak_tflops}) must be >= 0 (0: the GPU's own, if known)")
        if self.wandb_mode not in ("offline", "online", "disabled"):
            raise ValueError(
                f"logging.wandb_mode ({self.wandb_mode!r}) must be one of 'offline', 'online', 'disabled'"
            )


@dataclass(kw_only=True)
class CheckpointConfig:
    """When to write checkpoints and where to resume from."""

    dir: str | None = None
    """Checkpoint folder (default: <run dir>/checkpoints)."""
    every_n_steps: int = 0
    """Write a checkpoint every N steps and at the end of the run (0: never)."""
    keep_last: int = 3
    """Keep the newest K checkpoints."""
    resume: str = "none"
    """`none`, `auto` (the newest checkpoint that verifies), or a checkpoint folder."""
    async_mode: str = "disabled"
    """`disabled` (training waits for each write) or `async`: the tensors are copied to CPU memory
    and written by a thread while training goes on (trainer/async_checkpoint.py)."""
    on_signal: list[str] = field(default_factory=lambda: ["SIGTERM", "SIGUSR1"])
    """Signals on which every rank finishes its step, a checkpoint is written and the run ends (exit
    code 128 + the signal's number): SLURM's time limit and preemption, scancel, Kubernetes. [] turns it off."""

    def __post_init__(self) -> None:
        check_signal_names(self.on_signal)
        if self.async_mode not in ("disabled", "async"):
            raise ValueError(f"checkpoint.async_mode ({self.async_mode!r}) must be 'disabled' or 'async'")
        if self.every_n_steps < 0:
            raise ValueError(f"checkpoint.every_n_steps ({self.every_n_steps}) must be >= 0")
        if self.keep_last < 1:
            raise ValueError(f"checkpoint.keep_last ({self.keep_last}) must be >= 1")


@dataclass(kw_only=True)
class LauncherConfig:
    """How the job was started; the trainer reads the environment that the launcher sets."""

    name: str = "local"
    """`local` (torchrun or a single process), `slurm` (sbatch/srun) or `submitit`."""
    requeue: bool = False
    """SLURM (sbatch, or submitit's SLURM executor): a run stopped by a signal (the time limit's
    `--signal`, a preemption) requeues its job, which resumes from the checkpoint it wrote. The run is
    then named slurm-<job id> unless logging.run_name is set, and a requeued start resumes
    (checkpoint.resume=auto) unless told otherwise. launcher=submitit_slurm turns it on."""

    def __post_init__(self) -> None:
        if self.name not in ("local", "slurm", "submitit"):
            raise ValueError(f"launcher.name ({self.name!r}) must be one of 'local', 'slurm', 'submitit'")
        if self.requeue and self.name == "local":
            raise ValueError("launcher.requeue (True) needs launcher=slurm or launcher=submitit_slurm, "
                             "not launcher.name ('local')")


@dataclass(kw_only=True)
class TrainConfig:
    """A whole training run."""

    seed: int = 1337
    """Seeds the weights (identical on every rank) and the data stream (distinct per rank)."""
    steps: int = 250
    """Optimizer steps."""
    batch_size: int = 8
    """Sequences per rank per micro-step."""
    grad_accum_steps: int = 1
    """Micro-steps per optimizer step."""
    eval_every: int = 100
    """Evaluate on the validation split every N steps, and at the end (0: only at the end)."""
    eval_batches: int = 8
    """Validation batches per rank per evaluation."""
    stop_at_step: int = 0
    """End this run after this step (writing a checkpoint), as a time-limited job would; 0: run to `steps`."""
    on_nan: str = "stop"
    """A non-finite loss: `stop` (the last checkpoint is kept) or `skip` (drop the step, count it)."""
    compile: bool = False
    """torch.compile each transformer block (as torchtitan): element-wise work fuses around the
    matmuls. The first steps compile (tens of seconds). Under EP and FSSDP the dispatcher stays eager
    between the compiled regions, and the experts run one compiled SwiGLU shared by every layer."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    placement: PlacementConfig = field(default_factory=PlacementConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    launcher: LauncherConfig = field(default_factory=LauncherConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "grad_accum_steps", "eval_batches"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} ({getattr(self, name)}) must be >= 1")
        if self.eval_every < 0:
            raise ValueError(f"eval_every ({self.eval_every}) must be >= 0")
        if self.data.seq_len > self.model.max_seq_len:
            raise ValueError(
                f"data.seq_len ({self.data.seq_len}) must be <= model.max_seq_len ({self.model.max_seq_len})"
            )
        if self.data.source != "bin" and self.model.vocab_size < 256:
            raise ValueError(
                f"model.vocab_size ({self.model.vocab_size}) must be >= 256 for byte-level data.source {self.data.source!r}"
            )
        check_profile_steps(self.logging.profile_steps, self.steps)
        if self.optim.warmup_steps > self.steps:
            raise ValueError(f"optim.warmup_steps ({self.optim.warmup_steps}) must be <= steps ({self.steps})")
        if self.model.moe_impl == "deepspeed" and (self.checkpoint.every_n_steps or self.checkpoint.resume != "none"
                                                   or self.stop_at_step):
            raise ValueError(
                "checkpoint.every_n_steps / checkpoint.resume / stop_at_step with model.moe_impl (deepspeed): "
                "DeepSpeed-MoE's layer is the baseline of bench/compare.py and is not checkpointed; use model.moe_impl=moesaic"
            )
        if self.model.moe_impl == "deepspeed":
            _check_deepspeed_moe(self)
        if self.model.moe.kernels == "triton":
            _check_triton_kernels(self)
        every_expert_everywhere = self.parallel.ep_size == 1 and self.parallel.expert_sharding == "resident"
        if self.placement.plan != "contiguous" and every_expert_everywhere:
            raise ValueError(
                f"placement.plan ({self.placement.plan!r}) needs expert parallelism: with parallel.ep_size (1) and "
                "resident experts every rank holds every expert; set parallel.ep_size != 1 or parallel.expert_sharding=fssdp"
            )
        if self.placement.every_n_steps and every_expert_everywhere:
            raise ValueError(
                f"placement.every_n_steps ({self.placement.every_n_steps}) needs expert parallelism: "
                "set parallel.ep_size != 1 or parallel.expert_sharding=fssdp"
            )
        if self.placement.dynamic_replicas and self.parallel.expert_sharding != "fssdp":
            raise ValueError(
                f"placement.dynamic_replicas ({self.placement.dynamic_replicas}) needs parallel.expert_sharding=fssdp: "
                "only there does a per-step plan change move nothing"
            )
        if self.parallel.token_dedup and every_expert_everywhere:
            raise ValueError(
                f"parallel.token_dedup ({self.parallel.token_dedup}) needs expert parallelism: with parallel.ep_size (1) "
                "and resident experts no token leaves its rank; set parallel.ep_size != 1 or parallel.expert_sharding=fssdp"
            )
        if self.parallel.reshard_every_n_steps and self.parallel.expert_sharding != "fssdp":
            raise ValueError(
                f"parallel.reshard_every_n_steps ({self.parallel.reshard_every_n_steps}) needs parallel.expert_sharding=fssdp"
            )
        if self.compile and self.logging.count_kept:
            raise ValueError(f"logging.count_kept ({self.logging.count_kept}) with compile ({self.compile}): the count "
                             "runs a dispatch mode, under which compiled code runs eagerly; count an eager run")
        if self.compile and self.parallel.recast_expert_weights:
            raise ValueError(f"parallel.recast_expert_weights ({self.parallel.recast_expert_weights}) with compile "
                             f"({self.compile}): eager only; compiled, inductor's partitioner chooses what backward keeps")
        if self.parallel.recast_expert_weights and self.model.moe_impl == "deepspeed":
            raise ValueError("parallel.recast_expert_weights (True) with model.moe_impl ('deepspeed'): DeepSpeed-MoE's "
                             "experts are its own; use recast_expert_weights=false")
        if self.compile and self.model.moe_impl == "deepspeed":
            raise ValueError(f"compile ({self.compile}) with model.moe_impl ('deepspeed'): DeepSpeed-MoE's layer is "
                             "the comparison baseline and runs as DeepSpeed ships it; use compile=false")
        if self.parallel.activation_checkpoint != "none" and self.model.moe_impl == "deepspeed":
            raise ValueError(f"parallel.activation_checkpoint ({self.parallel.activation_checkpoint!r}) with "
                             "model.moe_impl ('deepspeed'): DeepSpeed-MoE's layer is the comparison baseline and runs "
                             "as DeepSpeed ships it; use activation_checkpoint=none")
        if self.parallel.recompute_moe_act and self.model.moe_impl == "deepspeed":
            raise ValueError("parallel.recompute_moe_act (True) with model.moe_impl ('deepspeed'): DeepSpeed-MoE's "
                             "experts are its own; use recompute_moe_act=false")
        if self.optim.implementation != "auto" and self.parallel.engine == "deepspeed":
            raise ValueError(f"optim.implementation ({self.optim.implementation!r}) with parallel.engine ('deepspeed'): "
                             "DeepSpeed's engine steps its own flat partitions with torch's default; use "
                             "implementation=auto")
        if not 0 <= self.seed < 2**63:  # numpy's SeedSequence draws the batches and takes no negative seed
            raise ValueError(f"seed ({self.seed}) must be in [0, 2**63)")
        if self.on_nan not in ("stop", "skip"):
            raise ValueError(f"on_nan ({self.on_nan!r}) must be 'stop' or 'skip'")
        if self.stop_at_step < 0 or self.stop_at_step > self.steps:
            raise ValueError(f"stop_at_step ({self.stop_at_step}) must be in [0, steps ({self.steps})]")
        if self.checkpoint.resume == "auto" and not (self.checkpoint.dir or self.logging.run_name):
            raise ValueError(
                "checkpoint.resume (auto) needs a fixed place to look: set logging.run_name or checkpoint.dir"
            )


def _check_deepspeed_moe(cfg: "TrainConfig") -> None:
    """model.moe_impl=deepspeed runs DeepSpeed-MoE's layer as it is: refuse what it cannot do."""
    m, p = cfg.model.moe, cfg.parallel
    rules = [
        (p.engine == "deepspeed", f"parallel.engine ({p.engine!r}) must be 'deepspeed'"),
        (p.expert_sharding == "resident", f"parallel.expert_sharding ({p.expert_sharding!r}) must be 'resident'"),
        (m.capacity_factor == 0, f"model.moe.capacity_factor ({m.capacity_factor}) must be 0 (dropless)"),
        (m.kernels == "torch", f"model.moe.kernels ({m.kernels!r}) must be 'torch'"),
        (m.router.score_func == "softmax", f"model.moe.router.score_func ({m.router.score_func!r}) must be 'softmax'"),
        (m.router.bias_update_rate == 0, f"model.moe.router.bias_update_rate ({m.router.bias_update_rate}) must be 0"),
        (m.router.route_scale == 1, f"model.moe.router.route_scale ({m.router.route_scale}) must be 1"),
        (not m.router.num_expert_groups, f"model.moe.router.num_expert_groups ({m.router.num_expert_groups}) must be 0"),
        (m.router.aux_loss_scope == "micro_batch",
         f"model.moe.router.aux_loss_scope ({m.router.aux_loss_scope!r}) must be 'micro_batch'"),
        (not p.token_dedup, f"parallel.token_dedup ({p.token_dedup}) must be false"),
        (p.mixed_precision != "fp16", f"parallel.mixed_precision ({p.mixed_precision!r}) must be 'none' or 'bf16'"),
        (cfg.placement.plan == "contiguous", f"placement.plan ({cfg.placement.plan!r}) must be 'contiguous'"),
        (not cfg.placement.every_n_steps, f"placement.every_n_steps ({cfg.placement.every_n_steps}) must be 0"),
        (not cfg.placement.dynamic_replicas, f"placement.dynamic_replicas ({cfg.placement.dynamic_replicas}) must be 0"),
    ]
    for ok, rule in rules:
        if not ok:
            raise ValueError(f"{rule} with model.moe_impl (deepspeed): DeepSpeed-MoE's layer routes by softmax "
                             "top-k without groups or scaling, and places experts contiguously, without drops or "
                             "re-placement")


def _check_triton_kernels(cfg: "TrainConfig") -> None:
    """model.moe.kernels=triton: Triton must be installed, and the ranks must run on GPUs (or under
    Triton's CPU interpreter, TRITON_INTERPRET=1, which the tests use)."""
    import torch

    from moesaic.parallel.kernels import unavailable

    on_gpu = cfg.parallel.device != "cpu" and torch.cuda.is_available()
    reason = unavailable(on_gpu)
    if reason:
        raise ValueError(f"model.moe.kernels ('triton') {reason} (parallel.device is {cfg.parallel.device!r}, "
                         f"torch.cuda.is_available() is {torch.cuda.is_available()}); use model.moe.kernels=torch")


def register_configs() -> None:
    """Register the schema: configs/config.yaml lists `base_config` first in its defaults."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="base_config", node=TrainConfig)


def to_train_config(cfg) -> TrainConfig:
    """DictConfig -> validated TrainConfig (runs every __post_init__). Raises ValueError."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        obj = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as e:  # a __post_init__ ValueError arrives wrapped
        cause = e.__cause__ or e.__context__
        if isinstance(cause, ValueError):
            raise cause from None
        raise
    assert isinstance(obj, TrainConfig), type(obj)
    return obj


def load_config_yaml(path) -> TrainConfig:
    """A run directory's config.yaml (the resolved config that the trainer writes) -> TrainConfig."""
    from omegaconf import OmegaConf

    return to_train_config(OmegaConf.merge(OmegaConf.structured(TrainConfig), OmegaConf.load(path)))
