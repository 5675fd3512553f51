"""Token-deduplicated dispatch (`parallel.token_dedup`): each token travels once to each rank that
computes any of its experts, as DeepEP dispatches, instead of once per token-slot as Megatron's and
DeepSpeed's all-to-all do. The expert rank copies the row to the token's slots there, computes them,
and sums their weighted outputs, so one row goes back as well.

Each row carries its slots beside the token: K columns of combine weights (their gradients come back
through the same all-to-all) and K columns holding the destination's local expert index of each slot
(-1 where the row has fewer slots), stored bit for bit in the row's dtype. So a layer moves one
all-to-all each way, as the per-slot dispatch does, with 2K more columns per row.

A token whose k experts sit on r distinct ranks moves r rows each way instead of k: fewer bytes where
fine-grained experts share ranks (bench/token_dedup.py). The math is the layer's; only the order of
the combine's sum changes.

Legend: T local tokens, K top-k, N = T*K token-slots, D model dim, E experts, P ep ranks,
R rows (one per token and destination rank), J the most slots one received row has.
"""

from __future__ import annotations

import torch

from moesaic.parallel.all_to_all import all_to_all, exchange_counts
from moesaic.parallel.experts import combine_slots, gather_slots, put_rows, take_rows
from moesaic.parallel.router import expert_counts

_INT_OF_SIZE = {2: torch.int16, 4: torch.int32, 8: torch.int64}


class _RowsToSlots(torch.autograd.Function):
    """slots = rows[row_S]: each received row copied to its slots. The backward sums each row's slot
    gradients through a (R, J) layout (slot s at row_S * J + pos_S): no atomics, deterministic."""

    @staticmethod
    def forward(ctx, rows_RD, row_S, pos_S, J):
        ctx.save_for_backward(row_S, pos_S)
        ctx.R, ctx.J = rows_RD.shape[0], J
        return take_rows(rows_RD, row_S)

    @staticmethod
    def backward(ctx, grad_SD):
        row_S, pos_S = ctx.saved_tensors
        return _sum_into_rows(grad_SD, row_S, pos_S, ctx.R, ctx.J), None, None, None


class _SlotsToRows(torch.autograd.Function):
    """rows[r] = the sum of row r's slots (the adjoint of `_RowsToSlots`)."""

    @staticmethod
    def forward(ctx, slots_SD, row_S, pos_S, R, J):
        ctx.save_for_backward(row_S)
        return _sum_into_rows(slots_SD, row_S, pos_S, R, J)

    @staticmethod
    def backward(ctx, grad_RD):
        (row_S,) = ctx.saved_tensors
        return take_rows(grad_RD.contiguous(), row_S), None, None, None, None


def _sum_into_rows(slots_SD, row_S, pos_S, R, J):
    D = slots_SD.shape[-1]
    if J == 1:  # one slot per row: a permutation
        return put_rows(slots_SD.new_empty(R, D), row_S, slots_SD)
    buf = put_rows(slots_SD.new_zeros(R * J, D), row_S * J + pos_S, slots_SD.contiguous())
    return buf.view(R, J, D).sum(1)


def local_index_table(holders, num_ranks: int, device) -> torch.Tensor:
    """(P, E) int64 on `device`: expert e's index among rank d's local experts (sorted by id), -1
    where d lacks e."""
    table = [[-1] * len(holders) for _ in range(num_ranks)]
    for d in range(num_ranks):
        for i, e in enumerate(e for e, h in enumerate(holders) if d in h):
            table[d][e] = i
    return torch.tensor(table, dtype=torch.int64, device=device)


def pair_rows(dest_N: torch.Tensor, kept: torch.Tensor, T: int, K: int):
    """The kept slots grouped into one row per (destination, token), ordered by destination then
    token. Returns the slots in row order (by_pair), each one's destination, whether it opens its row
    (the first kept slot of a pair names the row), its row, and its place in the row. Slot ids are
    token-major, so sorting by (destination, slot) groups a pair's slots."""
    by_pair = kept[torch.argsort(dest_N[kept] * (T * K) + kept, stable=True)]
    tok, dst = by_pair // K, dest_N[by_pair]
    first = torch.ones_like(by_pair, dtype=torch.bool)
    first[1:] = (tok[1:] != tok[:-1]) | (dst[1:] != dst[:-1])
    row_of = torch.cumsum(first.long(), 0) - 1
    idx = torch.arange(by_pair.numel(), device=by_pair.device)
    pos = idx - torch.cummax(torch.where(first, idx, torch.zeros_like(idx)), 0).values
    return by_pair, dst, first, row_of, pos


def dedup_dispatch(x_TD: torch.Tensor, weights_TK: torch.Tensor, dest_N: torch.Tensor, kept: torch.Tensor,
                   local_index_PE: torch.Tensor, ids_N: torch.Tensor, experts, num_local: int, me: int, P: int,
                   group) -> tuple[torch.Tensor, dict]:
    """The layer's output (T, D) and its counters, sending each (token, destination rank) once."""
    T, K = weights_TK.shape
    D, dev, dtype = x_TD.shape[-1], ids_N.device, x_TD.dtype
    # 1. rows: one per (destination, token), ordered by destination then token
    by_pair, dst, first, row_of, pos = pair_rows(dest_N, kept, T, K)
    row_slot = by_pair[first]
    R = row_slot.numel()
    # 2. each row's slots: the destination's local expert index and the combine weight, K columns each
    at = row_of * K + pos
    lid_RK = torch.full((R * K,), -1, dtype=torch.int64, device=dev).index_put_((at,), local_index_PE[dst, ids_N[by_pair]])
    w_RK = torch.zeros(R * K, dtype=dtype, device=dev).index_put((at,), weights_TK.reshape(-1)[by_pair].to(dtype))
    as_int = _INT_OF_SIZE[x_TD.element_size()]
    payload = torch.cat([gather_slots(x_TD, row_slot, K, experts.kernels), w_RK.view(R, K),
                         lid_RK.to(as_int).view(dtype).view(R, K)], 1)
    # 3. exchange the row counts, then the rows to the expert ranks
    rows_P = torch.zeros(P, dtype=torch.int64, device=dev).index_add_(0, dst[first], torch.ones_like(row_slot))
    rows_in = rows_P.tolist()
    rows_out = exchange_counts(rows_P[:, None], group)[:, 0].tolist()
    recv = all_to_all(payload, rows_out, rows_in, group)
    x_recv, w_recv = recv[:, :D], recv[:, D:D + K]
    lid_recv = recv[:, D + K:].detach().contiguous().view(as_int).long()
    # 4. the received slots expert-major (sources in rank order within an expert), grouped GEMM,
    #    weigh, and sum each row's slots
    Rr = x_recv.shape[0]
    flat = lid_recv.flatten()
    sel = torch.nonzero(flat >= 0).flatten()
    o = sel[torch.argsort(flat[sel] * max(Rr, 1) + sel // K, stable=True)]
    row_S, pos_S = o // K, o % K
    J = int((lid_recv >= 0).sum(1).max()) if Rr else 1
    counts_L = expert_counts(flat[o], num_local)
    x_S = _RowsToSlots.apply(x_recv, row_S, pos_S, J)
    y_S = experts(x_S, counts_L) if num_local else x_S  # a rank with no expert here receives nothing
    y_rows = _SlotsToRows.apply(y_S * w_recv.reshape(-1)[o][:, None], row_S, pos_S, Rr, J)
    # 5. one row per (token, rank) back home; a token's output is the sum of its rows
    y_back = all_to_all(y_rows, rows_in, rows_out, group)
    out_TD = combine_slots(y_back, row_slot, torch.ones_like(weights_TK, dtype=y_back.dtype), experts.kernels)
    bytes_to = [(2 * D + 2 * K) * x_TD.element_size() * c if d != me else 0 for d, c in enumerate(rows_in)]
    counters = {
        "tokens_sent": sum(c for d, c in enumerate(rows_in) if d != me),
        "tokens_received": sum(c for s, c in enumerate(rows_out) if s != me),
        "slots_sent": int((dst != me).sum()),
        # one row each way, the outgoing one with its 2K slot columns; by EP rank
        "a2a_bytes": sum(bytes_to),
        "a2a_bytes_to": bytes_to,
        "tokens_per_local_expert": counts_L.tolist(),
    }
    return out_TD, counters
