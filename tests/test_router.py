"""Tier 1: the router's options against a per-token reference written from the papers' definitions:
renormalised top-k (Mixtral, Qwen3-MoE), the route scale (DeepSeek-V2/V3), and group-limited
("node-limited") routing with DeepSeek-V3's top-2-sum and DeepSeek-V2's max group scores."""

import json
from dataclasses import asdict, replace

import pytest
import torch

from moesaic.parallel.moe import MoEConfig
from moesaic.parallel.router import RouterConfig, TopKRouter
from moesaic.trainer.checkpoint import _identity, model_hash
from moesaic.trainer.model import ModelConfig

E, K, D = 12, 3, 16


def _reference(router: TopKRouter, x_TD: torch.Tensor) -> tuple[list[list[int]], list[list[float]]]:
    """Each token on its own, in plain Python: scores, groups ranked, top-k among their experts."""
    cfg = router.cfg
    ids_out, weights_out = [], []
    for x in x_TD:
        logits = (router.gate.weight @ x).tolist()
        if cfg.score_func == "softmax":
            m = max(logits)
            ex = [2.718281828459045 ** (v - m) for v in logits]
            scores = [v / sum(ex) for v in ex]
        else:
            scores = [1 / (1 + 2.718281828459045 ** -v) for v in logits]
        select = [s + b for s, b in zip(scores, router.bias_E.tolist())]
        candidates = list(range(E))
        if cfg.num_expert_groups:
            size = E // cfg.num_expert_groups
            groups = [list(range(g * size, (g + 1) * size)) for g in range(cfg.num_expert_groups)]

            def rank(group):
                best = sorted((select[e] for e in group), reverse=True)
                return sum(best[:2]) if cfg.group_score == "top2_sum" else best[0]

            chosen = sorted(groups, key=rank, reverse=True)[: cfg.num_limited_groups]
            candidates = sorted(e for g in chosen for e in g)
        ids = sorted(candidates, key=lambda e: select[e], reverse=True)[:K]
        w = [scores[e] for e in ids]
        if cfg.route_norm or (cfg.route_norm is None and cfg.score_func == "sigmoid"):
            w = [v / sum(w) for v in w]
        ids_out.append(ids)
        weights_out.append([v * cfg.route_scale for v in w])
    return ids_out, weights_out


ROUTERS = {
    "softmax": RouterConfig(),
    "mixtral (softmax, renormalised)": RouterConfig(route_norm=True),
    "sigmoid raw": RouterConfig(score_func="sigmoid", route_norm=False, route_scale=1.5),
    "deepseek-v3 (sigmoid, 4 groups of 3, 2 each, top2_sum, x2.5)": RouterConfig(
        score_func="sigmoid", route_scale=2.5, num_expert_groups=4, num_limited_groups=2),
    "deepseek-v2 (softmax, 6 groups of 2, 2 each, max, x16)": RouterConfig(
        route_scale=16.0, num_expert_groups=6, num_limited_groups=2, group_score="max"),
    "one group of 3 allowed": RouterConfig(score_func="sigmoid", num_expert_groups=4, num_limited_groups=1),
}


@pytest.mark.parametrize("name", list(ROUTERS))
@pytest.mark.parametrize("bias", [False, True])
def test_router_equals_per_token_reference(name, bias):
    torch.manual_seed(0)
    router = TopKRouter(D, E, K, ROUTERS[name])
    if bias:  # aux-loss-free balancing's bias: it moves the selection (and the groups), not the weights
        router.bias_E.copy_(torch.randn(E) * 0.3)
    x = torch.randn(64, D)
    out = router(x)
    ids, weights = _reference(router, x)
    assert out.expert_ids_TK.tolist() == ids
    torch.testing.assert_close(out.weights_TK, torch.tensor(weights), rtol=1e-5, atol=1e-6)
    assert out.tokens_per_expert_E.tolist() == torch.bincount(out.expert_ids_TK.flatten(), minlength=E).tolist()


def test_groups_bound_the_groups_a_token_uses_and_change_the_choice():
    torch.manual_seed(1)
    cfg = RouterConfig(score_func="sigmoid", num_expert_groups=4, num_limited_groups=2)
    grouped = TopKRouter(D, E, K, cfg)
    free = TopKRouter(D, E, K, replace(cfg, num_expert_groups=0, num_limited_groups=0))
    free.load_state_dict(grouped.state_dict())
    x = torch.randn(512, D)
    ids = grouped(x).expert_ids_TK
    groups_per_token = torch.tensor([len(set((row // 3).tolist())) for row in ids])
    assert groups_per_token.max() <= 2
    free_ids = free(x).expert_ids_TK
    free_groups = torch.tensor([len(set((row // 3).tolist())) for row in free_ids])
    assert (free_groups == 3).any()  # unlimited, some tokens spread over 3 groups: the limit did something
    # all groups allowed: the same choice as no groups at all
    every = TopKRouter(D, E, K, replace(cfg, num_limited_groups=4))
    every.load_state_dict(grouped.state_dict())
    assert torch.equal(every(x).expert_ids_TK, free_ids)


def test_route_norm_and_scale_set_the_weights_sum_and_their_gradient():
    torch.manual_seed(2)
    x = torch.randn(32, D)
    raw = TopKRouter(D, E, K, RouterConfig())
    norm = TopKRouter(D, E, K, RouterConfig(route_norm=True, route_scale=2.0))
    norm.load_state_dict(raw.state_dict())
    w_raw, w_norm = raw(x).weights_TK, norm(x).weights_TK
    assert (w_raw.sum(-1) < 1).all()  # softmax's default: the chosen experts' raw probabilities
    torch.testing.assert_close(w_norm.sum(-1), torch.full((32,), 2.0))
    torch.testing.assert_close(w_norm, 2.0 * w_raw / w_raw.sum(-1, keepdim=True))
    (w_norm * torch.arange(K)).sum().backward()  # the gate learns through the renormalised, scaled weights
    assert norm.gate.weight.grad.abs().sum() > 0


def test_fp32_router_under_bf16_autocast_routes_as_the_fp32_model():
    """model.moe.router.dtype=fp32: under bf16 autocast the gate's matmul stays fp32, so the choices,
    weights, losses and the gate's gradient are those of the fp32 model, bit for bit; `auto` computes
    the logits in bf16 and routes some of these 512 tokens of 64 experts otherwise."""
    torch.manual_seed(0)
    D, E, K = 64, 64, 6
    x = torch.randn(512, D)
    routers = {d: TopKRouter(D, E, K, RouterConfig(dtype=d)) for d in ("auto", "fp32")}
    routers["fp32"].load_state_dict(routers["auto"].state_dict())

    def route(router, autocast: bool):
        router.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = router(x)
        (out.weights_TK.float().square().sum() + out.aux_loss + out.z_loss).backward()
        return out, router.gate.weight.grad.clone()

    ref, ref_grad = route(routers["fp32"], autocast=False)
    for name, autocast, equal in (("fp32", True, True), ("auto", True, False)):
        out, grad = route(routers[name], autocast)
        same = (torch.equal(out.expert_ids_TK, ref.expert_ids_TK) and torch.equal(out.weights_TK, ref.weights_TK)
                and torch.equal(out.aux_loss, ref.aux_loss) and torch.equal(grad, ref_grad))
        assert same == equal, name
    assert not torch.equal(route(routers["auto"], True)[0].expert_ids_TK, ref.expert_ids_TK)  # some choices move


@pytest.mark.parametrize("router,moe,match", [
    ({"num_expert_groups": 3, "num_limited_groups": 1}, {}, r"num_expert_groups \(3\) must divide model\.moe\.num_experts \(8\)"),
    ({"num_expert_groups": 4}, {}, r"num_limited_groups \(0\) must be in \[1, num_expert_groups \(4\)\]"),
    ({"num_expert_groups": 4, "num_limited_groups": 5}, {}, r"num_limited_groups \(5\) must be in \[1, num_expert_groups \(4\)\]"),
    ({"num_limited_groups": 2}, {}, r"num_limited_groups \(2\) needs model\.moe\.router\.num_expert_groups"),
    ({"num_expert_groups": 4, "num_limited_groups": 1}, {"top_k": 3}, r"model\.moe\.top_k \(3\) must be <= num_limited_groups x experts per group \(1 x 2\)"),
    ({"num_expert_groups": 8, "num_limited_groups": 4}, {}, r"group_score \('top2_sum'\) needs >= 2 experts per group"),
    ({"group_score": "sum"}, {}, r"model\.moe\.router\.group_score \('sum'\) must be one of 'top2_sum', 'max'"),
    ({"route_scale": 0.0}, {}, r"model\.moe\.router\.route_scale \(0\.0\) must be > 0"),
    ({"aux_loss_scope": "global"}, {}, r"model\.moe\.router\.aux_loss_scope \('global'\) must be one of 'micro_batch', 'sequence', 'global_batch'"),
    ({"dtype": "bf16"}, {}, r"model\.moe\.router\.dtype \('bf16'\) must be one of 'auto', 'fp32'"),
])
def test_bad_router_config_gets_a_named_error(router, moe, match):
    with pytest.raises(ValueError, match=match):
        MoEConfig(num_experts=8, **{"top_k": 2, **moe}, router=RouterConfig(**router))


def test_checkpoint_identity_keeps_older_checkpoints_and_tells_real_changes():
    """Checkpoints from before these fields existed resume under their defaults; a change that moves
    the math changes the model hash."""
    base = ModelConfig()
    old = asdict(base)
    for k in ("route_norm", "route_scale", "num_expert_groups", "num_limited_groups", "group_score", "aux_loss_scope",
              "dtype"):
        del old["moe"]["router"][k]
    del old["moe_every"]
    assert _identity(json.loads(json.dumps(old))) == _identity(asdict(base))
    assert model_hash(replace(base, moe_every=2)) != model_hash(base)

    def with_router(**kw):
        return replace(base, moe=replace(base.moe, router=replace(base.moe.router, **kw)))

    assert model_hash(with_router(route_norm=False)) == model_hash(base)  # softmax's default, said out loud
    assert model_hash(with_router(score_func="sigmoid", route_norm=True)) == model_hash(with_router(score_func="sigmoid"))
    assert model_hash(with_router(group_score="max")) == model_hash(base)  # no groups: how they rank is moot
    assert model_hash(with_router(dtype="fp32")) == model_hash(base)  # a precision choice, as mixed precision
    changed = [with_router(route_norm=True), with_router(route_scale=2.5), with_router(aux_loss_scope="sequence"),
               with_router(num_expert_groups=4, num_limited_groups=2), with_router(score_func="sigmoid")]
    assert len({model_hash(c) for c in changed} | {model_hash(base)}) == len(changed) + 1


def test_grouped_model_preset_routes_within_its_groups():
    """configs/model/grouped.yaml (DeepSeek-V3's routing at demo scale): every token of every MoE layer
    uses at most 4 of the 8 groups, and the block still equals the per-token sum of its experts."""
    from hydra import compose, initialize_config_module

    from moesaic.trainer.config import register_configs, to_train_config
    from moesaic.trainer.model import Transformer

    register_configs()
    with initialize_config_module(config_module="moesaic.configs", version_base=None):
        cfg = to_train_config(compose(config_name="config", overrides=["model=grouped"])).model
    torch.manual_seed(0)
    model = Transformer(cfg)
    x = torch.randint(0, 256, (2, 64))
    model(x, torch.roll(x, -1, 1))
    layers = model.moe_layers()
    assert len(layers) == 3
    per_group = cfg.moe.num_experts // cfg.moe.router.num_expert_groups
    for moe in layers:
        ids = moe.last_route.expert_ids_TK
        assert max(len(set((row // per_group).tolist())) for row in ids) <= 4
        torch.testing.assert_close(moe.last_route.weights_TK.sum(-1), torch.full((ids.shape[0],), 2.5))


def test_softmax_top1_with_route_norm_gives_unit_weights():
    """Renormalised top-1 weighs each token's expert by exactly route_scale: the gate then learns only
    through the aux and z losses (the user's choice; Switch keeps the raw probability)."""
    router = TopKRouter(D, E, 1, RouterConfig(route_norm=True))
    torch.testing.assert_close(router(torch.randn(8, D)).weights_TK, torch.ones(8, 1))


@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
def test_sequence_wise_aux_loss_is_the_mean_of_each_sequence_alone(score_func):
    """aux_loss_scope=sequence (DeepSeek-V3's sequence-wise balance loss): the micro-batch loss of each
    sequence on its own, averaged; for one sequence, the micro-batch loss itself."""
    torch.manual_seed(3)
    B, S = 4, 10
    seq = TopKRouter(D, E, K, RouterConfig(score_func=score_func, aux_loss_scope="sequence"))
    batch = TopKRouter(D, E, K, RouterConfig(score_func=score_func))
    batch.load_state_dict(seq.state_dict())
    x = torch.randn(B * S, D)
    aux = seq(x, seq_len=S).aux_loss
    alone = torch.stack([batch(x[b * S:(b + 1) * S]).aux_loss for b in range(B)]).mean()
    torch.testing.assert_close(aux, alone)
    assert not torch.allclose(aux, batch(x).aux_loss)  # a different loss than the micro-batch's
    torch.testing.assert_close(seq(x[:S], seq_len=S).aux_loss, batch(x[:S]).aux_loss)
    aux.backward()
    assert seq.gate.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match=r"needs the tokens as whole sequences: 40 tokens, seq_len 7"):
        seq(x, seq_len=7)


def test_global_batch_aux_loss_counts_the_steps_micro_batches_so_far():
    """aux_loss_scope=global_batch in one process: f_e over the step's micro-batches so far (the
    running mean), p_e over this micro-batch; its first micro-batch is the micro-batch loss. A second
    forward of one micro-batch (activation checkpointing's recompute) finds the same total, and a
    forward without gradients (evaluation) neither counts nor touches it."""
    torch.manual_seed(4)
    glob = TopKRouter(D, E, K, RouterConfig(aux_loss_scope="global_batch"))
    local = TopKRouter(D, E, K, RouterConfig())
    local.load_state_dict(glob.state_dict())
    x1, x2, x3 = torch.randn(12, D), torch.randn(12, D), torch.randn(20, D)
    first = glob(x1)
    torch.testing.assert_close(first.aux_loss, local(x1).aux_loss)
    with torch.no_grad():
        torch.testing.assert_close(glob(x3).aux_loss, local(x3).aux_loss)  # evaluation: this batch alone
    glob.end_micro_batch(last=False)
    second = glob(x2)
    torch.testing.assert_close(glob(x2).aux_loss, second.aux_loss, rtol=0, atol=0)  # the recompute's
    counts = first.tokens_per_expert_E + second.tokens_per_expert_E
    p2 = torch.softmax(glob.gate(x2).float(), -1).mean(0)
    torch.testing.assert_close(second.aux_loss, E * (counts / (24 * K) * p2).sum())
    assert not torch.allclose(second.aux_loss, local(x2).aux_loss)
    glob.end_micro_batch(last=True)  # the step is done: the next one starts from its own micro-batch
    torch.testing.assert_close(glob(x3).aux_loss, local(x3).aux_loss)

