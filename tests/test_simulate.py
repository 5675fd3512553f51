"""The cluster simulator: hand-checked traffic, and calibration against the trainer's own byte
counters at 4 gloo ranks (the same trace and plan must give exactly the same bytes)."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import child_env
from moesaic.placement.plan import Placement
from moesaic.placement.simulate import (CLUSTERS, Shape, coherent_inference, destinations, gather_bytes, row_bytes, simulate,
                                       token_bytes, token_rows)

WORKERS = Path(__file__).resolve().parent / "workers"


def test_destinations_prefer_a_local_replica_then_round_robin():
    layer = [(0,), (0, 1), (1,)]
    experts = np.array([[1, 2], [1, 0], [1, 2]])  # 3 tokens, top-2
    home, local = np.array([0, 1, 1]), np.array([0, 0, 1])
    d = destinations(experts, home, local, layer, 2)
    assert d.tolist() == [[0, 1], [1, 0], [1, 1]]  # expert 1 is local on both GPUs


def test_token_bytes_and_gather_bytes_by_hand():
    plan = Placement(2, 2, [[(0,), (1,)]])
    ex = np.array([[[1]], [[0]]])  # token 0 (home 0) -> expert 1 on GPU 1; token 1 (home 1) -> expert 0
    b = token_bytes(ex, plan, Shape(dim=4, ffn=8, bytes_per_el=2))
    assert b[0].tolist() == [[0, 8], [8, 0]]
    rep = Placement(2, 2, [[(0, 1), (1,)]])
    g = gather_bytes(rep, np.array([[0, 1]]), Shape(dim=4, ffn=8, bytes_per_el=2))
    assert g[0].tolist() == [[0, 3 * 4 * 8 * 2], [0, 0]]  # expert 0 gathered from its owner to GPU 1
    res = simulate(ex, plan, CLUSTERS["h100-nvlink-ib400"], Shape(dim=4, ffn=8))
    assert res["a2a_bytes"] == 2 * 16 and res["param_bytes"] == 0
    inf = coherent_inference(ex, plan, CLUSTERS["h100-nvlink-ib400"], Shape(dim=4, ffn=8))
    assert inf["cross_gpu_share"] == 1.0


def test_token_rows_per_slot_gpu_and_node_by_hand():
    plan = Placement(2, 2, [[(1,), (1,), (0,)]])
    ex = np.array([[[0, 1]], [[2, 0]]])  # token 0 (home 0): both experts on GPU 1; token 1 (home 1): GPU 0 and home
    assert token_rows(ex, plan)[0].tolist() == [[0, 2], [1, 0]]
    assert token_rows(ex, plan, "gpu")[0].tolist() == [[0, 1], [1, 0]]
    shape = Shape(dim=4, ffn=8, bytes_per_el=2)
    assert row_bytes(shape, 2, "gpu")[0].tolist() == [[16.0]] and row_bytes(shape, 2)[0].tolist() == [[8.0]]
    out, back = row_bytes(shape, 2, "node", 4, 2)  # across nodes 3K more columns, within 2K
    assert out[0].tolist() == [16, 16, 20, 20] and (back == 8).all()
    res = simulate(ex, plan, CLUSTERS["h100-nvlink-ib400"], shape, dispatch="gpu")
    assert res["a2a_bytes"] == 2 * (16 + 8)  # 2 rows out with their 2K slot columns, 2 back
    assert simulate(ex, plan, CLUSTERS["h100-nvlink-ib400"], shape)["a2a_bytes"] == 3 * (8 + 8)
    # two nodes of 2 GPUs, expert e on GPU e + 1 (mod 4), token t at home on GPU t, top-3
    four = Placement(4, 2, [[(1,), (2,), (3,), (0,)]])
    ex = np.array([[[0, 1, 2]], [[3, 0, 1]], [[3, 0, 1]], [[3, 0, 1]]])  # GPUs {1, 2, 3}, then {0, 1, 2}
    gpu, node = token_rows(ex, four, "gpu")[0], token_rows(ex, four, "node")[0]
    assert gpu.tolist() == [[0, 1, 1, 1], [1, 0, 1, 0], [1, 1, 0, 0], [1, 1, 1, 0]]
    # per node: token 0: 0->1 in its node, 0->2 across (GPU 2 has GPU 0's local index), 2->3 forwarded;
    # token 1: 1->0, 1->3 across, 3->2; token 2: 2->0 across, 0->1; token 3: 3->1 across, 1->0, 3->2
    assert node.tolist() == [[0, 2, 1, 0], [2, 0, 0, 1], [1, 0, 0, 1], [0, 1, 2, 0]]
    cross = (np.arange(4)[:, None] // 2) != (np.arange(4)[None, :] // 2)
    assert (gpu * cross).sum() == 7 and (node * cross).sum() == 4
    with pytest.raises(ValueError, match=r"dispatch \('deepep'\) must be one of slot, gpu, node"):
        token_rows(ex, four, "deepep")


@pytest.mark.slow
@pytest.mark.dist
def test_simulated_bytes_equal_the_trainers_counters(tmp_path):
    from moesaic.parallel.fssdp import even_owners

    out = tmp_path / "r.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "4", "--standalone", str(WORKERS / "sim_calibrate.py"), str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=child_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    plan = Placement.from_dict(r["plan"])
    shape = Shape(dim=r["dim"], ffn=r["ffn"], bytes_per_el=4)  # the CPU run is fp32
    for case, dispatch in (("resident", "slot"), ("fssdp", "slot"), ("resident-dedup", "gpu"), ("resident-node", "node")):
        ranks = r[case]
        trace = np.concatenate([np.array(rk["ids"]).transpose(1, 0, 2) for rk in ranks])  # (T, L, K), rank order
        rows = token_rows(trace, plan, dispatch, gpus_per_node=2)  # node dispatch: 2 nodes of 2 ranks
        out_b, back_b = row_bytes(shape, 2, dispatch, 4, 2)
        for rank, rk in enumerate(ranks):
            for layer in range(plan.num_layers):
                assert rk["a2a"][layer] == (rows[layer][rank] * (out_b + back_b)[rank]).sum(), (case, rank, layer)
                # and to each destination rank
                assert rk["to"][layer] == (rows[layer][rank] * (out_b + back_b)[rank]).tolist(), (case, rank, layer)
                if dispatch == "node":  # the first stage's rows: the only ones across nodes
                    cross = np.arange(4) // 2 != rank // 2
                    assert rk["inter"][layer] == (rows[layer][rank] * (out_b + back_b)[rank] * cross).sum()
        if dispatch == "gpu":  # a token whose 2 experts share a GPU sends one row there
            assert rows.sum() < token_rows(trace, plan).sum()
        if dispatch == "node":  # and one row to a node: fewer across nodes than per GPU, more within
            cross = (np.arange(4)[:, None] // 2) != (np.arange(4)[None, :] // 2)
            per_gpu = token_rows(trace, plan, "gpu")
            assert (rows * cross).sum() < (per_gpu * cross).sum() and (rows * ~cross).sum() > (per_gpu * ~cross).sum()
    owners = np.tile(even_owners(8, 4), (plan.num_layers, 1))
    par = gather_bytes(plan, owners, shape)
    for rank, rk in enumerate(r["fssdp"]):
        for layer in range(plan.num_layers):
            assert rk["gather"][layer] == 2 * par[layer][rank].sum()  # forward, and again for backward
