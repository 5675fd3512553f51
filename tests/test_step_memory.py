"""A training step's memory against `moesaic-estimate`, measured from the tensors of real steps on CPU
(torch's own MemTracker for the peak, `LiveBytes` for the phases), and AdamW's implementations."""

from __future__ import annotations

import sys

import pytest
import torch

from conftest import REPO, read_metrics, torchrun

BENCH = REPO / "bench"


def _forward(cfg, model, x):
    from moesaic.trainer.step import precision

    def forward():
        with precision(cfg, x.device):
            return model(x, x)

    return forward


@pytest.mark.parametrize("overrides", [
    ["optim.implementation=for-loop"],
    ["optim.implementation=foreach", "parallel.mixed_precision=bf16"],
    ["optim.implementation=fused", "parallel.mixed_precision=bf16", "parallel.activation_checkpoint=full"],
    ["optim.implementation=foreach", "parallel.activation_checkpoint=attention", "parallel.recompute_moe_act=true",
     "parallel.mixed_precision=bf16", "model.moe.num_shared_experts=1"],
], ids=["fp32-forloop", "bf16-foreach", "full-fused", "attention-moe-act-foreach"])
def test_the_estimate_bounds_a_real_step(overrides):
    """One process, the smoke model, its second step (AdamW's moments exist): forward, backward,
    clipping and AdamW, measured by torch's MemTracker (`bench/step_memory.py`). The estimate's total
    is at least the measured peak, and exceeds it by at most the gradients that backward had not yet
    produced at the peak (the estimate counts every gradient beside every activation). Its parts
    equal what the step's phases allocate: the fake forward and backward's kept bytes and working
    set those of the real ones, byte for byte, and the optimizer's temporaries those of
    `optimizer.step()`, byte for byte too."""
    sys.path.insert(0, str(BENCH))
    from step_memory import build, measure

    from moesaic.trainer.activations import count_step, step_bytes
    from moesaic.trainer.estimate import compose, estimate
    from moesaic.trainer.optim import build_optimizer

    cfg = compose(["experiment=smoke", "parallel=ddp", *overrides])
    kind = cfg.optim.implementation
    opt = build_optimizer(torch.nn.Linear(2, 2), cfg.optim)
    assert (opt.defaults["foreach"], opt.defaults["fused"]) == {"for-loop": (False, None), "foreach": (True, None),
                                                                 "fused": (None, True)}[kind]
    m, row = measure(cfg), estimate(cfg, 1)[0]
    assert row["dense_grads"] + row["expert_grads"] == m["grads"]
    assert m["optimizer_temps"] == row["optimizer_working"]
    assert row["optimizer_working"] > 0 or kind == "fused"
    assert m["peak"] <= row["total"] <= m["peak"] + m["grads"], (m, row["total"])
    model = build(cfg)
    x = torch.randint(0, 256, (cfg.batch_size, cfg.data.seq_len), generator=torch.Generator().manual_seed(1))
    real = step_bytes(model, _forward(cfg, model, x))
    assert count_step(cfg, cfg.batch_size) == real and real[1] == row["backward_working"] > 0


@pytest.mark.parametrize("mode", ["none", "attention", "full"])
def test_a_step_leaves_only_the_routes(mode):
    """After a forward and its backward, what the step allocated is freed but the gradients and what
    each MoE layer keeps for the routing recorder (`last_route`, without its graph). A route kept
    with its graph kept the router's inputs alive, and under checkpointing the recomputed block's
    whole graph, which no backward frees, until the next forward."""
    sys.path.insert(0, str(BENCH))
    from step_memory import build, storage_bytes

    from moesaic.trainer.activations import LiveBytes
    from moesaic.trainer.estimate import compose

    cfg = compose(["experiment=smoke", "parallel.mixed_precision=bf16", f"parallel.activation_checkpoint={mode}"])
    model = build(cfg)
    x = torch.randint(0, 256, (cfg.batch_size, cfg.data.seq_len))
    with LiveBytes() as live:
        loss = _forward(cfg, model, x)().loss
        loss.backward()
        del loss
    grads = live.serials([p.grad for p in model.parameters()])
    routes = [t for m in model.moe_layers() for t in vars(m.last_route).values()]
    assert all(not t.requires_grad and t.grad_fn is None for t in routes)
    assert live.now(grads) == storage_bytes(routes) > 0


@pytest.mark.slow
@pytest.mark.dist
def test_adamw_implementations_train_alike(tmp_path):
    """2 gloo ranks, resident EP with FSDP2's dense parameters, so that AdamW's groups hold DTensors
    and plain tensors (the experts) apart: foreach trains exactly as the for-loop; fused within float
    rounding; and a fused run resumed from its checkpoint ends where the uninterrupted one does."""
    base = ["experiment=smoke", "parallel=ep", "parallel.dense_sharding=fsdp", "steps=6", "optim.warmup_steps=1",
            "logging.log_every=1", "logging.dump_rank_params=true", f"logging.out_dir={tmp_path}"]

    def run(name: str, *extra: str) -> tuple[list[float], list[dict]]:
        torchrun(2, [*base, f"logging.run_name={name}", *extra])
        losses = [r["loss"] for r in read_metrics(tmp_path / name) if r["kind"] == "train"]
        return losses, [torch.load(tmp_path / name / f"params-rank{r}.pt", weights_only=True) for r in range(2)]

    loop, foreach = run("loop", "optim.implementation=for-loop"), run("foreach", "optim.implementation=foreach")
    fused = run("fused", "optim.implementation=fused", "checkpoint.every_n_steps=3")
    assert len(loop[0]) == 6 and loop[0] == foreach[0]
    assert all(torch.equal(a[k], b[k]) for a, b in zip(loop[1], foreach[1]) for k in a)
    assert fused[0] == pytest.approx(loop[0], rel=1e-5)
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for a, b in zip(loop[1], fused[1]) for k in a)
    resumed = run("resumed", "optim.implementation=fused",
                  f"checkpoint.resume={tmp_path / 'fused' / 'checkpoints' / 'step-00000003'}")
    assert resumed[0][-3:] == fused[0][-3:]
    assert all(torch.equal(a[k], b[k]) for a, b in zip(fused[1], resumed[1]) for k in a)
