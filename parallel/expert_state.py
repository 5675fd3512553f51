"""Moving expert state between ranks: pack a layer's expert parameters and AdamW moments into one
row per expert, rebuild tensors from such rows, and point the optimizer at the new tensors.
Used when resident EP adopts a new plan and when FSSDP re-assigns owners.
Legend: n experts in the shard, F ffn dim, D model dim; a row is [w1 | w2 | w3] (x3 with moments)."""

from __future__ import annotations

import torch
from torch import nn

NAMES = ("w1_EFD", "w2_EDF", "w3_EFD")
MOMENTS = ("exp_avg", "exp_avg_sq")


def pack(store, optimizer: torch.optim.Optimizer, n: int) -> tuple[torch.Tensor, bool]:
    """(n, 3*F*D [x3]) rows of the store's weights, followed by both AdamW moments when they exist."""
    ws = [getattr(store, name) for name in NAMES]
    states = [optimizer.state.get(w, {}) for w in ws]
    moments = all("exp_avg" in s for s in states)
    parts = [torch.cat([w.data.reshape(n, -1) for w in ws], 1)]
    if moments:
        parts += [torch.cat([s[m].reshape(n, -1) for s in states], 1) for m in MOMENTS]
    return torch.cat(parts, 1), moments


def install(store, optimizer: torch.optim.Optimizer, rows: torch.Tensor, moments: bool, F: int, D: int) -> None:
    """Give `store` new weight Parameters built from `rows`, and move the optimizer's entries (and
    the moments carried in the rows) from the old Parameters to the new ones."""
    sizes, shapes = [F * D, D * F, F * D], [(F, D), (D, F), (F, D)]
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
