"""Token-deduplicated dispatch (`parallel.token_dedup`): each token travels once to each rank that
computes any of its experts, as DeepEP dispatches, instead of once per token-slot as Megatron's and
DeepSpeed's all-to-all do. The expert rank expands the row to the token's slots there, computes them,
and sums their weighted outputs, so one row goes back as well. The slots' combine weights travel with
the rows (one value per slot), and their gradients come back the same way.

A token whose k experts sit on r distinct ranks moves r rows each way instead of k: fewer bytes where
fine-grained experts share ranks (e.g. 64 experts, top-6, 8 ranks: 4.5 distinct ranks per token on
uniform routing). The math is the layer's; only the order of the combine's sum changes.

Legend: T local tokens, K top-k, N = T*K token-slots, D model dim, E experts, P ep ranks,
R rows (one per token and destination rank), S slots received, J the most slots one row has here.
"""

from __future__ import annotations

import torch

from moesaic.parallel.all_to_all import all_to_all, exchange_counts
from moesaic.parallel.experts import combine_slots, gather_slots, put_rows, take_rows


class _RowsToSlots(torch.autograd.Function):
    """slots_SD = rows_RD[row_S]: each received row copied to its slots. The backward sums each row's
    slot gradients through a (R, J) layout (slot s at row_S * J + pos_S): no atomics, deterministic."""

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
    """rows_RD[r] = sum of the slots of row r (the adjoint of `_RowsToSlots`)."""

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
    buf = put_rows(slots_SD.new_zeros(R * J, D), row_S * J + pos_S, slots_SD.contiguous())
    return buf.view(R, J, D).sum(1)


def _positions(row_S: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Each slot's index among the slots of its row (0, 1, ...), and the most slots one row has."""
    if row_S.numel() == 0:
        return row_S.clone(), 1
    order = torch.argsort(row_S, stable=True)
    sorted_rows = row_S[order]
    new_run = torch.ones_like(sorted_rows, dtype=torch.bool)
    new_run[1:] = sorted_rows[1:] != sorted_rows[:-1]
    idx = torch.arange(row_S.numel(), device=row_S.device)
    run_start = torch.cummax(torch.where(new_run, idx, torch.zeros_like(idx)), 0).values
    pos = torch.empty_like(row_S)
    pos[order] = idx - run_start
    return pos, int(pos.max()) + 1


def dedup_dispatch(x_TD: torch.Tensor, weights_TK: torch.Tensor, ids_N: torch.Tensor, dest_N: torch.Tensor,
                   kept: torch.Tensor, experts, local_experts: list[int], me: int, P: int, E: int, group,
                   source_to_expert_major) -> tuple[torch.Tensor, dict]:
    """The layer's output (T, D) and its counters, sending each (token, destination rank) once."""
    T, K = weights_TK.shape
    dev = ids_N.device
    # 1. rows: one per (destination, token), ordered by destination then token; the first kept slot of
    #    each pair names it (slot ids are token-major, so sorting by (dest, slot) groups the pairs)
    by_pair = kept[torch.argsort(dest_N[kept] * (T * K) + kept, stable=True)]
    tok, dst = by_pair // K, dest_N[by_pair]
    first = torch.ones_like(by_pair, dtype=torch.bool)
    first[1:] = (tok[1:] != tok[:-1]) | (dst[1:] != dst[:-1])
    row_slot = by_pair[first]
    row_of_slot = torch.full((T * K,), -1, dtype=torch.int64, device=dev)
    row_of_slot[by_pair] = torch.cumsum(first.long(), 0) - 1
    rows_P = torch.zeros(P, dtype=torch.int64, device=dev).index_add_(0, dst[first], torch.ones_like(row_slot))
    row_start_P = torch.cumsum(rows_P, 0) - rows_P
    # 2. slots: ordered by (destination, expert) as the receiver's experts want them; each names its row
    #    within its destination's block, and carries its combine weight
    order = kept[torch.argsort(dest_N[kept] * E + ids_N[kept], stable=True)]
    rel_S = row_of_slot[order] - row_start_P[dest_N[order]]
    w_S = weights_TK.reshape(-1)[order].to(x_TD.dtype)
    # 3. exchange the (destination, expert) slot counts and the row counts, in one all-to-all
    send_PE = torch.zeros(P, E, dtype=torch.int64, device=dev)
    send_PE.index_put_((dest_N[order], ids_N[order]), torch.ones_like(order), accumulate=True)
    recv = exchange_counts(torch.cat([send_PE, rows_P[:, None]], 1), group)
    recv_PE, recv_rows_P = recv[:, :E], recv[:, E]
    rows_in, rows_out = rows_P.tolist(), recv_rows_P.tolist()
    slots_in, slots_out = send_PE.sum(1).tolist(), recv_PE.sum(1).tolist()
    # 4. the rows to the expert ranks; then each slot's row index and weight, as one float64 pair
    #    (exact for both; the weight's gradient comes back through the same all-to-all)
    x_recv = all_to_all(gather_slots(x_TD, row_slot, K, experts.kernels), rows_out, rows_in, group)
    meta = all_to_all(torch.stack([rel_S.double(), w_S.double()], 1), slots_out, slots_in, group)
    rel_recv, w_recv = meta[:, 0].long(), meta[:, 1].to(x_TD.dtype)
    # 5. expand rows to slots, regroup expert-major, grouped GEMM, weigh, sum each row's slots
    src_S = torch.repeat_interleave(torch.arange(P, device=dev), recv_PE.sum(1), output_size=rel_recv.numel())
    recv_row_start = torch.cumsum(recv_rows_P, 0) - recv_rows_P
    row_S = rel_recv + recv_row_start[src_S]
    pos_S, J = _positions(row_S)
    x_slots = _RowsToSlots.apply(x_recv, row_S, pos_S, J)
    cnt_PL = recv_PE[:, local_experts]
    if len(local_experts):
        perm = source_to_expert_major(cnt_PL)
        y = experts(x_slots[perm], cnt_PL.sum(0))
        y_slots = torch.empty_like(y).index_copy(0, perm, y)
    else:  # this rank computes no expert in this layer: it receives nothing
        y_slots = x_slots
    y_rows = _SlotsToRows.apply(y_slots * w_recv[:, None], row_S, pos_S, x_recv.shape[0], J)
    # 6. one row per (token, rank) back home; a token's output is the sum of its rows
    y_back = all_to_all(y_rows, rows_in, rows_out, group)
    out_TD = combine_slots(y_back, row_slot, torch.ones_like(weights_TK, dtype=y_back.dtype), experts.kernels)
    row_bytes = x_TD.shape[-1] * x_TD.element_size()
    rows_away = sum(c for d, c in enumerate(rows_in) if d != me)
    slots_away = sum(c for d, c in enumerate(slots_in) if d != me)
    counters = {
        "tokens_sent": rows_away,
        "tokens_received": sum(c for s, c in enumerate(rows_out) if s != me),
        "slots_sent": slots_away,
        # the rows each way, and each slot's (row index, weight) on the way out
        "a2a_bytes": 2 * row_bytes * rows_away + meta.element_size() * 2 * slots_away,
        "tokens_per_local_expert": cnt_PL.sum(0).tolist(),
    }
    return out_TD, counters
