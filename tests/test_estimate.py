"""`moesaic-estimate` against the trainer's own tensors: every rank's parameters and AdamW moments,
dense and expert, byte for byte, and FSSDP's peak of gathered expert weights, in layouts with uneven
FSDP shards, replicas, expert data parallelism, HSDP, uneven owners and the gather's three schedules;
and its count of activations against what a real forward keeps."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import child_env, torchrun

BASE = ["experiment=smoke", "steps=3", "optim.warmup_steps=1", "eval_every=0", "logging.count_kept=true"]
BF16 = "parallel.mixed_precision=bf16"


def _plan(path, kind: str, ep: int, layers: int, seed: int = 1) -> str:
    from moesaic.parallel.doctor import make_plan

    make_plan(kind, 4, ep, seed=seed, num_layers=layers).save(path)
    return str(path)


def _check(run_dir) -> dict:
    """The estimate of the run's own config.yaml against what its summary.json measured."""
    from moesaic.trainer.config import load_config_yaml
    from moesaic.trainer.estimate import estimate

    s = json.loads((run_dir / "summary.json").read_text())
    cfg = load_config_yaml(run_dir / "config.yaml")
    rows = estimate(cfg, s["world_size"])
    assert len(rows) == s["world_size"]
    for est, dense, experts, gathered in zip(rows, s["dense_state_bytes_per_rank"], s["expert_state_bytes_per_rank"],
                                             s["fssdp_gathered_peak_bytes_per_rank"]):
        want = (est["dense_params"], est["dense_moments"], est["expert_params"], est["expert_moments"])
        if s["expert_sharding"] == "replicated":  # no plan: the trainer counts the experts among the dense parameters
            want = (want[0] + want[2], want[1] + want[3], 0, 0)
        got = (dense["params"], dense["optimizer"], experts["params"], experts["optimizer"])
        assert got == want, (est, got)
        if gathered is None:
            assert est["gathered_weights"] == 0
        else:
            assert gathered["weights"] == est["gathered_weights"], (est, gathered)
            assert gathered["with_grads"] <= est["gathered_weights"] + est["gathered_grads"], (est, gathered)
    # what the first forward kept for backward: the weights' copies byte for byte; the activations
    # as the routing allows. The estimate routes evenly: without a plan each rank's count is within
    # 0.5% (the batch's own buffer, one row longer than the batch); with one, the ranks' rows differ
    # (0.68-1.23x here, at 256 tokens a rank) but sum alike, and the EP dispatch's index tensors add
    # about 0.75% (ratios seen: mean 1.005-1.008)
    ratios = []
    for est, kept in zip(rows, s["kept_for_backward_per_rank"]):
        assert kept["weight_copies"] == est["weight_copies"] and kept["fsdp_gathered"] == est["fsdp_gathered"], (est, kept)
        ratios.append((kept["total"] - kept["weight_copies"]) / est["activations"])
    if s["expert_sharding"] == "replicated":
        assert all(1 <= r < 1.005 for r in ratios), ratios
    else:
        assert 1 <= sum(ratios) / len(ratios) < 1.02, ratios
    # the forward and backward's working set, measured on each rank (gradients aside): where nothing
    # is gathered, at least 99% of the estimate's one-process count (EP's all-to-all buffers add
    # nothing to it). Not counted, so the measured figure may exceed it: collectives in flight (a DDP
    # bucket's reduction, FSSDP's reduce-scatters), whose buffers overlap the peak or not as the
    # ranks' timing goes (one rank's figure moved by 73 KB between runs here), and FSDP2's backward,
    # which gathers each block's weights again and makes their unsharded gradients
    s["working"] = [(kept["working"], est["backward_working"], est["gathered_weights"] + est["gathered_grads"])
                    for est, kept in zip(rows, s["kept_for_backward_per_rank"])]
    if cfg.parallel.dense_sharding != "fsdp" and not any(g for _, _, g in s["working"]):
        assert all(measured >= 0.99 * working for measured, working, _ in s["working"]), s["working"]
    return s


@pytest.mark.slow
@pytest.mark.dist
def test_the_estimate_is_what_each_rank_holds(tmp_path):
    rep2 = _plan(tmp_path / "rep2.json", "replicated", 2, 2)
    rep4 = _plan(tmp_path / "rep4.json", "replicated", 4, 2)
    rand = _plan(tmp_path / "rand.json", "random", 4, 3, seed=3)
    three = ["model.num_layers=3", f"placement.plan={rand}", "placement.align_owners=false"]
    cases = {  # name: (ranks, overrides)
        # under bf16 autocast the weights' copies: every weight's (FSDP gathers fp32), experts included (no plan)
        "fsdp_padded": (2, ["parallel=ddp", "parallel.dense_sharding=fsdp", "model.dim=40", "model.num_heads=4",
                            "model.moe.num_experts=3", BF16]),
        "ep2_edp": (4, ["parallel=ep", "parallel.ep_size=2", f"placement.plan={rep2}", BF16]),  # the held experts'
        "ep_replicas_hsdp": (4, ["parallel=ep", f"placement.plan={rep4}", "parallel.dense_sharding=fsdp",  # no dense ones:
                                 "parallel.dense_shard_size=2", BF16, "parallel.dense_gather_dtype=bf16"]),  # bf16 gathers
        "fssdp_uneven_owners": (3, ["parallel=fssdp", "parallel.dense_sharding=fsdp"]),
        # (the run's closing evaluation held all 3 layers' gathered experts at once before FSSDPExperts.release
        # freed them without gradients: rank 0's peak was 6 experts, not the 4 of two consecutive layers)
        "fssdp_prefetch_bf16": (4, ["parallel=fssdp", *three, BF16]),  # experts gathered in bf16: no copies
        "fssdp_kept": (4, ["parallel=fssdp", *three, "parallel.reshard_after_forward=false", BF16,  # gathered in fp32:
                           "parallel.gather_dtype=fp32", "parallel.dense_sharding=fsdp"]),  # every computed expert's
        # copy; FSDP2 keeps every block's dense weights gathered too
        "fssdp_replicas_no_prefetch": (4, ["parallel=fssdp", f"placement.plan={rep4}", "parallel.prefetch=false"]),
        # contiguous, owners aligned: computed in place, the owned weights cast again in backward, or kept
        "fssdp_in_place_bf16": (2, ["parallel=fssdp", BF16]),
        "fssdp_in_place_kept_bf16": (2, ["parallel=fssdp", BF16, "parallel.reshard_after_forward=false"]),
        # resident EP whose held experts are cast again in backward: the dense weights' copies alone
        "ep_recast_bf16": (2, ["parallel=ep", BF16, "parallel.recast_expert_weights=true"]),
    }
    seen = {}
    for name, (n, extra) in cases.items():
        torchrun(n, [*BASE, *extra, f"logging.out_dir={tmp_path}", f"logging.run_name={name}"])
        seen[name] = _check(tmp_path / name)
    # the cases do exercise what they are named for
    held = [r["params"] for r in seen["fsdp_padded"]["dense_state_bytes_per_rank"]]
    assert held[0] != held[1]  # padded shards: rank 1 holds fewer rows
    owners = [r["params"] for r in seen["fssdp_uneven_owners"]["expert_state_bytes_per_rank"]]
    assert owners[0] == 2 * owners[1] == 2 * owners[2]  # 4 experts over 3 ranks
    peaks = {k: max(r["weights"] for r in seen[k]["fssdp_gathered_peak_bytes_per_rank"])
             for k in ("fssdp_prefetch_bf16", "fssdp_kept", "fssdp_replicas_no_prefetch")}
    assert all(peaks.values()), peaks
    copies = {k: [r["weight_copies"] for r in seen[k]["kept_for_backward_per_rank"]]
              for k in ("fssdp_in_place_bf16", "fssdp_in_place_kept_bf16", "ep_recast_bf16")}
    owned = 3 * 32 * 32 * 2 * 2 * 2  # per rank 2 of 4 experts (d 32, ffn 32: 3FD each) in 2 layers, bf16
    assert [a - b for a, b in zip(copies["fssdp_in_place_kept_bf16"], copies["fssdp_in_place_bf16"])] == [owned] * 2
    assert copies["ep_recast_bf16"] == copies["fssdp_in_place_bf16"], copies  # the dense weights' alone
    # FSDP2's backward working set, not counted: more than the estimate's on every rank
    assert all(m > w + g for k in ("fsdp_padded", "ep_replicas_hsdp", "fssdp_uneven_owners", "fssdp_kept")
               for m, w, g in seen[k]["working"])
    assert {k for k in seen if all(g == 0 for _, _, g in seen[k]["working"])} >= {
        "ep2_edp", "fssdp_in_place_bf16", "fssdp_in_place_kept_bf16", "ep_recast_bf16"}  # checked above
    gathered = {k: [r["fsdp_gathered"] for r in seen[k]["kept_for_backward_per_rank"]]
                for k in ("fsdp_padded", "ep_replicas_hsdp", "fssdp_kept", "ep2_edp")}
    assert gathered["fsdp_padded"] == [256 * 40 * 4 + 40 * 4] * 2  # the root: the tied embedding (fp32) and norm
    assert gathered["ep_replicas_hsdp"] == [(256 * 32 + 32) * 2] * 4  # in bf16
    assert all(g > (256 * 32 + 32) * 4 for g in gathered["fssdp_kept"]) and gathered["ep2_edp"] == [0] * 4  # DDP


def test_the_cli_compares_layouts_and_names_bad_input(tmp_path, capsys):
    """The command once in a process of its own, then its main in this one."""
    from moesaic.trainer.estimate import main_cli

    def run(*args):
        try:
            main_cli(list(args))
            code = 0
        except SystemExit as e:
            code = e.code
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess(args, code, out, err)

    proc = subprocess.run([sys.executable, "-m", "moesaic.trainer.estimate", "--world-size", "4", "--compare", "--json"],
                          capture_output=True, text=True, timeout=120, env=child_env(), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    assert set(out) == {"ddp", "ddp+fsdp", "ep", "ep+fsdp", "fssdp", "fssdp+fsdp"}
    big = {k: v["largest_rank"] for k, v in out.items()}
    # the demo model at 4 ranks: every rank of ddp holds all 8 experts, of EP and FSSDP 2 of them
    assert big["ddp"]["expert_params"] == 4 * big["ep"]["expert_params"] == 4 * big["fssdp"]["expert_params"]
    assert big["ep+fsdp"]["dense_params"] < big["ep"]["dense_params"] and big["ep"]["total"] < big["ddp"]["total"]
    proc = run("--world-size", "4", "model=fine_grained")
    assert proc.returncode == 0 and "| this config |" in proc.stdout and "MiB" in proc.stdout, proc.stderr
    # --savings: each memory setting the config leaves off, alone, then together (here EP, FSDP2, bf16)
    proc = run("--world-size", "2", "--savings", "--json", "experiment=smoke", "parallel=ep", "parallel.dense_sharding=fsdp",
               "parallel.mixed_precision=bf16")
    assert proc.returncode == 0, proc.stderr
    rows = {k: v["largest_rank"] for k, v in json.loads(proc.stdout).items()}
    assert list(rows) == ["this config", "+ recompute_moe_act", "+ activation_checkpoint=attention",
                          "+ activation_checkpoint=full", "+ recast_expert_weights", "+ dense_gather_dtype=bf16",
                          "+ optim.implementation=fused", "all of them"]
    base = rows["this config"]
    act = {k: r["activations"] for k, r in rows.items()}
    assert act["+ activation_checkpoint=full"] < act["+ activation_checkpoint=attention"] < act["this config"]
    assert act["+ recompute_moe_act"] < act["this config"] == act["+ recast_expert_weights"]
    held = 2 * 2 * 3 * 32 * 32 * 2  # EP 2: 2 of 4 experts (d 32, ffn 32) in each of 2 layers, their bf16 casts
    assert rows["+ recast_expert_weights"]["weight_copies"] == base["weight_copies"] - held
    assert rows["+ dense_gather_dtype=bf16"]["fsdp_gathered"] == base["fsdp_gathered"] // 2  # the root in bf16
    assert rows["all of them"]["weight_copies"] == 0 and min(r["total"] for r in rows.values()) == rows["all of them"]["total"]
    assert all(r["expert_params"] == base["expert_params"] for r in rows.values())  # the state does not change
    # AdamW's temporaries: `auto` counted as foreach on a GPU (the sqrt of a group's second moments), fused none;
    # the dense matrices (DTensors) and the experts (plain tensors) are two groups
    dense_matrices = base["dense_params"] // 4 - 5 * 16  # all but the 5 norms (d 32, in 2 shards)
    assert base["optimizer_working"] == 4 * max(dense_matrices, base["expert_params"] // 4) > 0
    assert rows["+ optim.implementation=fused"]["optimizer_working"] == 0
    proc = run("--world-size", "2", "--savings", "experiment=smoke", "parallel=fssdp", "parallel.activation_checkpoint=full")
    assert proc.returncode == 0 and "| setting |" in proc.stdout and "| this config |" in proc.stdout, proc.stderr
    assert "recast" not in proc.stdout and "recompute_moe_act |" not in proc.stdout  # fp32, FSSDP, full: nothing to add
    for args, message in [(["--world-size", "3", "parallel=ep", "parallel.ep_size=2"],
                           "parallel.ep_size (2) must divide the world size (3)"),
                          (["--world-size", "0"], "--world-size (0) must be >= 1"),
                          (["--world-size", "2", "parallel.engine=deepspeed"], "parallel.engine (deepspeed)"),
                          (["--world-size", "2", "--compare", "--savings"], "--compare and --savings: one at a time")]:
        proc = run(*args)
        assert proc.returncode == 2 and f"moesaic-estimate: error: {message}" in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("overrides", [
    [],
    ["parallel.mixed_precision=bf16"],
    ["parallel.mixed_precision=bf16", "parallel.recompute_moe_act=true", "model.moe.num_shared_experts=1"],
    ["parallel.activation_checkpoint=attention", "model.num_dense_layers=1", "model.moe_every=2", "model.num_layers=4"],
    ["parallel.activation_checkpoint=full", "parallel.mixed_precision=bf16"],
    ["model=fine_grained", "model.dim=64", "parallel.mixed_precision=fp16", "model.moe.router.score_func=sigmoid"],
], ids=["fp32", "bf16", "bf16-moe-act-shared", "attention-interleaved", "full-bf16", "fine-grained-fp16"])
def test_the_activation_count_is_what_a_forward_keeps(overrides):
    """The estimate's count, on fake tensors, equals the bytes that a real forward of the same model
    keeps for backward, byte for byte: activations and the weights' copies (every matrix's, in the
    autocast dtype), at the smoke batch."""
    import torch

    from moesaic.trainer.activations import forward_kept, kept_for_backward
    from moesaic.trainer.estimate import compose
    from moesaic.trainer.model import Transformer
    from moesaic.trainer.parallelize import apply_activation_checkpoint

    cfg = compose(["experiment=smoke", *overrides])
    torch.manual_seed(0)
    model = Transformer(cfg.model)
    apply_activation_checkpoint(model, cfg.parallel.activation_checkpoint, recompute_moe_act=cfg.parallel.recompute_moe_act)
    x = torch.randint(0, 256, (cfg.batch_size, cfg.data.seq_len), generator=torch.Generator().manual_seed(1))
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.parallel.mixed_precision)
    with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        _, real = forward_kept(model, lambda: model(x, x))
    assert kept_for_backward(cfg, cfg.batch_size) == real and real.total > 0
    # the weights' copies: autocast's of the dense weights, the experts' cast; none without autocast
    # (the head's, tied or not; under `full` the blocks' copies are made again in backward: the head's alone)
    full = cfg.parallel.activation_checkpoint == "full"
    casts = sum(p.numel() for n, p in model.named_parameters() if p.dim() > 1 and not (full and "layers." in n)) * 2
    assert real.weight_copies == (casts if dtype is not None else 0), (real, casts)
    assert real.expert_copies == (sum(p.numel() for n, p in model.named_parameters() if ".experts." in n) * 2
                                  if dtype is not None and not full else 0)


def test_the_cli_counts_activations():
    """The activations column: per micro-batch, fewer with the Triton kernels' activation (h13 kept
    alone) by exactly the slots' silu(h1), a capacity counted as dropless and said so, and dims that
    only the per-expert loop takes named as not counted."""
    from moesaic.trainer.estimate import compose, estimate

    def act(*overrides):
        rows = estimate(compose(["experiment=smoke", *overrides]), 2)
        assert rows[0]["activations"] == rows[1]["activations"]
        return rows[0]

    torch_k, triton_k = act("parallel.mixed_precision=bf16"), act("parallel.mixed_precision=bf16", "model.moe.kernels=triton")
    m = compose(["experiment=smoke"])
    slots = m.batch_size * m.data.seq_len * m.model.moe.top_k
    assert torch_k["activations"] - triton_k["activations"] == m.model.num_moe_layers * slots * m.model.moe.ffn_dim * 2
    assert torch_k["total"] - triton_k["total"] == torch_k["activations"] - triton_k["activations"]
    capped = act("model.moe.capacity_factor=1.0")
    assert capped["activations"] == act()["activations"] and "dropless" in capped["activations_note"]
    loop = act("model.dim=40", "model.num_heads=4", "model.moe.ffn_dim=20", "parallel.mixed_precision=bf16")
    assert loop["activations"] is None and "per-expert loop" in loop["activations_note"]
