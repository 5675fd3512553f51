"""Export a checkpoint for inference: `moesaic-export CHECKPOINT OUT.pt [--dtype bf16] [--force]`, or
`python -m moesaic.trainer.export ...`.

CHECKPOINT is one checkpoint folder (`<run>/checkpoints/step-N`, saved at any world size, EP size or
sharding), or a run's `checkpoints/` folder, of which the newest checkpoint that verifies is taken
(corrupt ones are named and skipped). OUT is one file, `{"model", "model_config", "step"}`, that an
unsharded `Transformer` loads (`moesaic-sample OUT` does): the experts of every layer stacked in
torchtitan's three tensors `w1_EFD`, `w2_EDF`, `w3_EFD`. It is written to `OUT.tmp` and renamed, so
a failed export leaves no half file under OUT. The AdamW moments are not exported. It runs in one
process and needs no process group.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import torch

from moesaic.trainer.checkpoint import CheckpointError, list_checkpoints, newest_verified, verify
from moesaic.trainer.model import ModelConfig, Transformer, moe_layer_ids

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve(path: str | Path, report=print) -> tuple[Path, dict]:
    """(checkpoint folder, its manifest): `path` itself, or the newest checkpoint under a run's
    `checkpoints/` folder that verifies."""
    path = Path(path).expanduser()
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {str(path)!r} is not a folder" if path.exists()
                              else f"checkpoint {str(path)!r} does not exist")
    if (path / "manifest.json").exists() or not list_checkpoints(path):
        return path, verify(path)
    found = newest_verified(path, report)
    if found is None:
        raise CheckpointError(f"{str(path)!r} holds no checkpoint that verifies")
    return found


def consolidated(path: str | Path, report=print) -> dict:
    """{"model": an unsharded `Transformer`'s state dict, "model_config", "step"} of a checkpoint."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    path, manifest = resolve(path, report)
    with tempfile.TemporaryDirectory() as tmp:
        flat_path = os.path.join(tmp, "flat.pt")
        dcp_to_torch_save(str(path), flat_path)
        flat = torch.load(flat_path, weights_only=True)
    model_sd: dict[str, torch.Tensor] = {}
    experts: dict[tuple[int, str], dict[int, torch.Tensor]] = {}
    for k, v in flat.items():
        if k.startswith("model."):
            model_sd[k[len("model."):]] = v
        elif k.startswith("buffer."):
            model_sd[k[len("buffer."):]] = v
        elif k.startswith("experts."):
            _, li, e, n = k.split(".")
            experts.setdefault((int(li), n), {})[int(e)] = v
    cfg = manifest["model_config"]
    E = cfg["moe"]["num_experts"]
    moe_layers = moe_layer_ids(cfg["num_layers"], cfg["num_dense_layers"], cfg.get("moe_every", 1))
    for (li, n), per in experts.items():
        missing = sorted(set(range(E)) - set(per))
        if missing:
            raise CheckpointError(f"checkpoint {str(path)!r}: layer {li} lacks experts {missing}")
        model_sd[f"layers.{moe_layers[li]}.moe.experts.{n}"] = torch.stack([per[e] for e in range(E)])
    return {"model": model_sd, "model_config": cfg, "step": manifest["step"]}


def export_consolidated(path: str | Path, out: str | Path, *, dtype: torch.dtype | None = None,
                        report=print) -> Path:
    """Write `consolidated(path)` to one file, atomically (see `write_export`)."""
    return write_export(consolidated(path, report), out, dtype)


def write_export(blob: dict, out: str | Path, dtype: torch.dtype | None = None) -> Path:
    """Save `blob` to `out` through `out.tmp`; `dtype` casts the model's weights (the buffers, such
    as the routers' selection bias, stay as saved)."""
    out = Path(out).expanduser()
    if dtype is not None:  # the export's w1/w3 are halves of the model's w13: cast all but the buffers
        with torch.device("meta"):
            buffers = {n for n, _ in Transformer(ModelConfig(**blob["model_config"])).named_buffers()}
        blob["model"] = {k: v if k in buffers or not v.is_floating_point() else v.to(dtype)
                         for k, v in blob["model"].items()}
    tmp = out.with_name(out.name + ".tmp")
    try:
        torch.save(blob, tmp)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="moesaic-export", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", help="a checkpoint folder, or a run's checkpoints/ folder (its newest good one)")
    ap.add_argument("out", help="the file to write (.pt)")
    ap.add_argument("--dtype", default=None, help=f"cast the weights: {', '.join(DTYPES)} (default: as saved, fp32)")
    ap.add_argument("--force", action="store_true", help="replace OUT if it exists")
    a = ap.parse_args(argv)
    out = Path(a.out).expanduser()
    if a.dtype is not None and a.dtype not in DTYPES:
        return _error(f"--dtype ({a.dtype!r}) must be one of {', '.join(DTYPES)}")
    if out.exists() and not a.force:
        return _error(f"out ({str(out)!r}) exists: give --force to replace it")
    if not out.parent.is_dir():
        return _error(f"out ({str(out)!r}): its folder does not exist")
    try:
        blob = consolidated(a.checkpoint, report=lambda m: sys.stderr.write(f"moesaic-export: {m}\n"))
    except CheckpointError as e:
        return _error(str(e))
    write_export(blob, out, DTYPES.get(a.dtype))
    n = sum(v.numel() for v in blob["model"].values())
    print(f"moesaic-export: step {blob['step']}, {len(blob['model'])} tensors, {n:,} values, "
          f"{out.stat().st_size / 2**20:.1f} MiB -> {out}")
    return 0


def _error(message: str) -> int:
    sys.stderr.write(f"moesaic-export: error: {message}\n")
    return 2


def main_cli() -> None:
    sys.exit(main())


if __name__ == "__main__":
    main_cli()
