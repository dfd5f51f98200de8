"""Image presets (torchvision transforms v2): one for training, one for evaluation and scoring."""

from __future__ import annotations

import torch
from torchvision.transforms import v2

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def train_transform(*, image_size: int = 224, hflip_prob: float = 0.5,
                    rotation_degrees: float = 10.0, brightness: float = 0.2,
                    shear_degrees: float = 8.0, zoom: float = 0.1,
                    mean: tuple[float, ...] = IMAGENET_MEAN,
                    std: tuple[float, ...] = IMAGENET_STD) -> v2.Compose:
    """Light augmentation: flip, rotation, brightness, shear and zoom, then normalize.

    Kept light on purpose: the artifacts (an extra eye, a smeared patch) are local
    details that heavy crops or colour jitter could remove or imitate.
    """
    return v2.Compose([
        v2.ToImage(),
        v2.Resize((image_size, image_size), antialias=True),
        v2.RandomHorizontalFlip(p=hflip_prob),
        v2.RandomAffine(degrees=rotation_degrees, shear=shear_degrees,
                        scale=(1.0 - zoom, 1.0 + zoom)),
        v2.ColorJitter(brightness=brightness),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(mean=list(mean), std=list(std)),
    ])


def eval_resize(*, image_size: int = 224) -> v2.Compose:
    """First half of :func:`eval_transform`: PIL image -> resized uint8 (3, S, S) tensor.

    Scoring ships this to the predictor actors: a quarter of the bytes of float32.
    """
    return v2.Compose([v2.ToImage(), v2.Resize((image_size, image_size), antialias=True)])


def normalize(*, mean: tuple[float, ...] = IMAGENET_MEAN, std: tuple[float, ...] = IMAGENET_STD) -> v2.Compose:
    """Second half of :func:`eval_transform`: uint8 -> float in [0, 1] -> ImageNet-normalized."""
    return v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean=list(mean), std=list(std))])


def eval_transform(*, image_size: int = 224, mean: tuple[float, ...] = IMAGENET_MEAN,
                   std: tuple[float, ...] = IMAGENET_STD) -> v2.Compose:
    """Deterministic resize and normalize, shared by validation and scoring."""
    return v2.Compose([eval_resize(image_size=image_size), normalize(mean=mean, std=std)])
