"""`Placement`: for each MoE layer, for each expert, the sorted GPU ranks that compute it.

Round-trips to the `moesaic.placement/v1` JSON:
    {"format": "moesaic.placement/v1", "num_layers": L, "num_gpus": G, "gpus_per_node": N,
     "placement": [[[ranks of expert 0], [ranks of expert 1], ...] per layer], "meta": {...}}
Layers may have different expert counts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

FORMAT = "moesaic.placement/v1"


class PlanError(ValueError):
    """A plan file or plan that breaks a rule; the message names the field and the value."""


@dataclass(frozen=True)
class Placement:
    num_gpus: int
    gpus_per_node: int
    placement: tuple[tuple[tuple[int, ...], ...], ...]  # [layer][expert] -> sorted GPU ranks
    meta: dict = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        frozen = tuple(tuple(tuple(sorted(int(g) for g in gpus)) for gpus in layer) for layer in self.placement)
        object.__setattr__(self, "placement", frozen)
        validate(self)

    # -- shape ---------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return len(self.placement)

    def num_experts(self, layer: int = 0) -> int:
        return len(self.placement[layer])

    def replicas(self, layer: int) -> np.ndarray:
        """Number of GPUs holding each expert of `layer`, shape (E,)."""
        return np.array([len(g) for g in self.placement[layer]], dtype=np.int64)

    def holds(self, layer: int) -> np.ndarray:
        """Boolean (E, G): does GPU g hold expert e at `layer`."""
        out = np.zeros((self.num_experts(layer), self.num_gpus), dtype=bool)
        for e, gpus in enumerate(self.placement[layer]):
            out[e, list(gpus)] = True
        return out

    def experts_on(self, layer: int, gpu: int) -> list[int]:
        return [e for e, gpus in enumerate(self.placement[layer]) if gpu in gpus]

    def slots_used(self) -> int:
        """The most experts any GPU holds in any layer."""
        return max(int(self.holds(l).sum(0).max()) for l in range(self.num_layers))

    # -- construction and I/O ----------------------------------------------------------------
    @classmethod
    def from_gpu_of_expert(cls, gpu_of_expert_LE, num_gpus: int, gpus_per_node: int | None = None, meta=None):
        """One GPU per expert: an int array (L, E)."""
        arr = np.asarray(gpu_of_expert_LE)
        placement = [[(int(g),) for g in row] for row in arr]
        return cls(num_gpus, gpus_per_node or num_gpus, placement, dict(meta or {}))

    @classmethod
    def from_holds(cls, holds_LEG: list[np.ndarray], num_gpus: int, gpus_per_node: int, meta=None):
        placement = [[tuple(np.flatnonzero(row).tolist()) for row in h] for h in holds_LEG]
        return cls(num_gpus, gpus_per_node, placement, dict(meta or {}))

    def to_dict(self) -> dict:
        return {
            "format": FORMAT,
            "num_layers": self.num_layers,
            "num_gpus": self.num_gpus,
            "gpus_per_node": self.gpus_per_node,
            "placement": [[list(g) for g in layer] for layer in self.placement],
            "meta": _jsonable(self.meta),
        }

    def save(self, path: str | Path) -> None:
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=1) + "\n")
        tmp.replace(path)

    @classmethod
    def from_dict(cls, d: dict, *, source: str = "plan") -> "Placement":
        if not isinstance(d, dict):
            raise PlanError(f"{source}: top level must be a JSON object")
        if d.get("format") != FORMAT:
            raise PlanError(f"{source}: format ({d.get('format')!r}) must be {FORMAT!r}")
        for key in ("num_layers", "num_gpus", "gpus_per_node", "placement"):
            if key not in d:
                raise PlanError(f"{source}: missing key {key!r}")
        layers = d["placement"]
        if not isinstance(layers, list) or len(layers) != d["num_layers"]:
            n = len(layers) if isinstance(layers, list) else type(layers).__name__
            raise PlanError(f"{source}: placement has {n} layers, but num_layers is {d['num_layers']}")
        try:
            return cls(int(d["num_gpus"]), int(d["gpus_per_node"]), layers, dict(d.get("meta") or {}))
        except PlanError as e:
            raise PlanError(f"{source}: {e}") from None
        except (TypeError, ValueError) as e:
            raise PlanError(f"{source}: malformed placement ({e})") from None

    @classmethod
    def load(cls, path: str | Path) -> "Placement":
        path = Path(path)
        try:
            d = json.loads(path.read_text())
        except FileNotFoundError:
            raise PlanError(f"plan file {str(path)!r} does not exist") from None
        except json.JSONDecodeError as e:
            raise PlanError(f"plan file {str(path)!r} is not valid JSON: {e}") from None
        return cls.from_dict(d, source=f"plan file {str(path)!r}")


def validate(plan: Placement) -> None:
    if plan.num_gpus < 1:
        raise PlanError(f"num_gpus ({plan.num_gpus}) must be >= 1")
    if plan.gpus_per_node < 1 or plan.num_gpus % plan.gpus_per_node:
        raise PlanError(f"gpus_per_node ({plan.gpus_per_node}) must divide num_gpus ({plan.num_gpus})")
    if not plan.placement:
        raise PlanError("placement has no layers")
    for l, layer in enumerate(plan.placement):
        if not layer:
            raise PlanError(f"placement[{l}] has no experts")
        for e, gpus in enumerate(layer):
            if not gpus:
                raise PlanError(f"placement[{l}][{e}]: expert {e} of layer {l} has no GPU")
            if len(set(gpus)) != len(gpus):
                raise PlanError(f"placement[{l}][{e}] ({list(gpus)}) lists a GPU twice")
            bad = [g for g in gpus if not 0 <= g < plan.num_gpus]
            if bad:
                raise PlanError(f"placement[{l}][{e}]: GPU id {bad[0]} is out of range [0, {plan.num_gpus})")


def check_fits(plan: Placement, *, num_layers: int, num_experts: int, num_gpus: int) -> None:
    """Refuse a plan that does not match the model or the world it is applied to."""
    if plan.num_layers != num_layers:
        raise PlanError(f"plan has {plan.num_layers} layers, but the model has {num_layers} MoE layers")
    if plan.num_gpus != num_gpus:
        raise PlanError(f"plan is for {plan.num_gpus} GPUs, but the expert-parallel group has {num_gpus} ranks")
    for l in range(plan.num_layers):
        if plan.num_experts(l) != num_experts:
            raise PlanError(f"plan layer {l} has {plan.num_experts(l)} experts, but the model has {num_experts}")


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, float) and obj != obj:
        return None
    return obj
