"""Train/eval presets: sizes, normalization, augmentation actually varies the image."""

from __future__ import annotations

import torch
from PIL import Image

from artifact_core.transforms import IMAGENET_MEAN, IMAGENET_STD, eval_transform, train_transform


def test_eval_transform_is_deterministic_and_normalized():
    img = Image.new("RGB", (100, 60), tuple(int(m * 255) for m in IMAGENET_MEAN))
    x = eval_transform(image_size=64)(img)
    assert x.shape == (3, 64, 64) and x.dtype == torch.float32
    assert x.abs().max() < 0.02  # the ImageNet mean maps to ~0
    assert torch.equal(x, eval_transform(image_size=64)(img))
    white = eval_transform(image_size=8)(Image.new("RGB", (8, 8), (255, 255, 255)))
    assert torch.allclose(white[:, 0, 0], torch.tensor([(1 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)]), atol=1e-4)


def test_train_transform_augments():
    img = Image.linear_gradient("L").convert("RGB").resize((80, 80))
    tf = train_transform(image_size=48)
    torch.manual_seed(0)
    outs = [tf(img) for _ in range(4)]
    assert all(o.shape == (3, 48, 48) for o in outs)
    assert not all(torch.equal(outs[0], o) for o in outs[1:])
    plain = train_transform(image_size=48, hflip_prob=0, rotation_degrees=0, brightness=0, shear_degrees=0, zoom=0)
    assert torch.allclose(plain(img), eval_transform(image_size=48)(img), atol=1e-5)
