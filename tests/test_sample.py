"""`moesaic-sample`: a checkpoint of a 2-rank FSSDP run and its consolidated export continue a prompt
the same way; greedy decoding follows the model's own argmax; sampling is seeded and keeps to top-k."""

import subprocess
import sys

import pytest
import torch

from conftest import child_env, torchrun
from moesaic.trainer.model import Transformer

SMOKE = ["experiment=smoke", "eval_every=0"]


def _sample(*args, cwd):
    return subprocess.run([sys.executable, "-m", "moesaic.trainer.sample", *map(str, args)], capture_output=True,
                          text=True, timeout=120, env=child_env(), cwd=cwd)


@pytest.mark.slow
@pytest.mark.dist
def test_sample_from_a_sharded_checkpoint_and_its_export(tmp_path):
    from moesaic.trainer.export import export_consolidated
    from moesaic.trainer.sample import generate, load_model

    torchrun(2, [*SMOKE, "steps=30", f"logging.out_dir={tmp_path}", "logging.run_name=s",
                 "checkpoint.every_n_steps=30", "model.moe.num_experts=2"])  # rank 1 owns one expert, computes one
    ckpt = tmp_path / "s/checkpoints/step-00000030"
    export = export_consolidated(ckpt, tmp_path / "m.pt")
    greedy = ["--prompt", "def ", "--tokens", 30, "--temperature", 0]
    a, b = _sample(ckpt, *greedy, cwd=tmp_path), _sample(export, *greedy, cwd=tmp_path)
    assert a.returncode == 0, a.stderr[-3000:]
    assert a.stdout == b.stdout and a.stdout.startswith("def ")

    model = load_model(export)  # built on meta, allocated uninitialized, filled by the export
    blob = torch.load(export, weights_only=True)["model"]
    sd = model.state_dict()
    assert all(torch.equal(sd[k], v) for k, v in blob.items()) and torch.equal(sd["head.weight"], sd["embed.weight"])
    assert torch.equal(model.rope_cos, Transformer(model.cfg).rope_cos)
    prompt = torch.tensor([list(b"def ")])
    out = generate(model, prompt, 30, temperature=0)
    assert a.stdout == bytes(out[0].tolist()).decode("utf-8", errors="replace") + "\n"
    logits = model(out[:, :-1]).logits  # 33 tokens: within max_seq_len, so one forward sees what each step saw
    assert torch.equal(logits[:, 3:].argmax(-1), out[:, 4:])

    runs = [generate(model, prompt.repeat(3, 1), 20, temperature=1.0, top_k=5,
                     generator=torch.Generator().manual_seed(7)) for _ in range(2)]
    assert torch.equal(runs[0], runs[1])
    top5 = model(runs[0][:, :-1]).logits[:, 3:].topk(5, dim=-1).indices
    assert (top5 == runs[0][:, 4:, None]).any(-1).all()  # every sampled token is among that step's top 5


@pytest.mark.parametrize("args,message", [
    (["/no/such/checkpoint"], "checkpoint '/no/such/checkpoint' does not exist"),
    (["{bad}"], "checkpoint '{bad}' is not a consolidated export (UnpicklingError"),
    (["{bad}", "--temperature", "-1"], "--temperature (-1.0) must be >= 0"),
    (["{bad}", "--tokens", "0"], "--tokens (0) must be >= 1"),
])
def test_bad_sample_input_is_named(tmp_path, args, message):
    bad = tmp_path / "bad.pt"
    bad.write_text("not a checkpoint")
    proc = _sample(*[a.replace("{bad}", str(bad)) for a in args], cwd=tmp_path)
    message = message.replace("{bad}", str(bad))
    assert proc.returncode == 2 and f"moesaic-sample: error: {message}" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
