"""Phase 1's feature cache on disk: the same tensors back, channels-last, no file left behind."""

import os

import pytest
import torch

from artifact_core.spill import DISK_MARGIN_BYTES, SpillFile, spill_room


def test_spill_file_reads_back_what_was_written_as_one_channels_last_tensor(tmp_path):
    a, b, c = torch.randn(3, 4, 5, 6), torch.randn(2, 4, 5, 6), torch.randn(4, 4, 5, 6)
    first, second = SpillFile(str(tmp_path)), SpillFile(str(tmp_path))
    first.append(a)
    first.append(b.contiguous(memory_format=torch.channels_last))  # any layout in
    second.append(c)
    assert os.listdir(tmp_path) == [], "a spill file has a name: a killed worker would leave it behind"
    assert (first.nbytes, second.nbytes) == (5 * 120 * 2, 4 * 120 * 2)
    first.extend(second)
    second.close()
    got = first.tensor()
    first.close()  # the mapping outlives the file object

    want = torch.cat([a, b, c]).half()
    assert got.shape == (9, 4, 5, 6) and got.dtype == torch.float16
    assert got.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(got, want)
    assert torch.equal(got[torch.tensor([8, 0, 4])], want[[8, 0, 4]])  # as the head's batches index it


def test_spill_file_refuses_maps_of_another_shape_and_is_empty_when_nothing_came(tmp_path):
    with SpillFile(str(tmp_path)) as f:
        assert f.tensor().shape == (0,)
        f.append(torch.zeros(1, 2, 3, 3))
        with pytest.raises(ValueError, match=r"shape \(2, 4, 4\) after \(2, 3, 3\)"):
            f.append(torch.zeros(1, 2, 4, 4))


def test_spill_file_refuses_a_type_numpy_cannot_map(tmp_path):
    with pytest.raises(ValueError, match="cannot spill torch.bfloat16 features"):
        SpillFile(str(tmp_path), dtype=torch.bfloat16)


def test_spill_room_counts_every_worker_on_the_node_a_margin_and_no_memory_disks(tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    from artifact_core import spill

    usage = namedtuple("usage", "total used free")
    gib = 1 << 30
    monkeypatch.setattr(spill, "_filesystem_type", lambda d: "ext4")
    monkeypatch.setattr(shutil, "disk_usage", lambda d: usage(10 * gib, 0, 3 * gib + DISK_MARGIN_BYTES))
    assert spill_room(gib, workers_on_node=3, directory=str(tmp_path))
    assert not spill_room(gib, workers_on_node=4, directory=str(tmp_path))
    # a big disk keeps 5 % free, as Ray's object spilling needs
    monkeypatch.setattr(shutil, "disk_usage", lambda d: usage(1000 * gib, 0, 3 * gib + DISK_MARGIN_BYTES))
    assert not spill_room(gib, workers_on_node=3, directory=str(tmp_path))
    monkeypatch.setattr(shutil, "disk_usage", lambda d: usage(1000 * gib, 0, 53 * gib))
    assert spill_room(gib, workers_on_node=3, directory=str(tmp_path))
    # tmpfs is memory: the cache would only move there
    monkeypatch.setattr(spill, "_filesystem_type", lambda d: "tmpfs")
    assert not spill_room(gib, workers_on_node=3, directory=str(tmp_path))


def test_filesystem_type_is_the_innermost_mount(tmp_path, monkeypatch):
    import builtins
    import io

    from artifact_core import spill

    mounts = ("overlay / overlay rw 0 0\ntmpfs /dev/shm tmpfs rw 0 0\n"
              f"tmpfs {tmp_path}/ram\\040disk tmpfs rw 0 0\n")
    real_open = builtins.open
    monkeypatch.setattr(builtins, "open", lambda f, *a, **k: io.StringIO(mounts) if f == "/proc/mounts"
                        else real_open(f, *a, **k))
    (tmp_path / "ram disk" / "x").mkdir(parents=True)
    assert spill._filesystem_type(str(tmp_path / "ram disk" / "x")) == "tmpfs"
    assert spill._filesystem_type(str(tmp_path)) == "overlay"
    assert spill._filesystem_type("/dev/shmem") == "overlay"  # a prefix of a name is not a parent
