"""torchrun worker: engine=deepspeed must never see an expert. Checks that the DeepSpeed engine's
module and its optimizer hold no expert parameter, that a step leaves the expert gradients to
moesaic (equal on every rank that computes the same expert), and that the dense parameters stay
identical across ranks. ZeRO-2 runs with parallel.zero_config (small buckets, no contiguous
gradients), whose values the report reads back from the engine. Prints one JSON line on rank 0."""

import json
import sys

import torch
import torch.distributed as dist

from moesaic.parallel.process import finish_rank
from moesaic.parallel.config import ParallelConfig
from moesaic.trainer.config import OptimConfig, TrainConfig
from moesaic.trainer.data import DataConfig
from moesaic.trainer.dist import DistInfo
from moesaic.trainer.model import ModelConfig, Transformer
from moesaic.trainer.parallelize import parallelize, resolve_plan


TUNED = {"reduce_bucket_size": 1000, "allgather_bucket_size": 2000, "contiguous_gradients": False}


def main():
    dist.init_process_group("gloo")
    for stage in sys.argv[1:]:  # several stages run one after another in one launch
        run(int(stage))
    finish_rank(0)


def run(stage: int) -> None:
    W, rank = dist.get_world_size(), dist.get_rank()
    cfg = TrainConfig(model=ModelConfig(dim=32, num_layers=2, num_heads=2, max_seq_len=64,
                                        moe={"num_experts": 4, "top_k": 2, "ffn_dim": 16}),
                      data=DataConfig(seq_len=16), steps=4, optim=OptimConfig(warmup_steps=0),
                      parallel=ParallelConfig(ep_size=0, expert_sharding="fssdp", engine="deepspeed", zero_stage=stage,
                                              zero_config=TUNED if stage == 2 else {}))
    torch.manual_seed(0)
    model = Transformer(cfg.model)
    par = parallelize(model, cfg, DistInfo(rank, W, rank, torch.device("cpu"), "gloo"), resolve_plan(cfg, W))
    opt, sched = par.build_optimizer(cfg)
    engine = par.ds_engine
    expert_ids = {id(p) for n, p in model.named_parameters() if ".experts." in n}
    in_module = sum(id(p) in expert_ids for p in engine.module.parameters())
    ds_params = [p for g in engine.optimizer.param_groups for p in g["params"]]
    basic = getattr(engine, "basic_optimizer", None)
    if basic is not None:
        ds_params += [p for g in basic.param_groups for p in g["params"]]
    in_optimizer = sum(id(p) in expert_ids for p in ds_params)
    g = torch.Generator().manual_seed(rank)
    x = torch.randint(0, 256, (2, 16), generator=g)
    out = engine(x, torch.roll(x, -1, 1))
    engine.backward(out.loss)
    par.reduce_grads()
    expert_grads = [p.grad.clone() for n, p in model.named_parameters() if ".experts." in n]
    engine.step()
    opt.step()
    dense = torch.cat([p.detach().flatten() for n, p in model.named_parameters() if ".experts." not in n])
    gathered = [torch.empty_like(dense) for _ in range(W)]
    dist.all_gather(gathered, dense)
    if rank == 0:
        print(json.dumps({"stage": stage, "experts_in_engine_module": in_module, "experts_in_deepspeed_optimizer": in_optimizer,
                          "expert_grads_present": all(gr.abs().sum() > 0 for gr in expert_grads),
                          "dense_equal_across_ranks": all(torch.equal(gathered[0], t) for t in gathered[1:]),
                          "engine_module_params": len(list(engine.module.parameters())),
                          "zero": {"reduce_bucket_size": engine.zero_reduce_bucket_size(),
                                   "allgather_bucket_size": engine.zero_allgather_bucket_size(),
                                   "contiguous_gradients": engine.zero_contiguous_gradients()}}), flush=True)
    dist.barrier()


if __name__ == "__main__":
    main()  # ends in finish_rank
