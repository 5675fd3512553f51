"""Tier 4: `checkpoint.async_mode=async` writes the same checkpoints as a blocking save, of the state
at the step it was asked for, while training goes on; a resume from one is exact."""

import threading

import pytest
import torch

from conftest import flat_checkpoint, torchrun, train_losses

SMOKE = ["experiment=smoke", "logging.log_every=1", "eval_every=0", "logging.progress=false"]


def test_the_checkpoint_holds_the_state_of_its_step(tmp_path, monkeypatch):
    """The writer is held back until the parameters and AdamW's state have changed in place (as the
    next optimizer steps change them): the checkpoint still holds the values at the save."""
    from torch.distributed.checkpoint.filesystem import FileSystemWriter

    from moesaic.trainer.async_checkpoint import AsyncCheckpointer
    from moesaic.trainer.checkpoint import verify
    from moesaic.trainer.config import TrainConfig
    from moesaic.trainer.dist import DistInfo
    from moesaic.trainer.model import ModelConfig, Transformer

    cfg = TrainConfig(model=ModelConfig(dim=32, num_layers=2, num_heads=2))
    model = Transformer(cfg.model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randint(0, 256, (2, 16)), torch.randint(0, 256, (2, 16))).loss.backward()
    opt.step()
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    w1 = model.layers[0].moe.experts.w13_EGD[0].chunk(2)[0].detach().clone()  # expert 0's w1
    moments = {id(p): opt.state[p]["exp_avg"].clone() for p in model.parameters()}

    release, write = threading.Event(), FileSystemWriter.write_data
    monkeypatch.setattr(FileSystemWriter, "write_data", lambda self, *a, **k: (release.wait(60), write(self, *a, **k))[1])
    info = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), backend=None)
    writer = AsyncCheckpointer(info)
    path = writer.save(tmp_path, 7, model=model, optimizer=opt, scheduler=sched, cfg=cfg, info=info, keep_last=3)
    with torch.no_grad():  # what the next steps do, while the write waits
        for p in model.parameters():
            p.add_(1.0)
            opt.state[p]["exp_avg"].mul_(-3.0)
    assert not path.exists() and (tmp_path / "step-00000007.tmp").is_dir()  # not complete: no final name
    release.set()
    writer.wait()
    assert verify(path)["step"] == 7
    saved = flat_checkpoint(path)
    for name, p in model.named_parameters():
        if ".experts." not in name:
            assert torch.equal(saved[f"model.{name}"], before[name]), name
            assert torch.equal(saved[f"optim.model.{name}.exp_avg"], moments[id(p)]), name
    assert torch.equal(saved["experts.0.0.w1_EFD"], w1)


@pytest.mark.slow
@pytest.mark.dist
def test_async_checkpoints_equal_blocking_ones_and_resume_exactly(tmp_path):
    """2 ranks, FSSDP: every 4 steps, blocking against async. The checkpoints hold equal tensors, and a
    run resumed from the async one at step 8 has the losses of the run that never stopped."""
    base = [*SMOKE, "steps=12", f"logging.out_dir={tmp_path}", "checkpoint.every_n_steps=4"]
    torchrun(2, [*base, "logging.run_name=blocking"])
    torchrun(2, [*base, "logging.run_name=async", "checkpoint.async_mode=async", "stop_at_step=8"])
    for step in (4, 8):
        a = flat_checkpoint(tmp_path / f"async/checkpoints/step-{step:08d}")
        b = flat_checkpoint(tmp_path / f"blocking/checkpoints/step-{step:08d}")
        assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a), step
    torchrun(2, [*base, "logging.run_name=async", "checkpoint.async_mode=async", "checkpoint.resume=auto"])
    assert train_losses(tmp_path / "async") == train_losses(tmp_path / "blocking")
    assert sorted(p.name for p in (tmp_path / "async/checkpoints").iterdir() if p.is_dir()) == [
        "step-00000004", "step-00000008", "step-00000012"]


def test_a_failed_write_is_raised_at_the_next_wait_and_leaves_no_checkpoint(tmp_path, monkeypatch):
    from torch.distributed.checkpoint.filesystem import FileSystemWriter

    from moesaic.trainer.async_checkpoint import AsyncCheckpointer
    from moesaic.trainer.checkpoint import list_checkpoints
    from moesaic.trainer.config import TrainConfig
    from moesaic.trainer.dist import DistInfo
    from moesaic.trainer.model import Transformer

    def full_disk(self, *a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(FileSystemWriter, "write_data", full_disk)
    cfg = TrainConfig()
    model = Transformer(cfg.model)
    opt = torch.optim.AdamW(model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    info = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), backend=None)
    writer = AsyncCheckpointer(info)
    writer.save(tmp_path, 3, model=model, optimizer=opt, scheduler=sched, cfg=cfg, info=info)
    with pytest.raises(RuntimeError, match=r"asynchronous checkpoint write failed: rank 0: OSError: \[Errno 28\] No space left on device$"):
        writer.wait()
    assert list_checkpoints(tmp_path) == [] and (tmp_path / "step-00000003.tmp").is_dir()
    writer.wait()  # reported once
