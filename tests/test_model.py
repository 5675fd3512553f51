"""Tier 1: the model and the MoE block on one process."""

import pytest
import torch
import torch.nn.functional as F

from moesaic.parallel.experts import (GroupedExperts, _warn_unaligned, combine_slots, gather_slots,
                                      grouped_mm_aligned, grouped_swiglu, looped_swiglu)
from moesaic.parallel.moe import MoE, MoEConfig
from moesaic.parallel.router import RouterConfig
from moesaic.trainer.model import ModelConfig, Transformer


def _tiny(**moe) -> ModelConfig:
    return ModelConfig(dim=32, num_layers=2, num_heads=2, max_seq_len=32, moe=MoEConfig(num_experts=4, top_k=2, ffn_dim=16, **moe))


def test_forward_backward_shapes_and_losses():
    torch.manual_seed(0)
    model = Transformer(_tiny())
    x = torch.randint(0, 256, (3, 16))
    out = model(x, torch.roll(x, -1, 1))
    assert out.logits.shape == (3, 16, 256)
    assert torch.isfinite(out.loss) and out.loss > 0
    assert out.aux_loss > 0 and out.z_loss > 0  # both present, and part of the loss
    rc = model.cfg.moe.router
    torch.testing.assert_close(out.loss, out.ce_loss + rc.aux_loss_coef * out.aux_loss + rc.z_loss_coef * out.z_loss)
    assert out.tokens_per_expert_LE.shape == (2, 4)
    assert out.tokens_per_expert_LE.sum(1).tolist() == [3 * 16 * 2] * 2
    out.loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert model.layers[0].moe.router.gate.weight.grad.abs().sum() > 0  # aux/z-loss and combine reach the gate


def test_dense_first_layers_and_shared_experts():
    cfg = ModelConfig(dim=32, num_layers=3, num_heads=2, max_seq_len=32, num_dense_layers=1,
                      moe=MoEConfig(num_experts=8, top_k=3, ffn_dim=8, num_shared_experts=1))
    model = Transformer(cfg)
    assert [b.is_moe for b in model.layers] == [False, True, True]
    out = model(torch.randint(0, 256, (2, 8)), torch.randint(0, 256, (2, 8)))
    assert out.tokens_per_expert_LE.shape == (2, 8)
    out.loss.backward()
    counts = model.num_params()
    assert counts["active"] < counts["total"]


@pytest.mark.parametrize("layers,dense,every,moe", [(5, 1, 2, [2, 4]), (6, 0, 3, [2, 5]), (4, 0, 2, [1, 3]),
                                                     (4, 2, 1, [2, 3]), (3, 0, 4, [])])
def test_moe_every_interleaves_dense_and_moe_blocks(layers, dense, every, moe):
    """model.moe_every=N: after the dense first blocks, every N-th block is MoE (Llama 4's interleave
    step: dense, MoE, dense, MoE for N=2); the plan's and the checkpoint's MoE layer i is block moe[i]."""
    cfg = ModelConfig(dim=32, num_layers=layers, num_heads=2, max_seq_len=32, num_dense_layers=dense, moe_every=every,
                      dense_ffn_dim=48, moe=MoEConfig(num_experts=4, top_k=2, ffn_dim=16))
    model = Transformer(cfg)
    assert [i for i, b in enumerate(model.layers) if b.is_moe] == cfg.moe_layer_ids == moe
    assert cfg.num_moe_layers == len(model.moe_layers()) == len(moe)
    out = model(torch.randint(0, 256, (2, 8)), torch.randint(0, 256, (2, 8)))
    assert (out.tokens_per_expert_LE.shape[0] if moe else out.tokens_per_expert_LE) in (len(moe), None)
    with pytest.raises(ValueError, match=r"model\.moe_every \(0\) must be >= 1"):
        ModelConfig(moe_every=0)


def test_meta_build_materializes_to_the_eager_model_and_each_expert_has_its_own_seed():
    """Built on meta and materialized (the trainer's way) equals the eager build of the same seed;
    an expert's values depend on its global id, not on which other experts a tensor holds; the
    distributions are the configured ones; another seed gives other weights."""
    cfg = ModelConfig(dim=64, num_layers=4, num_heads=2, max_seq_len=32, num_dense_layers=1,
                      moe=MoEConfig(num_experts=8, top_k=2, ffn_dim=96, num_shared_experts=1))
    torch.manual_seed(3)
    eager = Transformer(cfg)
    torch.manual_seed(3)
    with torch.device("meta"):
        lazy = Transformer(cfg)
    assert all(p.is_meta for p in lazy.parameters())
    with pytest.raises(RuntimeError, match=r"meta device .*materialize\(device\)"):
        lazy(torch.zeros(1, 4, dtype=torch.int64))
    lazy.materialize("cpu")
    assert lazy.head.weight is lazy.embed.weight
    for (n, a), (_, b) in zip(eager.state_dict().items(), lazy.state_dict().items()):
        assert torch.equal(a, b), n
    torch.testing.assert_close(lazy.rope_cos, eager.rope_cos, rtol=0, atol=0)
    # a store of experts 5 and 2 (as expert parallelism leaves on a rank) gets rows 5 and 2
    torch.manual_seed(3)
    with torch.device("meta"):
        part = Transformer(cfg)
    moe = part.layers[2].moe
    moe.experts = GroupedExperts(2, 64, 96, device="meta")
    moe.layer_plan = type("Plan", (), {"local_experts": [5, 2]})()
    part.materialize("cpu")
    full = eager.layers[2].moe.experts
    assert torch.equal(moe.experts.w13_EGD, full.w13_EGD[[5, 2]]) and torch.equal(moe.experts.w2_EDF, full.w2_EDF[[5, 2]])
    # the configured distributions: N(0, 0.02), output projections / sqrt(2 L), unit norms
    out_std = 0.02 / (2 * 4) ** 0.5
    w13, w2 = full.w13_EGD, full.w2_EDF
    for t, std in ((w13, 0.02), (w2, out_std), (eager.layers[1].attn.wo.weight, out_std), (eager.embed.weight, 0.02)):
        assert abs(t.mean().item()) < 0.05 * std and abs(t.std().item() - std) < 0.05 * std, (t.shape, t.std(), std)
    assert all(torch.equal(m.weight, torch.ones_like(m.weight)) for m in eager.modules() if type(m).__name__ == "RMSNorm")
    # w1 and w3 of one expert, and two experts, are not copies of each other
    assert not torch.equal(w13[0, :96], w13[0, 96:]) and not torch.equal(w13[0], w13[1])
    torch.manual_seed(4)
    assert not torch.equal(Transformer(cfg).embed.weight, eager.embed.weight)


def test_experts_state_dict_keeps_three_tensors_and_loads_strictly():
    """w13 is stored; the state dict holds w1, w2, w3 (torchtitan's names), and loads back strictly."""
    torch.manual_seed(0)
    a, b = GroupedExperts(3, 8, 4), GroupedExperts(3, 8, 4)
    sd = a.state_dict()
    assert set(sd) == {"w1_EFD", "w2_EDF", "w3_EFD"} and sd["w1_EFD"].shape == (3, 4, 8)
    b.load_state_dict(sd, strict=True)
    torch.testing.assert_close(b.w13_EGD, a.w13_EGD, rtol=0, atol=0)
    torch.testing.assert_close(torch.cat([sd["w1_EFD"], sd["w3_EFD"]], 1), a.w13_EGD, rtol=0, atol=0)


def test_swiglu13_backward_writes_what_autograd_computes():
    """The torch path's SwiGLU over [a | b]: gradcheck in float64, and equal to autograd's own in fp32."""
    from moesaic.parallel.swiglu import _SwiGLU13

    h13 = torch.randn(7, 10, dtype=torch.float64, requires_grad=True)
    for keep_silu in (True, False):  # False: silu(a) recomputed in backward (parallel.recompute_moe_act)
        assert torch.autograd.gradcheck(lambda t: _SwiGLU13.apply(t, keep_silu), (h13,))
        h = torch.randn(6, 8, requires_grad=True)
        g = torch.randn(6, 4)
        (ours,) = torch.autograd.grad(_SwiGLU13.apply(h, keep_silu), h, g)
        a, b = h.chunk(2, dim=-1)
        (ref,) = torch.autograd.grad(F.silu(a) * b, h, g)
        torch.testing.assert_close(ours, ref)


@pytest.mark.parametrize("D,F_", [(16, 24), (30, 22)])  # (30, 22) breaks _grouped_mm's 16-byte rule
@pytest.mark.parametrize("counts", [[5, 0, 7, 3], [0, 0, 0, 0], [0, 9, 0, 0], [1, 1, 1, 1]])
def test_grouped_swiglu_equals_loop(counts, D, F_):
    torch.manual_seed(1)
    E = 4
    n = sum(counts)
    w1, w3 = torch.randn(E, F_, D), torch.randn(E, F_, D)
    w13 = torch.cat([w1, w3], dim=1).requires_grad_()
    w2 = torch.randn(E, D, F_, requires_grad=True)
    x = torch.randn(n, D, requires_grad=True)
    c = torch.tensor(counts)
    y = grouped_swiglu(x, c, w13, w2)
    y.sum().backward()  # an expanded incoming gradient: must not break _grouped_mm's backward
    grads = [t.grad.clone() for t in (x, w13, w2)]
    # the reference: three separate weights, one expert at a time
    ref = [t.detach().clone().requires_grad_() for t in (x, w1, w3, w2)]
    y_ref = []
    for e, rows in enumerate(torch.split(ref[0], counts)):
        y_ref.append((F.silu(rows @ ref[1][e].T) * (rows @ ref[2][e].T)) @ ref[3][e].T)
    y_ref = torch.cat(y_ref)
    y_ref.sum().backward()
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    ref_grads = [ref[0].grad, torch.cat([ref[1].grad, ref[2].grad], dim=1), ref[3].grad]
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(looped_swiglu(x, c, w13, w2), y_ref, rtol=1e-5, atol=1e-5)
    for e, k in enumerate(counts):
        if k == 0:  # an expert with no tokens gets an exact zero gradient
            assert grads[1][e].abs().max() == 0


def test_compiled_swiglu_serves_layers_of_any_expert_count_without_recompiling_each():
    """The experts' compiled SwiGLU under EP and FSSDP: one function for every layer. 12 layers of
    Parameters with 1-12 local experts and their own row counts, some with 0 or 1 rows (a rank that
    received no token, or one), in training and under no_grad (eval), give the eager outputs and
    gradients (bf16, where the grouped GEMM compiles), and no frame reaches dynamo's recompile limit."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    D, F_ = 16, 24
    for E in range(1, 13):
        torch.manual_seed(E)
        experts = GroupedExperts(E, D, F_).to(torch.bfloat16)
        counts = torch.randint(0, 6, (E,))
        if E in (4, 6):  # no row, and one row (of expert 2)
            counts = torch.zeros(E, dtype=torch.int64).index_fill_(0, torch.tensor([2]), E == 6)
        x = torch.randn(int(counts.sum()), D, dtype=torch.bfloat16, requires_grad=True)
        outs = {}
        for compiled in (False, True):
            experts.compiled = compiled
            experts.zero_grad()
            x.grad = None
            y = experts(x, counts)
            (y.float() * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
            with torch.no_grad():
                y_eval = experts(x, counts)
            outs[compiled] = [t.detach().float() for t in (y, y_eval, x.grad, experts.w13_EGD.grad, experts.w2_EDF.grad)]
        for got, want in zip(outs[True], outs[False]):
            torch.testing.assert_close(got, want, rtol=0.02, atol=0.02)
    limit = [r for r in counters["unimplemented"] if "recompile limit" in r.lower()]
    assert not limit and counters["stats"]["unique_graphs"] <= 4, (limit, dict(counters["stats"]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_mm_alignment_rule_is_torchs(dtype, caplog):
    """`grouped_mm_aligned` says yes exactly where torch._grouped_mm takes the experts' shapes; where it
    says no, the experts run as a loop, with one warning that names both dims and the rule."""
    for D in range(4, 21, 2):
        for F_ in range(4, 21, 2):
            x, w13, w2 = torch.randn(6, D, dtype=dtype), torch.randn(2, 2 * F_, D, dtype=dtype), torch.randn(2, D, F_, dtype=dtype)
            offs = torch.tensor([2, 6], dtype=torch.int32)
            try:
                h = torch._grouped_mm(x, w13.transpose(-2, -1), offs=offs)
                torch._grouped_mm(h[:, :F_].contiguous(), w2.transpose(-2, -1), offs=offs)
                accepted = True
            except RuntimeError as e:
                assert "16 bytes" in str(e)
                accepted = False
            assert grouped_mm_aligned(D, F_, dtype) == accepted, (D, F_, dtype)
    caplog.set_level("WARNING", logger="moesaic.parallel.experts")
    _warn_unaligned.cache_clear()  # (once per process: an earlier test may have been told already)
    moe = MoE(30, MoEConfig(num_experts=3, top_k=2, ffn_dim=22))
    for _ in range(2):
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            moe(torch.randn(2, 5, 30))
    rule = "multiples of 4" if dtype == torch.float32 else "multiples of 8"
    warned = [r.getMessage() for r in caplog.records if "torch._grouped_mm needs" in r.getMessage()]
    assert len(warned) == 1 and all("model.dim (30) and model.moe.ffn_dim (22)" in w and rule in w for w in warned)


@pytest.mark.parametrize("T,K,drop", [(7, 2, 0), (7, 2, 5), (5, 1, 2), (6, 3, 0), (0, 2, 0)])
def test_slot_gather_and_combine_equal_indexing_and_pass_gradcheck(T, K, drop):
    torch.manual_seed(3)
    D = 4
    order = torch.randperm(T * K)[: T * K - drop]  # any distinct slots: a permutation, or some dropped
    x = torch.randn(T, D, dtype=torch.float64, requires_grad=True)
    y = torch.randn(order.numel(), D, dtype=torch.float64, requires_grad=True)
    w = torch.rand(T, K, dtype=torch.float64, requires_grad=True)
    torch.testing.assert_close(gather_slots(x, order, K), x[order // K], rtol=0, atol=0)
    ref = torch.zeros(T, D, dtype=torch.float64).index_add(0, order // K, y * w.flatten()[order].unsqueeze(-1))
    torch.testing.assert_close(combine_slots(y, order, w), ref)
    if T:
        assert torch.autograd.gradcheck(lambda a: gather_slots(a, order, K), (x,))
        assert torch.autograd.gradcheck(lambda a, b: combine_slots(a, order, b), (y, w))
    else:
        gather_slots(x, order, K).sum().backward()
        assert x.grad.shape == x.shape


@pytest.mark.parametrize("dtype,D", [(torch.float32, 6), (torch.float32, 3), (torch.bfloat16, 8), (torch.bfloat16, 6)])
@pytest.mark.parametrize("drop", [0, 3])
def test_slot_helpers_move_rows_as_words_or_not_exactly(dtype, D, drop):
    """Rows whose bytes divide into 8-byte words move as words; others as they are: the same values."""
    torch.manual_seed(4)
    T, K = 9, 2
    order = torch.randperm(T * K)[: T * K - drop]
    x = torch.randn(T, D, dtype=dtype, requires_grad=True)
    g = torch.randn(order.numel(), D, dtype=dtype)
    gather_slots(x, order, K).backward(g)
    x_ref = x.detach().clone().requires_grad_()
    x_ref[order // K].backward(g)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=0, atol=0)
    y = torch.randn(order.numel(), D, dtype=dtype)
    w = torch.rand(T, K, dtype=dtype)
    ref = torch.zeros(T * K, D, dtype=dtype).index_copy(0, order, y).view(T, K, D)
    torch.testing.assert_close(combine_slots(y, order, w), (ref * w.unsqueeze(-1)).sum(1), rtol=0, atol=0)


@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
def test_moe_block_equals_naive_per_token_reference(score_func):
    torch.manual_seed(2)
    cfg = MoEConfig(num_experts=6, top_k=2, ffn_dim=12, num_shared_experts=1, router=RouterConfig(score_func=score_func))
    moe = MoE(16, cfg)
    x = torch.randn(2, 5, 16)
    y, route = moe(x)
    # reference: every token runs its k experts one by one
    ex: GroupedExperts = moe.experts
    xt = x.reshape(-1, 16)
    ref = torch.zeros_like(xt)
    for t in range(xt.shape[0]):
        for j in range(cfg.top_k):
            e = route.expert_ids_TK[t, j]
            h = F.silu(xt[t] @ ex.w1_EFD[e].T) * (xt[t] @ ex.w3_EFD[e].T)
            ref[t] += route.weights_TK[t, j] * (h @ ex.w2_EDF[e].T)
    ref = ref + moe.shared(xt)
    torch.testing.assert_close(y.reshape(-1, 16), ref, rtol=1e-5, atol=1e-6)
    if score_func == "sigmoid":
        torch.testing.assert_close(route.weights_TK.sum(-1), torch.ones(10))


@pytest.mark.parametrize("name", ["tiny", "default", "fine_grained", "grouped"])
def test_backward_gives_gradients_in_reverse_registration_order(name):
    """`parallel.ddp_bucket_order=fixed` packs DDP's buckets in reverse registration order. For each
    shipped model that is the order in which a real backward produces the gradients, so the buckets
    are the ones DDP would have built from that backward, and its reductions overlap backward as before."""
    from hydra import compose, initialize_config_module

    from moesaic.trainer.config import register_configs, to_train_config

    register_configs()
    with initialize_config_module(config_module="moesaic.configs", version_base=None):
        cfg = to_train_config(compose(config_name="config", overrides=[f"model={name}"])).model
    torch.manual_seed(0)
    model = Transformer(cfg)
    order = []
    for n, p in model.named_parameters():
        p.register_post_accumulate_grad_hook(lambda p, n=n: order.append(n))
    x = torch.randint(0, cfg.vocab_size, (2, 32))
    model(x, torch.roll(x, -1, 1)).loss.backward()
    assert order == [n for n, _ in model.named_parameters()][::-1]


@pytest.mark.parametrize("partial", [False, True], ids=["permutation", "capacity-drops"])
def test_place_rows_equals_index_copy_and_keeps_the_indices_alone(partial):
    """`place_rows` (the EP dispatch's rows back from expert order, and the combine's rows back to
    slot order) gives index_copy's values and gradients, and keeps for backward only the indices:
    index_copy kept its (N x D) source too, one more copy of every expert output row."""
    from moesaic.parallel.experts import place_rows

    gen = torch.Generator().manual_seed(0)
    rows = 12
    order = torch.randperm(rows, generator=gen)[: 9 if partial else rows]
    y = torch.randn(order.numel(), 8, generator=gen, requires_grad=True)
    g = torch.randn(rows, 8, generator=gen)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append((tuple(t.shape), t.dtype)) or t, lambda t: t):
        out = place_rows(y, order, rows)
    (ours,) = torch.autograd.grad(out, y, g)
    ref = torch.zeros(rows, 8).index_copy(0, order, y)
    (ref_g,) = torch.autograd.grad(ref, y, g)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    torch.testing.assert_close(ours, ref_g, rtol=0, atol=0)
    assert saved == [((order.numel(),), torch.int64)], saved
