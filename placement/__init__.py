"""moesaic.placement: which GPUs compute which experts, from routing statistics.

Pure numpy/scipy/PuLP: never torch.distributed, Hydra or wandb.
"""

from moesaic.placement.config import PlacementConfig

__all__ = ["PlacementConfig"]
