"""torchrun worker: `model.moe_impl=deepspeed` against a one-process reference of the same math.

Every rank builds the same model (same seed), keeps a copy of its moesaic MoE blocks, and swaps them
for DeepSpeed-MoE (`apply_deepspeed_moe`). Each rank feeds its own tokens to the first MoE layer.
The reference, with all experts in this process: softmax gate, top-k, weights renormalised over the
chosen experts (DeepSpeed's combine), SwiGLU experts. Checked: the outputs, the routed expert ids and
counts, the gate's gradient, and each local expert's gradient against the reference gradients summed
over the ranks of this rank's expert-parallel group. Prints one JSON line on rank 0.

    torchrun --nproc_per_node N ds_moe.py EP_SIZE
"""

import copy
import json
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F

from moesaic.parallel.process import finish_rank
from moesaic.parallel.deepspeed_moe import apply_deepspeed_moe
from moesaic.trainer.model import ModelConfig, Transformer


def reference(moe, x_TD, top_k):
    logits = moe.router.gate(x_TD).float()
    gates = logits.softmax(-1)
    ids = gates.topk(top_k, dim=-1).indices
    w = gates.gather(1, ids)
    w = w / w.sum(-1, keepdim=True).clamp_min(torch.finfo(w.dtype).eps)
    ex = moe.experts
    y = torch.zeros_like(x_TD)
    for k in range(top_k):
        for e in range(ex.num_experts):
            m = ids[:, k] == e
            if m.any():
                xe = x_TD[m]
                h = F.silu(xe @ ex.w1_EFD[e].T) * (xe @ ex.w3_EFD[e].T)
                y[m] += w[m, k, None] * (h @ ex.w2_EDF[e].T)
    return y, ids


def main():
    dist.init_process_group("gloo")
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    for ep in sys.argv[1:]:  # several ep sizes run one after another in one launch
        run(int(ep))
    finish_rank(0)


def run(ep: int) -> None:
    W, rank = dist.get_world_size(), dist.get_rank()
    cfg = ModelConfig(dim=32, num_layers=2, num_heads=2, max_seq_len=64,
                      moe={"num_experts": 4, "top_k": 2, "ffn_dim": 16})
    torch.manual_seed(0)
    model = Transformer(cfg)
    ref = copy.deepcopy(model.layers[0].moe)
    apply_deepspeed_moe(model, ep, rank)
    for blk in model.layers:
        blk.moe.deepspeed.set_deepspeed_parallelism()  # what deepspeed.initialize does
    block = model.layers[0].moe

    g = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(3, 5, cfg.dim, generator=g)
    grad_out = torch.randn(3, 5, cfg.dim, generator=g)
    y, route = block(x)
    (y * grad_out).sum().backward()
    y_ref, ids_ref = reference(ref, x.reshape(-1, cfg.dim), cfg.moe.top_k)
    (y_ref.view_as(x) * grad_out).sum().backward()

    out_diff = (y - y_ref.view_as(y)).abs().max().item()
    ids_equal = bool(torch.equal(route.expert_ids_TK.sort(-1).values, ids_ref.sort(-1).values))
    counts_equal = bool(torch.equal(route.tokens_per_expert_E, torch.bincount(ids_ref.flatten(), minlength=4)))
    gate_diff = (block.deepspeed.deepspeed_moe.gate.wg.weight.grad - ref.router.gate.weight.grad).abs().max().item()
    # expert gradients: DeepSpeed-MoE sums over the tokens of its expert-parallel group
    group_ranks = list(range(rank // ep * ep, rank // ep * ep + ep))
    group = None
    for start in range(0, W, ep):  # every rank creates every group, in the same order
        pg = dist.new_group(list(range(start, start + ep)))
        if start == group_ranks[0]:
            group = pg
    ex = ref.experts
    g1, g3 = ex.w13_EGD.grad.chunk(2, dim=1)
    ref_grads = torch.cat([g1.flatten(1), g3.flatten(1), ex.w2_EDF.grad.flatten(1)], 1)
    dist.all_reduce(ref_grads, group=group)
    local = block.deepspeed.deepspeed_moe.experts.deepspeed_experts
    n_local = len(local)
    expert_diff = 0.0
    for i, e in enumerate(local):
        gid = (rank % ep) * n_local + i
        mine = torch.cat([e.w1.weight.grad.flatten(), e.w3.weight.grad.flatten(), e.w2.weight.grad.flatten()])
        expert_diff = max(expert_diff, (mine - ref_grads[gid]).abs().max().item())
    expert_grad_norm = ref_grads.norm().item()
    result = torch.tensor([out_diff, gate_diff, expert_diff, float(not ids_equal), float(not counts_equal)])
    dist.all_reduce(result, op=dist.ReduceOp.MAX)
    if rank == 0:
        print(json.dumps({"world": W, "ep": ep, "out_diff": result[0].item(), "gate_grad_diff": result[1].item(),
                          "expert_grad_diff": result[2].item(), "ids_equal": result[3].item() == 0,
                          "counts_equal": result[4].item() == 0, "expert_grad_norm": expert_grad_norm,
                          "a2a_bytes": block.dispatcher.counters["a2a_bytes"]}), flush=True)
    dist.barrier()


if __name__ == "__main__":
    main()  # ends in finish_rank
