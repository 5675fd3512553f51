"""Shared helpers: launch torchrun jobs of the real trainer and read their run directories."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(**extra: str) -> dict:
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": "1", "WANDB_SILENT": "true", "PYTHONUNBUFFERED": "1"})
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))  # DeepSpeed's JIT ops
    env.update(extra)
    return env


def torchrun(nproc: int, args: list[str], *, timeout: float = 300, module: str = "moesaic.trainer", cwd=None,
             env: dict | None = None):
    """Run `torchrun --standalone --nproc_per_node N -m module args` and return the CompletedProcess."""
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
        "--standalone",
        "-m", module, *args,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=child_env(**(env or {})), cwd=cwd)
    if proc.returncode != 0:
        raise AssertionError(f"torchrun failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc


_LAUNCHED: dict = {}


def launch_once(key, cmd: list, *, timeout: float = 900) -> subprocess.CompletedProcess:
    """Run `cmd` the first time `key` is asked for in this pytest process, and return that run's
    CompletedProcess every time: the cases of a shared launch (ids `launch<key>-...`, which one
    xdist worker runs, see the scheduler below) each read their own report from it."""
    if key not in _LAUNCHED:
        _LAUNCHED[key] = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout,
                                        env=child_env())
    return _LAUNCHED[key]


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def train_losses(run_dir: Path) -> dict[int, float]:
    """{step: train loss}; a resumed run's later lines win."""
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if r["kind"] == "train"}


def flat_checkpoint(ckpt_dir: Path) -> dict:
    """A DCP checkpoint folder as one flat state dict (through a .pt file beside it)."""
    import torch
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = ckpt_dir.parent / (ckpt_dir.name + ".pt")
    dcp_to_torch_save(str(ckpt_dir), str(out))
    return torch.load(out, weights_only=True)


@pytest.fixture
def shared_dir() -> Path:
    return SHARED


# Files whose tests one pytest-xdist worker runs, one after another: the local SLURM cluster has 2
# nodes, and the SLURM fixture, where it finds no cluster free, starts one and stops it afterwards,
# under the other worker's jobs. (xdist's own `--dist loadgroup` does not group with pytest 9: it
# renames `item._nodeid`, which pytest 9 no longer reads.)
ONE_WORKER_FILES = ("tests/test_launch.py",)
# Parametrized cases that share one launch have ids that start with `launch<key>-` (e.g. the cases
# of tests/ep_cases.py, in two test files: one torchrun per world size runs all of them): one worker
# runs every case of a launch, whichever file holds it, so that the launch runs once.
LAUNCH_ID = re.compile(r"\[(launch[^-\]]*)-")


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    from xdist.scheduler import LoadScopeScheduling

    class Scheduler(LoadScopeScheduling):
        """One unit of work per test, except one per file in ONE_WORKER_FILES and one per shared
        launch (xdist hands out the units with the most tests first)."""

        def _split_scope(self, nodeid: str) -> str:
            path = nodeid.split("::", 1)[0]
            if path in ONE_WORKER_FILES:
                return path
            launch = LAUNCH_ID.search(nodeid)
            return launch.group(1) if launch else nodeid

    return Scheduler(config, log)


def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist (`make test`), hand out the slow tests first, so that neither worker is
    left with a long end-to-end test while the other has nothing to do. One process (`-n 0`) keeps
    the file order."""
    if hasattr(config, "workerinput"):
        items.sort(key=lambda it: it.get_closest_marker("slow") is None)
