"""Which predictor estimates the next loads better on the demo model: Hecate's sliding window (mean
of the last k steps' loads of a layer) or moesaic's affinity predictor (within the step, layer l's
actual loads times the inter-layer affinity learned so far predict layer l+1's loads before its
router runs).

    python bench/load_predictors.py [--steps 150] [--window 5] [--json out.json]

Trains the default demo model in one process on a global batch of 32 x 128 bytes (as 4 ranks x 8),
and scores each predictor by the mean absolute error per layer, relative to the mean load.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, table, write_json  # noqa: E402

from moesaic.placement.dynamic import affinity_prediction, window_prediction  # noqa: E402
from moesaic.placement.stats import RoutingStats  # noqa: E402
from moesaic.trainer.config import TrainConfig  # noqa: E402
from moesaic.trainer.data import DataConfig, load_corpus, sample_batch  # noqa: E402
from moesaic.trainer.model import Transformer  # noqa: E402
from moesaic.trainer.optim import build_optimizer, lr_lambda  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--window", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=10, help="steps before scoring starts")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    torch.set_num_threads(2)
    cfg = TrainConfig(steps=a.steps, data=DataConfig(max_bytes=8_000_000))
    corpus = load_corpus(cfg.data)
    torch.manual_seed(cfg.seed)
    model = Transformer(cfg.model)
    opt = build_optimizer(model, cfg.optim)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg.optim, cfg.steps))
    L, E = cfg.model.num_moe_layers, cfg.model.moe.num_experts
    P_hist, W_cum = [], np.zeros((L - 1, E, E))
    err_win, err_aff = [], []
    for step in range(a.steps):
        x, y = sample_batch(corpus.train, a.batch, cfg.data.seq_len, seed=cfg.seed, stream=(0, step, 0))
        out = model(x, y)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        opt.step()
        opt.zero_grad()
        sched.step()
        ids = np.stack([m.last_route.expert_ids_TK.numpy() for m in model.moe_layers()], 1)
        s = RoutingStats.from_experts(ids, E)
        if step >= a.warmup:
            mean = s.P.mean(axis=1, keepdims=True)
            err_win.append(np.abs(window_prediction(np.stack(P_hist), a.window) - s.P).mean(1) / mean[:, 0])
            err_aff.append(np.abs(affinity_prediction(s.P, W_cum) - s.P[1:]).mean(1) / mean[1:, 0])
        P_hist.append(s.P)
        W_cum += s.W
    ew, ea = np.mean(err_win, 0), np.mean(err_aff, 0)
    rows = [{"layer": l, "window_mae_rel": float(ew[l]), "affinity_mae_rel": float(ea[l - 1]) if l else float("nan"),
             "better": ("affinity" if l and ea[l - 1] < ew[l] else "window") if l else "window (affinity n/a)"}
            for l in range(L)]
    print("machine:", machine())
    print(f"demo model, {a.steps} steps, global batch {a.batch} x {cfg.data.seq_len}, scored from step {a.warmup}\n")
    print(table(rows))
    print(f"\nmean over layers 1..{L - 1}: window {ew[1:].mean():.4f}, affinity {ea.mean():.4f}")
    write_json(a.json, {"machine": machine(), "args": vars(a), "rows": rows})


if __name__ == "__main__":
    main()
