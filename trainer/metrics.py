"""Run directory, metrics.jsonl, wandb (offline by default) and the rank-0 progress bar.

Only rank 0 writes; every method is a no-op elsewhere.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import secrets
import string
import time
from dataclasses import asdict
from pathlib import Path

from moesaic.trainer.dist import DistInfo, broadcast_object

log = logging.getLogger(__name__)


def make_run_dir(out_dir: str, run_name: str | None, info: DistInfo) -> Path:
    """Rank 0 names and creates the run directory and tells the others; a failure is raised on
    every rank, naming `logging.out_dir`, before any step runs."""
    result: tuple[str | None, str | None] = (None, None)
    if info.is_main:
        name = run_name or time.strftime("%Y-%m-%d_%H-%M-%S")
        path = Path(out_dir).expanduser() / name
        try:
            if run_name is None:  # two runs in one second get distinct folders
                base, n = path, 1
                while path.exists():
                    path, n = base.with_name(f"{base.name}-{n}"), n + 1
            path.mkdir(parents=True, exist_ok=True)
            probe = path / ".write-test"
            probe.write_text("ok")
            probe.unlink()
            result = (str(path.resolve()), None)
        except OSError as e:
            result = (None, f"logging.out_dir ({out_dir!r}) is not writable: {e.strerror or e}")
    path_str, error = broadcast_object(result, info)
    if error:
        raise ValueError(error)
    return Path(path_str)


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def rewind_metrics(path: Path, start_step: int) -> int:
    """A run that starts at `start_step` (0, or its checkpoint's step) continues `path` from there. The
    records of later steps, which an earlier attempt in this run directory logged before it stopped or
    crashed, move to `metrics.superseded.jsonl` beside it, as does a line that a crash cut short. Each
    step then has one record of each kind. Returns how many records moved."""
    if not path.is_file():
        return 0
    keep, moved = [], []
    for line in path.read_text().splitlines():
        try:
            later = json.loads(line).get("step", 0) > start_step
        except (json.JSONDecodeError, AttributeError):
            later = True
        (moved if later else keep).append(line + "\n")
    if moved:
        with open(path.with_name("metrics.superseded.jsonl"), "a") as f:
            f.writelines(moved)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(keep))
        os.replace(tmp, path)  # atomic: a crash here leaves the old file whole
    return len(moved)


def wandb_run_id(run_dir: Path, start_step: int) -> str:
    """One wandb run per training run: a run resumed in its run directory (start_step > 0) logs under
    the id that the directory's first attempt stored; a run from step 0 gets a new id."""
    stored = run_dir / "wandb_run_id"
    run_id = stored.read_text().strip() if start_step > 0 and stored.is_file() else ""
    if run_id:
        return run_id
    run_id = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))  # as wandb's own
    stored.write_text(run_id + "\n")
    return run_id


class RunLogger:
    def __init__(self, run_dir: Path, cfg, info: DistInfo, *, total_steps: int, start_step: int = 0):
        self.run_dir, self.info = run_dir, info
        self.enabled = info.is_main
        self._file = self._wandb = self._bar = None
        if not self.enabled:
            return
        moved = rewind_metrics(run_dir / "metrics.jsonl", start_step)
        self._file = open(run_dir / "metrics.jsonl", "a", buffering=1)
        lc = cfg.logging
        if lc.wandb_mode != "disabled":
            os.environ.setdefault("WANDB_SILENT", "true")
            import wandb  # imported only when asked for

            try:
                self._wandb = wandb.init(
                    mode=lc.wandb_mode,
                    dir=str(run_dir),
                    project=lc.wandb_project,
                    name=run_dir.name,
                    tags=list(lc.wandb_tags),
                    config=asdict(cfg),
                    id=wandb_run_id(run_dir, start_step),
                    resume="allow",  # online: the segments form one run; offline: `wandb sync` joins them
                )
            except wandb.errors.Error as e:  # online without a login, or without a network
                self._file.close()
                raise ValueError(
                    f"logging.wandb_mode ({lc.wandb_mode!r}): wandb could not start the run ({type(e).__name__}: "
                    f"{e}). Log in (`wandb login`, or WANDB_API_KEY), or use logging.wandb_mode=offline "
                    "(then `wandb sync`) or disabled"
                ) from None
        if lc.progress:
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, desc="train", unit="step", dynamic_ncols=True, mininterval=0.5)
        if moved:
            self.message(f"metrics.jsonl: {moved} record(s) after step {start_step}, from an earlier attempt in "
                         f"this run directory, moved to metrics.superseded.jsonl")

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        self._file.write(json.dumps(record) + "\n")
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in record.items() if k not in ("kind",)}, step=record["step"])

    def progress(self, n: int, **postfix) -> None:
        if self._bar is not None:
            self._bar.update(n)
            self._bar.set_postfix(postfix, refresh=False)

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(text)
        else:
            print(text, flush=True)

    def close(self, summary: dict | None = None) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.close()
        if summary is not None:
            (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
            if self._wandb is not None:
                self._wandb.summary.update({k: v for k, v in summary.items() if isinstance(v, (int, float, str))})
        if self._wandb is not None:
            self._wandb.finish()
        self._file.close()
