"""FSSDP (Hecate, arXiv 2502.02581): Fully Sharded Sparse Data Parallelism for the experts.

Every expert has one owner rank in the expert domain (the "ep" mesh axis), which holds its parameters,
gradients and AdamW state: one global copy. Each step the plan says which ranks compute which experts
(replicas included), and
- `sparse_all_gather` brings each expert's parameters from its owner to exactly those ranks (one
  uneven all_to_all_single per layer), before the layer runs; the next layer's gather is prefetched
  asynchronously while this one computes;
- with re-materialization on, the gathered weights are freed after the layer's forward pass and
  gathered again at the start of its backward pass (the previous layer's re-gather is prefetched);
  a layer that computes in place keeps no autocast cast of its owned weights either (cast again);
- `sparse_reduce_scatter` returns each materialized expert's gradient to its owner, summed over every
  rank that computed it, after backward;
- a new plan only changes what the next gather fetches: nothing migrates;
- with `gather_dtype` bf16 (under bf16 autocast), the weights travel and stay materialized in bf16,
  cast at their owner, and the gradients travel back in bf16. A bf16 GEMM's weight gradient is bf16
  anyway, and the owner sums the copies in fp32, so the math equals fp32 gathers bit for bit;
- with `reduce_dtype` bf16 or fp16 (parallel.reduce_dtype), the gradients travel back in it
  whatever the gather's dtype, and the cross-domain all-reduce runs in it;
- under activation checkpointing, a layer recomputed inside backward computes with the weights that
  its backward re-gathers (`restore`), so recomputation adds no gathers.
Across "edp" (other expert domains) owners' gradients are all-reduced. Gradients are scaled to the
gradient of the global mean loss. Legend: E experts, P domain ranks, S = 3*F*D flat expert size.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from moesaic.parallel.expert_state import reshard_owners  # noqa: F401  (re-exported: FSSDP's owner moves)
from moesaic.parallel.experts import store_swiglu
from moesaic.parallel.expert_parallel import LayerPlan
from moesaic.parallel.fssdp_dispatch import FSSDPDispatcher
from moesaic.parallel.gather_schedule import GatherSchedule, computes_in_place, even_owners  # noqa: F401  (re-exported)
from moesaic.placement.plan import Placement, check_fits

log = logging.getLogger(__name__)
HALF = (torch.bfloat16, torch.float16)  # the reduce dtypes in which gradients travel (parallel.reduce_dtype)

# Bytes of materialized expert weights alive on this rank (gathered, prefetched), and the peak;
# `grads`: their gradients, alive from a layer's backward until its sparse_reduce_scatter, and
# `peak_total`, the peak of weights and gradients together.
WORKING_SET = {"live": 0, "peak": 0, "grads": 0, "peak_total": 0}


def _track(delta: int, grads: bool = False) -> None:
    WORKING_SET["grads" if grads else "live"] += delta
    WORKING_SET["peak"] = max(WORKING_SET["peak"], WORKING_SET["live"])
    WORKING_SET["peak_total"] = max(WORKING_SET["peak_total"], WORKING_SET["live"] + WORKING_SET["grads"])


class FSSDPExperts(nn.Module):
    """The owned shard of one MoE layer's experts, and the materialized weights of the experts this
    rank computes under the current plan."""

    def __init__(self, owned_w13, owned_w2, owned_ids: list[int], layer_plan: LayerPlan,
                 owners: np.ndarray, group, *, reshard_after_forward: bool, kernels: str = "torch",
                 gather_dtype: torch.dtype | None = None, reduce_dtype: torch.dtype | None = None):
        super().__init__()
        self._gather_dtype = gather_dtype
        self.reduce_dtype = reduce_dtype  # bf16/fp16 (parallel.reduce_dtype): gradients travel so whatever the gather's
        self.w13_EGD = nn.Parameter(owned_w13.detach().clone())
        self.w2_EDF = nn.Parameter(owned_w2.detach().clone())
        self.kernels = kernels
        self.compiled = False  # run compiled_grouped_swiglu (set by apply_compile)
        self.recompute_act = False  # recompute the activation in backward (set by apply_activation_checkpoint)
        self.owned_ids = owned_ids
        self.owners = owners
        self.group = group
        self.reshard_after_forward = reshard_after_forward
        self.F, self.D = owned_w2.shape[2], owned_w2.shape[1]
        self.row_size = 3 * self.F * self.D  # a row is [w13 | w2]
        # neighbours for prefetch, kept out of the module tree (they are other layers' modules)
        self.__dict__["next"] = None  # the following MoE layer (forward prefetch)
        self.__dict__["prev"] = None  # the preceding MoE layer (backward prefetch)
        self.prefetch = True
        self._mat: torch.Tensor | None = None  # (n_compute, S) materialized leaf
        self._pending = None  # (work, recv buffer) of an issued gather
        self._grad_expected = False
        self._released = False  # storage freed by release(): a flag, as an empty rank's storage is always empty
        self._rs_pending = None  # an issued sparse_reduce_scatter (work, recv, send)
        self.bytes = {"gather": 0, "reduce_scatter": 0}
        self.grad_scale = 1.0  # 1 / world size: expert gradients of the global mean loss
        self.edp_group = None  # other expert domains holding the same shard
        self.peak_materialized_bytes = 0
        self._grad_bytes = 0
        self.set_plan(layer_plan)

    # -- plan -----------------------------------------------------------------------------------
    def set_plan(self, layer_plan: LayerPlan) -> None:
        """Adopt a new plan: only the next gather changes; the owned shard stays where it is."""
        self.layer_plan = layer_plan
        self.rank, self.P = layer_plan.ep_rank, layer_plan.ep_size
        self.schedule = GatherSchedule.build(layer_plan.holders, self.owners, self.rank, self.P)
        self.num_compute = len(layer_plan.local_experts)
        self._pending = None
        self.direct = computes_in_place(layer_plan.holders, self.owners)

    @property
    def gather_dtype(self) -> torch.dtype:
        """What the gather moves and the layer computes with, and what carries the gradients back."""
        return self._gather_dtype or self.w2_EDF.dtype

    @property
    def num_experts(self) -> int:  # what the dispatcher's grouped GEMM sees
        return self.num_compute

    # -- sparse_all_gather ----------------------------------------------------------------------
    def _owned_flat(self) -> torch.Tensor:
        return torch.cat([self.w13_EGD.detach().flatten(1), self.w2_EDF.detach().flatten(1)], 1)

    def _issue_gather(self, async_op: bool):
        # 1. rows of the owned shard, ordered by (destination, expert)
        sch = self.schedule
        flat = self._owned_flat()
        send = (flat[list(sch.send_rows)] if sch.send_rows else flat[:0]).to(self.gather_dtype)  # cast, then send
        recv = send.new_empty(sum(sch.out_splits), self.row_size)
        # 2. one uneven all_to_all_single: owners -> exactly the ranks that compute each expert
        work = dist.all_to_all_single(recv, send.contiguous(), list(sch.out_splits), list(sch.in_splits),
                                      group=self.group, async_op=async_op)
        _track(recv.numel() * recv.element_size())
        self.bytes["gather"] += sch.bytes_sent(self.row_size * send.element_size(), self.rank)
        return work, recv

    def _finish_gather(self, work, recv) -> torch.Tensor:
        if work is not None:
            work.wait()
        # 3. received rows (by source) -> this rank's compute experts in id order
        out = torch.empty_like(recv)
        if recv.numel():
            out[list(self.schedule.recv_to_local)] = recv
        return out  # replaces recv in the working set (same size)

    def sparse_all_gather(self) -> None:
        """Materialize the weights of the experts this rank computes (collective)."""
        if self.direct:
            if self._mat is not None:  # an evaluation's weights, materialized under the previous plan
                _track(-self._mat.untyped_storage().nbytes())
                self._mat = None
            self._grad_expected = torch.is_grad_enabled()
            self._prefetch_next()
            return
        # gradient accumulation: the previous micro-batch's unsent gradients go first, from every rank (empty if none)
        if self._rs_pending is not None:
            self.finish_reduce_scatter()
        if self._mat is not None and self._grad_expected:
            self.sparse_reduce_scatter()
        if self._mat is not None:  # a previous forward's weights (evaluation, no backward)
            _track(-self._mat.untyped_storage().nbytes())
            self._mat = None
        if self._pending is not None:
            flat = self._finish_gather(*self._pending)
            self._pending = None
        else:
            flat = self._finish_gather(*self._issue_gather(async_op=False))
        self._mat = flat.requires_grad_(True)
        self._released = False
        self._grad_expected = torch.is_grad_enabled()
        if self._grad_expected:
            self._mat.register_post_accumulate_grad_hook(self._grad_ready)
        self.peak_materialized_bytes = max(self.peak_materialized_bytes, flat.numel() * flat.element_size())
        self._prefetch_next()

    def _prefetch_next(self) -> None:
        nxt = self.next
        if self.prefetch and nxt is not None and not nxt.direct and torch.is_grad_enabled():
            nxt._pending = nxt._issue_gather(async_op=True)

    def _grad_ready(self, mat: torch.Tensor) -> None:
        if not self._grad_bytes:  # counted once per materialization, however many micro-batches add to it
            self._grad_bytes = mat.grad.numel() * mat.grad.element_size()
            _track(self._grad_bytes, grads=True)

    def weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(w13_EGD, w2_EDF) of the experts this rank computes."""
        if self.direct:  # compute experts == owned experts, both in id order
            return self.w13_EGD, self.w2_EDF
        n, F, D = self.num_compute, self.F, self.D
        w13, w2 = self._mat.split([2 * F * D, D * F], dim=1)
        return w13.reshape(n, 2 * F, D), w2.reshape(n, D, F)

    def forward(self, x_TD: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        # in place, under autocast: no cast of the owned weights kept until backward, as a gathering
        # layer frees its gathered ones (compiled, the partitioner chooses, and keeps the fp32 weights)
        return store_swiglu(self, x_TD, counts_E, *self.weights(), recast=self.direct and self.reshard_after_forward)

    # -- re-materialization -------------------------------------------------------------------------
    def release(self) -> None:
        """After the layer's forward: free the materialized storage (autograd keeps its views). Without
        gradients (evaluation) no backward needs the weights: they go whatever reshard_after_forward
        says, so that an evaluation holds one layer's at a time, not every layer's."""
        if self._mat is None or self.direct:
            return
        if not torch.is_grad_enabled():
            _track(-self._mat.untyped_storage().nbytes())
            self._mat = None
        elif self.reshard_after_forward:
            _track(-self._mat.untyped_storage().nbytes())
            self._mat.untyped_storage().resize_(0)
            self._released = True

    def regather(self, async_op: bool = False) -> None:
        """Before the layer's backward: gather again into the freed storage (collective)."""
        if not self.reshard_after_forward or self._mat is None:
            return
        if not async_op and self._pending is None and not self._released:
            return  # already gathered again, for a recomputation (`restore`), or never released
        if async_op:
            self._pending = self._issue_gather(async_op=True)
            return
        pending, self._pending = self._pending, None
        flat = self._finish_gather(*(pending or self._issue_gather(async_op=False)))
        _track(-flat.numel() * flat.element_size())  # counted again below, as the restored storage
        storage = self._mat.untyped_storage()
        if storage.nbytes() == 0 and flat.numel():
            storage.resize_(flat.numel() * flat.element_size())
            _track(flat.numel() * flat.element_size())
        with torch.no_grad(), torch.autograd._unsafe_preserve_version_counter(self._mat):
            self._mat.copy_(flat)
        self._released = False
        if self.prefetch and self.prev is not None:
            self.prev.regather(async_op=True)

    def restore(self) -> None:
        """Activation checkpointing recomputes the forward inside backward, maybe before the layer's
        backward trigger: gather the released weights now (collective; the trigger's re-gather is then a no-op)."""
        if self.direct:
            return
        if self._mat is None:
            raise RuntimeError("FSSDP: a layer was recomputed after its gradients had been sent to their owners")
        self.regather()  # a no-op when the weights are in place (kept, or already gathered again)

    # -- sparse_reduce_scatter ------------------------------------------------------------------
    def sparse_reduce_scatter(self, async_op: bool = False) -> None:
        """Send each materialized expert's gradient to its owner, summed there over every rank that
        computed it; then sum over the other expert domains and scale (collective). With async_op the
        exchange is only issued (it overlaps the next layer's backward); `finish_reduce_scatter`
        completes it."""
        sch = self.schedule
        grad = self._mat.grad if self._mat is not None else None
        if grad is None:
            if self._mat is not None and self.num_compute and self._mat.requires_grad and self._grad_expected:
                raise RuntimeError("sparse_reduce_scatter ran before this layer's weight gradients were ready")
            grad = self.w2_EDF.new_zeros(self.num_compute, self.row_size, dtype=self.gather_dtype)
        # 1. this rank's gradients in the order it received the weights (the gather's reverse), in bf16
        #    (fp16) under parallel.reduce_dtype=bf16 (fp16)
        send = grad[list(sch.recv_to_local)] if sch.recv_to_local else grad[:0]
        if self.reduce_dtype in HALF:
            send = send.to(self.reduce_dtype)
        recv = send.new_empty(sum(sch.in_splits), self.row_size)
        # 2. the reverse all_to_all_single: computing ranks -> owners
        work = dist.all_to_all_single(recv, send.contiguous(), list(sch.in_splits), list(sch.out_splits),
                                      group=self.group, async_op=async_op)
        self.bytes["reduce_scatter"] += self.row_size * send.element_size() * sum(
            n for r, n in enumerate(sch.out_splits) if r != self.rank)
        if self._mat is not None:
            _track(-self._mat.untyped_storage().nbytes())
        _track(-self._grad_bytes, grads=True)
        self._grad_bytes = 0
        self._mat = None  # the materialized weights and their gradients are no longer needed
        self._rs_pending = (work, recv, send)
        if not async_op:
            self.finish_reduce_scatter()

    def finish_reduce_scatter(self) -> None:
        if self._rs_pending is None:
            return
        work, recv, _ = self._rs_pending
        self._rs_pending = None
        if work is not None:
            work.wait()
        sch = self.schedule
        # 3. sum every copy's gradient into the owned rows, in the owned dtype
        n = len(self.owned_ids)
        owned = self.w2_EDF.new_zeros(n, self.row_size).index_add_(
            0, torch.tensor(sch.send_rows, dtype=torch.int64, device=recv.device), recv.to(self.w2_EDF.dtype))
        self._install_grads(owned, accumulate=True)  # micro-batches of one step add up

    def direct_grads(self) -> None:
        """A direct layer's gradients are already on the owned shard: sum them over the expert domains
        and scale, as the reduce-scatter's last step does (collective over edp)."""
        if not (self.direct and self._grad_expected):
            return
        self._grad_expected = False
        ws = (self.w13_EGD, self.w2_EDF)
        owned = torch.cat([(w.grad if w.grad is not None else torch.zeros_like(w)).flatten(1) for w in ws], 1)
        self._install_grads(owned, accumulate=False)  # autograd has added up the micro-batches

    def _install_grads(self, owned: torch.Tensor, *, accumulate: bool) -> None:
        n = len(self.owned_ids)
        if self.edp_group is not None and dist.get_world_size(self.edp_group) > 1:
            comm = owned.to(self.reduce_dtype) if self.reduce_dtype in HALF else owned
            dist.all_reduce(comm, group=self.edp_group)
            owned = comm.to(self.w2_EDF.dtype)
        owned *= self.grad_scale
        F, D = self.F, self.D
        g13, g2 = owned.split([2 * F * D, D * F], dim=1)
        for w, g in ((self.w13_EGD, g13.reshape(n, 2 * F, D)), (self.w2_EDF, g2.reshape(n, D, F))):
            w.grad = g.contiguous() if not accumulate or w.grad is None else w.grad + g

    def extra_repr(self) -> str:
        return f"owned={self.owned_ids}, compute={self.layer_plan.local_experts}"


def apply_fssdp(model: nn.Module, mesh, plan: Placement, *, reshard_after_forward: bool = True, prefetch: bool = True,
                capacity_factor: float = 0.0, owners: np.ndarray | None = None, grad_scale: float | None = None,
                token_dedup=False, device=None, gather_dtype: torch.dtype | None = None,
                reduce_dtype: torch.dtype | None = None) -> list[str]:
    """Shard every MoE layer's experts over the "ep" axis of `mesh` (one owner per expert: `owners`,
    (E,) for every layer or (L, E); default even contiguous shards) and compute them where `plan` says.
    The model holds every expert, as built: initialized (identical on every rank), or on the meta
    device (then `device` says where the tokens will be, and `Transformer.materialize` allocates only
    the owned shard). `token_dedup`: False, True or `NodeGroups`, as `ExpertParallelDispatcher` takes it.
    `gather_dtype`: what the weights and gradients travel in (None: the parameters' own dtype).
    `reduce_dtype=torch.bfloat16` or `torch.float16` (parallel.reduce_dtype): the gradients travel to
    their owners in it (summed there in fp32), and are all-reduced across the expert domains in it.
    Returns the names of the parameters and buffers that differ across ranks (keep them out of DDP)."""
    ep_group, rank = mesh.get_group("ep"), mesh.get_local_rank("ep")
    P = mesh.size(-1)
    moes = model.moe_layers()
    E = moes[0].cfg.num_experts
    check_fits(plan, num_layers=len(moes), num_experts=E, num_gpus=P)
    owners = even_owners(E, P) if owners is None else np.asarray(owners, dtype=np.int64)
    owners_LE = np.tile(owners, (len(moes), 1)) if owners.ndim == 1 else owners  # (E,) or per layer (L, E)
    stores = []
    for layer, moe, own in zip(plan.placement, moes, owners_LE):
        lp = LayerPlan(tuple(layer), rank, P)
        full = moe.experts
        owned = [e for e in range(E) if own[e] == rank]
        store = FSSDPExperts(full.w13_EGD[owned], full.w2_EDF[owned], owned, lp, own, ep_group,
                             reshard_after_forward=reshard_after_forward, kernels=full.kernels,
                             gather_dtype=gather_dtype, reduce_dtype=reduce_dtype)
        store.prefetch = prefetch
        store.grad_scale = 1.0 / dist.get_world_size() if grad_scale is None else grad_scale
        store.edp_group = mesh.get_group("edp") if mesh.ndim > 1 else None
        moe.experts = store
        moe.dispatcher = FSSDPDispatcher(lp, ep_group, device=device or full.w2_EDF.device, capacity_factor=capacity_factor,
                                         token_dedup=token_dedup)
        moe.layer_plan = lp
        stores.append(store)
    for a, b in zip(stores, stores[1:]):
        a.__dict__["next"], b.__dict__["prev"] = b, a
    names = [n for n, _ in model.named_parameters() if ".experts." in n]
    names += [n for n, _ in model.named_buffers() if ".dispatcher." in n]
    owned_bytes = sum(p.numel() * p.element_size() for s in stores for p in s.parameters())
    log.info("applied fssdp: %d experts per layer over %d ranks, this rank owns %s (%.2f MiB of parameters; "
             "x4 with gradients and AdamW states), reshard_after_forward=%s, prefetch=%s",
             E, P, stores[0].owned_ids if all(s.owned_ids == stores[0].owned_ids for s in stores)
             else [s.owned_ids for s in stores], owned_bytes / 2**20, reshard_after_forward, prefetch)
    return names


def set_fssdp_plan(model: nn.Module, plan: Placement) -> None:
    """Adopt a new plan at a step boundary: no parameter or optimizer state moves."""
    for layer, moe in zip(plan.placement, model.moe_layers()):
        lp = LayerPlan(tuple(layer), moe.layer_plan.ep_rank, moe.layer_plan.ep_size)
        moe.experts.set_plan(lp)
        moe.layer_plan = lp
        old = moe.dispatcher
        moe.dispatcher = FSSDPDispatcher(lp, old.group, device=old.holders_pad.device, capacity_factor=old.capacity_factor,
                                         token_dedup=old.token_dedup)


def fssdp_reduce_scatter(model: nn.Module) -> None:
    """After backward: the sparse_reduce_scatter of the layers that backward has not sent yet (the
    first MoE layer; every layer when a layer ran without autograd's trigger), in reverse order."""
    for moe in reversed(model.moe_layers()):
        if moe.experts.direct:
            moe.experts.direct_grads()
        elif moe.experts._mat is not None:
            moe.experts.sparse_reduce_scatter()
    for moe in model.moe_layers():  # the asynchronous ones still in flight
        moe.experts.finish_reduce_scatter()


def fssdp_bytes(model: nn.Module) -> dict:
    """Bytes this rank has sent so far, per FSSDP collective."""
    return {k: sum(moe.experts.bytes[k] for moe in model.moe_layers()) for k in ("gather", "reduce_scatter")}


def fssdp_grad_sq_norm(model: nn.Module, mesh) -> torch.Tensor:
    """This rank's share of the squared norm of all expert gradients (each expert once over the world)."""
    edp = mesh.size(0) if mesh.ndim > 1 else 1
    total = torch.zeros((), dtype=torch.float64, device=next(model.parameters()).device)
    for moe in model.moe_layers():
        for p in moe.experts.parameters():
            if p.grad is not None:
                total += (p.grad.double() ** 2).sum() / edp
    return total
