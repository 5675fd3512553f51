"""The trainer, with an error raised on one rank at one step (fault injection for
tests/test_checkpoint.py): `python failing_rank.py RANK STEP <hydra overrides>` under torchrun. The
other ranks go on into that step's collectives, which the failing rank never joins."""

import sys

import moesaic.trainer.train as train_module
from moesaic.trainer.main import main_cli

FAIL_RANK, FAIL_STEP = int(sys.argv.pop(1)), int(sys.argv.pop(1))
_train_step = train_module.train_step


def train_step(step, **kw):
    if kw["info"].rank == FAIL_RANK and step == FAIL_STEP:
        raise RuntimeError(f"injected failure on rank {FAIL_RANK} at step {FAIL_STEP}")  # (0-based)
    return _train_step(step, **kw)


train_module.train_step = train_step
main_cli()
