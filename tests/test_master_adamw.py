"""bench/master_adamw.py's optimizer (gpu_train.py's fp32-master AdamW) against torch's AdamW."""

import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


def test_master_adamw_groups():
    import torch

    sys.path.insert(0, str(BENCH))
    from master_adamw import MasterAdamW

    ps = [torch.nn.Parameter(torch.zeros(3)) for _ in range(4)]
    opt = MasterAdamW(ps, lr=1e-2, weight_decay=0.0)
    opt.set_groups([[ps[2]], [ps[0], ps[3]]])
    assert opt.groups == [[1, 2], [0, 3]]  # the ungrouped parameter joins the first group
    with pytest.raises(ValueError, match="two groups"):
        opt.set_groups([[ps[0]], [ps[0]]])
    with pytest.raises(ValueError, match="overlap needs impl 'triton'"):
        opt.step(1.0, overlap=True)
    # the schedule's learning rate reaches the torch implementation's optimizers: lr 0 moves nothing
    for p in ps:
        p.data.fill_(1.0)
        p.grad = torch.ones(3)
    opt = MasterAdamW(ps, lr=1e-2, weight_decay=0.1)
    opt.set_lr(0.0)
    opt.step(1.0)
    assert all(torch.equal(p, torch.ones(3)) for p in ps)
    opt.set_lr(1e-2)
    for p in ps:
        p.grad = torch.ones(3)
    opt.step(1.0)
    assert all(float(p.detach().max()) < 1.0 for p in ps)


def test_master_adamw_equals_torch_adamw():
    """gpu_train's fp32-master AdamW, on fp32 weights, is torch's AdamW with clipping (chunked or not)."""
    import torch

    sys.path.insert(0, str(BENCH))
    from master_adamw import MasterAdamW

    torch.manual_seed(0)
    a = [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(7))]
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    mine = MasterAdamW(a, lr=1e-2, weight_decay=0.1, chunk_elems=10)
    ref = torch.optim.AdamW(b, lr=1e-2, weight_decay=0.1, betas=(0.9, 0.95))
    assert len(mine.chunks) == 2
    for step in range(3):
        g = [torch.randn_like(p) * (10 if step == 1 else 1) for p in a]
        for p, q, gi in zip(a, b, g):
            p.grad, q.grad = gi.clone(), gi.clone()
        mine.step(1.0)
        torch.nn.utils.clip_grad_norm_(b, 1.0)
        ref.step()
    for p, q in zip(a, b):
        assert torch.allclose(p, q, atol=1e-6)


def test_master_adamw_bf16_moments():
    """`moments="bf16"` (DeepSeek-V3's AdamW state): the written-out step is torch's AdamW when its
    buffers are fp32, and with bf16 buffers it stays within bf16 rounding of it, clipped steps and
    fp32-accumulated micro-batches included, in 8 bytes of state per parameter instead of 12."""
    import torch

    sys.path.insert(0, str(BENCH))
    from master_adamw import MasterAdamW

    with pytest.raises(ValueError, match="moments"):
        MasterAdamW([torch.nn.Parameter(torch.zeros(2))], lr=1e-2, weight_decay=0.0, moments="fp16")
    results = {}
    for buffers in (torch.float32, torch.bfloat16):
        torch.manual_seed(0)
        a = [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(700))]
        b = [torch.nn.Parameter(p.detach().clone()) for p in a]
        mine = MasterAdamW(a, lr=1e-2, weight_decay=0.1, moments="bf16")
        assert mine.exp_avg[0].dtype == torch.bfloat16 and mine.state_bytes() == 8 * sum(p.numel() for p in a)
        mine.exp_avg = [m.to(buffers) for m in mine.exp_avg]
        mine.exp_avg_sq = [v.to(buffers) for v in mine.exp_avg_sq]
        ref = torch.optim.AdamW(b, lr=1e-2, weight_decay=0.1, betas=(0.9, 0.95))
        start = [p.detach().clone() for p in b]
        for step in range(5):
            for _ in range(2 if step == 1 else 1):  # step 1: two micro-batches, summed in fp32, and clipped
                g = [torch.randn_like(p) * (10 if step == 1 else 1e-3) for p in a]
                for p, q, gi in zip(a, b, g):
                    p.grad, q.grad = gi.clone(), (gi.clone() if q.grad is None else q.grad + gi)
                if step == 1:
                    mine.accumulate()
            mine.step(1.0)
            torch.nn.utils.clip_grad_norm_(b, 1.0)
            ref.step()
            ref.zero_grad()
        update = max(float((q - s0).detach().abs().max()) for q, s0 in zip(b, start))
        results[buffers] = max(float((p - q).detach().abs().max()) for p, q in zip(a, b)) / update
    assert results[torch.float32] < 1e-5, results
    assert 1e-5 < results[torch.bfloat16] < 1e-2, results


def test_master_adamw_accumulates_micro_batches_in_fp32():
    """Two bf16 micro-batch gradients summed in fp32 accumulators: the step equals torch's AdamW on
    the fp32 sum, which a bf16 sum would round away."""
    import torch

    sys.path.insert(0, str(BENCH))
    from master_adamw import MasterAdamW

    torch.manual_seed(1)
    w = torch.randn(64)
    p = torch.nn.Parameter(w.to(torch.bfloat16))
    q = torch.nn.Parameter(p.detach().float().clone())
    mine = MasterAdamW([p], lr=1e-2, weight_decay=0.1)
    ref = torch.optim.AdamW([q], lr=1e-2, weight_decay=0.1, betas=(0.9, 0.95))
    g1, g2 = torch.full((64,), 1.0).to(torch.bfloat16), torch.full((64,), 1e-3).to(torch.bfloat16)
    for g in (g1, g2):
        p.grad = g.clone()
        mine.accumulate()
        assert p.grad is None
    assert torch.equal(mine.masters[0].grad, g1.float() + g2.float())  # 1.001 is not a bf16 number
    q.grad = g1.float() + g2.float()
    mine.step(100.0)
    ref.step()
    assert torch.allclose(mine.masters[0], q, atol=1e-7) and mine.masters[0].grad is None
    assert torch.equal(p.detach(), q.detach().to(torch.bfloat16))
