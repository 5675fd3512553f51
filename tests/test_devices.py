"""Tensors on the model's device: what a GPU run needs and this machine cannot show by itself.

On the CPU every tensor lands on the one device, so a tensor that moesaic's code makes without naming
its device runs here and fails on a GPU, where it lands on the CPU beside CUDA tensors. The eighteenth
session's first GPU run of the trainer and of moesaic-doctor failed so: the EP and FSSDP dispatchers
built their plan's index tables after the model had moved to the GPU, on the CPU. The worker
(`tests/workers/device_check.py`) records every factory call from moesaic's sources that names no
device once the model is built; these tests train through each dispatch path with it, re-plan,
checkpoint and resume, and ask for none. They also ask that the model reach `parallelize` still on
the meta device: the trainer shards the experts before a rank allocates anything."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO, child_env
from moesaic.parallel.expert_parallel import ExpertParallelDispatcher, LayerPlan
from moesaic.parallel.experts import GroupedExperts

WORKER = REPO / "tests" / "workers" / "device_check.py"


def _checked_run(tmp_path: Path, name: str, nproc: int, args: list[str]) -> list[str]:
    """Train under the worker; return the offending call sites of all ranks."""
    out = tmp_path / name
    out.mkdir()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), str(WORKER),
           str(out), "experiment=smoke", f"logging.out_dir={tmp_path / 'runs'}", f"logging.run_name={name}", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=child_env())
    assert proc.returncode == 0, f"{name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    files = sorted(out.glob("rank*.txt"))
    assert len(files) == nproc, f"{name}: the worker wrote {len(files)} of {nproc} rank files"
    # the trainer shards the experts before anything is allocated (no rank holds the whole model)
    built = [f.read_text() for f in sorted(out.glob("rank*.built"))]
    assert built == ["meta"] * nproc, f"{name}: the model reached parallelize as {built}"
    return sorted({line for f in files for line in f.read_text().splitlines() if line})


@pytest.mark.slow
def test_no_tensor_lands_off_the_model_device_through_training_replanning_and_resume(tmp_path):
    ck = f"checkpoint.dir={tmp_path / 'ck'}"
    replan = ["placement=replan", "placement.every_n_steps=3", "placement.adopt_after_steps=1"]
    runs = {
        # FSSDP: gather schedule, capacity drops, a new plan (set_fssdp_plan), eval, a checkpoint ...
        "fssdp": (2, ["parallel=fssdp", *replan, "steps=10", "eval_every=5", "checkpoint.every_n_steps=5", ck,
                      "model.moe.capacity_factor=1.0"]),
        # ... and the resume from it (the optimizer state made to be loaded into)
        "fssdp_resume": (2, ["parallel=fssdp", *replan, "steps=12", "eval_every=5", "checkpoint.every_n_steps=5", ck,
                             "model.moe.capacity_factor=1.0", "checkpoint.resume=auto"]),
        # resident EP through the node dispatch (token dedup tables), with a migration to a new plan,
        # the dense parameters under HSDP (sharded on meta, 2 copies of 2 shards), and the
        # global-batch balance loss's counts
        "ep_node": (4, ["parallel=ep", "parallel.token_dedup=true", "parallel.node_dispatch=true",
                        "parallel.dense_sharding=fsdp", "parallel.dense_shard_size=2",
                        "parallel.gpus_per_node=2", *replan, "steps=7", "model.moe.router.score_func=sigmoid",
                        "model.moe.router.bias_update_rate=0.001", "model.moe.router.aux_loss_scope=global_batch"]),
    }
    found = {name: _checked_run(tmp_path, name, n, args) for name, (n, args) in runs.items()}
    assert not any(found.values()), "tensors made without a device after the model was built (they land on the " \
        f"CPU on a GPU run; name the device, 'cpu' where host memory is meant): {found}"


def test_the_check_sees_a_table_built_without_its_device(tmp_path):
    """The worker's check can fail: the old LayerPlan.tables (no device) is flagged."""
    sys.path.insert(0, str(WORKER.parent))
    try:
        from device_check import ImplicitDevice
    finally:
        sys.path.remove(str(WORKER.parent))
    out = tmp_path / "sites.txt"
    out.write_text("")
    holders = ((0,), (1,), (0, 1))
    with ImplicitDevice(out, roots=(str(Path(__file__).resolve().parent),)):
        torch.tensor([len(h) for h in holders], dtype=torch.int64)  # the old tables' way: flagged
        torch.tensor([len(h) for h in holders], dtype=torch.int64, device="cpu")  # named: not flagged
    sites = out.read_text().splitlines()
    assert len(sites) == 1 and sites[0].endswith("test_the_check_sees_a_table_built_without_its_device"), sites


def test_dispatcher_tables_and_experts_are_built_on_the_given_device():
    """A dispatcher made after the model moved (at apply, at each re-plan) puts its tables where the
    tokens are; `meta` stands in for a GPU here."""
    lp = LayerPlan(((0,), (1,), (0, 1), (1,)), 0, 2)
    d = ExpertParallelDispatcher(lp, None, device=torch.device("meta"), token_dedup=True)
    assert {b.device.type for b in d.buffers()} == {"meta"}
    pad, n, local = lp.tables("cpu")
    assert pad.tolist() == [[0, 0], [1, 1], [0, 1], [1, 1]] and n.tolist() == [1, 1, 2, 1]
    assert local.tolist() == [True, False, True, False]
    ex = GroupedExperts(2, 8, 4, device="meta", dtype=torch.bfloat16)
    assert {(p.device.type, p.dtype) for p in ex.parameters()} == {("meta", torch.bfloat16)}
