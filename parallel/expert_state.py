"""Moving expert state between ranks: pack a layer's expert parameters and AdamW moments into one
row per expert, rebuild tensors from such rows, and point the optimizer at the new tensors.
Used when resident EP adopts a new plan and when FSSDP re-assigns owners.
Legend: n experts in the shard, F ffn dim, D model dim; a row is [w13 | w2] (x3 with moments)."""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from moesaic.parallel.experts import EXPERT_WEIGHTS as NAMES
from moesaic.parallel.experts import expert_weight_shapes

MOMENTS = ("exp_avg", "exp_avg_sq")


def pack(store, optimizer: torch.optim.Optimizer) -> tuple[torch.Tensor, bool]:
    """(n, 3*F*D [x3]) rows of the store's weights, followed by both AdamW moments when they exist."""
    ws = [getattr(store, name) for name in NAMES]
    states = [optimizer.state.get(w, {}) for w in ws]
    moments = all("exp_avg" in s for s in states)
    parts = [torch.cat([w.data.flatten(1) for w in ws], 1)]
    if moments:
        parts += [torch.cat([s[m].flatten(1) for s in states], 1) for m in MOMENTS]
    return torch.cat(parts, 1), moments


def install(store, optimizer: torch.optim.Optimizer, rows: torch.Tensor, moments: bool, F: int, D: int) -> None:
    """Give `store` new weight Parameters built from `rows`, and move the optimizer's entries (and
    the moments carried in the rows) from the old Parameters to the new ones."""
    shapes = expert_weight_shapes(F, D)
    sizes = [a * b for a, b in shapes]
    m = rows.shape[0]
    chunks = rows.split([sum(sizes)] * (3 if moments else 1), dim=1)
    for i, name in enumerate(NAMES):
        w_old = getattr(store, name)
        w_new = nn.Parameter(chunks[0].split(sizes, 1)[i].reshape(m, *shapes[i]).clone())
        setattr(store, name, w_new)
        for group in optimizer.param_groups:
            for j, p in enumerate(group["params"]):
                if p is w_old:
                    group["params"][j] = w_new
        old = optimizer.state.pop(w_old, None)
        if old is not None and moments:
            optimizer.state[w_new] = {"step": old["step"].clone(), **{
                k: chunks[1 + a].split(sizes, 1)[i].reshape(m, *shapes[i]).clone() for a, k in enumerate(MOMENTS)}}


def reshard_owners(model: nn.Module, optimizer: torch.optim.Optimizer, owners_LE) -> int:
    """Move each expert's owned state (parameters and AdamW moments) to a new owner, layer by layer,
    with one all_to_all_single per layer (collective). The optimizer's entries are swapped in place.
    Returns the bytes this rank sent."""
    sent = 0
    for moe, owners in zip(model.moe_layers(), owners_LE):
        st = moe.experts  # an FSSDPExperts
        owners = np.asarray(owners, dtype=np.int64)
        old_ids, rank, P = list(st.owned_ids), st.rank, st.P
        new_ids = [e for e in range(len(owners)) if owners[e] == rank]
        flat, moments = pack(st, optimizer)
        # 1. rows to send: every owned expert whose new owner is another rank, by (destination, expert)
        sends = sorted((int(owners[e]), e) for e in old_ids if owners[e] != rank)
        recvs = sorted((int(st.owners[e]), e) for e in new_ids if st.owners[e] != rank)
        row = {e: i for i, e in enumerate(old_ids)}
        send = flat[[row[e] for _, e in sends]] if sends else flat[:0]
        recv = flat.new_empty(len(recvs), flat.shape[1])
        # 2. one uneven all_to_all_single: old owners -> new owners
        dist.all_to_all_single(recv, send.contiguous(), [sum(1 for s, _ in recvs if s == r) for r in range(P)],
                               [sum(1 for d, _ in sends if d == r) for r in range(P)], group=st.group)
        sent += send.numel() * send.element_size()
        # 3. the new shard's tensors, and the optimizer pointed at them
        got = {e: recv[i] for i, (_, e) in enumerate(recvs)}
        rows = torch.stack([flat[row[e]] if e in row else got[e] for e in new_ids]) if new_ids else flat[:0]
        install(st, optimizer, rows, moments, st.F, st.D)
        st.owned_ids, st.owners = new_ids, owners
        st.set_plan(st.layer_plan)  # the gather schedule follows the new owners
    return sent
