"""`checkpoint.async_mode=async`: training goes on while a checkpoint is written (torchtitan's
async_mode=async, built on DCP's `async_save`).

One save, step by step:
  1. every rank waits for the previous save to be complete (one save in flight at a time);
  2. rank 0 makes `step-N.tmp/` (a barrier on the default group, in the training thread);
  3. every rank stages its tensors: DCP copies them to fresh CPU memory before `save` returns, so
     the optimizer steps that follow do not reach the checkpoint;
  4. a writer thread writes them. Its collectives (gather of the plans, the metadata) run on a gloo
     group of their own, created once, so they never interleave with the training's collectives;
  5. on rank 0, once DCP reports every rank's files written, the same thread writes the plan, the
     statistics and the manifest, renames `step-N.tmp` to `step-N` and prunes old checkpoints
     (`checkpoint.finish_on_rank0`, as a blocking save does).
A crash before 5 leaves only a `.tmp` folder, which a resume ignores: saves stay atomic. The run
waits for the save in flight before its next save, before it stops (end, `stop_at_step`, a signal)
and before it reports success; a failed write raises there.
"""

from __future__ import annotations

import threading
import warnings
from pathlib import Path

import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from moesaic.trainer import checkpoint as ckpt


class AsyncCheckpointer:
    """Collective to create (under a process group) and to `save`; `wait` is local."""

    def __init__(self, info):
        self.info = info
        self.group = dist.new_group(backend="gloo") if info.backend is not None else None  # (4)
        if info.backend is None:  # the writer thread's save says it "assumes" one process: it is meant
            warnings.filterwarnings("ignore", message=ckpt.NO_DIST_WARNING)
        self._done: threading.Event | None = None
        self._error: BaseException | None = None

    def save(self, ckpt_root: Path, step: int, *, model, optimizer, scheduler, cfg, info, plan=None, routing=None,
             tokens: int = 0, keep_last: int = 3, extra_arrays: dict | None = None, engine=None, scaler=None) -> Path:
        self.wait()  # (1)
        tmp, final = ckpt.begin(ckpt_root, step, info)  # (2)
        rest = ckpt.extras(step, model=model, scheduler=scheduler, cfg=cfg, info=info, plan=plan, routing=routing,
                           tokens=tokens, keep_last=keep_last, extra_arrays=extra_arrays,
                           scaler=scaler) if info.is_main else None
        sd = ckpt.state_dict(model, optimizer, for_save=True, engine=engine)  # ZeRO's moments: gathered here
        with ckpt.no_dist_warning_off(info):
            future = dcp.async_save(sd, checkpoint_id=str(tmp), process_group=self.group,  # (3), (4)
                                    no_dist=info.backend is None)
        done = self._done = threading.Event()

        def written(f) -> None:  # (5), in the writer's thread
            try:
                f.result()
                if rest is not None:
                    ckpt.finish_on_rank0(tmp, final, **rest)
            except BaseException as e:  # handed to the training thread by wait()
                self._error = e
            finally:
                done.set()

        future.add_done_callback(written)
        return final

    def wait(self) -> None:
        """Block until the save in flight (if any) is complete; raise its error, if it failed."""
        if self._done is None:
            return
        self._done.wait()
        self._done, error, self._error = None, self._error, None
        if error is not None:
            raise RuntimeError(f"the asynchronous checkpoint write failed: {_cause(error)}") from error


def _cause(error: BaseException) -> str:
    """One line per failing rank (DCP's CheckpointException prints every traceback)."""
    failures = getattr(error, "failures", None)
    if not failures:
        return f"{type(error).__name__}: {error}"
    return "; ".join(f"rank {r}: {type(exc).__name__}: {exc}" for r, (exc, _trace) in sorted(failures.items()))
