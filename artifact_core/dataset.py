"""The torch Dataset of labelled image files, read and decoded at their turn."""

from __future__ import annotations

from typing import Callable, NamedTuple, Sequence

import pyarrow.fs as pafs
import torch
from torch.utils.data import Dataset

from artifact_core.images import ImageDecodeError, decode_image
from artifact_core.storage import FileReadError, read_file_bytes


class Unreadable(NamedTuple):
    """What :class:`ImageFileDataset` returns for a file it cannot read or decode."""

    path: str
    reason: str


class ImageFileDataset(Dataset):
    """(image tensor, label) pairs read from files with the shared decoder.

    Files are read at their turn (through ``fs`` when they live in object storage), so
    nothing decodes the whole folder up front. A file that cannot be read or decoded
    gives an :class:`Unreadable` marker instead of an image; :func:`collate_readable`
    drops it from the batch and passes it on to be counted. With ``target_size`` the
    decoder also resizes (at reduced scale where it can), exactly as scoring's decode tasks
    do, so validation and scoring see the same pixels.
    """

    def __init__(self, paths: Sequence[str], labels: Sequence[int],
                 transform: Callable, fs: pafs.FileSystem | None = None, *,
                 target_size: int | None = None) -> None:
        if len(paths) != len(labels):
            raise ValueError(f"{len(paths)} paths but {len(labels)} labels")
        self.paths = list(paths)
        self.labels = [int(y) for y in labels]
        self.transform = transform
        self.target_size = target_size
        self.fs = fs

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int] | Unreadable:
        path = self.paths[i]
        try:
            return self.transform(decode_image(read_file_bytes(path, self.fs), name=path,
                                               target_size=self.target_size)), self.labels[i]
        except (FileReadError, ImageDecodeError) as exc:
            return Unreadable(path, exc.reason)


def collate_readable(items: list, *, image_size: int) -> tuple[torch.Tensor, torch.Tensor, list[Unreadable]]:
    """Stack the readable samples of a batch; returns (images, labels, unreadable markers).

    A batch of only unreadable files becomes an empty (0, 3, S, S) batch rather than
    disappearing: under DDP every rank must run the same number of steps.
    """
    bad = [it for it in items if isinstance(it, Unreadable)]
    good = [it for it in items if not isinstance(it, Unreadable)]
    if not good:
        return torch.zeros(0, 3, image_size, image_size), torch.zeros(0, dtype=torch.int64), bad
    return torch.stack([x for x, _ in good]), torch.tensor([y for _, y in good], dtype=torch.int64), bad
