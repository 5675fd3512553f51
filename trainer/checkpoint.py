"""Checkpoints with torch.distributed.checkpoint (DCP): atomic, checked, resumable at another world
or EP size.

Layout of one checkpoint, `<dir>/step-00000010/`:
    .metadata, __*_*.distcp    the DCP tensors
    plan.json                  the placement plan in force (if any)
    routing_stats.npz          the accumulated routing statistics
    manifest.json              written last: step, tokens, world and EP sizes, the model config and
                               its hash, the scheduler state, and the sha256 of every file above
It is written under `step-00000010.tmp/` and renamed when complete, so a crash leaves no half
checkpoint under a final name. Experts are saved per global expert id (`experts.<layer>.<expert>.w1`
and their AdamW moments), each exactly once whatever the sharding, so that a checkpoint loads at any
world size, EP size or sharding: every rank reads only the experts it holds.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import shutil
import time
import warnings
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from moesaic.parallel.dense_fsdp import reshard
from moesaic.parallel.router import resolved_route_norm
from moesaic.trainer.model import held_expert_ids

log = logging.getLogger(__name__)
FORMAT = "moesaic.checkpoint/v1"
# checkpoint names of the expert tensors (torchtitan's), and where each lives: (parameter, half of w13)
_W = (("w1_EFD", "w13_EGD", 0), ("w2_EDF", "w2_EDF", None), ("w3_EFD", "w13_EGD", 1))
_MOMENTS = ("exp_avg", "exp_avg_sq")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names it and says why."""


_ROUTER_SINCE_V1 = {"route_norm": None, "route_scale": 1.0, "num_expert_groups": 0, "num_limited_groups": 0,
                    "group_score": "top2_sum", "aux_loss_scope": "micro_batch"}
"""Router fields added after the first checkpoints, at the values that compute what those did."""


def _identity(model_cfg: dict) -> dict:
    """The model config without what does not change the model's math: which kernels compute it, the
    router's matmul precision (as mixed precision, a choice of the run), and router fields at the
    values that checkpoints from before those fields existed computed with (route_norm is compared
    resolved: null for sigmoid is true; group_score only with groups)."""
    moe = {k: v for k, v in model_cfg.get("moe", {}).items() if k != "kernels"}
    if "router" in moe:
        router = dict(moe["router"])
        router.pop("dtype", None)
        score_func = router.get("score_func", "softmax")
        if router.get("route_norm") is not None and router["route_norm"] == resolved_route_norm(score_func, None):
            router["route_norm"] = None  # said out loud, the score function's own default
        if not router.get("num_expert_groups"):  # without groups, how they would rank changes nothing
            router.pop("group_score", None)
        moe["router"] = {k: v for k, v in router.items() if not (k in _ROUTER_SINCE_V1 and v == _ROUTER_SINCE_V1[k])}
    top = {k: v for k, v in model_cfg.items() if not (k == "moe_every" and v == 1)}  # a field since the 26th session
    return {**top, "moe": moe}


def model_hash(model_cfg) -> str:
    return hashlib.sha256(json.dumps(_identity(asdict(model_cfg)), sort_keys=True).encode()).hexdigest()[:16]


def _expert_ids(moe) -> tuple[list[int], list[bool]]:
    """Global ids of the experts in this rank's tensors, and whether this rank saves each one."""
    store, ids = moe.experts, held_expert_ids(moe)
    if hasattr(store, "owned_ids"):  # FSSDP: the owner saves (first expert domain only)
        first_domain = store.edp_group is None or dist.get_rank(store.edp_group) == 0
        return ids, [first_domain] * len(ids)
    lp = getattr(moe, "layer_plan", None)
    if lp is None:  # every rank holds every expert: identical keys, DCP keeps one copy
        return ids, [True] * len(ids)
    edp0 = not dist.is_initialized() or dist.get_rank() < lp.ep_size
    return ids, [edp0 and lp.holders[e][0] == lp.ep_rank for e in ids]


def state_dict(model, optimizer, *, for_save: bool, engine=None) -> dict[str, torch.Tensor]:
    """Flat tensors keyed by global names. With for_save, experts this rank does not save are left out
    (replicas); otherwise every expert this rank holds is listed (to be filled by a load). With a
    DeepSpeed `engine` (engine=deepspeed), the dense moments are ZeRO's, gathered whole (collective)
    for a save, or zeros for a load to fill; the names are the same as under the torch engine."""
    reshard(model)  # FSDP: each dense parameter as its DTensor shard, never a gathered copy
    sd: dict[str, torch.Tensor] = {}
    expert_params = set()
    for li, moe in enumerate(model.moe_layers()):
        ids, saves = _expert_ids(moe)
        for n, param, half in _W:
            p = getattr(moe.experts, param)
            expert_params.add(id(p))
            state = optimizer.state.get(p, {})
            part = (lambda t: t) if half is None else (lambda t, h=half: t.chunk(2, dim=0)[h])  # noqa: E731
            for i, (e, mine) in enumerate(zip(ids, saves)):
                if for_save and not mine:
                    continue
                sd[f"experts.{li}.{e}.{n}"] = part(p.data[i])  # a view: a load fills it in place
                for m in _MOMENTS:
                    if m in state:
                        sd[f"optim.experts.{li}.{e}.{n}.{m}"] = part(state[m][i])
    dense = {name: p for name, p in model.named_parameters() if id(p) not in expert_params}
    moments = _dense_moments(dense, optimizer, engine, for_save)
    for name, p in dense.items():
        sd[f"model.{name}"] = p.data
        for m in _MOMENTS:
            if m in moments.get(name, {}):
                sd[f"optim.model.{name}.{m}"] = moments[name][m]
    for name, b in model.named_buffers():
        if ".dispatcher." not in name and name not in ("rope_cos", "rope_sin"):
            sd[f"buffer.{name}"] = b
    steps = [s["step"] for s in optimizer.state.values() if "step" in s]
    if engine is not None:  # the loop's optimizer may hold no expert (ep_size 1): ZeRO counts the steps
        from moesaic.parallel.deepspeed_engine import zero_step

        steps = [s for s in [zero_step(engine)] if s is not None] or steps
    sd["optim.step"] = steps[0].clone() if steps else torch.zeros(())
    return sd


def _dense_moments(dense: dict, optimizer, engine, for_save: bool) -> dict[str, dict[str, torch.Tensor]]:
    if engine is None:
        return {name: optimizer.state.get(p, {}) for name, p in dense.items()}
    if not for_save:  # in host memory: the engine copies each rank's slices from there
        return {name: {m: torch.zeros_like(p, device="cpu") for m in _MOMENTS} for name, p in dense.items()}
    from moesaic.parallel.deepspeed_engine import zero_moments

    return zero_moments(engine, dense)


def init_optimizer_state(optimizer) -> None:
    """Create AdamW's state tensors (zeros) so that a load can fill them in place."""
    for group in optimizer.param_groups:
        on_device = group.get("fused") or group.get("capturable")  # as AdamW keeps its step: beside the weights
        for p in group["params"]:
            st = optimizer.state[p]
            if "step" not in st:
                st["step"] = torch.zeros((), dtype=torch.float32, device=p.device if on_device else "cpu")
                st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save(ckpt_root: Path, step: int, *, model, optimizer, scheduler, cfg, info, plan=None, routing=None,
         tokens: int = 0, keep_last: int = 3, extra_arrays: dict | None = None, engine=None, scaler=None) -> Path:
    """Collective: every rank writes its tensors; rank 0 writes the rest and renames atomically."""
    tmp, final = begin(ckpt_root, step, info)
    sd = state_dict(model, optimizer, for_save=True, engine=engine)
    with no_dist_warning_off(info):
        dcp.save(sd, checkpoint_id=str(tmp), no_dist=info.backend is None)
    _barrier(info)
    if info.is_main:
        finish_on_rank0(tmp, final, **extras(step, model=model, scheduler=scheduler, cfg=cfg, info=info, plan=plan,
                                             routing=routing, tokens=tokens, keep_last=keep_last, extra_arrays=extra_arrays,
                                             scaler=scaler))
    _barrier(info)
    return final


def begin(ckpt_root: Path, step: int, info) -> tuple[Path, Path]:
    """Collective: rank 0 makes an empty `step-N.tmp/`, which every rank then sees. (tmp, final)."""
    final = ckpt_root / f"step-{step:08d}"
    tmp = ckpt_root / f"step-{step:08d}.tmp"
    if info.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True, exist_ok=True)
    _barrier(info)
    return tmp, final


def extras(step: int, *, model, scheduler, cfg, info, plan, routing, tokens, keep_last, extra_arrays, scaler=None) -> dict:
    """What rank 0 writes beside the tensors, taken now (an async save writes it after training moved on).
    `scaler`: the fp16 loss scaler (trainer/loss_scale.py), whose state the manifest keeps."""
    import copy

    return {"plan": plan, "routing": routing, "extra_arrays": copy.deepcopy(extra_arrays), "keep_last": keep_last,
            "manifest": {"format": FORMAT, "step": step, "tokens": tokens, "time": time.time(),
                         "world_size": info.world_size, "ep_size": (cfg.parallel.ep_size or info.world_size),
                         "expert_sharding": cfg.parallel.expert_sharding, "model_hash": model_hash(cfg.model),
                         "model_config": asdict(cfg.model), "scheduler": copy.deepcopy(scheduler.state_dict()),
                         "loss_scale": scaler.state_dict() if scaler is not None else None}}


def finish_on_rank0(tmp: Path, final: Path, *, plan, routing, extra_arrays, keep_last, manifest) -> None:
    """Once every rank's tensors are in `tmp`: the plan, the statistics, the manifest (last, with the
    sha256 of every file), the rename to the final name, and the pruning of old checkpoints."""
    import numpy as np

    if plan is not None:
        plan.save(tmp / "plan.json")
    if routing is not None:
        np.savez(tmp / "routing_stats.npz", **routing.to_npz_dict())
    if extra_arrays:
        np.savez(tmp / "replan_state.npz", **extra_arrays)
    files = {p.name: _sha256(p) for p in sorted(tmp.iterdir()) if p.is_file()}
    (tmp / "manifest.json").write_text(json.dumps({**manifest, "files": files}, indent=1))
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    for old in list_checkpoints(final.parent)[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


def list_checkpoints(ckpt_root: Path) -> list[Path]:
    """Complete-looking checkpoint folders, oldest first (temporary folders are ignored)."""
    if not ckpt_root.is_dir():
        return []
    return sorted(p for p in ckpt_root.iterdir() if p.is_dir() and p.name.startswith("step-") and not p.name.endswith(".tmp"))


def verify(path: Path) -> dict:
    """The manifest of a checkpoint whose files are all present and intact; CheckpointError otherwise."""
    mf = path / "manifest.json"
    if not mf.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} has no manifest.json (incomplete write?)")
    try:
        manifest = json.loads(mf.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"checkpoint {str(path)!r}: manifest.json is corrupt ({e})") from None
    if manifest.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {str(path)!r}: format {manifest.get('format')!r} is not {FORMAT!r}")
    for name, digest in manifest["files"].items():
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"checkpoint {str(path)!r}: file {name} is missing")
        if _sha256(f) != digest:
            raise CheckpointError(f"checkpoint {str(path)!r}: file {name} does not match its checksum (truncated or corrupt)")
    return manifest


def find_resume(ckpt_root: Path, resume: str, model_cfg, report=print) -> tuple[Path, dict] | None:
    """`auto`: the newest checkpoint that verifies (corrupt ones are reported by name and skipped);
    a path: that checkpoint, or an error. Also refuses a checkpoint of another model config."""
    if resume == "none":
        return None
    if resume == "auto":
        found = newest_verified(ckpt_root, report)
        if found is None:
            return None
        path, manifest = found
    else:
        path = Path(resume).expanduser()
        manifest = verify(path)
    _check_model(path, manifest, model_cfg)
    return path, manifest


def newest_verified(ckpt_root: Path, report=print) -> tuple[Path, dict] | None:
    """(folder, manifest) of the newest checkpoint under `ckpt_root` that verifies; corrupt ones are
    reported by name and skipped."""
    for path in reversed(list_checkpoints(ckpt_root)):
        try:
            return path, verify(path)
        except CheckpointError as e:
            report(f"skipping {e}")
    return None


def _check_model(path: Path, manifest: dict, model_cfg) -> None:
    if manifest["model_hash"] == model_hash(model_cfg):
        return
    diffs = []

    def walk(prefix, old, new):
        for k in sorted(set(old) | set(new)):
            a, b = old.get(k), new.get(k)
            if isinstance(a, dict) and isinstance(b, dict):
                walk(f"{prefix}{k}.", a, b)
            elif a != b:
                diffs.append(f"model.{prefix}{k} (checkpoint {a!r}, config {b!r})")

    walk("", _identity(manifest["model_config"]), _identity(asdict(model_cfg)))
    raise CheckpointError(f"checkpoint {str(path)!r} was written for another model config: {', '.join(diffs)}")


NO_DIST_WARNING = "torch.distributed is .*uninitialized, assuming the intent"
"""torch warns that it is "assuming the intent" of one process even when no_dist=True says so."""


@contextlib.contextmanager
def no_dist_warning_off(info):
    with warnings.catch_warnings():
        if info.backend is None:
            warnings.filterwarnings("ignore", message=NO_DIST_WARNING)
        yield


def load(path: Path, manifest: dict, *, model, optimizer, scheduler, info, engine=None, scaler=None) -> None:
    """Fill the model, the expert shards this rank holds and the optimizer from `path` (collective).
    With a DeepSpeed `engine`, the dense parameters' AdamW state goes into ZeRO's partitions. An fp16
    `scaler` takes the saved scale (a checkpoint of a run without fp16 has none: it starts afresh)."""
    init_optimizer_state(optimizer)
    sd = state_dict(model, optimizer, for_save=False, engine=engine)
    with no_dist_warning_off(info):
        dcp.load(sd, checkpoint_id=str(path), no_dist=info.backend is None)
    for st in optimizer.state.values():
        st["step"].copy_(sd["optim.step"])
    restore_schedule(scheduler, manifest["scheduler"])
    if scaler is not None and manifest.get("loss_scale"):
        scaler.load_state_dict(manifest["loss_scale"])
    if engine is not None:
        from moesaic.parallel.deepspeed_engine import load_zero_state

        params = {n: p for n, p in model.named_parameters() if f"model.{n}" in sd}  # the dense ones
        moments = {n: {m: sd[f"optim.model.{n}.{m}"] for m in _MOMENTS} for n in params}
        load_zero_state(engine, params, moments, sd["optim.step"], manifest["step"])
        restore_schedule(engine.lr_scheduler, manifest["scheduler"])


def restore_schedule(scheduler, state: dict) -> None:
    """Set a LambdaLR schedule to the saved position and its optimizer's rates to match. Only the
    position is taken: the engines group the parameters differently (the torch engine's optimizer
    holds every parameter; under DeepSpeed, ZeRO's holds the dense ones and the loop's the experts)."""
    scheduler.last_epoch = state["last_epoch"]
    lrs = [base * fn(scheduler.last_epoch) for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas, strict=True)]
    for group, lr in zip(scheduler.optimizer.param_groups, lrs, strict=True):
        group["lr"] = lr
    scheduler._last_lr = lrs


def _barrier(info) -> None:
    if info.backend is not None:
        dist.barrier()


def replan_arrays(replanner, dynamic=None) -> dict | None:
    """The re-placement state (EMA, snapshot, a pending adoption) and the dynamic-replica load
    history, so that a resume places work exactly as an uninterrupted run would."""
    import numpy as np

    if dynamic is not None and dynamic.enabled and dynamic.history:
        extra = {"dyn_history": np.stack(dynamic.history)}
    else:
        extra = {}
    if not replanner.enabled:
        return extra or None

    arrays = {}
    for name in ("ema", "snapshot"):
        s = getattr(replanner, name)
        if s is not None:
            arrays.update({f"{name}_P": s.P, f"{name}_W": s.W, f"{name}_n": np.float64(s.num_tokens)})
    arrays["adopt_at"] = np.int64(replanner.adopt_at if replanner.adopt_at is not None else -1)
    return {**arrays, **extra}


def restore_extras(path: Path, *, recorder, replanner, info, dynamic=None) -> None:
    """Routing statistics (on rank 0, which all-reduces add to) and the re-placement state."""
    import numpy as np

    from moesaic.placement.stats import RoutingStats

    rs = path / "routing_stats.npz"
    if rs.is_file() and info.is_main:
        z = np.load(rs)
        recorder.P += torch.from_numpy(z["P"])
        recorder.W += torch.from_numpy(z["W"])
        recorder.num_tokens += float(z["num_tokens"])
    st = path / "replan_state.npz"
    if st.is_file() and dynamic is not None and dynamic.enabled:
        z = np.load(st)
        if "dyn_history" in z:
            dynamic.history.extend(list(z["dyn_history"]))
    if st.is_file() and replanner.enabled and "adopt_at" in np.load(st):
        z = np.load(st)
        for name in ("ema", "snapshot"):
            if f"{name}_P" in z:
                setattr(replanner, name, RoutingStats(z[f"{name}_P"], z[f"{name}_W"], float(z[f"{name}_n"]), recorder.K))
        adopt_at = int(z["adopt_at"])
        if adopt_at >= 0:  # a solve was running when the checkpoint was written: run it again
            replanner.adopt_at = adopt_at
            if info.is_main:
                replanner._start_solve(replanner.ema, adopt_at - replanner.cfg.adopt_after_steps)
