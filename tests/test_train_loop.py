"""Loop details that need no Ray: mixed-precision choice per GPU generation, evaluation with uneven shards."""

from __future__ import annotations

import multiprocessing
import os
import socket

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from artifact_core import train_loop
from artifact_core.model import unwrap


@pytest.fixture
def fake_cuda(monkeypatch):
    """Pretend CUDA exists (so the grad scaler does not disable itself) with a settable capability."""
    capability = {"value": (8, 0)}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability["value"])
    # Says yes for emulated bf16 too: the choice must not follow it.
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    return capability


@pytest.mark.parametrize("capability, dtype, scaled", [
    ((7, 0), torch.float16, True),    # V100
    ((7, 5), torch.float16, True),    # T4: bf16 only emulated
    ((8, 0), torch.bfloat16, False),  # A100
    ((9, 0), torch.bfloat16, False),  # H100
])
def test_amp_bf16_only_from_compute_capability_8(fake_cuda, capability, dtype, scaled):
    fake_cuda["value"] = capability
    device = torch.device("cuda", 0)
    assert train_loop.amp_dtype(device) == dtype
    _, scaler = train_loop._amp(device)
    assert scaler.is_enabled() is scaled


def test_amp_off_on_cpu():
    assert train_loop.amp_dtype(torch.device("cpu")) is None
    autocast, scaler = train_loop._amp(torch.device("cpu"))
    assert not scaler.is_enabled()
    with autocast():
        assert torch.ones(2).dtype == torch.float32


def _tiny_model() -> nn.Module:
    # BatchNorm has buffers: DDP's forward would broadcast them (a collective).
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 1))


def _loader(n: int) -> DataLoader:
    return DataLoader(TensorDataset(torch.rand(n, 3, 8, 8), torch.tensor([i % 2 for i in range(n)])), batch_size=2)


def test_evaluate_empty_shard_calls_no_collective(monkeypatch):
    def collective(*a, **k):
        raise AssertionError("evaluate called a collective")

    for name in ("all_reduce", "all_gather", "all_gather_object", "broadcast", "barrier"):
        monkeypatch.setattr(dist, name, collective)
    probs, labels, loss, n = train_loop.evaluate(_tiny_model(), _loader(0), torch.ones(2), torch.device("cpu"))
    assert (probs, labels, loss, n) == ([], [], 0.0, 0)


def _uneven_rank(rank: int, port: int, out) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)
        ddp = nn.parallel.DistributedDataParallel(_tiny_model())  # broadcast_buffers=True
        ddp.train()
        ddp(torch.rand(2, 3, 8, 8)).sum().backward()  # one step, as in an epoch
        # rank 1's validation shard is empty (fewer images than ranks): it never runs a forward
        probs, labels, _, n = train_loop.evaluate(unwrap(ddp), _loader(4 if rank == 0 else 0),
                                                  torch.ones(2), torch.device("cpu"))
        gathered = train_loop._gather(probs)  # both ranks must reach the next collective together
        out.put((rank, n, len(gathered)))
    finally:
        dist.destroy_process_group()


def test_uneven_validation_shards_do_not_hang():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()
    procs = [ctx.Process(target=_uneven_rank, args=(r, port, out)) for r in range(2)]
    for p in procs:
        p.start()
    try:
        for p in procs:
            p.join(timeout=60)
        assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
        assert sorted(out.get(timeout=5) for _ in procs) == [(0, 4, 4), (1, 0, 4)]
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
