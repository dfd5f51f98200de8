"""Training ingest through Ray Data (``--ingest ray-data``): decode spread over the cluster.

The driver turns the training part of the split into a Ray Data pipeline (read the bytes,
the shared decoder, the same augmentation as the DataLoader path) and Ray Train hands
each worker a ``streaming_split`` shard of it (equal row counts, so every DDP rank runs
the same number of steps). Decode then runs in Ray Data tasks on any node with free CPUs
instead of inside the training worker. Validation keeps the exact, unpadded sharding of
the DataLoader path (``streaming_split(equal=True)`` would drop up to ``world - 1`` rows).
Unreadable files become rows with an ``error`` and are dropped and counted in the worker,
as on the DataLoader path.
"""

from __future__ import annotations

import random
from typing import Any, Iterator

import numpy as np
import pyarrow.fs as pafs
import torch

from artifact_core.dataset import Unreadable
from artifact_core.images import ImageDecodeError, decode_image
from artifact_core.storage import FileReadError, read_file_bytes
from artifact_core.transforms import normalize, train_augment

INGEST_CHOICES = ("dataloader", "ray-data")
#: Rows per decode task: large enough to amortize task overhead, small enough to stream.
DECODE_BATCH = 32


def decode_train_batch(batch: dict[str, np.ndarray], *, image_size: int,
                       fs: pafs.FileSystem | None = None) -> dict[str, np.ndarray]:
    """Paths -> augmented uint8 (N, 3, S, S); unreadable files get an ``error``. Normalized in
    the worker (:class:`ShardLoader`): float32 blocks would be 4x the bytes through the object
    store (at 768 px a 32-row block would be 226 MB instead of 57 MB).

    Decoded at ``image_size`` (reduced scale first, where the file allows), as
    :class:`~artifact_core.dataset.ImageFileDataset` decodes for the DataLoader path, validation
    and scoring: the same pixels go into augmentation whichever ingest runs, at a fraction of
    a full-size decode's cost.
    """
    tf = train_augment(image_size=image_size)
    paths = [str(p) for p in batch["path"]]
    images = np.zeros((len(paths), 3, image_size, image_size), dtype=np.uint8)
    errors = np.full(len(paths), "", dtype=object)
    for i, path in enumerate(paths):
        try:
            images[i] = tf(decode_image(read_file_bytes(path, fs), name=path, target_size=image_size)).numpy()
        except (FileReadError, ImageDecodeError) as exc:
            errors[i] = exc.reason
    return {"image": images, "label": np.asarray(batch["label"], dtype=np.int64),
            "path": np.asarray(paths, dtype=object), "error": errors}


def train_datasets(loop_config: dict[str, Any], *, image_size: int, cpus_per_task: float = 1.0) -> dict[str, Any]:
    """``{"train": Dataset}`` for ``TorchTrainer(datasets=...)`` from the run's split (lazy)."""
    import ray.data

    split = loop_config["split"]
    rows = [{"path": p, "label": int(y)} for p, y in zip(split["train_paths"], split["train_labels"])]
    # Blocks are runs of consecutive rows and the split lists files in name order: a folder of
    # artifact/... then clean/... would give blocks of one class. Shuffled once here (seeded),
    # then a new block order every epoch, and rows mixed further in the worker's buffer.
    random.Random(int(loop_config.get("train", {}).get("seed", 0))).shuffle(rows)
    ds = ray.data.from_items(rows)
    ds = ds.randomize_block_order()
    return {"train": ds.map_batches(decode_train_batch, batch_size=DECODE_BATCH, batch_format="numpy",
                                    num_cpus=cpus_per_task,
                                    fn_kwargs={"image_size": image_size, "fs": loop_config.get("data_fs")})}


class _NoSampler:
    """Stands in for DistributedSampler: Ray Data reshuffles by itself every epoch."""

    def set_epoch(self, epoch: int) -> None:
        """Nothing to do."""


class ShardLoader:
    """Iterates ``(images, labels)`` of this worker's Ray Data shard, like :class:`SkippingLoader`.

    Rows with a decode error are dropped and kept in ``unreadable``.
    """

    sampler = _NoSampler()

    def __init__(self, shard: Any, *, batch_size: int, drop_last: bool) -> None:
        self.shard = shard
        self.batch_size = batch_size
        self.drop_last = drop_last
        self.unreadable: list[Unreadable] = []
        self.normalize = normalize()  # (the second half of train_transform: the tasks ship uint8)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for batch in self.shard.iter_batches(batch_size=self.batch_size, batch_format="numpy",
                                             drop_last=self.drop_last,
                                             local_shuffle_buffer_size=4 * self.batch_size):
            errors = np.asarray(batch["error"], dtype=object)
            ok = errors == ""
            self.unreadable.extend(Unreadable(str(p), str(e)) for p, e in zip(batch["path"][~ok], errors[~ok]))
            images = self.normalize(torch.from_numpy(np.ascontiguousarray(batch["image"][ok])))
            yield images, torch.from_numpy(batch["label"][ok])
