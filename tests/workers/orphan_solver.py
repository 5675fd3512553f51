"""A rank stand-in that ends by os._exit (as `moesaic-train` does) while its re-placement solver is
in the middle of a long solve. The solve is real: the affinity ILP on synthetic routing statistics
(8 layers, 64 experts, 2 GPUs, dense inter-layer flows), whose exact balance ILPs alone take half
the time limit, far longer than the test waits. The solver process must notice that its rank has
gone and leave.

argv: seconds to wait, once the solver has started, before exiting; the solve's time limit in seconds. Prints the solver's pid."""

import multiprocessing
import os
import sys
import threading
import time

from synthetic_stats import dense_stats  # this folder is the script's, so it is on sys.path

from moesaic.placement.topology import Topology
from moesaic.trainer.replan import _solve_in_process


def main() -> None:
    wait_s, time_limit = float(sys.argv[1]), float(sys.argv[2])
    args = ("affinity", dense_stats(8, 64), Topology(num_gpus=2), 0.05, time_limit, "highs", 0)
    threading.Thread(target=_solve_in_process, args=(args,), daemon=True).start()
    # the solver is a child once its start() returns: after its imports, and after it has read the
    # statistics through a pipe (which takes seconds on a busy machine); then give it wait_s to solve
    deadline = time.time() + 120
    while not multiprocessing.active_children() and time.time() < deadline:
        time.sleep(0.1)
    time.sleep(wait_s)
    print(" ".join(str(c.pid) for c in multiprocessing.active_children()), flush=True)  # alive, mid-solve
    os._exit(0)


if __name__ == "__main__":
    main()
