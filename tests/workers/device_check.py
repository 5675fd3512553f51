"""torchrun worker: run the trainer, and record every tensor that moesaic's own code creates without
naming its device once the model is on its device.

    torchrun --nproc_per_node 2 tests/workers/device_check.py OUT_DIR trainer-overrides...

Why: on a GPU, a tensor made with `torch.tensor(...)`, `torch.zeros(...)`, ... and no `device=` lands
on the CPU. Where it then meets the model's CUDA tensors (a plan's index tables, say), the step fails
on the GPU alone; on this machine every tensor is on the CPU, and nothing shows. (The eighteenth
session's first GPU run of the trainer failed so: the EP and FSSDP dispatchers built their plan
tables on the CPU after the model had moved to the GPU.) So once the model is built (the trainer
builds it on the meta device, shards its experts, then allocates what the rank holds on its device),
each factory call from a moesaic source file must name its device, `"cpu"` where host memory is meant. A `TorchFunctionMode` sees every factory call; each offending call site is
appended to OUT_DIR/rank{R}.txt as `path:line function`; OUT_DIR/rank{R}.built says whether the
model reached `parallelize` on the meta device. The test reads those files."""

import os
import runpy
import sys
import traceback
from pathlib import Path

from torch.overrides import TorchFunctionMode
from torch.utils._device import _device_constructors

import moesaic.trainer.train as train_module


class ImplicitDevice(TorchFunctionMode):
    """Appends to `out` each call site under `roots` (moesaic's sources by default) of a factory call
    that names no device."""

    def __init__(self, out: Path, roots: tuple[str, ...] | None = None):
        super().__init__()
        self.out, self.seen, self.roots = out, set(), roots or _source_roots()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _device_constructors() and "device" not in kwargs:  # (device=None passed on: a module's
            # factory kwargs, torch's default device by design)
            self._record()
        return func(*args, **kwargs)

    def _record(self):
        for frame in traceback.extract_stack()[-3::-1]:  # the nearest caller outside torch
            if "/torch/" in frame.filename:
                continue
            path = str(Path(frame.filename).resolve())
            if path.startswith(self.roots) and not path.endswith("device_check.py"):
                site = f"{path}:{frame.lineno} {frame.name}"
                if site not in self.seen:
                    self.seen.add(site)
                    with self.out.open("a") as f:
                        f.write(site + "\n")
            return


def _source_roots() -> tuple[str, ...]:
    """The product's source folders (the editable install maps moesaic.* onto the checkout's)."""
    import moesaic.parallel
    import moesaic.placement
    import moesaic.trainer

    return tuple(str(Path(m.__file__).resolve().parent) for m in (moesaic.parallel, moesaic.trainer, moesaic.placement))


def main() -> None:
    out_dir = Path(sys.argv[1])
    out = out_dir / f"rank{os.environ.get('RANK', '0')}.txt"
    out.write_text("")
    mode = ImplicitDevice(out)
    original = train_module.parallelize

    def parallelize(*args, **kwargs):
        # the model is built (on the meta device, in `with torch.device(...)`, which has ended: a mode
        # entered inside it would be popped by its exit); from here on, for the rest of the run
        if not getattr(mode, "entered", False):
            mode.entered = True
            mode.__enter__()
        # what the trainer hands over: a model still on the meta device, or one already allocated
        built = "meta" if all(p.is_meta for p in args[0].parameters()) else "allocated"
        out.with_suffix(".built").write_text(built)
        return original(*args, **kwargs)

    train_module.parallelize = parallelize
    sys.argv = ["moesaic.trainer", *sys.argv[2:]]
    runpy.run_module("moesaic.trainer", run_name="__main__")


if __name__ == "__main__":
    main()
