"""Stop cleanly when the scheduler says so: on SIGTERM (SLURM's time limit and preemption, `scancel`,
Kubernetes, torchrun forwarding its own SIGTERM) or SIGUSR1 (`sbatch --signal=USR1@120` with one
srun task per rank), every rank finishes the step it is in, a checkpoint of that step is written, and
the run ends with exit code 128 + the signal's number. `checkpoint.resume=auto` continues from it.

The ranks agree at each step boundary: one all-reduce (max) of the number of the signal that each
rank has received, 0 if none. A signal may reach one rank only, or reach the ranks mid-step at
different moments; either way all of them stop after the same step. A rank often receives the same
signal twice: SLURM signals every process of a step, and torchrun forwards its own SIGTERM to its
workers. Repeats change nothing; SIGKILL stops a rank at once (saves are atomic: the last complete
checkpoint stays).

Under torchrun the agent forwards SIGTERM to its workers and kills them 30 s later (torch 2.13:
`--shutdown-timeout`), so the step in progress and the save must fit in that time. torchrun passes
on SIGUSR1 only where `--signals-to-handle` (PET_SIGNALS_TO_HANDLE, torch >= 2.9) names it, as the
launch scripts do; otherwise SIGUSR1 ends torchrun itself. SLURM sends SIGKILL `KillWait` seconds
(default 30) after the SIGTERM of a time limit; `--signal=TERM@120` sends a SIGTERM two minutes early.

With launcher.requeue (SLURM), rank 0 then requeues the job, whose next start resumes under the same
run name (`requeue_defaults`, `requeue_job`).

The price: a rank that waits in a collective for a rank that has crashed runs no Python handler
until the wait ends, so the launcher's SIGTERM no longer ends it at once; the launcher's SIGKILL does,
after the same timeout. (gloo notices a crashed peer by itself, within seconds.)
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading

import torch

from moesaic.trainer.dist import DistInfo, all_reduce_

log = logging.getLogger(__name__)
CATCHABLE = ("SIGTERM", "SIGUSR1", "SIGUSR2", "SIGINT", "SIGHUP", "SIGQUIT")
_STOP_SIGNALS = {signal.Signals[n] for n in CATCHABLE}


def check_signal_names(names: list[str], field: str = "checkpoint.on_signal") -> None:
    for name in names:
        if name not in CATCHABLE:
            raise ValueError(f"{field} ({list(names)}): {name!r} is not one of {', '.join(CATCHABLE)}")


class Preemption:
    """`with Preemption(names, info) as p:` installs the handlers (main thread only) and restores the
    previous ones on exit; `p.agreed()` at a step boundary returns the signal's name on every rank
    once any rank has received one, else None."""

    def __init__(self, names: list[str], info: DistInfo):
        check_signal_names(names)
        self.signals = [signal.Signals[n] for n in names]
        self.info = info
        self.received = 0
        self._previous: dict[signal.Signals, object] = {}

    def __enter__(self) -> "Preemption":
        if threading.current_thread() is not threading.main_thread():
            # only the main thread may install handlers; every rank of a run is alike in this
            log.warning("checkpoint.on_signal is off: train() runs outside the main thread")
            self.signals = []
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:
        if self.received:  # the same request again, e.g. from SLURM and from torchrun: one stop
            return
        self.received = signum
        if self.info.local_rank == 0:  # one line per node; os.write, as a handler may run inside a print
            os.write(2, f"moesaic: rank {self.info.rank}: {signal.Signals(signum).name} received; stopping after "
                        f"this step with a checkpoint\n".encode())

    def agreed(self) -> str | None:
        """Collective when the world has more than one rank: call it on every rank at the same step."""
        if not self.signals:
            return None
        flag = torch.tensor([self.received], dtype=torch.int64, device=self.info.device)
        signum = int(all_reduce_(flag, self.info, op=torch.distributed.ReduceOp.MAX).item())
        return signal.Signals(signum).name if signum else None

    @staticmethod
    def exit_code(name: str) -> int:
        return 128 + int(signal.Signals[name])


@contextlib.contextmanager
def stop_signals_blocked():
    """Around the start of a helper process that ends with its rank (the re-plan solver): the signal
    that a launcher sends to a rank's whole process group must not end it while the rank finishes its
    step. The calling thread's signal mask is inherited through spawn's fork and exec, so the helper
    is deaf to these signals from its first instruction; the rank's own handlers are untouched."""
    from multiprocessing import resource_tracker

    # spawn starts this tracker on first use, and its start unblocks SIGINT and SIGTERM in the calling
    # thread (Python 3.11's ensure_running): start it before blocking them
    resource_tracker.ensure_running()
    old = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def requeue_defaults(cfg):
    """launcher.requeue under SLURM: a run name that survives the requeue (slurm-<job id>), and a
    requeued start (SLURM_RESTART_COUNT > 0) that resumes, unless the config says otherwise."""
    import dataclasses

    job = os.environ.get("SLURM_JOB_ID")
    if not (cfg.launcher.requeue and job):
        return cfg
    logging_cfg, ckpt_cfg = cfg.logging, cfg.checkpoint
    if logging_cfg.run_name is None and ckpt_cfg.dir is None:
        logging_cfg = dataclasses.replace(logging_cfg, run_name=f"slurm-{job}")
    if int(os.environ.get("SLURM_RESTART_COUNT", "0")) > 0 and ckpt_cfg.resume == "none":
        ckpt_cfg = dataclasses.replace(ckpt_cfg, resume="auto")
    return dataclasses.replace(cfg, logging=logging_cfg, checkpoint=ckpt_cfg)


def requeue_job() -> None:
    """Rank 0, after every rank has written everything: put this SLURM job back in the queue. The
    requeue ends the job step at once, and with it the forwarding of the step's output, so the line
    that says so is written before; only a failure is reported after. The stop signals stay blocked
    from here on (the rank exits right after) so that the requeue's own SIGTERM cannot cut it short."""
    import subprocess

    signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
    job = os.environ["SLURM_JOB_ID"]
    os.write(2, f"moesaic: requeueing SLURM job {job} (scontrol requeue); it resumes from the checkpoint\n".encode())
    try:
        out = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
        failure = None if out.returncode == 0 else f"failed ({out.returncode}): {out.stderr.strip()}"
    except (OSError, subprocess.TimeoutExpired) as e:  # the checkpoint is written: say so, and exit as stopped
        failure = f"failed: {e}"
    if failure:
        os.write(2, f"moesaic: scontrol requeue {job} {failure}\n".encode())
