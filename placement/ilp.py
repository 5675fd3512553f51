"""Solving a PuLP model honestly: HiGHS (highspy) first, CBC as the fallback, with warm starts,
a time limit and a relative gap, and a status that says whether optimality was proven.

PuLP's `LpStatus` reads "Optimal" after a time limit too; `prob.sol_status` does not
(1 proven optimal, 2 feasible only), and that is what `SolveReport.status` reports.
"""

from __future__ import annotations

import functools
import os
import sys
import time
from dataclasses import dataclass

import pulp

SOLVERS = ("highs", "cbc")


@dataclass
class SolveReport:
    status: str  # "optimal" (proven), "feasible" (time or gap limit), "infeasible", "no-solution"
    objective: float | None
    bound: float | None
    gap: float | None
    seconds: float
    solver: str

    def as_meta(self) -> dict:
        return {"status": self.status, "objective": self.objective, "bound": self.bound,
                "gap": self.gap, "seconds": round(self.seconds, 3), "solver": self.solver}


@functools.cache
def available_solvers() -> tuple[str, ...]:
    """The solvers PuLP can run here, best first. Asked once per process: PuLP's probe runs
    `shutil.which` over PATH for each of its dozen solvers: 17% of an affinity solve's time in a
    profile, when it was asked before each of the solve's ~1,000 small ILPs."""
    names = pulp.listSolvers(onlyAvailable=True)
    out = []
    if "HiGHS" in names:
        out.append("highs")
    if "PULP_CBC_CMD" in names:
        out.append("cbc")
    return tuple(out)


_BANNER_SHOWN = False


def _quiet_highs_banner() -> None:
    """highspy prints a copyright banner to fd 1 when the first Highs() is made; swallow it once."""
    global _BANNER_SHOWN
    if _BANNER_SHOWN:
        return
    _BANNER_SHOWN = True
    try:
        import highspy
    except ImportError:
        return
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 1)
            highspy.Highs()
    finally:
        os.dup2(saved, 1)
        os.close(saved)


class _WarmHiGHS(pulp.HiGHS):
    """PuLP's highspy interface, plus a MIP start taken from the variables' initial values."""

    def callSolver(self, lp):
        import highspy

        values = [v.varValue for v in lp.variables()]
        if all(x is not None for x in values):
            sol = highspy.HighsSolution()
            sol.col_value = [float(x) for x in values]
            sol.value_valid = True
            lp.solverModel.setSolution(sol)
        lp.solverModel.run()


def share_of(deadline: float, parts_left: int, cap: float, floor: float = 0.05) -> float:
    """Time limit for the next of `parts_left` solves that share what is left until `deadline` (a
    `time.perf_counter()` value), at most `cap` seconds and at least `floor`."""
    return min(cap, max(floor, (deadline - time.perf_counter()) / parts_left))


def solve(prob: pulp.LpProblem, *, solver: str = "highs", time_limit: float | None = None,
          gap: float | None = None, warm_start: bool = False, threads: int | None = None,
          highs_options: dict | None = None) -> SolveReport:
    """Solve `prob` in place. With warm_start, variables' `setInitialValue` values seed the search.
    `highs_options` are HiGHS option names and values (CBC ignores them)."""
    if solver not in SOLVERS:
        raise ValueError(f"solver ({solver!r}) must be one of {', '.join(SOLVERS)}")
    avail = available_solvers()
    if solver not in avail:
        if not avail:
            raise RuntimeError("no MILP solver available to PuLP (need highspy or the bundled CBC)")
        solver = avail[0]
    t0 = time.perf_counter()
    if solver == "highs":
        _quiet_highs_banner()
        cls = _WarmHiGHS if warm_start else pulp.HiGHS
        s = cls(msg=False, timeLimit=time_limit, gapRel=gap, threads=threads, **(highs_options or {}))
        prob.solve(s)
        info = prob.solverModel.getInfo()
        bound = float(info.mip_dual_bound) if _is_mip(prob) else None
        gap_v = float(info.mip_gap) if _is_mip(prob) else 0.0
    else:
        s = pulp.PULP_CBC_CMD(msg=False, timeLimit=time_limit, gapRel=gap, warmStart=warm_start, threads=threads)
        prob.solve(s)
        bound, gap_v = None, None
    seconds = time.perf_counter() - t0
    obj = pulp.value(prob.objective)
    if prob.sol_status == pulp.LpSolutionOptimal:
        status = "optimal"
        if gap_v is not None and gap is not None and gap_v > 1e-9:
            status = "feasible"  # stopped at the relative gap, not proven optimal
    elif prob.sol_status == pulp.LpSolutionIntegerFeasible:
        status = "feasible"
    elif prob.sol_status == pulp.LpSolutionInfeasible:
        status = "infeasible"
    else:
        status = "no-solution"
    if status in ("infeasible", "no-solution"):
        obj = None
    if gap_v is not None and (gap_v != gap_v or gap_v > 1e30):
        gap_v = None
    if bound is not None and abs(bound) > 1e30:
        bound = None
    return SolveReport(status, None if obj is None else float(obj), bound, gap_v, seconds, solver)


def _is_mip(prob: pulp.LpProblem) -> bool:
    return any(v.cat == pulp.LpInteger for v in prob.variables())
