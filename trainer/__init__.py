"""moesaic.trainer: the model, data, loop, logging and the Hydra entry point.

`train(cfg)` takes a validated `TrainConfig`; `moesaic-train` builds one from `configs/`.
"""

from moesaic.trainer.config import TrainConfig
from moesaic.trainer.model import ModelConfig, Transformer

__all__ = ["ModelConfig", "TrainConfig", "Transformer"]
