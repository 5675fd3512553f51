"""Decoder-only MoE transformer: RMSNorm, rotary embeddings, causal SDPA attention, and an MoE
feed-forward in every layer (the first `num_dense_layers` may be dense SwiGLU instead, and with
`moe_every` N only every N-th block after them is MoE).

Legend: B batch, S sequence, D model dim, H heads, Dh head dim, V vocab.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor
from torch.utils.checkpoint import checkpoint, set_checkpoint_early_stop

from moesaic.parallel.moe import MoE, MoEConfig, SwiGLU


@dataclass(kw_only=True)
class ModelConfig:
    """Sizes of the transformer. The MoE block's own sizes live in `moe`."""

    vocab_size: int = 256
    """Token vocabulary; 256 for byte-level text."""
    dim: int = 128
    """Model (residual stream) width."""
    num_layers: int = 4
    """Transformer blocks."""
    num_heads: int = 4
    """Attention heads; must divide dim."""
    max_seq_len: int = 256
    """Longest sequence the rotary tables cover."""
    num_dense_layers: int = 0
    """The first N blocks use a dense SwiGLU FFN instead of MoE."""
    dense_ffn_dim: int = 512
    """Hidden size of the dense FFN blocks (the first ones, and those between MoE blocks)."""
    moe_every: int = 1
    """After the first `num_dense_layers`, every N-th block is MoE and the others dense: 2 gives dense,
    MoE, dense, MoE, ... (GShard's and Switch's MoE in every other layer, Llama 4 Maverick's
    interleave step, Megatron's --moe-layer-freq). 1: every block after the dense ones is MoE."""
    rope_theta: float = 10000.0
    """Rotary embedding base."""
    norm_eps: float = 1e-5
    """RMSNorm epsilon."""
    init_std: float = 0.02
    """Std of the normal initialisation; output projections are scaled by 1/sqrt(2 * num_layers)."""
    tie_embeddings: bool = True
    """Share the input embedding with the output head."""
    moe: MoEConfig = field(default_factory=MoEConfig)
    """The MoE feed-forward block."""
    moe_impl: str = "moesaic"
    """`moesaic`, or `deepspeed`: DeepSpeed-MoE's layer (`deepspeed.moe.layer.MoE`) in its place, the
    baseline that bench/compare.py measures against; it needs parallel.engine=deepspeed."""

    def __post_init__(self) -> None:
        if isinstance(self.moe, dict):
            self.moe = MoEConfig(**self.moe)
        if self.moe_impl not in ("moesaic", "deepspeed"):
            raise ValueError(f"model.moe_impl ({self.moe_impl!r}) must be one of 'moesaic', 'deepspeed'")
        for name in ("vocab_size", "dim", "num_layers", "num_heads", "max_seq_len", "dense_ffn_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"model.{name} ({getattr(self, name)}) must be >= 1")
        if self.dim % self.num_heads:
            raise ValueError(f"model.dim ({self.dim}) must be divisible by model.num_heads ({self.num_heads})")
        if (self.dim // self.num_heads) % 2:
            raise ValueError(
                f"model.dim / model.num_heads ({self.dim // self.num_heads}) must be even for rotary embeddings"
            )
        if not 0 <= self.num_dense_layers <= self.num_layers:
            raise ValueError(
                f"model.num_dense_layers ({self.num_dense_layers}) must be in [0, model.num_layers ({self.num_layers})]"
            )
        if self.moe_every < 1:
            raise ValueError(f"model.moe_every ({self.moe_every}) must be >= 1")

    @property
    def moe_layer_ids(self) -> list[int]:
        """The blocks that are MoE, in order (MoE layer i of a plan or a checkpoint is block moe_layer_ids[i])."""
        return moe_layer_ids(self.num_layers, self.num_dense_layers, self.moe_every)

    @property
    def num_moe_layers(self) -> int:
        return len(self.moe_layer_ids)


def moe_layer_ids(num_layers: int, num_dense_layers: int, moe_every: int = 1) -> list[int]:
    """Blocks num_dense_layers + moe_every - 1, then every moe_every-th one after it."""
    return list(range(num_dense_layers + moe_every - 1, num_layers, moe_every))


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)  # fused on a GPU; computed in fp32


def rotary_tables(head_dim: int, max_seq_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(max_seq_len, head_dim / 2) cos and sin, computed on the host in float64."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64, device="cpu") / head_dim)
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float64, device="cpu"), inv_freq)
    return angles.cos().float(), angles.sin().float()


def apply_rotary(x_BHSDh: torch.Tensor, cos_SD: torch.Tensor, sin_SD: torch.Tensor) -> torch.Tensor:
    x1, x2 = x_BHSDh[..., 0::2], x_BHSDh[..., 1::2]
    cos, sin = cos_SD.to(x_BHSDh.dtype), sin_SD.to(x_BHSDh.dtype)
    out = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return out.flatten(-2)


def seeded_normal_(t: torch.Tensor, name: str, base_seed: int, std: float) -> None:
    """Fill `t` in place from N(0, std) with a generator of `t`'s device seeded by (base_seed, name)."""
    if t.is_meta:
        return
    if isinstance(t, DTensor):  # FSDP's shard: draw the whole tensor, keep this rank's part
        return fill_sharded_(t, lambda full: seeded_normal_(full, name, base_seed, std))
    digest = hashlib.blake2b(f"{base_seed}/{name}".encode(), digest_size=8).digest()
    gen = torch.Generator(device=t.device)
    gen.manual_seed(int.from_bytes(digest, "little") >> 1)
    t.normal_(0.0, std, generator=gen)


def fill_sharded_(t: torch.Tensor, fill) -> None:
    """Apply `fill` to a whole tensor of `t`'s shape and keep what `t` holds: a DTensor's local part
    (one tensor whole at a time, on this rank's device), or `t` itself."""
    if not isinstance(t, DTensor):
        return fill(t)
    from torch.distributed.tensor import distribute_tensor

    full = torch.empty(t.shape, dtype=t.dtype, device=t.to_local().device)
    fill(full)
    with torch.no_grad():  # src_data_rank None: every rank slices its own copy, nothing is sent
        t.to_local().copy_(distribute_tensor(full, t.device_mesh, t.placements, src_data_rank=None).to_local())


def held_expert_ids(moe: MoE) -> list[int]:
    """Global ids of the experts in this rank's expert tensors, in their order: FSSDP's owned shard,
    expert parallelism's local experts, or every expert."""
    store = moe.experts
    if hasattr(store, "owned_ids"):
        return list(store.owned_ids)
    lp = getattr(moe, "layer_plan", None)
    return list(lp.local_experts) if lp is not None else list(range(store.num_experts))


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.head_dim = cfg.dim // cfg.num_heads
        self.wqkv = nn.Linear(cfg.dim, 3 * cfg.dim, bias=False)
        self.wo = nn.Linear(cfg.dim, cfg.dim, bias=False)

    def forward(self, x_BSD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, S, D = x_BSD.shape
        q, k, v = self.wqkv(x_BSD).view(B, S, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k = apply_rotary(q, cos[:S], sin[:S]), apply_rotary(k, cos[:S], sin[:S])
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.wo(y.transpose(1, 2).reshape(B, S, D))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__()
        out_std = cfg.init_std / math.sqrt(2 * cfg.num_layers)
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.is_moe = layer_id in cfg.moe_layer_ids
        if self.is_moe:
            self.moe = MoE(cfg.dim, cfg.moe, init_std=cfg.init_std, out_std=out_std)
        else:
            self.mlp = SwiGLU(cfg.dim, cfg.dense_ffn_dim)
        self.activation_checkpoint = "none"  # set by apply_activation_checkpoint

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        if self.activation_checkpoint == "none" or not torch.is_grad_enabled():
            return self._forward(x, cos, sin)
        if self.activation_checkpoint == "full":
            # recompute the whole block, never stopping early: the MoE layer's all-to-alls must run in
            # every rank's recomputation, however many tensors a rank's experts saved (a safeguard:
            # today the combine after the last all-to-all saves tensors on every rank)
            with set_checkpoint_early_stop(False):
                return checkpoint(self._forward, x, cos, sin, use_reentrant=False, preserve_rng_state=False)
        return self._ffn(checkpoint(self._attention, x, cos, sin, use_reentrant=False, preserve_rng_state=False))

    # activation checkpointing recomputes one of these in backward (`apply_activation_checkpoint`).
    # Nothing in a block draws random numbers, so no RNG state is kept for the recomputation.
    def _forward(self, x, cos, sin):
        return self._ffn(self._attention(x, cos, sin))

    def _attention(self, x, cos, sin):
        return x + self.attn(self.attn_norm(x), cos, sin)

    def _ffn(self, x):
        h = self.ffn_norm(x)
        if self.is_moe:
            y, route = self.moe(h)
            return x + y, route
        return x + self.mlp(h), None


@dataclass
class ModelOutput:
    loss: torch.Tensor | None  # ce + aux_coef * aux + z_coef * z (what backward runs on)
    ce_loss: torch.Tensor | None  # next-token cross-entropy, nats per token
    aux_loss: torch.Tensor  # mean over MoE layers, unscaled
    z_loss: torch.Tensor  # mean over MoE layers, unscaled
    logits: torch.Tensor
    tokens_per_expert_LE: torch.Tensor | None  # int64 (moe layers, experts), detached


class Transformer(nn.Module):
    """The model. Built on the current default device (`with torch.device(...)`), initialized there;
    under `with torch.device("meta")` nothing is allocated or drawn: shard the experts first
    (`apply_expert_parallel`, `apply_fssdp`), then `materialize(device)` allocates and initializes
    what this rank holds, with the same values as an unsharded model of the same seed."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        # every tensor's draws come from its own seed (`init_weights`), derived from this one: one
        # draw of torch's CPU generator, so `torch.manual_seed(s)` still decides the weights
        self.init_seed = int(torch.randint(2**62, (), device="cpu"))
        device = torch.get_default_device()
        with torch.device("meta"):  # nothing allocated or drawn twice: `materialize` does it once
            self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
            self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_layers))
            self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
            self.head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
            self.register_buffer("rope_cos", torch.empty(cfg.max_seq_len, cfg.dim // cfg.num_heads // 2), persistent=False)
            self.register_buffer("rope_sin", torch.empty_like(self.rope_cos), persistent=False)
        if cfg.tie_embeddings:
            self.head.weight = self.embed.weight
        if device.type != "meta":
            self.materialize(device)

    def materialize(self, device, *, init: bool = True) -> "Transformer":
        """Give every parameter and buffer still on the meta device storage on `device` (tied ones
        stay tied; tensors already on a device, such as a dispatcher's plan tables, are kept), fill
        the rotary tables, then `init_weights` (`init=False`: left uninitialized, for a state dict
        to fill)."""
        device = torch.device(device)
        if any(isinstance(p, DTensor) and p.is_meta for p in self.parameters()):
            # FSDP2 sharded the dense parameters on meta (apply_fsdp): allocate each rank's shards
            # through FSDP's own `_apply`, which re-registers them; tensors on a device stay
            self._apply(lambda t: torch.empty_like(t, device=device) if t.is_meta else t)
            if self.cfg.tie_embeddings and self.head.weight is not self.embed.weight:
                raise RuntimeError("materialize: FSDP's allocation untied the embedding and the head")
        new: dict[int, torch.Tensor] = {}
        for module in self.modules():
            for slots in (module._parameters, module._buffers):
                for name, t in slots.items():
                    if t is None or not t.is_meta:
                        continue
                    if id(t) not in new:
                        empty = torch.empty_like(t, device=device)
                        new[id(t)] = nn.Parameter(empty, t.requires_grad) if isinstance(t, nn.Parameter) else empty
                    slots[name] = new[id(t)]
        cos, sin = rotary_tables(self.cfg.dim // self.cfg.num_heads, self.cfg.max_seq_len, self.cfg.rope_theta)
        with torch.no_grad():
            self.rope_cos.copy_(cos)
            self.rope_sin.copy_(sin)
        if init:
            self.init_weights()
        return self

    @torch.no_grad()
    def init_weights(self) -> None:
        """Normal(0, init_std) weights (output projections: / sqrt(2 * num_layers)), unit norms, zero
        router biases. Each weight draws from a generator seeded by (init_seed, its name), and each
        expert's from one seeded by (init_seed, name, global expert id): a rank that holds only some
        experts, or a shard of them, initializes them to the values of the whole model."""
        std, out_std = self.cfg.init_std, self.cfg.init_std / math.sqrt(2 * self.cfg.num_layers)
        for name, module in self.named_modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                seeded_normal_(module.weight, name + ".weight", self.init_seed, out_std if name.endswith(("wo", "w2")) else std)
            elif isinstance(module, RMSNorm):
                module.weight.fill_(1.0)
            elif hasattr(module, "bias_E"):  # the router's selection bias
                module.bias_E.zero_()
        for li, blk in enumerate(self.layers):
            if not blk.is_moe:
                continue
            store = blk.moe.experts
            F_ = store.w2_EDF.shape[2]
            ids = held_expert_ids(blk.moe)

            def fill_w13(w13, stem=f"layers.{li}.moe.experts", ids=ids):
                for i, e in enumerate(ids):
                    seeded_normal_(w13[i, :F_], f"{stem}.{e}.w1", self.init_seed, std)
                    seeded_normal_(w13[i, F_:], f"{stem}.{e}.w3", self.init_seed, std)

            def fill_w2(w2, stem=f"layers.{li}.moe.experts", ids=ids):
                for i, e in enumerate(ids):
                    seeded_normal_(w2[i], f"{stem}.{e}.w2", self.init_seed, out_std)

            fill_sharded_(store.w13_EGD, fill_w13)  # FSDP without expert parallelism shards them too
            fill_sharded_(store.w2_EDF, fill_w2)

    def moe_layers(self) -> list[MoE]:
        return [blk.moe for blk in self.layers if blk.is_moe]

    def forward(self, idx_BS: torch.Tensor, targets_BS: torch.Tensor | None = None) -> ModelOutput:
        if self.embed.weight.is_meta and not idx_BS.is_meta:
            raise RuntimeError("the model is on the meta device (built under `with torch.device('meta')`): "
                               "call model.materialize(device) once its experts are sharded")
        x = self.embed(idx_BS)
        aux, z, counts = [], [], []
        for layer in self.layers:
            x, route = layer(x, self.rope_cos, self.rope_sin)
            if route is not None:
                aux.append(route.aux_loss)
                z.append(route.z_loss)
                counts.append(route.tokens_per_expert_E)
        logits = self.head(self.norm(x)).float()
        zero = logits.new_zeros(())
        aux_loss = torch.stack(aux).mean() if aux else zero
        z_loss = torch.stack(z).mean() if z else zero
        ce = loss = None
        if targets_BS is not None:
            ce = F.cross_entropy(logits.view(-1, logits.shape[-1]), targets_BS.reshape(-1))
            rc = self.cfg.moe.router
            loss = ce + rc.aux_loss_coef * aux_loss + rc.z_loss_coef * z_loss
        return ModelOutput(
            loss=loss,
            ce_loss=ce,
            aux_loss=aux_loss,
            z_loss=z_loss,
            logits=logits,
            tokens_per_expert_LE=torch.stack(counts).detach() if counts else None,
        )

    def num_params(self) -> dict[str, int]:
        """Total and active (per token) parameter counts; tied weights counted once."""
        seen, total, expert = set(), 0, 0
        for name, p in self.named_parameters():
            if id(p) in seen:
                continue
            seen.add(id(p))
            total += p.numel()
            if ".experts." in name:
                expert += p.numel()
        m = self.cfg.moe
        active = total - expert + expert * m.top_k // m.num_experts
        return {"total": total, "active": active, "expert": expert}
