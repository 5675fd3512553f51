"""Sample from a trained model: `moesaic-sample CHECKPOINT [--prompt TEXT] [--tokens N] ...`, or
`python -m moesaic.trainer.sample ...`.

CHECKPOINT is a checkpoint folder (`<run>/checkpoints/step-N`, saved at any world size, EP size or
sharding), a run's `checkpoints/` folder (its newest checkpoint that verifies), or a file written by
`moesaic-export`. It runs in one
process, on the CPU or one GPU. Models of at most 256 tokens are byte models (the default corpus):
the prompt is encoded as UTF-8 bytes and the output decoded with replacement. Larger vocabularies
take and print token ids (`--prompt-ids`). There is no KV cache: each new token runs the model over
the last `max_seq_len` tokens, which is plenty for a look at what a run has learned.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from moesaic.trainer.checkpoint import CheckpointError
from moesaic.trainer.export import consolidated
from moesaic.trainer.model import ModelConfig, Transformer


def load_model(path: str | Path, device: str | torch.device = "cpu") -> Transformer:
    """The model of a checkpoint folder or of a consolidated export, in eval mode on `device`."""
    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    if path.is_dir():
        blob = consolidated(path, report=lambda m: sys.stderr.write(f"moesaic-sample: {m}\n"))
    else:
        try:
            blob = torch.load(path, weights_only=True, map_location="cpu")
        except Exception as e:
            first = (str(e).splitlines() or [""])[0][:120]
            raise CheckpointError(f"checkpoint {str(path)!r} is not a consolidated export ({type(e).__name__}: {first})") from None
        if not isinstance(blob, dict) or not {"model", "model_config"} <= set(blob):
            raise CheckpointError(f"checkpoint {str(path)!r} is not a consolidated export (no model and model_config)")
    with torch.device("meta"):  # allocated on `device`, and filled by the state dict: nothing drawn
        model = Transformer(ModelConfig(**blob["model_config"]))
    model.materialize(device, init=False)
    missing, unexpected = model.load_state_dict(blob["model"], strict=False)
    tied = {"head.weight"} if model.cfg.tie_embeddings else set()
    if set(missing) - tied or unexpected:
        raise CheckpointError(f"checkpoint {str(path)!r} does not fit its own model config: missing "
                              f"{sorted(set(missing) - tied)}, unexpected {sorted(unexpected)}")
    return model.eval()


@torch.no_grad()
def generate(model: Transformer, prompt: torch.Tensor, max_new_tokens: int, *, temperature: float = 1.0,
             top_k: int = 0, generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, S + max_new_tokens) token ids: `prompt` (B, S) followed by sampled tokens. temperature 0 is
    greedy (argmax); top_k > 0 samples among the k most likely tokens only."""
    ids = prompt
    for _ in range(max_new_tokens):
        logits = model(ids[:, -model.cfg.max_seq_len:]).logits[:, -1, :]
        if temperature == 0:
            nxt = logits.argmax(dim=-1, keepdim=True)
        else:
            logits = logits / temperature
            if top_k:
                kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            probs = torch.softmax(logits, dim=-1)
            nxt = torch.multinomial(probs.cpu(), 1, generator=generator).to(ids.device)
        ids = torch.cat([ids, nxt], dim=1)
    return ids


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="moesaic-sample", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", help="a checkpoint folder, or a consolidated export (.pt)")
    ap.add_argument("--prompt", default="\n", help="text to continue (byte models)")
    ap.add_argument("--prompt-ids", default=None, help="comma-separated token ids to continue (any model)")
    ap.add_argument("--tokens", type=int, default=200, help="tokens to generate")
    ap.add_argument("--temperature", type=float, default=0.8, help="0: greedy")
    ap.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0: all)")
    ap.add_argument("--samples", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = ap.parse_args(argv)
    for name, value, least in (("--tokens", a.tokens, 1), ("--temperature", a.temperature, 0), ("--top-k", a.top_k, 0),
                               ("--samples", a.samples, 1)):
        if value < least:
            return _error(f"{name} ({value}) must be >= {least}")
    try:
        model = load_model(a.checkpoint, a.device)
    except (CheckpointError, ValueError) as e:
        return _error(str(e))
    vocab, byte_model = model.cfg.vocab_size, model.cfg.vocab_size <= 256
    if a.prompt_ids is not None:
        try:
            prompt = [int(t) for t in a.prompt_ids.split(",") if t.strip()]
        except ValueError:
            return _error(f"--prompt-ids ({a.prompt_ids!r}) must be comma-separated integers")
    elif byte_model:
        prompt = list(a.prompt.encode())
    else:
        return _error(f"the model has {vocab} tokens, not bytes: give --prompt-ids")
    if not prompt or min(prompt) < 0 or max(prompt) >= vocab:
        return _error(f"the prompt's token ids must be in [0, {vocab}) and not empty")
    g = torch.Generator().manual_seed(a.seed)
    x = torch.tensor([prompt] * a.samples, device=a.device)
    out = generate(model, x, a.tokens, temperature=a.temperature, top_k=a.top_k, generator=g)
    for i, row in enumerate(out.tolist()):
        if a.samples > 1:
            print(f"--- sample {i + 1}")
        print(bytes(row).decode("utf-8", errors="replace") if byte_model else ",".join(map(str, row)))
    return 0


def _error(message: str) -> int:
    sys.stderr.write(f"moesaic-sample: error: {message}\n")
    return 2


def main_cli() -> None:
    sys.exit(main())


if __name__ == "__main__":
    main_cli()
