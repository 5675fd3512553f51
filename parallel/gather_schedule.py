"""FSSDP's gather schedule: for one layer and one plan, which owned rows a rank sends to whom in the
SparseAllGather, and where the rows it receives go. The SparseReduceScatter runs the same schedule
backwards. Pure: built from the plan's holders and the owners alone."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class GatherSchedule:
    """Who sends which expert to whom, for one layer and one plan, as seen from one rank."""

    send_rows: tuple[int, ...]  # owned-row index of each row sent, ordered by (dest, expert)
    in_splits: tuple[int, ...]  # rows sent to each rank
    out_splits: tuple[int, ...]  # rows received from each rank
    recv_to_local: tuple[int, ...]  # received row -> position among this rank's compute experts

    @classmethod
    def build(cls, holders: tuple[tuple[int, ...], ...], owners: np.ndarray, rank: int, P: int) -> "GatherSchedule":
        owned = [e for e in range(len(holders)) if owners[e] == rank]
        row_of = {e: i for i, e in enumerate(owned)}
        sends = sorted((d, e) for e in owned for d in holders[e])
        compute = [e for e, h in enumerate(holders) if rank in h]
        pos = {e: i for i, e in enumerate(compute)}
        recvs = sorted((int(owners[e]), e) for e in compute)
        return cls(tuple(row_of[e] for _, e in sends), tuple(sum(1 for d, _ in sends if d == r) for r in range(P)),
                   tuple(sum(1 for s, _ in recvs if s == r) for r in range(P)), tuple(pos[e] for _, e in recvs))

    def bytes_sent(self, row_bytes: int, rank: int) -> int:
        return row_bytes * sum(n for r, n in enumerate(self.in_splits) if r != rank)
