"""How a moesaic rank ends: `exit_rank(code)` flushes the streams and leaves without the interpreter's
teardown. On the 2-core CI machine a finished rank aborted there about once in 30 runs ("terminate
called without an active exception": a native thread destroyed while joinable), after a clean run
with everything written and the process group destroyed. Used by `moesaic-train`, `moesaic-doctor`
and the torchrun workers of the benchmarks and tests.

`finish_rank(code)` is the end of a worker's `main`: a barrier, then `exit_rank`, with no process group
destroyed and no local freed. Destroying them can hang: when the last reference to a gloo process
group goes (say with a DDP Reducer among `main`'s locals), its destructor joins gloo's threads while
holding the GIL, and one of them may be waiting for the GIL to free a finished collective's tensors
(seen in CI, about once in 20 four-rank runs)."""

from __future__ import annotations

import os
import sys


def exit_rank(code: int = 0) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def finish_rank(code: int = 0) -> None:
    """Wait for every rank (all have written what they write), then leave without any teardown."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
    exit_rank(code)
