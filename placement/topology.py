"""GPUs, nodes and the hop cost between two GPUs: 0 on the same GPU, 1 within a node, and
`inter_node_cost` across nodes (default 2, or intra/inter bandwidth ratio)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, kw_only=True)
class Topology:
    num_gpus: int
    """GPUs (expert-parallel ranks) in all."""
    gpus_per_node: int = 0
    """GPUs per node; 0 means all GPUs in one node."""
    inter_node_cost: float = 2.0
    """Hop cost between GPUs of different nodes (within a node it is 1)."""

    def __post_init__(self) -> None:
        if self.num_gpus < 1:
            raise ValueError(f"num_gpus ({self.num_gpus}) must be >= 1")
        if self.gpus_per_node == 0:
            object.__setattr__(self, "gpus_per_node", self.num_gpus)
        if self.gpus_per_node < 1 or self.num_gpus % self.gpus_per_node:
            raise ValueError(f"gpus_per_node ({self.gpus_per_node}) must divide num_gpus ({self.num_gpus})")
        if self.inter_node_cost < 1:
            raise ValueError(f"inter_node_cost ({self.inter_node_cost}) must be >= 1 (the intra-node hop)")

    @classmethod
    def from_bandwidth(cls, num_gpus: int, gpus_per_node: int, intra_gbps: float, inter_gbps: float) -> "Topology":
        return cls(num_gpus=num_gpus, gpus_per_node=gpus_per_node, inter_node_cost=max(1.0, intra_gbps / inter_gbps))

    @property
    def num_nodes(self) -> int:
        return self.num_gpus // self.gpus_per_node

    def node_of(self) -> np.ndarray:
        return np.arange(self.num_gpus) // self.gpus_per_node

    def hop_matrix(self) -> np.ndarray:
        """(G, G) hop costs."""
        node = self.node_of()
        hop = np.where(node[:, None] == node[None, :], 1.0, self.inter_node_cost)
        np.fill_diagonal(hop, 0.0)
        return hop
