"""Hydra entry point: `moesaic-train [overrides]`, or `python -m moesaic.trainer [overrides]`.

Under torchrun: `torchrun --standalone --nproc_per_node 4 -m moesaic.trainer model.moe.num_experts=16`.
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from moesaic.trainer.config import register_configs, to_train_config
from moesaic.trainer.train import train

register_configs()


@hydra.main(version_base=None, config_path="pkg://moesaic.configs", config_name="config")
def main(cfg: DictConfig) -> None:
    try:
        train_cfg = to_train_config(cfg)
        train(train_cfg)
    except ValueError as e:  # bad input: one line naming the field, no traceback
        print(f"moesaic-train: error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    except FloatingPointError as e:  # a diverged run: say so plainly; the last checkpoint is kept
        print(f"moesaic-train: error: {e}", file=sys.stderr, flush=True)
        sys.exit(3)


if __name__ == "__main__":
    main()
