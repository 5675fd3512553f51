"""torchrun worker: one forward and backward of a small model under resident EP, FSSDP, and
resident EP with token-deduplicated dispatch per rank and per node (2 nodes of 2 ranks),
reporting the routing of every rank and the byte counters of every rank (rank 0 writes JSON)."""

import json
import sys

import torch
import torch.distributed as dist

from moesaic.parallel.config import ParallelConfig
from moesaic.parallel.process import finish_rank
from moesaic.parallel.doctor import make_plan
from moesaic.parallel.fssdp import fssdp_reduce_scatter
from moesaic.parallel.moe import MoEConfig
from moesaic.trainer.dist import DistInfo
from moesaic.trainer.model import ModelConfig, Transformer
from moesaic.trainer.parallelize import parallelize


def main():
    out_path = sys.argv[1]
    dist.init_process_group("gloo")
    W, rank = dist.get_world_size(), dist.get_rank()
    mcfg = ModelConfig(dim=32, num_layers=3, num_heads=2, max_seq_len=32, moe=MoEConfig(num_experts=8, top_k=2, ffn_dim=16))
    plan = make_plan("replicated", 8, W, seed=2, num_layers=3)
    report = {"plan": plan.to_dict(), "dim": 32, "ffn": 16}
    for case in ("resident", "fssdp", "resident-dedup", "resident-node"):
        sharding = case.split("-")[0]

        class _Cfg:  # node dispatch: nodes of 2 ranks
            parallel = ParallelConfig(ep_size=W, expert_sharding=sharding, token_dedup=case != sharding,
                                      node_dispatch=case.endswith("node"), gpus_per_node=2)

            class model:
                moe_impl = "moesaic"

                class moe:
                    capacity_factor = 0.0

        torch.manual_seed(0)
        model = Transformer(mcfg)
        par = parallelize(model, _Cfg, DistInfo(rank, W, rank, torch.device("cpu"), "gloo"), plan)
        g = torch.Generator().manual_seed(100 + rank)
        x = torch.randint(0, 256, (3, 16), generator=g)
        par.train_model(x, torch.roll(x, -1, 1)).loss.backward()
        if sharding == "fssdp":
            fssdp_reduce_scatter(model)
        ids = [m.last_route.expert_ids_TK.tolist() for m in model.moe_layers()]
        a2a = [m.dispatcher.counters["a2a_bytes"] for m in model.moe_layers()]
        inter = [m.dispatcher.counters.get("a2a_inter_node_bytes", 0) for m in model.moe_layers()]
        to = [m.dispatcher.counters["a2a_bytes_to"] for m in model.moe_layers()]
        gather = [getattr(m.experts, "bytes", {}).get("gather", 0) for m in model.moe_layers()]
        allv = [None] * W
        dist.all_gather_object(allv, {"ids": ids, "a2a": a2a, "gather": gather, "inter": inter, "to": to})
        report[case] = allv
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(report, f)
    finish_rank(0)


if __name__ == "__main__":
    main()  # ends in finish_rank
