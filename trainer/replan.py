"""Re-placement from live routing statistics during training.

Every `placement.every_n_steps`: the statistics recorded since the last solve are all-reduced and
folded into an EMA (`placement.ema_decay`); rank 0 starts the solver (method, time limit, epsilon and
the launcher's GPUs per node) in a background thread, so that training goes on (an ILP runs in a
spawned process). After `placement.adopt_after_steps` more steps every rank adopts the broadcast plan
at the same boundary, waiting for the solver if need be; with `placement.wait_for_plan=false` at the
first boundary from then on where the plan is ready.
Under FSSDP adoption moves only the owned shards whose owner changes (`placement.align_owners`;
nothing when false); under resident EP the experts and their AdamW moments move with one all-to-all
per layer. Each plan is written to <run dir>/plans/plan-<step>.json.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import threading
import time
from collections import deque
from pathlib import Path

import numpy as np

from moesaic.parallel.expert_parallel import migrate_resident
from moesaic.parallel.fssdp import reshard_owners, set_fssdp_plan
from moesaic.placement.dynamic import add_replicas, aligned_owners, window_prediction
from moesaic.placement.plan import Placement
from moesaic.placement.solve import solve
from moesaic.placement.stats import RoutingStats
from moesaic.placement.topology import Topology
from moesaic.trainer.dist import broadcast_object
from moesaic.trainer.preempt import stop_signals_blocked

HEURISTICS = ("eplb", "contiguous", "round_robin")  # solved in the trainer's thread; the ILPs in a process


class Replanner:
    def __init__(self, pcfg, par, recorder, optimizer, run_dir: Path, info, logger):
        self.cfg, self.par, self.recorder, self.optimizer = pcfg, par, recorder, optimizer
        self.run_dir, self.info, self.logger = run_dir, info, logger
        self.ema: RoutingStats | None = None
        self.snapshot: RoutingStats | None = None
        self.thread: threading.Thread | None = None
        self.result: dict = {}
        self.adopt_at: int | None = None
        self.history: list[dict] = []

    @property
    def enabled(self) -> bool:
        return self.cfg.every_n_steps > 0 and self.par.plan is not None

    def after_step(self, done: int) -> None:
        if not self.enabled:
            return
        if done % self.cfg.every_n_steps == 0 and self.adopt_at is None:
            total = self.recorder.stats(all_reduce=True)
            window = total if self.snapshot is None else _minus(total, self.snapshot)
            self.snapshot = total
            self.ema = window if self.ema is None else self.ema.ema(window, self.cfg.ema_decay)
            self.adopt_at = done + self.cfg.adopt_after_steps
            if self.info.is_main:
                self._start_solve(self.ema, done)
        if self.adopt_at is not None and done >= self.adopt_at and self._plan_ready():
            self._adopt(done)

    def _plan_ready(self) -> bool:
        """Whether to adopt at this boundary: rank 0's word that its solve has finished, broadcast
        (a collective, at each step while a plan is pending), or always with wait_for_plan."""
        if self.cfg.wait_for_plan:
            return True
        ready = self.info.is_main and (self.thread is None or not self.thread.is_alive())
        return bool(broadcast_object(ready, self.info))

    def _start_solve(self, stats: RoutingStats, step: int) -> None:
        P = self.par.plan.num_gpus
        topo = Topology(num_gpus=P, gpus_per_node=self.par.gpus_per_node, inter_node_cost=self.cfg.inter_node_cost)

        # the router's expert groups: eplb, affinity and moetuner put whole groups onto nodes (node-limited routing)
        groups = max(1, self.par.model.moe_layers()[0].cfg.router.num_expert_groups)
        args = (self.cfg.method, stats, topo, self.cfg.epsilon, self.cfg.time_limit, self.cfg.solver, step,
                self.cfg.slots_per_gpu or None, groups)

        where = "thread" if self.cfg.method in HEURISTICS else "process"

        def run():
            # an ILP runs in a fresh process: its native thread pools stay out of the trainer, and the
            # GIL is not shared with the training loop. A heuristic takes milliseconds (EPLB: 0.2 s at
            # 58 layers x 256 experts), less than spawning a Python process costs (0.5 s of CPU), so
            # it runs here, in this thread.
            t0 = time.perf_counter()
            try:
                if where == "thread":
                    plan_dict = _solve_to_dict(*args)
                else:
                    plan_dict = _solve_in_process(args)
                self.result = {"plan": plan_dict, "seconds": time.perf_counter() - t0, "solved_at": step,
                               "solved_in": where}
            except Exception as e:  # reported at adoption; training keeps the current plan
                self.result = {"error": f"{type(e).__name__}: {e}", "seconds": time.perf_counter() - t0}

        self.result = {}
        self.thread = threading.Thread(target=run, name="moesaic-replan", daemon=True)
        self.thread.start()

    def _adopt(self, done: int) -> None:
        wait0 = time.perf_counter()
        if self.info.is_main and self.thread is not None:
            self.thread.join()
        waited = time.perf_counter() - wait0
        result = broadcast_object(self.result if self.info.is_main else None, self.info)
        deferred, self.adopt_at = done - self.adopt_at, None
        record = {"kind": "placement", "step": done, "solve_s": result.get("seconds"), "adopt_wait_s": waited,
                  "deferred_steps": deferred}
        if "error" in result:
            record["error"] = result["error"]
            self.logger.log(record)
            self.logger.message(f"step {done}: re-placement failed, keeping the current plan ({result['error']})")
            return
        plan = Placement.from_dict(result["plan"])
        moved = 0
        if self.par.fssdp:
            if self.par.align_owners:  # owners move once, to GPUs that compute their experts
                current = [m.experts.owners for m in self.par.model.moe_layers()]
                moved = reshard_owners(self.par.model, self.optimizer, aligned_owners(plan, np.stack(current)))
            set_fssdp_plan(self.par.model, plan)
        else:
            moved = migrate_resident(self.par.model, self.optimizer, plan)
        self.par.plan = plan
        meta = plan.meta
        record.update({"method": meta.get("method"), "status": meta.get("status"), "objective": meta.get("objective"),
                       "migrated_bytes_rank0": moved, "solved_at": result.get("solved_at"),
                       "solved_in": result.get("solved_in")})
        if self.info.is_main:
            (self.run_dir / "plans").mkdir(exist_ok=True)
            plan.save(self.run_dir / "plans" / f"plan-{done:08d}.json")
        self.history.append(record)
        self.logger.log(record)


def _solve_to_dict(method, stats, topo, epsilon, time_limit, solver, seed, slots_per_gpu=None, num_groups=1) -> dict:
    t0 = time.perf_counter()
    plan = solve(method, stats, topo, slots_per_gpu=slots_per_gpu, epsilon=epsilon, time_limit=time_limit,
                 solver=solver, seed=seed, num_groups=num_groups)
    plan.meta["solver_process_seconds"] = time.perf_counter() - t0
    return plan.to_dict()


def _solve_in_process(args: tuple) -> dict:
    """`_solve_to_dict(*args)` in a spawned process, its answer back through a pipe. (Not a Pool: its
    queues' semaphores outlive it, and a rank that ends by os._exit leaves them to the resource
    tracker, which warns of leaked semaphores.)"""
    ctx = mp.get_context("spawn")
    receive, send = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_solve_into, args=(send, args, os.getpid()), name="moesaic-solver", daemon=True)
    with stop_signals_blocked():  # a SIGTERM to the rank's process group is the rank's to handle
        child.start()
    send.close()  # the child holds the only writer: its death ends recv() with EOFError
    try:
        ok, value = receive.recv()
    except EOFError:
        ok, value = False, None
    finally:
        receive.close()
        child.join()
    if not ok:
        raise RuntimeError(f"in the solver process: {value or f'it ended with exit code {child.exitcode} and no answer'}")
    return value


def _solve_into(send, args: tuple, parent: int) -> None:
    # a rank that ends (by os._exit, a crash or a signal) while a solve is in flight leaves this
    # process to itself: it follows the rank out rather than solve on for nobody
    threading.Thread(target=_exit_with, args=(parent,), daemon=True).start()
    try:
        answer = (True, _solve_to_dict(*args))
    except Exception as e:
        answer = (False, f"{type(e).__name__}: {e}")
    try:
        send.send(answer)
    except OSError:  # the rank has gone
        pass
    finally:
        send.close()


def _exit_with(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(0.2)
    os._exit(0)


def _minus(a: RoutingStats, b: RoutingStats) -> RoutingStats:
    return RoutingStats(a.P - b.P, a.W - b.W, a.num_tokens - b.num_tokens, a.top_k)


class DynamicReplicas:
    """Hecate's dynamic replicas under FSSDP: before each step, the plan in force is the current base
    plan plus replicas of the experts that the last `predictor_window` steps' loads predict hot."""

    def __init__(self, pcfg, par, info):
        self.cfg, self.par, self.info = pcfg, par, info
        self.history: deque = deque(maxlen=pcfg.predictor_window)
        self.in_force: Placement | None = None
        self.replicas_added: list[int] = []

    @property
    def enabled(self) -> bool:
        return self.cfg.dynamic_replicas > 0 and self.par.fssdp

    def before_step(self) -> None:
        if not self.enabled or not self.history:
            return
        loads = window_prediction(np.stack(self.history), self.cfg.predictor_window)
        plan = add_replicas(self.par.plan, loads, self.cfg.dynamic_replicas)
        if self.in_force is None or plan != self.in_force:
            set_fssdp_plan(self.par.model, plan)
            self.in_force = plan
        base = sum(len(g) for layer in self.par.plan.placement for g in layer)
        self.replicas_added.append(sum(len(g) for layer in plan.placement for g in layer) - base)

    def after_step(self, global_counts_LE) -> None:
        """Record the step's loads, summed over all ranks."""
        if not self.enabled or global_counts_LE is None:
            return
        self.history.append(global_counts_LE.numpy())


class Resharder:
    """FSSDP heterogeneous sharding (Hecate's Algorithm 2) every `parallel.reshard_every_n_steps`:
    owners follow the loads recorded since the last re-shard (every rank computes the same owners from
    the all-reduced counts), and owned parameters and AdamW moments move to their new owners."""

    def __init__(self, pcfg, par, recorder, optimizer, logger):
        self.every, self.par, self.recorder, self.optimizer, self.logger = pcfg.reshard_every_n_steps, par, recorder, optimizer, logger
        self.snapshot: RoutingStats | None = None
        self.history: list[dict] = []

    @property
    def enabled(self) -> bool:
        return self.every > 0 and self.par.fssdp

    def after_step(self, done: int) -> None:
        if not self.enabled or done % self.every:
            return
        from moesaic.parallel.fssdp import reshard_owners
        from moesaic.placement.dynamic import hecate_owners

        total = self.recorder.stats(all_reduce=True)
        window = total if self.snapshot is None else _minus(total, self.snapshot)
        self.snapshot = total
        P = self.par.plan.num_gpus
        owners = [hecate_owners(window.P[l], P, self.par.gpus_per_node) for l in range(window.num_layers)]
        t0 = time.perf_counter()
        moved = reshard_owners(self.par.model, self.optimizer, owners)
        record = {"kind": "reshard", "step": done, "moved_bytes_rank": moved, "seconds": time.perf_counter() - t0}
        self.history.append(record)
        self.logger.log(record)
