"""The benchmark scripts run on a tiny setting and print their tables (timings are not tested)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


def run(script, *args, timeout=300):
    proc = subprocess.run([sys.executable, str(BENCH / script), *map(str, args)], capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_gpu_moe_layer_tiny_on_cpu(tmp_path):
    out = run("gpu_moe_layer.py", "--device", "cpu", "--tiny", "--json", tmp_path / "r.json")
    assert "| tiny" in out and "dense matmul" in out
    rows = json.loads((tmp_path / "r.json").read_text())["rows"]
    assert rows[0]["fwd_bwd_tflops"] > 0


def test_placement_scale_small(tmp_path):
    out = run("placement_scale.py", "--preset", "mixtral", "--tokens", 2000, "--gpus", 4, "--gpus-per-node", 2,
              "--time-limit", 10, "--json", tmp_path / "s.json")
    assert "| affinity" in out and "| eplb" in out
    rows = json.loads((tmp_path / "s.json").read_text())["rows"]
    assert {r["method"] for r in rows} == {"contiguous", "round_robin", "eplb", "moetuner", "affinity"}


@pytest.mark.slow
def test_placement_quality_one_domain(tmp_path):
    out = run("placement_quality.py", "--domains", "coding", "--epsilons", 0.05, 1.0, "--time-limit", 20,
              "--json", tmp_path / "q.json", "--plot", tmp_path / "t.png")
    assert "## 8 GPUs, 2 slots per GPU" in out and (tmp_path / "t.png").stat().st_size > 2000


@pytest.mark.slow
@pytest.mark.dist
def test_compare_tiny(tmp_path):
    out = run("compare.py", "--model", "tiny", "--warm-steps", 4, "--warmup", 1, "--steps", 3, "--rounds", 1,
              "--extra", "batch_size=2", "data.seq_len=32", "data.max_bytes=2000000", "eval_batches=1",
              "--cache", tmp_path / "c", "--json", tmp_path / "r.json", timeout=900)
    assert "## (a) DeepSpeed-MoE ep_size = 4" in out and "## (b) DeepSpeed-MoE ep_size = 2" in out
    r = json.loads((tmp_path / "r.json").read_text())["settings"]
    unit = 2 * 3 * 32 * 32 * 4 / 2**20  # MiB of one expert (tiny: d 32, ffn 32, fp32) in each of 2 layers
    # expert state from the tensors, against what each layout must hold per rank (E = 4 experts):
    # DeepSpeed ZeRO-2 keeps its local experts, an fp32 master partition and two Adam moments, and at
    # the end of backward the local experts' full gradients (ep 4: 1 expert each; ep 2: 2, partitions of 1)
    assert r["a"]["contenders"]["deepspeed-moe"]["expert_state_MiB"] == pytest.approx((1 + 1 + 1 + 2) * unit)
    assert r["b"]["contenders"]["deepspeed-moe"]["expert_state_MiB"] == pytest.approx((2 + 2 + 1 + 2) * unit)
    assert r["a"]["contenders"]["moesaic-ep"]["expert_state_MiB"] == pytest.approx(4 * unit)
    assert r["b"]["contenders"]["moesaic-ep"]["expert_state_MiB"] == pytest.approx(8 * unit)
    for s in ("a", "b"):
        c = r[s]["contenders"]
        for name in ("moesaic-fssdp", "moesaic-fssdp-fixed-owners"):  # one owned expert per layer, + gathered
            fssdp = c[name]
            assert fssdp["expert_state_MiB"] == pytest.approx(4 * unit + fssdp["working_set_MiB"])
        # owners that follow the plan compute their experts in place; fixed owners gather them
        assert c["moesaic-fssdp"]["working_set_MiB"] == 0
        assert "expert_params" not in c["moesaic-fssdp"]["bytes_MiB_per_step"]
        # DeepSpeed-MoE pads every expert's buffer to the largest load: never fewer token bytes than dropless EP
        assert c["deepspeed-moe"]["bytes_MiB_per_step"]["tokens"] >= c["moesaic-ep"]["bytes_MiB_per_step"]["tokens"] > 0
        assert "dense_grads" in c["moesaic-ep"]["bytes_MiB_per_step"] and "zero_grads" in c["deepspeed-moe"]["bytes_MiB_per_step"]
        assert all(x["median_step_s"] > 0 and x["final_train_loss"] < 6 for x in c.values())



def test_gpu_train_tiny_on_cpu(tmp_path):
    out = run("gpu_train.py", "--device", "cpu", "--tiny", "--batch", 2, "--warmup", 1, "--steps", 2,
              "--json", tmp_path / "g.json")
    assert "whole training steps" in out
    row = json.loads((tmp_path / "g.json").read_text())["rows"][0]
    assert row["mfu"] > 0 and row["tokens_per_s"] > 0 and row["last_loss"] < 6


def test_gpu_train_variants_tiny_on_cpu(tmp_path):
    run("gpu_train.py", "--device", "cpu", "--tiny", "--batch", 2, "--warmup", 1, "--steps", 2,
        "--variant", "w13", "complex-rotary", "--json", tmp_path / "g.json")
    row = json.loads((tmp_path / "g.json").read_text())["rows"][0]
    assert row["run"].endswith("w13, complex-rotary") and row["last_loss"] < 6


def test_gpu_variants_compute_what_they_replace():
    """Each candidate speed-up equals the library code it would replace (outputs and gradients)."""
    import torch

    sys.path.insert(0, str(BENCH))
    from gpu_variants import complex_rotary, fused_w13_swiglu

    from moesaic.parallel.experts import grouped_swiglu
    from moesaic.trainer.model import apply_rotary, rotary_tables

    torch.manual_seed(0)
    E, D, Fd = 3, 8, 12
    ws = [torch.randn(E, Fd, D, requires_grad=True), torch.randn(E, D, Fd, requires_grad=True),
          torch.randn(E, Fd, D, requires_grad=True)]
    x = torch.randn(9, D, requires_grad=True)
    counts = torch.tensor([4, 0, 5])
    outs, grads = [], []
    w13 = torch.cat([ws[0], ws[2]], dim=1).detach().requires_grad_()
    y = grouped_swiglu(x, counts, *ws)
    y.square().sum().backward()
    ref = [t.grad.clone() for t in (x, *ws)]
    x.grad = None
    y13 = fused_w13_swiglu(x, counts, w13, ws[1])
    y13.square().sum().backward()
    torch.testing.assert_close(y13, y)
    torch.testing.assert_close(x.grad, ref[0])
    torch.testing.assert_close(ws[1].grad, 2 * ref[2])  # w2's gradient accumulated twice
    torch.testing.assert_close(w13.grad, torch.cat([ref[1], ref[3]], dim=1))
    cos, sin = rotary_tables(8, 16, 10000.0)
    q = torch.randn(2, 3, 16, 8)
    torch.testing.assert_close(complex_rotary(q, cos, sin), apply_rotary(q, cos, sin))
    torch.testing.assert_close(complex_rotary(q[..., :10, :], cos, sin), apply_rotary(q[..., :10, :], cos[:10], sin[:10]))


def _tiny_model_and_reference():
    """gpu_train's tiny model, a batch, its loss and every parameter's gradient (the library's layer)."""
    import torch

    sys.path.insert(0, str(BENCH))
    from gpu_train import TINY

    from moesaic.trainer.model import ModelConfig, Transformer

    torch.manual_seed(0)
    model = Transformer(ModelConfig(**TINY))
    x = torch.randint(0, 256, (2, 32))
    out = model(x, x)
    out.loss.backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return model, x, out, ref


def test_fused_w13_model_equals_the_library_model():
    """`--variant w13` stores [w1; w3] as one parameter: the same loss, and its gradient is theirs."""
    import torch

    model, x, out, ref = _tiny_model_and_reference()
    from gpu_train import _groups
    from gpu_variants import fuse_w13

    assert fuse_w13(model) == 2
    out13 = model(x, x)
    out13.loss.backward()
    torch.testing.assert_close(out13.loss, out.loss)
    grads = dict(model.named_parameters())
    for i in range(2):
        pre = f"layers.{i}.moe.experts."
        torch.testing.assert_close(grads[pre + "w13_EGD"].grad, torch.cat([ref[pre + "w1_EFD"], ref[pre + "w3_EFD"]], 1))
        torch.testing.assert_close(grads[pre + "w2_EDF"].grad, ref[pre + "w2_EDF"])
    # the overlapped optimizer's groups cover every parameter once, in the forward's order
    groups = _groups(model)
    assert len(groups) == 4 and sorted(id(p) for g in groups for p in g) == sorted(id(p) for p in model.parameters())


def test_fused_moe_equals_the_loop():
    """bench/fused_moe.py's layer (its ops' torch paths, as on a machine without CUDA) against the
    library's gather, per-expert loop and combine in fp32: output and every gradient, dropless and
    with a third of the slots dropped, and with the weight gradients one mm per expert."""
    import torch

    sys.path.insert(0, str(BENCH))
    from fused_moe import check_against_loop

    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 3e-2)):
        for drop, loop_dw in ((0.0, False), (0.3, False), (0.3, True)):
            err = check_against_loop(torch.device("cpu"), dtype, tokens=50, top_k=3, num_experts=5, drop=drop,
                                     loop_dw=loop_dw)
            assert max(err.values()) < tol, (dtype, drop, loop_dw, err)


def test_fused_moe_kernels_in_the_interpreter():
    """The same, with the Triton kernels run by Triton's CPU interpreter (fp32 and fp16; numpy has no
    bf16): blocks cut by d and f, an expert without rows, dropped slots."""
    code = """
import sys, torch
sys.path.insert(0, sys.argv[1])
from common import ensure_importable; ensure_importable()
import fused_moe
from fused_moe import check_against_loop
assert fused_moe._use_triton(torch.zeros(1))
for dtype, tol in ((torch.float32, 1e-5), (torch.float16, 3e-3)):
    for kw in (dict(), dict(tokens=50, top_k=3, num_experts=6, dim=40, ffn=24, drop=0.3)):
        err = check_against_loop(torch.device("cpu"), dtype, **kw)
        assert max(err.values()) < tol, (dtype, kw, err)
        print(dtype, err)
"""
    env = {**__import__("os").environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-c", code, str(BENCH)], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("grad_w13") == 4


def test_fused_variant_model_equals_the_library_model():
    """`--variant fused` in moesaic's model: the same loss and gradients as the library's layer."""
    import torch

    import moesaic.parallel.moe as moe

    model, x, out, ref = _tiny_model_and_reference()
    from gpu_variants import apply, use

    saved = moe.gather_slots, moe.combine_slots
    try:
        use(["fused"])
        assert moe.combine_slots is not saved[1]
        apply(model, ["fused"])
        out2 = model(x, x)
        out2.loss.backward()
    finally:
        moe.gather_slots, moe.combine_slots = saved
    torch.testing.assert_close(out2.loss, out.loss)
    for n, p in model.named_parameters():
        if n.endswith("w13_EGD"):
            pre = n[: -len("w13_EGD")]
            torch.testing.assert_close(p.grad, torch.cat([ref[pre + "w1_EFD"], ref[pre + "w3_EFD"]], 1))
        else:
            torch.testing.assert_close(p.grad, ref[n], msg=n)


def test_layer_traffic_on_meta(tmp_path):
    """`gpu_moe_layer.py --traffic` counts the bytes outside the GEMMs at the GPU shapes, on meta tensors."""
    run("gpu_moe_layer.py", "--traffic", "--json", tmp_path / "t.json")
    rows = {(r["shape"], r["layer"]): r for r in json.loads((tmp_path / "t.json").read_text())["rows"]}
    lib, fused = rows[("deepseekmoe-16b", "library")], rows[("deepseekmoe-16b", "fused")]
    assert 5.0 < lib["GB"] < 5.6 and fused["GB"] < 0.5 * lib["GB"]


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
    assert all(float(p.max()) < 1.0 for p in ps)


def test_triton_grouped_gemm_equals_the_loop_in_the_interpreter():
    """bench/triton_grouped.py's kernels (forward GEMMs, input and weight gradients) against the
    per-expert loop, run by Triton's CPU interpreter: fp32 and fp16, an expert without rows, a K that
    is not a multiple of the block (numpy has no bf16, which the GPU check covers)."""
    code = """
import sys, torch
sys.path.insert(0, sys.argv[1])
from common import ensure_importable; ensure_importable()
from triton_grouped import check_against_loop
cpu = torch.device("cpu")
for dtype, tol in ((torch.float32, 1e-5), (torch.float16, 3e-3)):
    for shape in (dict(), dict(num_experts=3, dim=32, ffn=40, counts=(16, 17, 0))):
        err = check_against_loop(cpu, dtype, **shape)
        assert max(err.values()) < tol, (dtype, shape, err)
        print(dtype, err)
"""
    env = {**__import__("os").environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-c", code, str(BENCH)], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("grad_w2") == 4


def test_gpu_grouped_gemm_tiny_in_the_interpreter(tmp_path):
    env = {**__import__("os").environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, str(BENCH / "gpu_grouped_gemm.py"), "--device", "cpu", "--tiny",
                           "--json", str(tmp_path / "g.json")], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((tmp_path / "g.json").read_text())
    assert max(res["check_vs_loop"].values()) < 1e-5
    assert [r["gemm"] for r in res["rows"]] == ["forward (ragged M)", "input grad (ragged M)", "weight grad (ragged K)"]


def test_layer_gemms_tiny(tmp_path):
    """`gpu_grouped_gemm.py --layer`: the library's nine GEMMs and the w13 layout's six, and their sums."""
    run("gpu_grouped_gemm.py", "--device", "cpu", "--tiny", "--layer", "--json", tmp_path / "l.json")
    rows = json.loads((tmp_path / "l.json").read_text())["rows"]
    for layout, n in (("library", 6), ("w13", 6)):
        mine = [r for r in rows if r["layout"] == layout]
        assert len(mine) == n + 1 and mine[-1]["gemm"] == "all (fwd+bwd)"
        assert abs(sum(r["ms"] for r in mine[:-1]) - mine[-1]["ms"]) < 1e-9


def test_loss_curves_compare_runs(tmp_path):
    """bench/loss_curves.py: each run's losses at the chosen steps and its gap to the first run."""
    sys.path.insert(0, str(BENCH))
    from loss_curves import compare, curves

    for name, losses in (("a", [5.0, 4.0, 3.0]), ("b", [5.0, 4.5, 2.0])):
        (tmp_path / f"{name}.json").write_text(json.dumps({"rows": [{"run": name, "losses": losses}, {"run": "x", "error": "oom"}]}))
    rows = compare(curves([tmp_path / "a.json", tmp_path / "b.json"]), steps=(1, 3))
    assert [r["run"] for r in rows] == ["a: a", "b: b"]
    assert rows[0]["max |diff| vs first"] == 0 and rows[1]["max |diff| vs first"] == 1.0
    assert rows[1]["step 3"] == 2.0 and abs(rows[1]["mean |diff| vs first"] - 0.5) < 1e-12
    out = run("loss_curves.py", tmp_path / "a.json", tmp_path / "b.json", tmp_path / "missing.json")
    assert "| b: b" in out


def test_trainer_runs_table(tmp_path):
    """bench/trainer_runs.py reads each run's summary.json (as gpu_check.sh trainer writes them)."""
    for name, comp in (("eager", None), ("compiled", {"graphs": 2, "graph_breaks": 0})):
        (tmp_path / name).mkdir()
        (tmp_path / name / "summary.json").write_text(json.dumps(
            {"device": "cuda", "backend": "nccl", "expert_sharding": "fssdp", "compile": comp, "steps": 300,
             "final_train_loss": 2.5, "val_bpb": 3.1, "tokens_per_s": 1e5, "median_step_s": 0.01}))
    out = run("trainer_runs.py", tmp_path, "--json", tmp_path / "t.json")
    rows = {r["run"]: r for r in json.loads((tmp_path / "t.json").read_text())["rows"]}
    assert rows["compiled"]["compile"] and rows["compiled"]["graphs"] == 2 and not rows["eager"]["compile"]
    assert "| compiled" in out


def test_check_w13_against_the_loop():
    """The GPU diagnostic for the w13 variant: on CPU both paths equal the fp32 loop (fp32), and
    stay within bf16 rounding of it (bf16)."""
    import torch

    sys.path.insert(0, str(BENCH))
    from gpu_variants import check_w13

    small = dict(tokens=256, experts=4, top_k=2, dim=32, ffn=24)
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 3e-2)):
        res = check_w13(torch.device("cpu"), dtype, **small)
        assert set(res) == {"library", "w13"}
        assert all(v < tol for errs in res.values() for v in errs.values()), (dtype, res)


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


@pytest.mark.slow
@pytest.mark.dist
def test_simulate_calibrate_tiny(tmp_path):
    out = run("simulate_calibrate.py", "--tokens", 128, "--dim", 32, "--ffn", 32, "--layers", 2, "--reps", 2,
              "--json", tmp_path / "c.json")
    assert "Simulator time calibration" in out
    rows = json.loads((tmp_path / "c.json").read_text())["rows"]
    assert len(rows) == 4 and all(r["measured (ms)"] > 0 and r["simulated (ms)"] > 0 for r in rows)
    assert rows[0]["sim a2a (ms)"] == 0 and rows[1]["sim a2a (ms)"] > 0


def test_simulate_small(tmp_path):
    out = run("simulate.py", "--preset", "mixtral", "--gpus", 4, 8, "--layers", 2, "--tokens-per-gpu", 64,
              "--time-limit", 5, "--json", tmp_path / "s.json")
    assert "## training step, MoE part" in out and "coherent inference" in out
    rows = json.loads((tmp_path / "s.json").read_text())["train"]
    assert {r["gpus"] for r in rows} == {4, 8} and len(rows) == 10
    assert all(r["step_ms"] > 0 for r in rows)
    assert all(r["speedup_vs_contiguous"] == 1.0 for r in rows if r["strategy"] == "EP contiguous")


def test_load_predictors_few_steps(tmp_path):
    out = run("load_predictors.py", "--steps", 20, "--batch", 4, "--warmup", 2, "--window", 2, "--json", tmp_path / "p.json")
    assert "window" in out and "affinity" in out


@pytest.mark.slow
@pytest.mark.dist
def test_fssdp_memory_one_step(tmp_path):
    out = run("fssdp_memory.py", "--modes", "resident-ep4", "fssdp", "--steps", 1, "--plan", "replicated",
              "--json", tmp_path / "m.json", timeout=600)
    assert "| fssdp" in out
    rows = json.loads((tmp_path / "m.json").read_text())["rows"]
    fs = [r for r in rows if r["mode"] == "fssdp"]
    assert len(fs) == 4 and all(r["resident_MiB"] == 12.0 for r in fs)  # one copy of the 12 MiB of experts, over 4
    assert sum(r["expert_gather_MiB"] for r in fs) > 0


@pytest.mark.slow
@pytest.mark.dist
def test_replan_overhead_short(tmp_path):
    out = run("replan_overhead.py", "--steps", 8, "--every", 4, "--repeats", 1, "--cases", "fssdp, fixed plan",
              "fssdp, re-plan eplb", "--json", tmp_path / "o.json", timeout=600)
    assert "re-plan eplb" in out


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
