"""`RoutingStats`: expert loads P[l, e] and inter-layer flows W[l, i, j], the solvers' input.

From per-token top-k choices experts[t, l, :]:
    P[l, e]    += 1 for every slot of token t at layer l routed to e (token-slots);
    W[l, a, b] += 1/k for every a in token t's top-k at layer l and b in its top-k at layer l+1.
The affinity is W normalised by rows: P(j at l+1 | i at l) (ExFlow, MoETuner).
Legend: T tokens, L layers, K top-k, E experts.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class RoutingStats:
    P: np.ndarray  # (L, E) float64 token-slots per expert
    W: np.ndarray  # (L-1, E, E) float64 inter-layer flows
    num_tokens: float = 0.0
    top_k: int = 0
    sources: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.P = np.asarray(self.P, dtype=np.float64)
        self.W = np.asarray(self.W, dtype=np.float64)
        L, E = self.P.shape
        if self.W.shape != (max(L - 1, 0), E, E):
            raise ValueError(f"W has shape {self.W.shape}, expected {(max(L - 1, 0), E, E)} for P of shape {(L, E)}")

    @property
    def num_layers(self) -> int:
        return self.P.shape[0]

    @property
    def num_experts(self) -> int:
        return self.P.shape[1]

    @classmethod
    def zeros(cls, num_layers: int, num_experts: int, top_k: int = 0) -> "RoutingStats":
        return cls(np.zeros((num_layers, num_experts)), np.zeros((max(num_layers - 1, 0), num_experts, num_experts)), 0.0, top_k)

    @classmethod
    def from_experts(cls, experts_TLK: np.ndarray, num_experts: int | None = None, *, source: str = "") -> "RoutingStats":
        ex = np.asarray(experts_TLK, dtype=np.int64)
        if ex.ndim != 3:
            raise ValueError(f"experts must have shape (tokens, layers, k), got {ex.shape}")
        T, L, K = ex.shape
        E = int(num_experts if num_experts is not None else (ex.max() + 1 if ex.size else 0))
        P = np.stack([np.bincount(ex[:, l].ravel(), minlength=E) for l in range(L)]).astype(np.float64) if L else np.zeros((0, E))
        W = np.zeros((max(L - 1, 0), E, E))
        for l in range(L - 1):
            pairs = (ex[:, l, :, None] * E + ex[:, l + 1, None, :]).ravel()  # (T, K, K) pairs
            W[l] = np.bincount(pairs, minlength=E * E).reshape(E, E) / K
        return cls(P, W, float(T), K, [source] if source else [])

    def __add__(self, other: "RoutingStats") -> "RoutingStats":
        if self.P.shape != other.P.shape:
            raise ValueError(f"cannot add routing statistics of shapes {self.P.shape} and {other.P.shape}")
        return RoutingStats(self.P + other.P, self.W + other.W, self.num_tokens + other.num_tokens,
                            self.top_k or other.top_k, self.sources + other.sources)

    def scaled(self, factor: float) -> "RoutingStats":
        return RoutingStats(self.P * factor, self.W * factor, self.num_tokens * factor, self.top_k, list(self.sources))

    def ema(self, new: "RoutingStats", decay: float) -> "RoutingStats":
        """decay * self + new: older windows fade geometrically (decay in [0, 1])."""
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"decay ({decay}) must be in [0, 1]")
        return self.scaled(decay) + new

    def affinity(self) -> np.ndarray:
        """(L-1, E, E) row-normalised W: P(expert j at l+1 | expert i at l)."""
        rows = self.W.sum(axis=2, keepdims=True)
        return np.divide(self.W, rows, out=np.zeros_like(self.W), where=rows > 0)

    @classmethod
    def load_npz(cls, path) -> "RoutingStats":
        """Statistics written by the trainer (`routing_stats.npz`: P, W, num_tokens, top_k)."""
        z = np.load(path)
        return cls(z["P"], z["W"], float(z["num_tokens"]), int(z["top_k"]), [str(path)])

    def to_npz_dict(self) -> dict:
        return {"P": self.P, "W": self.W, "num_tokens": np.float64(self.num_tokens), "top_k": np.int64(self.top_k)}


def combine(stats: list[RoutingStats]) -> RoutingStats:
    """Sum several traces' statistics (over tokens)."""
    if not stats:
        raise ValueError("no routing statistics to combine")
    out = stats[0]
    for s in stats[1:]:
        out = out + s
    return out
