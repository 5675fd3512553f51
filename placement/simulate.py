"""A cluster simulator: what a placement strategy implies per training step at 16 to 256 GPUs.

From routing traces (per-token top-k per layer) and a plan it computes, per MoE layer:
- the token all-to-all traffic matrix (each token lives on its data-parallel home GPU; each slot goes
  to a local replica if there is one, otherwise replicas in turn by slot index, as the trainer's
  dispatcher does; one row per slot, per token and GPU (`parallel.token_dedup`), or per token and
  node (DeepEP's two stages)), split into intra-node and inter-node bytes, and its time;
- the expert compute time of the most loaded GPU;
- FSSDP's sparse gather and reduce-scatter bytes (each expert from its owner to every other GPU
  that computes it) and their time, overlapped with the previous layer's compute;
- resident EP's gradient all-reduce over replicas.
Step time = sum over layers of dispatch + combine (forward and backward) + the exposed parameter
traffic + compute. Attention and dense layers are left out: the figures compare the MoE part.
Also ExFlow-style coherent inference: a token stays on the GPU of its last top-1 expert, one
all-to-all per layer. Pure numpy. Legend: T tokens, L layers, K top-k, E experts, G GPUs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moesaic.placement.plan import Placement


@dataclass(frozen=True, kw_only=True)
class Cluster:
    gpus_per_node: int
    intra_gbs: float  # per-GPU send bandwidth within a node, GB/s
    inter_gbs: float  # per-GPU send bandwidth across nodes, GB/s
    expert_tflops: float  # sustained grouped-GEMM rate, TFLOP/s (fwd+bwd)


CLUSTERS = {
    # NVLink 4 (~450 GB/s per direction per GPU) and one 400 Gb/s NIC per GPU; the GEMM rate is the
    # H200 grouped_mm Mixtral-like fwd+bwd figure of shared/ANCHORS.md, scaled to H100 (x0.9).
    "h100-nvlink-ib400": Cluster(gpus_per_node=8, intra_gbs=450.0, inter_gbs=50.0, expert_tflops=510.0),
    "h200-nvlink-ib400": Cluster(gpus_per_node=8, intra_gbs=450.0, inter_gbs=50.0, expert_tflops=565.0),
}


@dataclass(frozen=True, kw_only=True)
class Shape:
    dim: int
    ffn: int
    bytes_per_el: int = 2  # bf16 activations and parameters

    @property
    def expert_bytes(self) -> int:
        return 3 * self.dim * self.ffn * self.bytes_per_el


SHAPES = {
    "mixtral": Shape(dim=4096, ffn=14336),
    "olmoe": Shape(dim=2048, ffn=1024),
    "qwen3-moe": Shape(dim=4096, ffn=1536),
    "deepseek-v3": Shape(dim=7168, ffn=2048),
}


def home_of(num_tokens: int, num_gpus: int) -> tuple[np.ndarray, np.ndarray]:
    """(T,) home GPU of each token (contiguous data shards) and (T,) its index within the shard."""
    per = -(-num_tokens // num_gpus)
    t = np.arange(num_tokens)
    return t // per, t % per


def destinations(experts_TK: np.ndarray, home_T: np.ndarray, local_T: np.ndarray, layer_plan, num_gpus: int) -> np.ndarray:
    """(T, K) GPU computing each slot: the home GPU if it holds the expert, else replicas in turn by
    the slot's index within its home shard (the trainer's rule)."""
    T, K = experts_TK.shape
    n = np.array([len(h) for h in layer_plan])
    pad = np.array([list(h) + [h[0]] * (n.max() - len(h)) for h in layer_plan])
    held = np.zeros((len(layer_plan), num_gpus), dtype=bool)
    for e, h in enumerate(layer_plan):
        held[e, list(h)] = True
    slot = local_T[:, None] * K + np.arange(K)[None, :]
    pick = pad[experts_TK, slot % n[experts_TK]]
    return np.where(held[experts_TK, home_T[:, None]], home_T[:, None], pick)


DISPATCHES = ("slot", "gpu", "node")


def token_rows(experts_TLK: np.ndarray, plan: Placement, dispatch: str = "slot", gpus_per_node: int = 0) -> np.ndarray:
    """(L, G, G) rows sent from GPU g to GPU h by one forward dispatch. `slot`: one row per
    token-slot (Megatron, DeepSpeed, moesaic's default); `gpu`: one per (token, destination GPU)
    (`parallel.token_dedup`); `node`: DeepEP's two stages (`parallel.node_dispatch`): one row per
    (token, remote node) to the GPU there with the home GPU's local index, which forwards it once to
    each other GPU of its node that computes the token, and one per (token, GPU) within the home
    node (nodes of `gpus_per_node`, default the plan's). The diagonal is zero."""
    if dispatch not in DISPATCHES:
        raise ValueError(f"dispatch ({dispatch!r}) must be one of {', '.join(DISPATCHES)}")
    T, L, K = experts_TLK.shape
    G, gpn = plan.num_gpus, gpus_per_node or plan.gpus_per_node
    home, local = home_of(T, G)
    tok_N = np.repeat(np.arange(T), K)
    out = np.zeros((L, G, G))
    for l in range(L):
        dest_N = destinations(experts_TLK[:, l], home, local, plan.placement[l], G).ravel()
        src_N = home[tok_N]
        if dispatch != "slot":  # a token's slots to one GPU share a row
            keep = np.unique(tok_N * G + dest_N, return_index=True)[1]
            tok, src, dest = tok_N[keep], src_N[keep], dest_N[keep]
        else:
            tok, src, dest = tok_N, src_N, dest_N
        if dispatch == "node":
            remote = dest // gpn != src // gpn
            peer = (dest // gpn) * gpn + src % gpn  # the remote node's GPU with the home GPU's local index
            first = np.unique(tok[remote] * G + peer[remote], return_index=True)[1]
            np.add.at(out[l], (src[remote][first], peer[remote][first]), 1.0)  # 1. across nodes, once per node
            np.add.at(out[l], (peer[remote], dest[remote]), 1.0)  # 2. forwarded within it (diagonal: none)
            np.add.at(out[l], (src[~remote], dest[~remote]), 1.0)
        else:
            np.add.at(out[l], (src, dest), 1.0)
        np.fill_diagonal(out[l], 0.0)
    return out


def row_bytes(shape: Shape, top_k: int, dispatch: str = "slot", num_gpus: int = 1,
              gpus_per_node: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """(G, G) bytes of one row dispatched from g to h, and of one row combined back: the token, plus
    per slot its combine weight and its expert's local index (`gpu`, and `node` within a node), and
    across nodes (`node`) its destination GPU's in-node index and expert id in their place."""
    d, b = shape.dim * shape.bytes_per_el, shape.bytes_per_el
    out = np.full((num_gpus, num_gpus), float(d if dispatch == "slot" else d + 2 * top_k * b))
    if dispatch == "node":
        node = np.arange(num_gpus) // gpus_per_node
        out[node[:, None] != node[None, :]] = d + 3 * top_k * b
    return out, np.full((num_gpus, num_gpus), float(d))


def token_bytes(experts_TLK: np.ndarray, plan: Placement, shape: Shape, dispatch: str = "slot") -> np.ndarray:
    """(L, G, G) bytes sent from GPU g to GPU h by one forward dispatch (see `token_rows`)."""
    out, _ = row_bytes(shape, experts_TLK.shape[2], dispatch, plan.num_gpus, plan.gpus_per_node)
    return token_rows(experts_TLK, plan, dispatch) * out


def gather_bytes(plan: Placement, owners_LE: np.ndarray, shape: Shape) -> np.ndarray:
    """(L, G, G) FSSDP gather bytes per layer: every expert from its owner to each other computing GPU."""
    G = plan.num_gpus
    out = np.zeros((plan.num_layers, G, G))
    for l, layer in enumerate(plan.placement):
        for e, gpus in enumerate(layer):
            for g in gpus:
                if g != owners_LE[l][e]:
                    out[l, owners_LE[l][e], g] += shape.expert_bytes
    return out


def _time(bytes_GG: np.ndarray, cluster: Cluster) -> float:
    """Seconds for one exchange: the slowest GPU's send time, intra- and inter-node links in parallel."""
    G = bytes_GG.shape[0]
    node = np.arange(G) // cluster.gpus_per_node
    same = node[:, None] == node[None, :]
    intra = (bytes_GG * same).sum(1) / (cluster.intra_gbs * 1e9)
    inter = (bytes_GG * ~same).sum(1) / (cluster.inter_gbs * 1e9)
    return float(np.maximum(intra, inter).max())


def simulate(experts_TLK: np.ndarray, plan: Placement, cluster: Cluster, shape: Shape, *, fssdp: bool = False,
             owners_LE: np.ndarray | None = None, remat: bool = True, dispatch: str = "slot") -> dict:
    """One training step's MoE part under `plan` (resident EP, or FSSDP with `owners_LE`), its tokens
    dispatched as `token_rows` describes."""
    T, L, K = experts_TLK.shape
    G = plan.num_gpus
    rows = token_rows(experts_TLK, plan, dispatch)
    out_b, back_b = row_bytes(shape, K, dispatch, G, plan.gpus_per_node)
    home, local = home_of(T, G)
    res = {"a2a_bytes": 0.0, "a2a_inter_bytes": 0.0, "param_bytes": 0.0, "a2a_s": 0.0, "param_s": 0.0, "compute_s": 0.0}
    node = np.arange(G) // cluster.gpus_per_node
    flops_per_slot = 2 * 3 * shape.dim * shape.ffn * 3  # forward + backward
    prev_compute = 0.0
    par = gather_bytes(plan, owners_LE, shape) if fssdp else None
    for l in range(L):
        dest = destinations(experts_TLK[:, l], home, local, plan.placement[l], G)
        slots = np.bincount(dest.ravel(), minlength=G)
        compute = slots.max() * flops_per_slot / (cluster.expert_tflops * 1e12)
        a2a = 2 * (_time(rows[l] * out_b, cluster) + _time(rows[l] * back_b, cluster))  # fwd and bwd
        res["a2a_bytes"] += float((rows[l] * (out_b + back_b)).sum())
        res["a2a_inter_bytes"] += float((rows[l] * (out_b + back_b) * (node[:, None] != node[None, :])).sum())
        res["compute_s"] += compute
        res["a2a_s"] += a2a
        if fssdp:
            times = (2 if remat else 1) + 1  # gather (again for backward with remat) and reduce-scatter
            res["param_bytes"] += times * par[l].sum()
            res["param_s"] += max(0.0, times * _time(par[l], cluster) - prev_compute)  # overlapped with compute
        else:  # resident replicas all-reduce their gradients (ring over the replica group)
            for e, gpus in enumerate(plan.placement[l]):
                if len(gpus) > 1:
                    r = len(gpus)
                    b = 2 * (r - 1) / r * shape.expert_bytes
                    res["param_bytes"] += b * r
                    cross = len({int(node[g]) for g in gpus}) > 1
                    res["param_s"] += b / ((cluster.inter_gbs if cross else cluster.intra_gbs) * 1e9)
        prev_compute = compute
    res["step_s"] = res["a2a_s"] + res["param_s"] + res["compute_s"]
    return res


def coherent_inference(experts_TLK: np.ndarray, plan: Placement, cluster: Cluster, shape: Shape) -> dict:
    """ExFlow: after layer l a token stays on the GPU that computed its top-1 expert; one all-to-all
    per layer, forward only. Returns the cross-GPU share of token moves and the all-to-all seconds."""
    T, L, K = experts_TLK.shape
    G = plan.num_gpus
    home, local = home_of(T, G)
    moved = total = 0
    secs = 0.0
    for l in range(L):
        dest = destinations(experts_TLK[:, l], home, local, plan.placement[l], G)
        b = np.zeros((G, G))
        np.add.at(b, (np.repeat(home, K), dest.ravel()), shape.dim * shape.bytes_per_el)
        np.fill_diagonal(b, 0.0)
        secs += _time(b, cluster)
        moved += int((dest != home[:, None]).sum())
        total += dest.size
        home = dest[:, 0]
    return {"cross_gpu_share": moved / total, "a2a_s": secs}
