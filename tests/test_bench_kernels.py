"""The GPU candidates' code on CPU: the Triton kernels (through Triton's interpreter), the fused
layer and the stored-w13 variant against the library's layer, and the layer's byte and GEMM
accounts. Timings are not tested."""

import json
import subprocess
import sys

from test_bench import BENCH, run


def interpreted(*args) -> str:
    """Run python with `args` under Triton's CPU interpreter (TRITON_INTERPRET=1); its stdout."""
    env = {**__import__("os").environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout

def test_gpu_variants_compute_what_they_replace():
    """Each candidate equals the library code it stands beside (outputs and gradients)."""
    import torch

    sys.path.insert(0, str(BENCH))
    from gpu_variants import complex_rotary, split_swiglu

    from moesaic.parallel.experts import grouped_swiglu
    from moesaic.trainer.model import apply_rotary, rotary_tables

    torch.manual_seed(0)
    E, D, Fd = 3, 8, 12
    w13, w2 = torch.randn(E, 2 * Fd, D, requires_grad=True), torch.randn(E, D, Fd, requires_grad=True)
    w1, w3 = (t.detach().clone().requires_grad_() for t in w13.chunk(2, dim=1))
    x = torch.randn(9, D, requires_grad=True)
    counts = torch.tensor([4, 0, 5])
    y = grouped_swiglu(x, counts, w13, w2)
    y.square().sum().backward()
    ref = [t.grad.clone() for t in (x, w13, w2)]
    x.grad = None
    y_split = split_swiglu(x, counts, w1, w2, w3)
    y_split.square().sum().backward()
    torch.testing.assert_close(y_split, y)
    torch.testing.assert_close(x.grad, ref[0])
    torch.testing.assert_close(w2.grad, 2 * ref[2])  # w2's gradient accumulated twice
    # one GEMM of N = 2F against two of N = F: with more than one thread the CPU's kernels sum in
    # other orders (1.1e-5 relative measured with 2 threads; equal to fp32's default with 1)
    torch.testing.assert_close(torch.cat([w1.grad, w3.grad], dim=1), ref[1], rtol=1e-4, atol=1e-5)
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


def test_w1w3_model_equals_the_library_model():
    """`--variant w1w3` stores w1 and w3 apart again: the same loss, and their gradients are w13's halves."""
    import torch

    model, x, out, ref = _tiny_model_and_reference()
    from gpu_train import _groups
    from gpu_variants import split_w13

    assert split_w13(model) == 2
    out_split = model(x, x)
    out_split.loss.backward()
    torch.testing.assert_close(out_split.loss, out.loss)
    grads = dict(model.named_parameters())
    for i in range(2):
        pre = f"layers.{i}.moe.experts."
        both = torch.cat([grads[pre + "w1_split"].grad, grads[pre + "w3_split"].grad], 1)
        torch.testing.assert_close(both, ref[pre + "w13_EGD"])
        torch.testing.assert_close(grads[pre + "w2_EDF"].grad, ref[pre + "w2_EDF"])
    # the overlapped optimizer's groups cover every parameter once, in the forward's order
    groups = _groups(model)
    assert len(groups) == 4 and sorted(id(p) for g in groups for p in g) == sorted(id(p) for p in model.parameters())


def test_fused_moe_equals_the_loop():
    """The library's layer with kernels="triton" (its ops' torch paths, as on a machine without CUDA)
    against the torch path's gather, per-expert loop and combine in fp32: output and every gradient,
    dropless and with a third of the slots dropped, and with the weight gradients one mm per expert
    (bench/fused_moe.py)."""
    import torch

    sys.path.insert(0, str(BENCH))
    from fused_moe import check_against_loop

    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 3e-2)):
        for drop, loop_dw in ((0.0, False), (0.3, False), (0.3, True)):
            err = check_against_loop(torch.device("cpu"), dtype, tokens=50, top_k=3, num_experts=5, drop=drop,
                                     loop_dw=loop_dw)
            assert max(err.values()) < tol, (dtype, drop, loop_dw, err)


def test_fused_variant_model_equals_the_library_model():
    """`--variant fused` in moesaic's model (kernels="triton" in every MoE layer): the same loss and
    gradients as the torch path."""
    import torch

    model, x, out, ref = _tiny_model_and_reference()
    from gpu_variants import apply

    apply(model, ["fused"])
    assert {m.kernels for m in model.modules() if hasattr(m, "kernels")} == {"triton"}
    out2 = model(x, x)
    out2.loss.backward()
    torch.testing.assert_close(out2.loss, out.loss)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref[n], msg=n)


def test_layer_traffic_on_meta(tmp_path):
    """`gpu_moe_layer.py --traffic` counts the bytes outside the GEMMs at the GPU shapes, on meta tensors."""
    run("gpu_moe_layer.py", "--traffic", "--json", tmp_path / "t.json")
    rows = {(r["shape"], r["layer"]): r for r in json.loads((tmp_path / "t.json").read_text())["rows"]}
    old, lib, fused = (rows[("deepseekmoe-16b", k)] for k in ("w1w3", "torch", "triton"))
    assert 5.0 < old["GB"] < 5.6 and 4.4 < lib["GB"] < old["GB"] and fused["GB"] < 0.5 * lib["GB"]


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
    assert interpreted("-c", code, BENCH).count("grad_w2") == 4


def test_gpu_grouped_gemm_tiny_in_the_interpreter(tmp_path):
    interpreted(BENCH / "gpu_grouped_gemm.py", "--device", "cpu", "--tiny", "--json", tmp_path / "g.json")
    res = json.loads((tmp_path / "g.json").read_text())
    assert max(res["check_vs_loop"].values()) < 1e-5
    assert [r["gemm"] for r in res["rows"]] == ["forward (ragged M)", "input grad (ragged M)", "weight grad (ragged K)"]


def test_layer_gemms_tiny(tmp_path):
    """`gpu_grouped_gemm.py --layer`: the library's six GEMMs and the w1w3 layout's nine, and their sums."""
    run("gpu_grouped_gemm.py", "--device", "cpu", "--tiny", "--layer", "--json", tmp_path / "l.json")
    rows = json.loads((tmp_path / "l.json").read_text())["rows"]
    for layout, n in (("library", 6), ("w1w3", 6)):
        mine = [r for r in rows if r["layout"] == layout]
        assert len(mine) == n + 1 and mine[-1]["gemm"] == "all (fwd+bwd)"
        assert abs(sum(r["ms"] for r in mine[:-1]) - mine[-1]["ms"]) < 1e-9


def test_check_w13_against_the_loop():
    """The GPU diagnostic for the stored w13: on CPU it and the w1w3 layout equal the fp32 loop
    (fp32), and stay within bf16 rounding of it (bf16)."""
    import torch

    sys.path.insert(0, str(BENCH))
    from gpu_variants import check_w13

    small = dict(tokens=256, experts=4, top_k=2, dim=32, ffn=24)
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 3e-2)):
        res = check_w13(torch.device("cpu"), dtype, **small)
        assert set(res) == {"w13 (torch)", "w1w3"}
        assert all(v < tol for errs in res.values() for v in errs.values()), (dtype, res)
