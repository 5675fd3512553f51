"""The Triton layer (`model.moe.kernels=triton`, moesaic/parallel/kernels.py) against the torch path:
its ops' torch math (as on a machine without a GPU), the kernels themselves under Triton's CPU
interpreter (TRITON_INTERPRET=1), in a model, and in FSSDP training on 2 gloo ranks."""

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import child_env, read_metrics, torchrun

from moesaic.parallel.experts import combine_slots, gather_slots, grouped_swiglu


def layer_diffs(dtype=torch.float32, tokens=37, top_k=3, num_experts=5, dim=40, ffn=24, drop=0.0, seed=0) -> dict:
    """Max relative differences between kernels="triton" and kernels="torch": the layer's output and
    the gradients of x, the router weights, w13 and w2, on random data (expert 0 gets no rows; with
    `drop`, that share of the slots is dropped, as over capacity)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randn(tokens, num_experts, generator=g)[:, 1:].topk(top_k, dim=-1).indices.flatten() + 1
    order = torch.argsort(ids, stable=True)
    if drop:
        order = order[torch.rand(order.numel(), generator=g) >= drop]
    counts = torch.bincount(ids[order], minlength=num_experts)
    leaf = lambda *shape, scale=1.0: (torch.randn(*shape, generator=g) * scale).to(dtype).requires_grad_()  # noqa: E731
    x, w = leaf(tokens, dim), leaf(tokens, top_k)
    w13, w2, dy = leaf(num_experts, 2 * ffn, dim, scale=0.2), leaf(num_experts, dim, ffn, scale=0.2), leaf(tokens, dim)
    out = {}
    for kernels in ("torch", "triton"):
        y = combine_slots(grouped_swiglu(gather_slots(x, order, top_k, kernels), counts, w13, w2, kernels=kernels),
                          order, w, kernels)
        out[kernels] = [y, *torch.autograd.grad(y, (x, w, w13, w2), dy)]
    names = ("out", "grad_x", "grad_weights", "grad_w13", "grad_w2")
    return {n: float((a.detach().float() - b.detach().float()).abs().max() / b.detach().float().abs().max())
            for n, a, b in zip(names, out["triton"], out["torch"])}


@pytest.mark.parametrize("drop", [0.0, 0.3])
def test_triton_ops_torch_math_equals_the_torch_path(drop):
    """Without a GPU the custom ops run their torch math: the same function, through their autograd."""
    assert max(layer_diffs(drop=drop).values()) < 1e-6


def test_triton_kernels_equal_the_torch_path_in_the_interpreter():
    """The kernels themselves (Triton's interpreter): fp32 and fp16 (numpy has no bf16), blocks cut by
    D and F, an expert without rows, dropped slots; and a MoE block built with kernels="triton"."""
    code = """
import sys, torch
sys.path.insert(0, sys.argv[1])
from test_kernels import layer_diffs
from moesaic.parallel import kernels
from moesaic.parallel.moe import MoE, MoEConfig
assert kernels.available() and kernels._use_triton(torch.zeros(1))
for dtype, tol in ((torch.float32, 1e-5), (torch.float16, 3e-3)):
    for drop in (0.0, 0.3):
        err = layer_diffs(dtype, drop=drop)
        assert max(err.values()) < tol, (dtype, drop, err)
        print(dtype, drop, err)
torch.manual_seed(0)
ref = MoE(32, MoEConfig(num_experts=4, top_k=2, ffn_dim=24, capacity_factor=1.0))
fast = MoE(32, MoEConfig(num_experts=4, top_k=2, ffn_dim=24, capacity_factor=1.0, kernels="triton"))
fast.load_state_dict(ref.state_dict())
x = torch.randn(2, 9, 32)
for m in (ref, fast):
    m(x)[0].square().sum().backward()
torch.testing.assert_close(fast(x)[0], ref(x)[0])
for (n, a), b in zip(ref.named_parameters(), fast.parameters()):
    torch.testing.assert_close(b.grad, a.grad, msg=n)
print("moe ok")
"""
    env = child_env(TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-c", code, os.path.dirname(__file__)], capture_output=True, text=True,
                          timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("grad_w13") == 4 and "moe ok" in proc.stdout


def test_kernels_are_checked_before_any_rank_works(tmp_path):
    """An unknown value, and triton where it cannot run (a CPU without the interpreter), are named."""
    for value, message in (("cuda", "model.moe.kernels ('cuda') must be one of torch, triton"),
                           ("triton", "model.moe.kernels ('triton') needs a CUDA device")):
        proc = subprocess.run([sys.executable, "-m", "moesaic.trainer", "experiment=smoke", f"model.moe.kernels={value}",
                               f"logging.out_dir={tmp_path}"], capture_output=True, text=True, timeout=120,
                              env={k: v for k, v in child_env().items() if k != "TRITON_INTERPRET"}, cwd=tmp_path)
        assert proc.returncode != 0 and message in proc.stderr, proc.stderr[-2000:]


@pytest.mark.slow
@pytest.mark.dist
def test_fssdp_training_with_triton_kernels_equals_torch_kernels(tmp_path):
    """2 gloo ranks, FSSDP with capacity drops: the Triton layer (interpreted) trains
    to the same losses as the torch path, and resumes the torch path's checkpoint (the kernels are
    not part of the model's identity)."""
    base = ["experiment=smoke", "steps=4", "batch_size=2", "data.seq_len=32", "optim.warmup_steps=1", "parallel=fssdp",
            "model.moe.capacity_factor=1.25", f"logging.out_dir={tmp_path}", "logging.log_every=1",
            "checkpoint.every_n_steps=2"]
    torchrun(2, [*base, "logging.run_name=torch"])
    torchrun(2, [*base, "logging.run_name=triton", "model.moe.kernels=triton"], env={"TRITON_INTERPRET": "1"})
    losses = {k: [r["loss"] for r in read_metrics(tmp_path / k) if r["kind"] == "train"] for k in ("torch", "triton")}
    assert len(losses["torch"]) == 4
    for a, b in zip(losses["torch"], losses["triton"]):
        assert abs(a - b) < 1e-4 * abs(a), losses
    ckpt = tmp_path / "torch/checkpoints/step-00000002"
    torchrun(2, [*base, "logging.run_name=resumed", "model.moe.kernels=triton", f"checkpoint.resume={ckpt}"],
             env={"TRITON_INTERPRET": "1"})
    resumed = [r["loss"] for r in read_metrics(tmp_path / "resumed") if r["kind"] == "train"]
    assert abs(resumed[-1] - losses["torch"][-1]) < 1e-4 * abs(losses["torch"][-1]), (resumed, losses)
    assert json.loads((tmp_path / "triton/summary.json").read_text())["steps"] == 4


@pytest.mark.slow
@pytest.mark.dist
def test_doctor_checks_the_triton_layer():
    """`moesaic-doctor --kernels triton` runs the EP and FSSDP layers with the Triton kernels (here
    interpreted) against the torch reference; without a GPU or the interpreter it refuses by name."""
    def doctor(extra_env):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
               "-m", "moesaic.parallel.doctor", "--kernels", "triton", "--json"]
        env = {k: v for k, v in child_env(**extra_env).items() if extra_env or k != "TRITON_INTERPRET"}
        return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)

    proc = doctor({"TRITON_INTERPRET": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["ok"] and report["kernels"] == "triton"
    layers = [r for r in report["results"] if "max_rel_diff" in r]
    assert len(layers) == 8 and all(r["max_rel_diff"] < 1e-5 for r in layers), layers
    # the Triton gather and combine under token_dedup, and under node dispatch's two stages
    assert {"ep/token-dedup", "ep/node-dispatch"} <= {r["check"] for r in layers}
    proc = doctor({})
    assert proc.returncode != 0 and "--kernels triton needs a CUDA device" in proc.stderr
