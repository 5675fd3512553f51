"""moesaic.placement: which GPUs compute which experts, from routing statistics.

Pure numpy/scipy/PuLP: never torch.distributed, Hydra or wandb. Arrays in, a `Placement` out:

    stats = stats_from_traces(["coding.json", "math.json"])
    plan = solve("affinity", stats, Topology(num_gpus=4), epsilon=0.05)
    evaluate(plan, stats)  # cross_gpu_share, hop_cost, load_max, load_mean, max_pair_traffic
"""

from moesaic.placement.config import PlacementConfig
from moesaic.placement.metrics import evaluate
from moesaic.placement.plan import FORMAT, Placement, PlanError, check_fits
from moesaic.placement.solve import METHODS, solve
from moesaic.placement.stats import RoutingStats, combine
from moesaic.placement.topology import Topology
from moesaic.placement.traces import PRESETS, TraceError, load_trace, stats_from_traces, synth

__all__ = [
    "FORMAT", "METHODS", "PRESETS", "Placement", "PlacementConfig", "PlanError", "RoutingStats", "Topology",
    "TraceError", "check_fits", "combine", "evaluate", "load_trace", "solve", "stats_from_traces", "synth",
]
