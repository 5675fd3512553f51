"""moesaic.parallel: the MoE layer's pieces (router, dispatch, grouped experts) and the
parallelisms applied to a model. Knows process groups and collectives; never Hydra or wandb."""

from moesaic.parallel.config import ParallelConfig
from moesaic.parallel.experts import GroupedExperts, grouped_swiglu, looped_swiglu
from moesaic.parallel.moe import MoE, MoEConfig
from moesaic.parallel.router import RouterConfig, RouterOutput, TopKRouter

__all__ = [
    "GroupedExperts",
    "MoE",
    "MoEConfig",
    "ParallelConfig",
    "RouterConfig",
    "RouterOutput",
    "TopKRouter",
    "grouped_swiglu",
    "looped_swiglu",
]
