"""Placement options as the trainer reads them (pure dataclass)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(kw_only=True)
class PlacementConfig:
    """Which plan the expert-parallel layer follows, and when to re-plan."""

    plan: str = "contiguous"
    """`contiguous`, `round_robin`, or a path to a `moesaic.placement/v1` plan file."""
    every_n_steps: int = 0
    """Re-plan from live routing statistics every N steps (0: never)."""

    def __post_init__(self) -> None:
        if self.every_n_steps < 0:
            raise ValueError(f"placement.every_n_steps ({self.every_n_steps}) must be >= 0")
