"""Hydra entry point: `moesaic-train [overrides]`, or `python -m moesaic.trainer [overrides]`.

Under torchrun: `torchrun --standalone --nproc_per_node 4 -m moesaic.trainer model.moe.num_experts=16`.
"""

from __future__ import annotations

import os
import sys

import hydra
from omegaconf import DictConfig

from moesaic.parallel.process import exit_rank
from moesaic.trainer.config import register_configs, to_train_config
from moesaic.trainer.preempt import Preemption, requeue_defaults, requeue_job
from moesaic.trainer.train import train

register_configs()


@hydra.main(version_base=None, config_path="pkg://moesaic.configs", config_name="config")
def main(cfg: DictConfig) -> None:
    try:
        train_cfg = requeue_defaults(to_train_config(cfg))
        summary = train(train_cfg)
    except ValueError as e:  # bad input: one line naming the field, no traceback
        _error(e, 2)
    except FloatingPointError as e:  # a diverged run: say so plainly; the last checkpoint is kept
        _error(e, 3)
    except TimeoutError as e:  # a rendezvous that never completed
        _error(e, 4)
    if summary["stopped_by"]:  # the checkpoint is written; tell the scheduler that the run did not finish,
        # and skip the interpreter's teardown as main_cli does (see moesaic.parallel.process): a sweep ends here too
        if train_cfg.launcher.requeue and os.environ.get("SLURM_JOB_ID") and os.environ.get("RANK", "0") == "0":
            requeue_job()
        exit_rank(Preemption.exit_code(summary["stopped_by"]))


def _error(e: Exception, code: int) -> None:
    """One line per rank, the field and the rule, no traceback; HYDRA_FULL_ERROR=1 (Hydra's own switch)
    lets the error through with its traceback, for an error that is a bug rather than bad input."""
    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        raise e
    # one write per line, so that the ranks' lines do not interleave on a shared terminal
    sys.stderr.write(f"moesaic-train: error: {e}\n")
    sys.stderr.flush()
    sys.exit(code)


def _take_local_rank_arg() -> None:
    """The DeepSpeed launcher passes `--local_rank=N`, which Hydra would read as an override."""
    argv, out, i = sys.argv, [], 0
    while i < len(argv):
        a = argv[i]
        if a.startswith("--local_rank=") or a.startswith("--local-rank="):
            os.environ.setdefault("LOCAL_RANK", a.split("=", 1)[1])
        elif a in ("--local_rank", "--local-rank") and i + 1 < len(argv):
            os.environ.setdefault("LOCAL_RANK", argv[i + 1])
            i += 1
        else:
            out.append(a)
        i += 1
    sys.argv[:] = out


def main_cli() -> None:
    _take_local_rank_arg()
    main()
    exit_rank(0)  # everything is written: skip the interpreter's teardown (see moesaic.parallel.process)


if __name__ == "__main__":
    main_cli()
