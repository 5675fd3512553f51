"""FSSDP's gather schedule: for one layer and one plan, which owned rows a rank sends to whom in the
SparseAllGather, and where the rows it receives go. The SparseReduceScatter runs the same schedule
backwards. Pure: built from the plan's holders and the owners alone. Also the owners a run starts
from, and whether a layer needs no gather at all (the trainer and `moesaic-estimate` both use them)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moesaic.placement.plan import Placement


def even_owners(num_experts: int, num_ranks: int) -> np.ndarray:
    """(E,) owner of each expert: contiguous, as even as possible (Hecate's default sharding)."""
    return (np.arange(num_experts) * num_ranks) // num_experts


def start_owners(plan: Placement, num_ranks: int, align: bool) -> np.ndarray:
    """(L, E) owners of a fresh run: even contiguous shards, or, with `align` (placement.align_owners),
    moved to GPUs that the plan has compute them (a fresh model holds every expert: this moves nothing)."""
    even = np.tile(even_owners(plan.num_experts(), num_ranks), (plan.num_layers, 1))
    if not align:
        return even
    from moesaic.placement.dynamic import aligned_owners

    return aligned_owners(plan, even)


def computes_in_place(holders, owners) -> bool:
    """Every expert of the layer computed by its owner alone, on every rank (the plan and owners are
    global): the layer computes with the owned shard in place, and nothing is gathered or scattered."""
    return all(tuple(h) == (int(owners[e]),) for e, h in enumerate(holders))


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
