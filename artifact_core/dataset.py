"""The torch Dataset of labelled image files, read and decoded at their turn."""

from __future__ import annotations

from typing import Callable, Iterator, NamedTuple, Sequence

import numpy as np
import pyarrow.fs as pafs
import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler

from artifact_core.images import ImageDecodeError, decode_image
from artifact_core.storage import FileReadError, read_file_bytes


class Unreadable(NamedTuple):
    """What :class:`ImageFileDataset` returns for a file it cannot read or decode."""

    path: str
    reason: str


def item_seed(seed: int, epoch: int, index: int, draw: int = 0) -> int:
    """The seed of one draw of one image's augmentation in one epoch."""
    return (((seed * 1_000_003 + epoch) * 1_000_033 + index) * 1_000_037 + draw) % (2 ** 63 - 1)


class EpochSampler(Sampler):
    """A sampler's indices tagged with the epoch and the draw, ``(index, epoch, draw)``, for
    :class:`ImageFileDataset`; ``draw`` is the index's place in this rank's order, so that an
    image drawn twice (oversampling, or on two ranks) is augmented twice anew.

    Each draw's augmentation then comes from its own seed (:func:`item_seed`): a resumed epoch
    augments as the uninterrupted one would have, whichever DataLoader process reads the image
    (persistent loader processes would otherwise carry their random streams on from epoch to
    epoch, and a restart begins them anew).
    """

    def __init__(self, inner: Sampler, *, rank: int = 0) -> None:
        self.inner = inner
        self.rank = rank
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """The epoch to tag with; passed on to the wrapped sampler (its shuffle)."""
        self.epoch = epoch
        if hasattr(self.inner, "set_epoch"):
            self.inner.set_epoch(epoch)

    def __iter__(self) -> Iterator[tuple[int, int, int]]:
        epoch, first = self.epoch, self.rank * len(self.inner)
        return ((int(i), epoch, first + k) for k, i in enumerate(self.inner))

    def __len__(self) -> int:
        return len(self.inner)


class DecodeCache:
    """Decoded, resized images kept in memory up to a byte budget, first come first kept.

    Training reads every image once per epoch (and phase 1 several times to cache its views);
    a 1024 px PNG costs about 16 ms to decode and resize, and an object-storage read a round
    trip. Only the decoder's output is kept (the resized image, before any augmentation), so a
    cached image gives exactly the pixels a fresh decode would. Keys are (path, target size),
    so datasets decoding the same file at other sizes never get each other's pixels. A cache
    lives in one process: DataLoader processes would each fill their own copy.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max(0, int(max_bytes))
        self.used = 0
        self._images: dict[tuple[str, int | None], np.ndarray] = {}

    def __len__(self) -> int:
        return len(self._images)

    def get(self, path: str, target_size: int | None) -> Image.Image | None:
        """The cached image (a fresh PIL image each time, so transforms cannot alter the copy kept)."""
        arr = self._images.get((path, target_size))
        return None if arr is None else Image.fromarray(arr)

    def put(self, path: str, target_size: int | None, img: Image.Image) -> None:
        """Keep ``img`` if the budget has room for it."""
        arr = np.asarray(img)
        key = (path, target_size)
        if key in self._images or self.used + arr.nbytes > self.max_bytes:
            return
        self._images[key] = arr
        self.used += arr.nbytes


class ImageFileDataset(Dataset):
    """(image tensor, label) pairs read from files with the shared decoder.

    Files are read at their turn (through ``fs`` when they live in object storage), so
    nothing decodes the whole folder up front. A file that cannot be read or decoded
    gives an :class:`Unreadable` marker instead of an image; :func:`collate_readable`
    drops it from the batch and passes it on to be counted. With ``target_size`` the
    decoder also resizes (at reduced scale where it can), exactly as scoring's decode tasks
    do, so validation and scoring see the same pixels. With a :class:`DecodeCache`, decoded
    images are kept for later epochs (files that fail are read again each time, so each
    epoch counts them). Indexed by ``(index, epoch, draw)`` (:class:`EpochSampler`), the
    transform draws from that draw's own seed (:func:`item_seed` of ``seed``); indexed by a
    plain index, from the process's random stream.
    """

    def __init__(self, paths: Sequence[str], labels: Sequence[int],
                 transform: Callable, fs: pafs.FileSystem | None = None, *,
                 target_size: int | None = None, cache: DecodeCache | None = None, seed: int = 0) -> None:
        if len(paths) != len(labels):
            raise ValueError(f"{len(paths)} paths but {len(labels)} labels")
        self.paths = list(paths)
        self.labels = [int(y) for y in labels]
        self.transform = transform
        self.target_size = target_size
        self.fs = fs
        self.cache = cache
        self.seed = seed

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, item: int | tuple[int, int, int]) -> tuple[torch.Tensor, int] | Unreadable:
        i, epoch, draw = item if isinstance(item, tuple) else (item, None, 0)
        path = self.paths[i]
        img = self.cache.get(path, self.target_size) if self.cache is not None else None
        if img is None:
            try:
                img = decode_image(read_file_bytes(path, self.fs), name=path, target_size=self.target_size)
            except (FileReadError, ImageDecodeError) as exc:
                return Unreadable(path, exc.reason)
            if self.cache is not None:
                self.cache.put(path, self.target_size, img)
        if epoch is None:
            return self.transform(img), self.labels[i]
        # The CPU generator alone (torch.manual_seed would reseed the GPUs' too, and costs more),
        # restored afterwards: the process's own stream is left as it was.
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(item_seed(self.seed, epoch, i, draw))
            return self.transform(img), self.labels[i]


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
