"""Training ingest through Ray Data: the decode function alone, then a small real run."""

from __future__ import annotations

import json

import numpy as np
import pytest

from artifact_core.ingest import decode_train_batch
from conftest import write_image


def test_decode_train_batch_augments_and_marks_unreadable(tmp_path):
    good = write_image(tmp_path / "image_0_1.png", size=40)
    bad = tmp_path / "image_1_0.png"
    bad.write_text("text, not a picture")
    batch = {"path": np.asarray([str(good), str(bad)], dtype=object), "label": np.asarray([1, 0])}
    out = decode_train_batch(batch, image_size=32)
    assert out["image"].shape == (2, 3, 32, 32) and out["image"].dtype == np.uint8  # normalized in the worker
    assert out["error"][0] == "" and out["error"][1] and out["label"].tolist() == [1, 0]
    assert np.abs(out["image"][0]).sum() > 0 and not out["image"][1].any()


@pytest.mark.ray
def test_ray_data_ingest_trains_and_counts_unreadable(ray_session, tmp_path, backbone_weights):
    from artifact_core.config import TrainConfig
    from artifact_core.trainer import run_training
    from conftest import make_easy_folder

    # 31 + 1 files: 24 train (12 per worker, split equally, none dropped), 8 validation
    data = make_easy_folder(tmp_path / "train", n=31)
    (data / "image_91_1.png").write_text("text, not a picture")
    # 2 workers x 0.5 CPU leave one CPU of the 2-CPU test node for the Ray Data decode tasks
    cfg = TrainConfig(data_dir=str(data), storage_path=str(tmp_path / "runs"), name="rd", weights=backbone_weights,
                      num_workers=2, cpus_per_worker=0.5, batch_size=16, image_size=32, head_epochs=1,
                      finetune_epochs=1, patience=0, max_failures=0, val_fraction=0.25, ingest="ray-data")
    summary = run_training(cfg)
    hist = summary.metrics["history"]
    assert [h["epoch"] for h in hist] == [1, 2] and all(np.isfinite(h["train_loss"]) for h in hist)
    # met every epoch, whichever part of the split it landed in
    assert [h["unreadable_skipped"] for h in hist] == [1, 1]
    assert summary.metrics["unreadable_skipped"] == [str(data / "image_91_1.png")]
    split = json.loads((tmp_path / "runs" / "rd" / "split.json").read_text())
    assert len(split["train"]["files"]) == 24
    assert summary.metrics["validation"]["support"] == 8 - ("image_91_1.png" in split["val"]["files"])


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_ray_data_decode_gives_the_dataloader_pixels(tmp_path, monkeypatch, fmt):
    """``--ingest ray-data`` decodes at the target size as the DataLoader path does (reduced
    first), so both feed augmentation the same pixels; a full-size decode then resize differs."""
    import torch
    from PIL import Image

    import artifact_core.ingest as ingest
    from artifact_core.dataset import ImageFileDataset
    from artifact_core.images import resize_image

    size = 64
    rng = np.random.default_rng(0)
    path = tmp_path / f"image_0_1.{fmt.lower()}"
    Image.fromarray(rng.integers(0, 255, (1024, 1024, 3), dtype=np.uint8)).save(path, fmt)

    def no_augmentation(img):
        # train_augment's first step (ResizePIL), without the random part
        return torch.from_numpy(np.asarray(resize_image(img, size), dtype=np.uint8).transpose(2, 0, 1).copy())

    monkeypatch.setattr(ingest, "train_augment", lambda image_size: no_augmentation)
    out = ingest.decode_train_batch({"path": np.asarray([str(path)], dtype=object), "label": np.asarray([1])},
                                    image_size=size)
    assert out["error"][0] == ""
    loader = ImageFileDataset([str(path)], [1], no_augmentation, target_size=size)
    assert np.array_equal(out["image"][0], loader[0][0].numpy())


def test_the_shard_loader_gives_what_train_transform_gives(tmp_path):
    """The tasks ship augmented uint8 and the worker normalizes: the same tensors as the
    DataLoader path's train_transform for the same draw."""
    import torch

    from artifact_core.images import decode_image
    from artifact_core.ingest import ShardLoader
    from artifact_core.transforms import train_transform

    path = write_image(tmp_path / "image_0_1.png", size=40)
    torch.manual_seed(5)
    batch = decode_train_batch({"path": np.asarray([str(path)], dtype=object), "label": np.asarray([1])},
                               image_size=32)
    torch.manual_seed(5)
    want = train_transform(image_size=32)(decode_image(str(path), target_size=32))

    class Shard:
        def iter_batches(self, **kw):
            yield batch

    images, labels = next(iter(ShardLoader(Shard(), batch_size=1, drop_last=False)))
    assert images.dtype == torch.float32 and labels.tolist() == [1]
    assert torch.allclose(images[0], want, atol=1e-6)
