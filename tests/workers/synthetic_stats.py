"""Synthetic routing statistics whose ILPs are hard: dense inter-layer flows, so that every pair of
experts has affinity. Shared by `tests/test_placement.py` and `orphan_solver.py` (which runs as a
script and imports this module from its own folder)."""

import numpy as np

from moesaic.placement.stats import RoutingStats


def dense_stats(num_layers: int = 8, num_experts: int = 64, seed: int = 0) -> RoutingStats:
    """Loads from Dirichlet(0.5) per layer, scaled to 1e5 tokens; each expert's flow to the next
    layer is split by Dirichlet(0.3); top-2."""
    rng = np.random.default_rng(seed)
    P = rng.dirichlet(np.full(num_experts, 0.5), size=num_layers) * 1e5
    W = rng.dirichlet(np.full(num_experts, 0.3), size=(num_layers - 1, num_experts)) * P[:-1, :, None]
    return RoutingStats(P, W, 1e5, 2, [])
