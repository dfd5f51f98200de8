"""Image presets (torchvision transforms v2): one for training, one for evaluation and scoring.

Both resize with :func:`artifact_core.images.resize_image` (PIL), the function scoring's
torch-free decode tasks use, so validation and scoring see the same pixels.
"""

from __future__ import annotations

import torch
from PIL import Image
from torchvision.transforms import v2

from artifact_core.config import IMAGENET_MEAN, IMAGENET_STD
from artifact_core.images import resize_image


class ResizePIL:
    """PIL image -> ``size`` x ``size`` PIL image via :func:`~artifact_core.images.resize_image`
    (a no-op on images :func:`~artifact_core.images.decode_image` already resized)."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __call__(self, img: Image.Image) -> Image.Image:
        if not isinstance(img, Image.Image):
            raise TypeError(f"expected a PIL image (from artifact_core.images.decode_image), got {type(img).__name__}")
        return resize_image(img, self.size)

    def __repr__(self) -> str:
        return f"ResizePIL(size={self.size})"


def train_augment(*, image_size: int = 224, hflip_prob: float = 0.5,
                  rotation_degrees: float = 10.0, brightness: float = 0.2,
                  shear_degrees: float = 8.0, zoom: float = 0.1) -> v2.Compose:
    """First half of :func:`train_transform`: PIL image -> augmented uint8 (3, S, S) tensor
    (what Ray Data ingest ships: a quarter of the float32 bytes)."""
    return v2.Compose([
        ResizePIL(image_size),
        v2.ToImage(),
        v2.RandomHorizontalFlip(p=hflip_prob),
        v2.RandomAffine(degrees=rotation_degrees, shear=shear_degrees,
                        scale=(1.0 - zoom, 1.0 + zoom)),
        v2.ColorJitter(brightness=brightness),
    ])


def train_transform(*, image_size: int = 224, mean: tuple[float, ...] = IMAGENET_MEAN,
                    std: tuple[float, ...] = IMAGENET_STD, **augment: float) -> v2.Compose:
    """Light augmentation: flip, rotation, brightness, shear and zoom (:func:`train_augment`,
    whose keywords ``augment`` takes), then normalize.

    Kept light on purpose: the artifacts (an extra eye, a smeared patch) are local
    details that heavy crops or colour jitter could remove or imitate.
    """
    return v2.Compose([train_augment(image_size=image_size, **augment), normalize(mean=mean, std=std)])


def eval_resize(*, image_size: int = 224) -> v2.Compose:
    """First half of :func:`eval_transform`: PIL image -> resized uint8 (3, S, S) tensor.

    Equals what scoring's decode tasks produce (without torch) for an image decoded with
    the same target size.
    """
    return v2.Compose([ResizePIL(image_size), v2.ToImage()])


def normalize(*, mean: tuple[float, ...] = IMAGENET_MEAN, std: tuple[float, ...] = IMAGENET_STD) -> v2.Compose:
    """Second half of :func:`eval_transform`: uint8 -> float in [0, 1] -> ImageNet-normalized."""
    return v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean=list(mean), std=list(std))])


def eval_transform(*, image_size: int = 224, mean: tuple[float, ...] = IMAGENET_MEAN,
                   std: tuple[float, ...] = IMAGENET_STD) -> v2.Compose:
    """Deterministic resize and normalize, shared by validation and scoring."""
    return v2.Compose([eval_resize(image_size=image_size), normalize(mean=mean, std=std)])
