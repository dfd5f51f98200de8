"""Phase 1's cached trunk features on local disk, for a cache larger than ``--head-cache-mb``.

Streaming instead would run the whole trunk over every training image in every one of the
head's epochs; a file read back through the page cache costs a small share of that. The
file never has a name (``O_TMPFILE``), so nothing is left behind when a worker is killed.
"""

from __future__ import annotations

import os
import shutil
import tempfile

import numpy as np
import torch

#: room a disk keeps beyond the caches of its node's workers: at least this, and at least
#: :data:`DISK_MARGIN_SHARE` of the disk (Ray's own object spilling stops at 95 % full)
DISK_MARGIN_BYTES = 1 << 30
DISK_MARGIN_SHARE = 0.05
#: file systems whose "disk" is memory: spilling there would only move the cache into RAM
MEMORY_FILESYSTEMS = ("tmpfs", "ramfs")
_COPY_CHUNK = 64 << 20


def _filesystem_type(directory: str) -> str:
    """The type of the file system holding ``directory`` (the longest mount point above it in
    ``/proc/mounts``), or "" where that is unknown."""
    path, best, kind = os.path.realpath(directory), "", ""
    try:
        with open("/proc/mounts", encoding="utf-8") as mounts:
            for line in mounts:
                fields = line.split()
                if len(fields) < 3:
                    continue
                point = fields[1].replace("\\040", " ")
                inside = path == point or path.startswith(point.rstrip("/") + "/")
                if inside and len(point) >= len(best):
                    best, kind = point, fields[2]
    except OSError:
        return ""
    return kind


def spill_room(nbytes: int, *, workers_on_node: int, directory: str | None = None) -> bool:
    """Whether ``directory`` (default: the temp dir, ``TMPDIR``) can take ``nbytes`` of files
    from each of ``workers_on_node`` workers and keep its margin; never on a memory file system."""
    directory = directory or tempfile.gettempdir()
    if _filesystem_type(directory) in MEMORY_FILESYSTEMS:
        return False
    usage = shutil.disk_usage(directory)
    margin = max(DISK_MARGIN_BYTES, int(usage.total * DISK_MARGIN_SHARE))
    return usage.free >= nbytes * max(1, workers_on_node) + margin


class SpillFile:
    """Batches of feature maps (N, C, H, W) appended to a nameless file in channels-last
    order, read back as one memory-mapped (N, C, H, W) channels-last tensor."""

    def __init__(self, directory: str | None = None, dtype: torch.dtype = torch.float16) -> None:
        try:
            self._np_dtype = torch.empty(0, dtype=dtype).numpy().dtype
        except TypeError:
            raise ValueError(f"cannot spill {dtype} features: numpy has no such type") from None
        self._file = tempfile.TemporaryFile(prefix="head-cache-", dir=directory)
        self._dtype = dtype
        self._item_shape: tuple[int, ...] | None = None  # (H, W, C), as written
        self.rows = 0

    @property
    def nbytes(self) -> int:
        """Bytes written."""
        return self.rows * int(np.prod(self._item_shape or (0,))) * self._np_dtype.itemsize

    def _check(self, hwc: tuple[int, ...]) -> None:
        if self._item_shape is not None and hwc != self._item_shape:
            def chw(s: tuple[int, ...]) -> tuple[int, ...]:
                return (s[2], *s[:2])
            raise ValueError(f"feature maps of shape {chw(hwc)} after {chw(self._item_shape)}")
        self._item_shape = hwc

    def append(self, x: torch.Tensor) -> None:
        """Write ``x`` (N, C, H, W) after what is there."""
        nhwc = x.detach().to(device="cpu", dtype=self._dtype).permute(0, 2, 3, 1).contiguous()
        self._check(tuple(nhwc.shape[1:]))
        self._file.write(nhwc.numpy().data)
        self.rows += len(nhwc)

    def extend(self, other: "SpillFile") -> None:
        """Append ``other``'s rows (same shape and type) after these, copied on disk in chunks."""
        if not other.rows:
            return
        self._check(other._item_shape)  # type: ignore[arg-type]
        other._file.flush()
        other._file.seek(0)
        self._file.seek(0, os.SEEK_END)
        shutil.copyfileobj(other._file, self._file, _COPY_CHUNK)
        self.rows += other.rows

    def tensor(self) -> torch.Tensor:
        """The rows written, mapped from the file: (N, C, H, W) with channels-last strides;
        (0,) when nothing was written."""
        self._file.flush()
        if not self.rows or self._item_shape is None:
            return torch.zeros(0, dtype=self._dtype)
        mapped = np.memmap(self._file, dtype=self._np_dtype, mode="r+", shape=(self.rows, *self._item_shape))
        return torch.from_numpy(mapped).permute(0, 3, 1, 2)

    def close(self) -> None:
        """Close the file; a tensor already mapped keeps its pages until it is freed."""
        self._file.close()

    def __enter__(self) -> "SpillFile":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
