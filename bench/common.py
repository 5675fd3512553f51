"""Shared by the benchmark scripts: the machine record, table printing and JSON output."""

from __future__ import annotations

import datetime
import json
import os
import platform
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
TRACES = SHARED / "data" / "traces" / "mixtral-8x7b"


def machine() -> dict:
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "host": platform.node(),
        "cpu": _cpu_name(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
    }
    try:
        import torch

        info["torch"] = torch.__version__
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    from importlib import metadata

    for mod in ("numpy", "scipy", "pulp", "highspy"):  # the installed distribution's version
        try:
            info[mod] = metadata.version(mod)
        except metadata.PackageNotFoundError:
            pass
    return info


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def table(rows: list[dict], cols: list[str] | None = None) -> str:
    cols = cols or list(rows[0])
    fmt = lambda v: f"{v:.4f}" if isinstance(v, float) else str(v)  # noqa: E731
    widths = [max(len(c), *(len(fmt(r.get(c, ""))) for r in rows)) for c in cols]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(cols, widths)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    lines += ["| " + " | ".join(fmt(r.get(c, "")).ljust(w) for c, w in zip(cols, widths)) + " |" for r in rows]
    return "\n".join(lines)


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def timeit(fn, device, iters: int, warmup: int = 3) -> float:
    """Median seconds of fn() over `iters` runs after `warmup`, synchronizing a GPU around each."""
    import time

    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def profile_to(path: str, fn, device, steps: int = 2) -> str:
    """Where fn's time goes: the kernels (or CPU ops) with the most self time over `steps` calls,
    as a table written to `path` (and returned)."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        for _ in range(steps):
            fn()
        sync(device)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    text = prof.key_averages().table(sort_by=key, row_limit=30, max_name_column_width=70)
    Path(path).write_text(f"# {steps} calls, sorted by {key}\n{text}\n")
    return text


def dense_rate(device, dtype, n: int, iters: int = 10) -> float:
    """Dense matmul TFLOP/s at n x n x n: the denominator of the MFU and of "% of dense"."""
    import torch

    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n ** 3 / timeit(lambda: a @ b, device, iters) / 1e12


def write_json(path: str | Path | None, payload: dict) -> None:
    if path:
        Path(path).write_text(json.dumps(payload, indent=1, default=str) + "\n")


def ensure_importable() -> None:
    """Make `moesaic.*` importable from this checkout without installing it (the GPU machine has
    torch but not our dependencies): map moesaic.parallel -> parallel/, and so on."""
    import importlib.util
    import sys
    import types

    try:
        import moesaic.parallel  # noqa: F401

        return
    except ImportError:
        pass
    pkg = sys.modules.setdefault("moesaic", types.ModuleType("moesaic"))
    pkg.__path__ = []
    for name in ("placement", "parallel", "trainer"):
        spec = importlib.util.spec_from_file_location(
            f"moesaic.{name}", REPO / name / "__init__.py", submodule_search_locations=[str(REPO / name)])
        mod = importlib.util.module_from_spec(spec)
        sys.modules[f"moesaic.{name}"] = mod
        setattr(pkg, name, mod)
    for name in ("placement", "parallel"):  # trainer needs hydra; load it only when asked for
        spec = sys.modules[f"moesaic.{name}"].__spec__
        try:
            spec.loader.exec_module(sys.modules[f"moesaic.{name}"])
        except ImportError:
            pass


def traffic(layer, leaves, *args) -> dict:
    """Bytes read and written per op (views and grouped GEMMs left out; a custom op counts as one
    kernel) by `layer(*args)`, forward and backward, the `leaves` (the tensors that get a gradient)
    starting without one. Runs on meta tensors: a layer's traffic at the GPU's shapes, on a CPU."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    skip = {"_grouped_mm", "transpose", "detach", "view", "expand", "unsqueeze", "t", "alias", "_unsafe_view",
            "as_strided", "slice", "split", "split_with_sizes", "chunk", "select", "_to_copy",
            "empty", "empty_like", "new_empty", "empty_strided"}  # (allocations move no bytes)
    rows: dict = {}

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            name = func.overloadpacket.__name__
            if name not in skip:
                size = lambda v: sum(t.numel() * t.element_size() for t in tree_flatten(v)[0]  # noqa: E731
                                     if isinstance(t, torch.Tensor))
                r = rows.setdefault(name, [0, 0, 0])
                r[0] += 1
                r[1] += size((args, {k: v for k, v in (kwargs or {}).items() if k not in ("out", "grad_input")}))
                r[2] += size(out)
            return out

    for t in leaves:
        t.grad = None  # else the backward adds into the old gradient: traffic that a step does not have
    with Count():
        layer(*args).sum().backward()
    return {k: {"calls": n, "read": rd, "written": wr} for k, (n, rd, wr) in rows.items()}
