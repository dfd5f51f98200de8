"""MobileNetV2 with a binary head, and the freezing rules of the two training phases."""

from __future__ import annotations

import os
from urllib.error import URLError

import torch
from torch import nn
from torchvision.models import MobileNet_V2_Weights, mobilenet_v2

#: torchvision's MobileNetV2 has 19 blocks in ``model.features``.
NUM_FEATURE_BLOCKS = 19
ARCHITECTURE = "mobilenet_v2"
IMAGENET_WEIGHTS = MobileNet_V2_Weights.IMAGENET1K_V2


class WeightsUnavailableError(RuntimeError):
    """Pretrained weights could not be loaded (offline, or a bad file)."""


def _imagenet_state_dict() -> dict[str, torch.Tensor]:
    """torchvision's ImageNet weights from the torch hub cache, downloading if needed."""
    try:
        return IMAGENET_WEIGHTS.get_state_dict(progress=False, check_hash=True)
    except (URLError, OSError, RuntimeError) as exc:
        cache = os.path.join(torch.hub.get_dir(), "checkpoints")
        file_name = os.path.basename(IMAGENET_WEIGHTS.url)
        raise WeightsUnavailableError(
            f"cannot load ImageNet weights for MobileNetV2 ({type(exc).__name__}: {exc}). "
            f"Either pre-download them on a machine with internet "
            f"(python -c \"import torchvision; torchvision.models.mobilenet_v2(weights='IMAGENET1K_V2')\") "
            f"and copy {file_name} into {cache} (set TORCH_HOME to move that cache), "
            f"or pass a state-dict file path as weights."
        ) from exc


def _file_state_dict(path: str) -> dict[str, torch.Tensor]:
    if not os.path.isfile(path):
        raise WeightsUnavailableError(
            f"weights file {path!r} does not exist; expected 'imagenet', 'none' or a state-dict path"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for a non-checkpoint file
        raise WeightsUnavailableError(f"cannot read weights file {path!r}: {exc}") from exc
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise WeightsUnavailableError(f"weights file {path!r} holds {type(state).__name__}, expected a state dict")
    return state


def build_model(*, weights: str = "imagenet", dropout: float = 0.2, num_outputs: int = 1) -> nn.Module:
    """MobileNetV2 whose ImageNet classifier is replaced by a fresh ``num_outputs`` head.

    Args:
        weights: ``"imagenet"`` (torchvision IMAGENET1K_V2 via the torch hub cache),
            ``"none"`` (random init), or a path to a MobileNetV2 state dict (1000-class
            ImageNet layout, or this project's own head layout).
        dropout: dropout before the final linear layer.
        num_outputs: 1 (a logit for "artifact-free") or 2 (two-class logits).

    Raises:
        WeightsUnavailableError: the weights cannot be loaded; says how to fix it.
    """
    model = mobilenet_v2(weights=None)
    if weights == "imagenet":
        model.load_state_dict(_imagenet_state_dict())
    elif weights not in ("none", None, ""):
        state = _file_state_dict(os.path.expanduser(weights))
        # A 1000-class ImageNet file: keep its head out; our own head layout: load all.
        backbone = {k: v for k, v in state.items() if not k.startswith("classifier.")}
        missing, unexpected = model.load_state_dict(backbone, strict=False)
        missing = [k for k in missing if not k.startswith("classifier.")]
        if missing or unexpected:
            raise WeightsUnavailableError(
                f"weights file {weights!r} does not fit MobileNetV2: "
                f"{len(missing)} missing keys (e.g. {missing[:3]}), "
                f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})"
            )
    in_features = model.classifier[-1].in_features
    model.classifier = nn.Sequential(nn.Dropout(p=dropout), nn.Linear(in_features, num_outputs))
    return model


def set_trainable(model: nn.Module, *, unfreeze_depth: int) -> int:
    """Freeze the backbone except its last ``unfreeze_depth`` feature blocks.

    K = 0 trains only the classifier head; K = 19 trains everything.
    Use :func:`train_mode` instead of ``model.train()`` so frozen BatchNorm stays in eval.

    Returns:
        The number of trainable parameters (elements).
    """
    if not 0 <= unfreeze_depth <= NUM_FEATURE_BLOCKS:
        raise ValueError(f"unfreeze_depth must be in 0..{NUM_FEATURE_BLOCKS}, got {unfreeze_depth}")
    for p in model.features.parameters():
        p.requires_grad = False
    for block in model.features[NUM_FEATURE_BLOCKS - unfreeze_depth:]:
        for p in block.parameters():
            p.requires_grad = True
    for p in model.classifier.parameters():
        p.requires_grad = True
    return count_trainable(model)


def count_trainable(model: nn.Module) -> int:
    """Number of parameter elements that require gradients."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def train_mode(model: nn.Module) -> nn.Module:
    """``model.train()``, but BatchNorm layers whose parameters are frozen stay in eval.

    Frozen blocks must keep their ImageNet running statistics; updating them from
    small, skewed batches silently shifts features the head was trained on.
    """
    model.train()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            if not any(p.requires_grad for p in m.parameters(recurse=False)):
                m.eval()
    return model


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model inside a DistributedDataParallel (or DataParallel) wrapper."""
    return model.module if hasattr(model, "module") else model
