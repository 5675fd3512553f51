"""Placement options as the trainer reads them (pure dataclass)."""

from __future__ import annotations

from dataclasses import dataclass

_METHODS = ("affinity", "moetuner", "eplb", "contiguous", "round_robin")


@dataclass(kw_only=True)
class PlacementConfig:
    """Which plan the expert-parallel layer follows, and when and how to re-plan."""

    plan: str = "contiguous"
    """The starting plan: `contiguous`, `round_robin`, or a path to a `moesaic.placement/v1` file."""
    every_n_steps: int = 0
    """Re-plan from live routing statistics every N steps (0: never)."""
    method: str = "eplb"
    """Solver for re-placement: eplb (balance), affinity, moetuner, contiguous or round_robin."""
    epsilon: float = 0.05
    """Load tolerance above the best balance (affinity)."""
    time_limit: float = 30.0
    """Seconds the solver may take."""
    solver: str = "highs"
    """MILP solver: highs or cbc."""
    ema_decay: float = 0.5
    """Older statistics fade by this factor at every re-plan (0: only the last window counts)."""
    adopt_after_steps: int = 3
    """Steps between the start of a solve (in the background) and the first boundary where the plan
    may be adopted."""
    wait_for_plan: bool = True
    """True: every rank waits at adopt_after_steps for the solver, so the adoption step is the same in
    every run. False: adopt at the first step boundary, from adopt_after_steps on, at which the
    solver has finished (a one-flag broadcast per step while a plan is pending), so training never
    stalls; that pays where the solver has cores of its own, not where it competes with the ranks
    (bench/RESULTS.md, "Re-placement during training")."""
    align_owners: bool = True
    """FSSDP: each expert's owner is a GPU that the plan has compute it (an assignment that keeps
    every GPU's owned count), at start and at every re-plan, where the owned parameters and AdamW
    moments move once; then experts without replicas are computed in place, not gathered every
    step. False keeps the owners fixed: a new plan moves nothing, and every step gathers instead.
    Off while parallel.reshard_every_n_steps (Hecate's owners by load) is on."""
    slots_per_gpu: int = 0
    """Experts each GPU computes per layer in re-placed plans (0: the fewest that fit, ceil(E / GPUs));
    more slots hold replicas of hot experts (under FSSDP they cost gather bytes, not resident memory)."""
    inter_node_cost: float = 2.0
    """Hop cost across nodes relative to 1 within a node."""
    dynamic_replicas: int = 0
    """FSSDP only: each step, add up to this many replicas per layer of the experts predicted hot
    (Hecate's Algorithm 1) on top of the current plan; 0 turns it off."""
    predictor_window: int = 5
    """Steps of routing history whose mean predicts the next step's loads (dynamic replicas)."""

    def __post_init__(self) -> None:
        if self.every_n_steps < 0:
            raise ValueError(f"placement.every_n_steps ({self.every_n_steps}) must be >= 0")
        if self.method not in _METHODS:
            raise ValueError(f"placement.method ({self.method!r}) must be one of {', '.join(_METHODS)}")
        if self.solver not in ("highs", "cbc"):
            raise ValueError(f"placement.solver ({self.solver!r}) must be 'highs' or 'cbc'")
        if not 0 <= self.ema_decay <= 1:
            raise ValueError(f"placement.ema_decay ({self.ema_decay}) must be in [0, 1]")
        if self.adopt_after_steps < 0:
            raise ValueError(f"placement.adopt_after_steps ({self.adopt_after_steps}) must be >= 0")
        if self.time_limit <= 0:
            raise ValueError(f"placement.time_limit ({self.time_limit}) must be > 0")
        if self.slots_per_gpu < 0:
            raise ValueError(f"placement.slots_per_gpu ({self.slots_per_gpu}) must be >= 0 (0: ceil(experts / GPUs))")
        if self.dynamic_replicas < 0:
            raise ValueError(f"placement.dynamic_replicas ({self.dynamic_replicas}) must be >= 0")
        if self.predictor_window < 1:
            raise ValueError(f"placement.predictor_window ({self.predictor_window}) must be >= 1")
        if self.epsilon < 0:
            raise ValueError(f"placement.epsilon ({self.epsilon}) must be >= 0")
