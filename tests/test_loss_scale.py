"""parallel.mixed_precision=fp16: loss scaling (trainer/loss_scale.py), in the trainer and across ranks.
The distributed paths under fp16 autocast (tokens, FSSDP's fp16 gathers, the unscaling in the
clipping pass) are checked against the one-process reference in test_mixed_precision.py (the FP16 cases of tests/ep_cases.py)."""

import json
import math
import subprocess
import sys

import pytest
import torch

from conftest import child_env, read_metrics, torchrun
from moesaic.parallel.config import ParallelConfig
from moesaic.trainer.loss_scale import LossScaler
from moesaic.trainer.loss_scale import unscale_and_clip_

SMOKE = ["experiment=smoke", "logging.log_every=1", "eval_every=0", "logging.progress=false"]
FP16 = ["parallel.mixed_precision=fp16"]


def test_dynamic_scale_halves_on_an_overflow_and_doubles_after_a_window():
    s = LossScaler.from_config(ParallelConfig(mixed_precision="fp16", initial_scale_power=10, loss_scale_window=3))
    assert (s.scale, s.dynamic) == (1024.0, True)
    seen = []
    for step, overflow in enumerate([True, True, False, False, False, False, True, False, False, False]):
        s.update(overflow, step)
        seen.append(s.scale)
    # 1024 -> 512 -> 256; three good steps -> 512; one more good, then an overflow -> 256 (the count restarts)
    assert seen == [512, 256, 256, 256, 512, 512, 256, 256, 256, 512]
    assert (s.overflows, s.good_steps) == (3, 0)
    restored = LossScaler.from_config(ParallelConfig(mixed_precision="fp16", initial_scale_power=10, loss_scale_window=3))
    restored.load_state_dict(json.loads(json.dumps(s.state_dict())))  # as the manifest keeps it
    assert restored == s


@pytest.mark.parametrize("consecutive,expected", [
    (False, [1024, 512, 256, 256, 256, 512, 512, 512, 256]),  # halves until the doubling refills it
    (True, [1024, 512, 256, 256, 256, 512, 512, 512, 512]),  # each good step refills it
])
def test_hysteresis_absorbs_overflows_until_it_is_refilled(consecutive, expected):
    """DeepSpeed's hysteresis 2: the first overflow only skips its step; then each one halves the scale
    until a doubling (consecutive_hysteresis: any good step) gives it back. tests/test_deepspeed.py
    checks the same against DeepSpeed's own scaler on random overflows."""
    s = LossScaler.from_config(ParallelConfig(mixed_precision="fp16", initial_scale_power=10, loss_scale_window=3,
                                              hysteresis=2, consecutive_hysteresis=consecutive))
    seen = []
    for step, overflow in enumerate([True, True, True, False, False, False, True, False, True]):
        s.update(overflow, step)
        seen.append(s.scale)
    assert seen == expected
    restored = LossScaler.from_config(ParallelConfig(mixed_precision="fp16", hysteresis=2))
    restored.load_state_dict(json.loads(json.dumps(s.state_dict())))
    assert restored.hysteresis_left == s.hysteresis_left == 1  # the last overflow took one
    old = {k: v for k, v in s.state_dict().items() if k != "hysteresis_left"}  # a checkpoint from before it: full
    restored.load_state_dict(old)
    assert restored.hysteresis_left == 2
    with pytest.raises(ValueError, match=r"parallel.hysteresis \(0\) must be >= 1"):
        ParallelConfig(mixed_precision="fp16", hysteresis=0)


def test_static_scale_never_moves_and_only_the_minimum_stops_a_dynamic_one():
    assert LossScaler.from_config(ParallelConfig(mixed_precision="bf16")) is None
    static = LossScaler.from_config(ParallelConfig(mixed_precision="fp16", loss_scale=128))
    for step in range(5):
        static.update(step % 2 == 0, step)  # overflows skip their steps; nothing else changes
    assert (static.scale, static.dynamic, static.overflows) == (128.0, False, 3)
    floor = LossScaler.from_config(ParallelConfig(mixed_precision="fp16", initial_scale_power=2, min_loss_scale=2))
    floor.update(True, 0)
    assert floor.scale == 2
    with pytest.raises(FloatingPointError, match=r"overflowed fp16 at step 2 with the loss scale at its minimum "
                                                 r"\(parallel.min_loss_scale=2\)"):
        floor.update(True, 1)


def test_unscaling_in_the_clipping_pass_is_exact_for_a_power_of_two():
    """Gradients scaled by 2**12, then unscaled and clipped in one multiply, equal the unscaled
    gradients clipped alone, bit for bit, and the norm is the unscaled one (clipped and unclipped)."""
    torch.manual_seed(0)
    grads = [torch.randn(7, 5) * 10 ** -i for i in range(4)]
    for max_norm in (0.5, 0.0, 1e9):
        plain = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads]
        scaled = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads]
        for p, q, g in zip(plain, scaled, grads):
            p.grad, q.grad = g.clone(), g * 2.0 ** 12
        n1 = unscale_and_clip_(plain, torch.nn.utils.get_total_norm([p.grad for p in plain]), max_norm, 1.0)
        n2 = unscale_and_clip_(scaled, torch.nn.utils.get_total_norm([q.grad for q in scaled]), max_norm, 2.0 ** -12)
        assert float(n1) == float(n2) == pytest.approx(float(torch.linalg.vector_norm(torch.cat([g.flatten() for g in grads]))))
        assert all(torch.equal(p.grad, q.grad) for p, q in zip(plain, scaled)), max_norm
    inf = [torch.nn.Parameter(torch.zeros(3))]
    inf[0].grad = torch.tensor([1.0, float("inf"), 2.0])
    assert math.isinf(float(unscale_and_clip_(inf, torch.tensor(float("inf")), 0.5, 2.0 ** -12)))
    assert inf[0].grad.tolist() == [1.0, float("inf"), 2.0]  # left alone: the step is skipped


def _single(args, tmp_path, name):
    proc = subprocess.run([sys.executable, "-m", "moesaic.trainer", *SMOKE, f"logging.out_dir={tmp_path}",
                           f"logging.run_name={name}", *args], capture_output=True, text=True, timeout=120,
                          env=child_env(), cwd=tmp_path)
    return proc, [r for r in read_metrics(tmp_path / name) if r["kind"] == "train"] if proc.returncode == 0 else []


def test_fp16_run_skips_its_overflows_on_a_dynamic_scale_and_learns(tmp_path):
    """From 2**36 every step overflows (skipped, the scale halved: on_nan=stop does not stop on an
    overflow) until the scale fits; then it doubles after each 3 good steps, and overflows again
    above what fits (the sawtooth). An overflow is exactly a non-finite gradient norm with a finite
    loss; the logged scales are the scaler's own sequence. The skipped steps do not stop learning."""
    proc, rows = _single([*FP16, "parallel.initial_scale_power=36", "parallel.loss_scale_window=3"], tmp_path, "dyn")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(rows) == 30 and all(math.isfinite(r["loss"]) for r in rows)
    assert [r["overflow"] for r in rows] == [not math.isfinite(r["grad_norm"]) for r in rows]
    first_good = next(i for i, r in enumerate(rows) if not r["overflow"])
    assert first_good >= 5 and [r["loss_scale"] for r in rows[:first_good + 1]] == [2.0 ** (36 - i) for i in range(first_good + 1)]
    replay = LossScaler(scale=2.0 ** 36, window=3)
    for i, r in enumerate(rows):
        assert r["loss_scale"] == replay.scale, (i, r)
        replay.update(r["overflow"], i)
    assert any(b["loss_scale"] == 2 * a["loss_scale"] for a, b in zip(rows, rows[1:]))  # a doubling
    assert sum(r["overflow"] for r in rows[first_good:]) >= 1  # and an overflow above what fits
    summary = json.loads((tmp_path / "dyn/summary.json").read_text())
    assert summary["skipped_steps"] == summary["loss_scale"]["overflows"] == sum(r["overflow"] for r in rows)
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.2, [r["loss"] for r in rows]


def test_fp16_steps_track_fp32_steps_with_the_scale_divided_out(tmp_path):
    """A static scale of 4096 under fp16 autocast against fp32 (no autocast): the same weights and
    batches, so the gradient norms and losses agree to fp16's rounding (measured: 9.8e-5 relative on the
    norm); had the scale not been divided out, the norm would be 4096 times larger, and clipping
    (optim.grad_clip=1) would have cut every step to the same length."""
    args = ["steps=6", "optim.warmup_steps=1"]
    proc16, fp16 = _single([*args, *FP16, "parallel.loss_scale=4096"], tmp_path, "s16")
    proc32, fp32 = _single(args, tmp_path, "s32")
    assert proc16.returncode == proc32.returncode == 0, (proc16.stderr[-2000:], proc32.stderr[-2000:])
    assert all(r["loss_scale"] == 4096 and not r["overflow"] for r in fp16)
    assert "loss_scale" not in fp32[0]
    for a, b in zip(fp16, fp32):
        assert abs(a["grad_norm"] - b["grad_norm"]) < 1e-3 * b["grad_norm"], (a, b)
        assert abs(a["loss"] - b["loss"]) < 1e-3, (a, b)


def test_an_overflow_at_the_minimum_scale_stops_with_a_named_error(tmp_path):
    proc, _ = _single([*FP16, "parallel.initial_scale_power=40", "parallel.min_loss_scale=549755813888"], tmp_path, "min")
    assert proc.returncode == 3 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "the gradients overflowed fp16 at step 2 with the loss scale at its minimum " \
           "(parallel.min_loss_scale=5.49756e+11)" in proc.stderr


@pytest.mark.slow
@pytest.mark.dist
def test_fp16_resume_continues_the_loss_scale_bit_for_bit(tmp_path):
    """2 ranks, FSSDP gathering fp16 weights (owners apart from the plan), a dynamic scale that
    overflows and doubles on both sides of step 8: the run resumed from its step-8 checkpoint logs the
    uninterrupted run's losses, norms, scales and overflows, bit for bit. The checkpoint's manifest
    holds the scaler; a resume that restarted it at 2**22 would differ from step 9 on."""
    base = [*SMOKE, *FP16, "steps=16", f"logging.out_dir={tmp_path}", "checkpoint.every_n_steps=8", "parallel=fssdp",
            "placement.plan=round_robin", "placement.align_owners=false", "parallel.initial_scale_power=22",
            "parallel.loss_scale_window=3"]
    torchrun(2, [*base, "logging.run_name=straight"])
    step8 = tmp_path / "straight/checkpoints/step-00000008"
    torchrun(2, [*base, "logging.run_name=resumed", f"checkpoint.resume={step8}"])
    keys = ("step", "loss", "grad_norm", "loss_scale", "overflow")
    a = [tuple(r[k] for k in keys) for r in read_metrics(tmp_path / "straight") if r["kind"] == "train"]
    b = [tuple(r[k] for k in keys) for r in read_metrics(tmp_path / "resumed") if r["kind"] == "train"]
    assert len(a) == 16 and b == a[8:], (a, b)
    saved = json.loads((step8 / "manifest.json").read_text())["loss_scale"]
    assert saved["scale"] == a[8][3] != 2.0 ** 22 and saved["overflows"] == sum(r[4] for r in a[:8]) > 0
    assert any(r[4] for r in a[8:]) and any(y[3] == 2 * x[3] for x, y in zip(a[8:], a[9:]))
    summary = json.loads((tmp_path / "straight/summary.json").read_text())
    assert summary["expert_gather_dtype"] == "float16"
    assert all(r["expert_gather_bytes"] > 0 for r in read_metrics(tmp_path / "straight") if r["kind"] == "train")
