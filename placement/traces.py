"""Routing traces: per-token top-k expert ids per layer, with tokens aligned across layers.

Formats:
- HD-MoE JSON: {"0": [[e1, e2], ...], "1": ...}, one list of top-k ids per token per layer.
- moesaic .npz: `experts` int16 [tokens, layers, k], optional `weights` float16 [tokens, layers, k],
  and `meta` (a JSON string).
- synthetic: `synth(preset, tokens, seed)`, a Markov chain over layers with planted affinity groups
  and Zipf-like loads.
Legend: T tokens, L layers, K top-k, E experts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from moesaic.placement.stats import RoutingStats, combine


class TraceError(ValueError):
    """A trace that cannot be read; the message names the file and the rule."""


@dataclass(frozen=True)
class Preset:
    num_layers: int
    num_experts: int
    top_k: int
    skew: float  # Zipf exponent of the expert popularity within a layer
    affinity: float  # share of the routing that follows the planted groups of the previous layer


PRESETS = {
    "mixtral": Preset(32, 8, 2, 0.5, 0.5),
    "olmoe": Preset(16, 64, 8, 0.3, 0.5),
    "qwen3-moe": Preset(48, 128, 8, 0.2, 0.5),
    # DeepSeek-V3 trains with aux-loss-free balancing: mild skew.
    "deepseek-v3": Preset(58, 256, 8, 0.1, 0.5),
}


def load_hdmoe_json(path: str | Path) -> np.ndarray:
    path = Path(path)
    try:
        d = json.loads(path.read_text())
    except FileNotFoundError:
        raise TraceError(f"trace {str(path)!r} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TraceError(f"trace {str(path)!r} is not valid JSON: {e}") from None
    if not isinstance(d, dict) or not d:
        raise TraceError(f"trace {str(path)!r}: expected an object of layers {{'0': [[e, ...], ...], ...}}")
    try:
        keys = sorted(d, key=int)
    except ValueError:
        raise TraceError(f"trace {str(path)!r}: layer keys must be integers, got {sorted(d)[:3]}") from None
    if [int(k) for k in keys] != list(range(len(keys))):
        raise TraceError(f"trace {str(path)!r}: layer keys must be 0..{len(keys) - 1}, got {keys[:5]}...")
    layers = []
    for k in keys:
        rows = d[k]
        try:
            arr = np.asarray(rows, dtype=np.int64)
        except (ValueError, TypeError):
            raise TraceError(f"trace {str(path)!r}: layer {k} is not a rectangular list of expert ids") from None
        if arr.ndim != 2 or arr.shape[1] < 1:
            raise TraceError(f"trace {str(path)!r}: layer {k} must be a list of top-k lists, got shape {arr.shape}")
        layers.append(arr)
    ks = {a.shape[1] for a in layers}
    if len(ks) != 1:
        raise TraceError(f"trace {str(path)!r}: inconsistent k across layers: {sorted(ks)}")
    ts = {a.shape[0] for a in layers}
    if len(ts) != 1:
        raise TraceError(f"trace {str(path)!r}: token counts differ across layers: {sorted(ts)}")
    ex = np.stack(layers, axis=1)
    if ex.size and ex.min() < 0:
        raise TraceError(f"trace {str(path)!r}: negative expert id {ex.min()}")
    return ex.astype(np.int16)


def save_npz(path: str | Path, experts_TLK: np.ndarray, weights_TLK: np.ndarray | None = None, meta: dict | None = None) -> None:
    arrays = {"experts": np.asarray(experts_TLK, dtype=np.int16), "meta": np.array(json.dumps(meta or {}))}
    if weights_TLK is not None:
        arrays["weights"] = np.asarray(weights_TLK, dtype=np.float16)
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez_compressed(tmp, **arrays)
    tmp.replace(path)


def load_npz(path: str | Path) -> tuple[np.ndarray, dict]:
    path = Path(path)
    try:
        z = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise TraceError(f"trace {str(path)!r} does not exist") from None
    except (ValueError, OSError) as e:
        raise TraceError(f"trace {str(path)!r} is not a readable .npz: {e}") from None
    if "experts" not in z:
        raise TraceError(f"trace {str(path)!r}: no 'experts' array")
    ex = z["experts"]
    if ex.ndim != 3:
        raise TraceError(f"trace {str(path)!r}: 'experts' must be [tokens, layers, k], got shape {ex.shape}")
    meta = json.loads(str(z["meta"])) if "meta" in z else {}
    return ex, meta


def load_trace(path: str | Path) -> np.ndarray:
    """experts [T, L, K] from a .json (HD-MoE) or .npz (moesaic) trace."""
    path = Path(path)
    if path.suffix == ".npz":
        return load_npz(path)[0]
    return load_hdmoe_json(path)


def stats_from_traces(paths: list[str | Path], num_experts: int | None = None) -> RoutingStats:
    """Load several traces and sum their statistics over tokens; all must share L, K and E."""
    if not paths:
        raise TraceError("no trace given")
    arrays = [(str(p), load_trace(p)) for p in paths]
    shapes = {a.shape[1:] for _, a in arrays}
    if len(shapes) != 1:
        raise TraceError(f"traces disagree on (layers, k): {sorted(shapes)}")
    E = num_experts or max(int(a.max()) + 1 for _, a in arrays)
    return combine([RoutingStats.from_experts(a, E, source=Path(p).name) for p, a in arrays])


def synth(preset: str | Preset, num_tokens: int, seed: int, *, skew: float | None = None,
          affinity: float | None = None, sample_seed: int | None = None, chunk: int = 16384,
          expert_groups: int = 0, limited_groups: int = 0) -> np.ndarray:
    """A synthetic trace [T, L, K] (int16). Per layer, expert popularity is Zipf(skew) over a random
    order. Experts fall into hidden groups; with probability mass `affinity`, a token's next-layer
    choice follows the groups of its current experts (the planted inter-layer affinity).
    `seed` fixes the model (popularities and groups); `sample_seed` (default: seed) the tokens, so
    two traces of one model with different sample seeds are a fit set and a held-out set.
    `expert_groups` n with `limited_groups` M: group-limited routing (DeepSeek-V2/V3): experts
    [k E/n, (k+1) E/n) form group k, a group scores the sum of its two best perturbed probabilities,
    and each token takes its top-k among the experts of its M best groups."""
    if isinstance(preset, str):
        if preset not in PRESETS:
            raise TraceError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
        preset = PRESETS[preset]
    s = preset.skew if skew is None else skew
    a = preset.affinity if affinity is None else affinity
    if not 0 <= a <= 1:
        raise TraceError(f"affinity ({a}) must be in [0, 1]")
    if num_tokens < 1:
        raise TraceError(f"tokens ({num_tokens}) must be >= 1")
    L, E, K = preset.num_layers, preset.num_experts, preset.top_k
    _check_expert_groups(expert_groups, limited_groups, E, K)
    rng = np.random.default_rng(seed)
    num_groups = max(2, E // 8)
    pops, group_probs, groups = [], [], []
    for _ in range(L):
        pop = (np.arange(1, E + 1, dtype=np.float64) ** -s)[rng.permutation(E)]
        pop /= pop.sum()
        g = rng.permutation(E) % num_groups  # hidden group of each expert
        gp = np.zeros((num_groups, E))
        gp[g, np.arange(E)] = pop
        gp /= gp.sum(axis=1, keepdims=True)
        pops.append(pop)
        group_probs.append(gp)
        groups.append(g)
    if sample_seed is not None:
        rng = np.random.default_rng([seed, sample_seed])
    out = np.empty((num_tokens, L, K), dtype=np.int16)
    for start in range(0, num_tokens, chunk):
        n = min(chunk, num_tokens - start)
        probs = np.broadcast_to(pops[0], (n, E))
        for l in range(L):
            if l > 0:
                cell = np.repeat(np.arange(n) * num_groups, K) + groups[l - 1][ids.ravel()]
                gcount = np.bincount(cell, minlength=n * num_groups).reshape(n, num_groups) / K
                # next-layer group of a current group: the same hidden label (a planted matching)
                probs = (1 - a) * pops[l] + a * (gcount @ group_probs[l])
            u = np.maximum(rng.random((n, E), dtype=np.float32), np.float32(1e-12))
            scores = np.log(np.maximum(probs, 1e-30)).astype(np.float32) - np.log(-np.log(u))
            if expert_groups:
                scores = _limit_to_groups(scores, expert_groups, limited_groups)
            ids = np.argpartition(-scores, K - 1, axis=1)[:, :K]
            order = np.argsort(-np.take_along_axis(scores, ids, 1), axis=1)
            ids = np.take_along_axis(ids, order, 1)
            out[start : start + n, l] = ids
    return out


def _check_expert_groups(n: int, m: int, num_experts: int, top_k: int) -> None:
    if n == 0 and m == 0:
        return
    if n < 1 or num_experts % n:
        raise TraceError(f"expert_groups ({n}) must divide the experts ({num_experts})")
    if not 1 <= m <= n or m * (num_experts // n) < top_k:
        raise TraceError(f"limited_groups ({m}) must be in [1, expert_groups ({n})] and its groups must hold "
                         f"top-k ({top_k}) experts ({num_experts // n} per group)")


def _limit_to_groups(scores_NE: np.ndarray, n: int, m: int) -> np.ndarray:
    """Scores of the experts outside each token's m best groups (top-2 sum of exp(score)) set to -inf."""
    N, E = scores_NE.shape
    grouped = np.exp(scores_NE - scores_NE.max(1, keepdims=True)).reshape(N, n, E // n)
    best2 = np.sort(grouped, axis=2)[:, :, -2:].sum(2)
    keep = np.argpartition(-best2, m - 1, axis=1)[:, :m]
    mask = np.zeros((N, n), dtype=bool)
    np.put_along_axis(mask, keep, True, axis=1)
    return np.where(np.repeat(mask, E // n, axis=1), scores_NE, -np.inf).astype(np.float32)
