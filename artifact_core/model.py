"""MobileNetV2 with a binary head, where its starting weights come from, and the freezing rules
of the two training phases."""

from __future__ import annotations

import hashlib
import http.client
import importlib.resources
import logging
import os
import re
import urllib.request
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torchvision.models import MobileNet_V2_Weights, mobilenet_v2

from artifact_core.errors import WeightsUnavailableError  # noqa: F401 (re-exported)
from artifact_core.config import (  # noqa: F401 (ARCHITECTURE re-exported)
    ARCHITECTURE, HEADS, LOCAL_TRUNK_BLOCKS, MULTISCALE_TAP_BLOCK, TRUNK_HEADS)

#: torchvision's MobileNetV2 has 19 blocks in ``model.features``.
NUM_FEATURE_BLOCKS = 19
#: Share of the evidence map's cells averaged into the image score (at least one): about
#: four cells of a 28 x 28 map at 448 px, eight of a 40 x 40 map at 640 px, the size of the
#: defects the head is built for.
LOCAL_TOP_FRACTION = 0.005
IMAGENET_WEIGHTS = MobileNet_V2_Weights.IMAGENET1K_V2

log = logging.getLogger(__name__)



#: ``--weights`` keywords; anything else but ``none`` is a state-dict path.
WEIGHTS_KEYWORDS = ("imagenet", "torchvision", "bundled")
#: ImageNet MobileNetV2 shipped in the package as the offline fallback (see weights/README.md there).
BUNDLED_WEIGHTS_FILE = "mobilenet_v2_imagenet_coral.fp16.pth"
BUNDLED_WEIGHTS_SHA256 = "71e5b720c3f1fb3434b634c9883478fe699c8f0eefde6b21c644ab6f8cb46792"
#: Seconds a download may wait on one network operation (connect to one address, each read).
#: urllib has no timeout by default: a firewall that drops packets would hold the driver for
#: minutes per address, and a stalled transfer for ever.
DOWNLOAD_TIMEOUT_S = 10.0


def _torchvision_cache_file() -> str:
    """Where torchvision keeps its ImageNet file: ``$TORCH_HOME/hub/checkpoints/<name>``."""
    return os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(IMAGENET_WEIGHTS.url))


def _download(url: str, dst: str, *, timeout: float) -> None:
    """Fetch ``url`` into ``dst`` atomically, checking the sha256 prefix in its file name.

    A fresh opener per call, so proxy settings from the environment are read now.
    """
    match = re.search(r"-([a-f0-9]+)\.", os.path.basename(url))
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    tmp = f"{dst}.{os.getpid()}.partial"
    digest = hashlib.sha256()
    try:
        with urllib.request.build_opener().open(url, timeout=timeout) as response, open(tmp, "wb") as f:
            while chunk := response.read(1 << 20):
                digest.update(chunk)
                f.write(chunk)
        if match and not digest.hexdigest().startswith(match.group(1)):
            raise OSError(f"{url}: sha256 {digest.hexdigest()[:12]}... does not start with {match.group(1)}")
        os.replace(tmp, dst)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _torchvision_state_dict(*, timeout: float) -> tuple[dict[str, torch.Tensor], str]:
    """torchvision's IMAGENET1K_V2 from the torch hub cache, else downloaded into it."""
    path = _torchvision_cache_file()
    if os.path.isfile(path):
        return _file_state_dict(path), f"torchvision cache {path}"
    try:
        _download(IMAGENET_WEIGHTS.url, path, timeout=timeout)
    except (OSError, http.client.HTTPException) as exc:  # URLError, HTTPError, timeouts are OSErrors
        raise WeightsUnavailableError(
            f"cannot load ImageNet weights for MobileNetV2 ({type(exc).__name__}: {exc}). "
            f"Either pre-download them on a machine with internet "
            f"(python -c \"import torchvision; torchvision.models.mobilenet_v2(weights='IMAGENET1K_V2')\") "
            f"and copy {os.path.basename(path)} into {os.path.dirname(path)} (set TORCH_HOME to move that cache), "
            f"pass --weights bundled (the ImageNet copy shipped with this package), "
            f"or pass a state-dict file path as weights."
        ) from exc
    return _file_state_dict(path), f"torchvision download {IMAGENET_WEIGHTS.url} -> {path}"


def bundled_weights_path() -> str:
    """Path of the ImageNet MobileNetV2 state dict shipped inside the package (fp16)."""
    return str(importlib.resources.files("artifact_core").joinpath("weights", BUNDLED_WEIGHTS_FILE))


def _bundled_state_dict() -> tuple[dict[str, torch.Tensor], str]:
    path = bundled_weights_path()
    if not os.path.isfile(path):
        raise WeightsUnavailableError(f"the bundled weights {path!r} are missing: reinstall artifact-core")
    with open(path, "rb") as f:
        sha = hashlib.sha256(f.read()).hexdigest()
    if sha != BUNDLED_WEIGHTS_SHA256:
        raise WeightsUnavailableError(
            f"the bundled weights {path!r} have sha256 {sha}, expected {BUNDLED_WEIGHTS_SHA256}: reinstall artifact-core")
    return _file_state_dict(path), f"bundled fp16 (google-coral MobileNetV2, Apache-2.0) {path} sha256 {sha}"


def resolve_weights(weights: str | None, *,
                    download_timeout: float = DOWNLOAD_TIMEOUT_S) -> tuple[dict[str, torch.Tensor] | None, str]:
    """Load the starting weights that a ``--weights`` value names, and say where they came from.

    Args:
        weights: ``"imagenet"`` (torchvision's IMAGENET1K_V2 from the torch hub cache, else
            downloaded, else the copy shipped in this package), ``"torchvision"`` (cache or
            download only), ``"bundled"`` (the shipped copy only), ``"none"`` (random init),
            or a path to a MobileNetV2 state dict.
        download_timeout: seconds one network operation of a download may take.

    Returns:
        ``(state_dict or None, source)``; the source is a short text for logs and the bundle,
        e.g. ``"torchvision cache /root/.cache/torch/hub/checkpoints/mobilenet_v2-7ebf99e0.pth"``.

    Raises:
        WeightsUnavailableError: the weights cannot be loaded; says how to fix it.
    """
    if weights in ("none", None, ""):
        # Not logged: every worker and every bundle load builds its model this way.
        return None, "none (random init)"
    if weights == "imagenet":
        try:
            state, source = _torchvision_state_dict(timeout=download_timeout)
        except WeightsUnavailableError as exc:
            cause = exc.__cause__ or exc
            log.warning("torchvision's ImageNet weights are not available (%s: %s); using the ImageNet "
                        "copy shipped with artifact-core instead", type(cause).__name__, cause)
            state, source = _bundled_state_dict()
    elif weights == "torchvision":
        state, source = _torchvision_state_dict(timeout=download_timeout)
    elif weights == "bundled":
        state, source = _bundled_state_dict()
    else:
        path = os.path.abspath(os.path.expanduser(weights))
        state, source = _file_state_dict(path), f"file {path}"
    log.info("starting weights: %s", source)
    return state, source


def _file_state_dict(path: str) -> dict[str, torch.Tensor]:
    """A state dict from a file; half-precision tensors come back as float32."""
    if not os.path.isfile(path):
        raise WeightsUnavailableError(
            f"weights file {path!r} does not exist; expected one of {', '.join(WEIGHTS_KEYWORDS)}, "
            f"'none' or a state-dict path"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for a non-checkpoint file
        raise WeightsUnavailableError(f"cannot read weights file {path!r}: {exc}") from exc
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise WeightsUnavailableError(f"weights file {path!r} holds {type(state).__name__}, expected a state dict")
    # fp16/bf16 files (such as the shipped copy) train and score in float32 like the rest.
    return {k: v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in state.items()}


class MultiScaleTrunk(nn.Sequential):
    """MobileNetV2 blocks that return the last block's map with block ``tap``'s map beside it,
    average-pooled onto the same grid (channels: the tap's, then the last block's).

    A plain ``nn.Sequential`` in every other way: the blocks keep their indices (and state-dict
    keys), so freezing the last K blocks works as for the other heads.
    """

    def __init__(self, *blocks: Any, tap: int = MULTISCALE_TAP_BLOCK) -> None:
        super().__init__(*blocks)
        self.tap = tap

    @property
    def out_channels(self) -> int:
        """Channels of the joined map."""
        return self[self.tap].out_channels + self[-1].out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H', W') joined map: the tap's pooled map, then the last block's."""
        return trunk_suffix(self, 0, x)

    def join(self, skip: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
        """The last block's map ``x`` with the tap's map ``skip`` pooled onto its grid beside it
        (a ``skip`` already on that grid is taken as it is)."""
        if skip is None or skip is x:  # a slice without the tap (only ever used for its parameters)
            return x
        return torch.cat([pool_to_grid(skip, x), x], dim=1)


def pool_to_grid(skip: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``skip`` average-pooled onto ``x``'s coarser grid (unchanged when it is already on it)."""
    # ceil_mode: an odd-sized map gets the same grid as the strided convolutions give
    # int(): under ONNX tracing sizes are tensors; the graph keeps the bundle's fixed size
    big, small = int(skip.shape[-1]), int(x.shape[-1])
    factor = (big + small - 1) // small
    return nn.functional.avg_pool2d(skip, factor, ceil_mode=True) if factor > 1 else skip


def trunk_prefix(trunk: nn.Sequential, stop: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Blocks ``[0, stop)`` of a trunk: their output and, for a :class:`MultiScaleTrunk` whose tap
    is among them, the tap's map (pooled onto the final grid when no later block changes the
    grid, so a cache of it is a quarter the size). :func:`trunk_suffix` continues from there."""
    skip = None
    for i in range(stop):
        x = trunk[i](x)
        if isinstance(trunk, MultiScaleTrunk) and i == trunk.tap:
            skip = x
    if skip is not None and all(getattr(block, "stride", None) == 1 for block in trunk[stop:]):
        skip = pool_to_grid(skip, x)
    return x, skip


def trunk_suffix(trunk: nn.Sequential, start: int, x: torch.Tensor,
                 skip: torch.Tensor | None = None) -> torch.Tensor:
    """The trunk's output from block ``start`` on, given block ``start - 1``'s output ``x`` (and
    the tap's map from :func:`trunk_prefix` when the tap came before ``start``)."""
    for i in range(start, len(trunk)):
        x = trunk[i](x)
        if isinstance(trunk, MultiScaleTrunk) and i == trunk.tap:
            skip = x
    return trunk.join(skip, x) if isinstance(trunk, MultiScaleTrunk) else x


def _batch_independent_prefix(trunk: nn.Sequential) -> int:
    """How many leading blocks of ``trunk`` give each image an output of its own, building no
    autograd graph: no BatchNorm in training mode and, with grad enabled, no trainable
    parameter. Such blocks may run on any split of a batch with the same result."""
    grad = torch.is_grad_enabled()
    count = 0
    for block in trunk:
        if any(m.training for m in block.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)):
            break
        if grad and any(p.requires_grad for p in block.parameters()):
            break
        count += 1
    return count


def frozen_prefix(model: nn.Module) -> int:
    """How many leading trunk blocks have no trainable parameter: with their BatchNorm in eval
    (see :func:`train_mode`) their output is a fixed function of the input image."""
    count = 0
    for block in unwrap(model).features:
        if any(p.requires_grad for p in block.parameters()):
            break
        count += 1
    return count


def amp_dtype(device: torch.device) -> torch.dtype | None:
    """The autocast dtype on ``device``: None on CPU, bf16 on GPUs of compute capability
    8.0+ (Ampere and later), else fp16 (which needs grad scaling)."""
    if device.type != "cuda":
        return None
    # Not torch.cuda.is_bf16_supported(): it also says yes where bf16 is only emulated
    # (e.g. Turing, 7.5), which is slow and skips the fp16 tensor cores.
    major, _ = torch.cuda.get_device_capability(device)
    return torch.bfloat16 if major >= 8 else torch.float16


class LocalEvidenceNet(nn.Module):
    """MobileNetV2's first :data:`LOCAL_TRUNK_BLOCKS` blocks, a per-location classifier and top-k pooling.

    Each cell of the stride-16 feature map (16 x 16 input pixels, seen in a larger context)
    gets an artifact logit; the image's artifact logit is the mean of the highest
    ``top_fraction`` of them. An average over the whole image would let a defect of a few
    cells vanish among hundreds of clean ones; the top-k mean keeps it, and the map shows
    where it is. ``forward`` returns the same (N, 1) "artifact-free" logit as the global head.

    With ``members`` > 1 the classifier is that many per-cell classifiers side by side, each
    with its own hidden units and output (one grouped layer); each is top-k pooled on its own
    and the image's logit is the mean of theirs. In training mode ``forward`` returns one logit
    per member, (N, members), so that each member's weights learn from its own loss only. They
    share the input BatchNorm and the dropout mask (and the trunk, once it is unfrozen).
    """

    def __init__(self, features: nn.Sequential, *, dropout: float = 0.2, hidden: int = 64,
                 top_fraction: float = LOCAL_TOP_FRACTION, test_time_flip: bool = False,
                 members: int = 1) -> None:
        super().__init__()
        if members < 1:
            raise ValueError(f"members must be at least 1, got {members}")
        #: in eval mode, also score the mirrored image and keep the stronger artifact evidence
        self.test_time_flip = test_time_flip
        self.members = members
        self.features = features
        channels = features.out_channels if isinstance(features, MultiScaleTrunk) else features[-1].out_channels
        # Normalized input (the trunk's channels differ in scale by orders of magnitude), then two
        # 1x1 convolutions: a linear one per cell finds too little in 96 channels. With one
        # member the layout (and state-dict shapes) are those of a plain two-layer classifier.
        self.classifier = nn.Sequential(nn.BatchNorm2d(channels), nn.Dropout(p=dropout),
                                        nn.Conv2d(channels, hidden * members, 1), nn.ReLU(inplace=True),
                                        nn.Conv2d(hidden * members, members, 1, groups=members))
        self.top_fraction = top_fraction
        #: images per pass through the trunk's leading blocks that build no autograd graph (0:
        #: the whole batch at once); set on CPU from :func:`~artifact_core.cpu_memory.trunk_images_per_pass`.
        #: Not part of the state dict; the ONNX export takes the whole batch.
        self.images_per_pass = 0

    def trunk(self, x: torch.Tensor) -> torch.Tensor:
        """``self.features(x)``; with :attr:`images_per_pass` set, the leading blocks that build
        no autograd graph (all of them under no grad; the frozen ones in phase 2) run on that
        many images at a time, and the rest on the whole batch. The same result: those blocks
        treat each image on its own."""
        n = self.images_per_pass
        if n <= 0 or x.shape[0] <= n:
            return self.features(x)
        stop = _batch_independent_prefix(self.features)
        if stop == 0:
            return self.features(x)
        with torch.no_grad():
            parts = [trunk_prefix(self.features, stop, part) for part in x.split(n)]
        h = torch.cat([p[0] for p in parts])
        skip = torch.cat([p[1] for p in parts]) if parts[0][1] is not None else None
        return trunk_suffix(self.features, stop, h, skip)

    def evidence_map(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 1, H/16, W/16) artifact logits, one per cell: the members' mean, for display (the
        image's logit pools each member's map on its own, so it is not the top-k of this map)."""
        return self.classifier(self.trunk(x)).mean(dim=1, keepdim=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 1) "artifact-free" logit ((N, members) in training); with the test-time flip, the
        lower of the image's and its mirror's."""
        if self.test_time_flip and not self.training:
            # One pass over the image and its mirror; the lower "artifact-free" logit wins, so a
            # defect the cells see better from one side is not averaged away by the other.
            n = x.shape[0]
            z = self.head(self.trunk(torch.cat([x, x.flip(-1)])))
            return torch.minimum(z[:n], z[n:])
        return self.head(self.trunk(x))

    def head(self, features: torch.Tensor) -> torch.Tensor:
        """The (N, 1) "artifact-free" logit from the trunk's feature map; (N, members) in
        training mode."""
        cells = self.classifier(features).flatten(2)
        # int(): under ONNX tracing the size is a tensor; the exported graph keeps k for the
        # bundle's fixed image size.
        k = max(1, int(self.top_fraction * int(cells.shape[2]) + 0.5))
        logits = -cells.topk(k, dim=2).values.mean(dim=2)
        if self.training:
            return logits
        return logits.mean(dim=1, keepdim=True)


def head_logits(model: nn.Module, features: torch.Tensor) -> torch.Tensor:
    """What ``model(x)`` computes after ``model.features(x)``: the head alone, for either head."""
    if isinstance(model, LocalEvidenceNet):
        return model.head(features)
    # torchvision's MobileNetV2.forward after its features
    return model.classifier(torch.flatten(nn.functional.adaptive_avg_pool2d(features, (1, 1)), 1))


def head_name(model: nn.Module) -> str:
    """The :data:`HEADS` name of a model that :func:`build_model` made."""
    if isinstance(model, LocalEvidenceNet):
        return "multiscale" if isinstance(model.features, MultiScaleTrunk) else "local"
    return "global"


def _block_index(key: str) -> int | None:
    match = re.match(r"features\.(\d+)\.", key)
    return int(match.group(1)) if match else None


def build_model(*, weights: str | Mapping[str, torch.Tensor] | None = "imagenet", dropout: float = 0.2,
                num_outputs: int = 1, head: str = "global", test_time_flip: bool = False,
                members: int = 1) -> nn.Module:
    """MobileNetV2 with a binary head in place of ImageNet's classifier: fresh, or the one in
    ``weights`` when that state dict has this model's head layout (a model of this project).

    Args:
        weights: a ``--weights`` value as :func:`resolve_weights` reads it (``"imagenet"``,
            ``"torchvision"``, ``"bundled"``, ``"none"``, a state-dict path), or a state dict
            already loaded (1000-class ImageNet layout, or this project's own head layout).
        dropout: dropout before the head's first layer.
        num_outputs: 1 (a logit for "artifact-free") or 2 (two-class logits; global head only).
        head: ``"global"`` (the whole network, average pooling, a linear layer), ``"local"``
            (:class:`LocalEvidenceNet` on the stride-16 trunk) or ``"multiscale"`` (the same on
            a :class:`MultiScaleTrunk`); see :data:`HEADS`.
        test_time_flip: (local and multiscale heads) in eval mode the model also scores the
            mirrored image and returns the lower "artifact-free" logit of the two.
        members: (local and multiscale heads) independent per-cell classifiers whose image
            logits are averaged (see :class:`LocalEvidenceNet`).

    Raises:
        WeightsUnavailableError: the weights cannot be loaded; says how to fix it.
        ValueError: an unknown head; two outputs, a test-time flip or several members asked of
            a head without them.
    """
    if head not in HEADS:
        raise ValueError(f"head must be one of {HEADS}, got {head!r}")
    if head in TRUNK_HEADS and num_outputs != 1:
        raise ValueError(f"the {head} head gives one logit (artifact-free); num_outputs must be 1")
    if test_time_flip and head not in TRUNK_HEADS:
        raise ValueError(f"test-time flip needs one of the heads {TRUNK_HEADS}, got {head!r}")
    if members != 1 and head not in TRUNK_HEADS:
        raise ValueError(f"a head ensemble needs one of the heads {TRUNK_HEADS}, got {head!r}")
    model = mobilenet_v2(weights=None)
    if head == "local":
        model = LocalEvidenceNet(model.features[:LOCAL_TRUNK_BLOCKS], dropout=dropout, test_time_flip=test_time_flip,
                                 members=members)
    elif head == "multiscale":
        model = LocalEvidenceNet(MultiScaleTrunk(*model.features[:LOCAL_TRUNK_BLOCKS]), dropout=dropout,
                                 test_time_flip=test_time_flip, members=members)
    state, source = (weights, "state dict") if isinstance(weights, Mapping) else resolve_weights(weights)
    if state is not None:
        # The trunk first; the head below, once it has its final layout.
        backbone = {k: v for k, v in state.items() if not k.startswith("classifier.")}
        if head in TRUNK_HEADS:  # the trunk ends before the stride-32 blocks
            backbone = {k: v for k, v in backbone.items()
                        if _block_index(k) is None or _block_index(k) < LOCAL_TRUNK_BLOCKS}
        missing, unexpected = model.load_state_dict(backbone, strict=False)
        missing = [k for k in missing if not k.startswith("classifier.")]
        if missing or unexpected:
            raise WeightsUnavailableError(
                f"weights from {source}: the state dict does not fit MobileNetV2: "
                f"{len(missing)} missing keys (e.g. {missing[:3]}), "
                f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})"
            )
    if head == "global":
        in_features = model.classifier[-1].in_features
        model.classifier = nn.Sequential(nn.Dropout(p=dropout), nn.Linear(in_features, num_outputs))
    if state is not None:
        _load_head(model, state, source)
    return model


def _load_head(model: nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """Load the state dict's head when it has this model's head layout (a model of this project,
    same head and member count); ImageNet's 1000-class head, or another layout, is left out."""
    head = {k: v for k, v in state.items() if k.startswith("classifier.")}
    own = {k: v for k, v in model.state_dict().items() if k.startswith("classifier.")}
    if head and head.keys() == own.keys() and all(head[k].shape == own[k].shape for k in own):
        model.load_state_dict(head, strict=False)
    elif head and not any(v.shape == (1000, 1280) for v in head.values()):
        log.info("weights from %s: their head has another layout than this model's; the head starts fresh", source)


def model_for(cfg: Any, *, weights: str | Mapping[str, torch.Tensor] | None = "none") -> nn.Module:
    """The model a :class:`~artifact_core.config.TrainConfig` trains: its head, dropout, test-time
    flip and head members as they act (one place, so workers and the export build the same)."""
    return build_model(weights=weights, dropout=cfg.dropout, head=cfg.head, test_time_flip=cfg.flips_at_test_time,
                       members=cfg.ensemble_members)


def set_trainable(model: nn.Module, *, unfreeze_depth: int) -> int:
    """Freeze the backbone except its last ``unfreeze_depth`` feature blocks.

    K = 0 trains only the classifier head; K = ``len(model.features)`` (19 for the global
    head, 14 for the local and multiscale ones) trains everything. Use :func:`train_mode` instead of ``model.train()`` so frozen BatchNorm stays in eval.

    Returns:
        The number of trainable parameters (elements).
    """
    blocks = len(model.features)
    if not 0 <= unfreeze_depth <= blocks:
        raise ValueError(f"unfreeze_depth must be in 0..{blocks}, got {unfreeze_depth}")
    for p in model.features.parameters():
        p.requires_grad = False
    for block in model.features[blocks - unfreeze_depth:]:
        for p in block.parameters():
            p.requires_grad = True
    for p in model.classifier.parameters():
        p.requires_grad = True
    return count_trainable(model)


def count_trainable(model: nn.Module) -> int:
    """Number of parameter elements that require gradients."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def train_mode(model: nn.Module, *, trunk_bn_frozen: bool = False) -> nn.Module:
    """``model.train()``, but BatchNorm layers whose parameters are frozen stay in eval.

    Frozen blocks must keep their ImageNet running statistics; updating them from
    small, skewed batches silently shifts features the head was trained on. With
    ``trunk_bn_frozen`` every BatchNorm of the trunk (``model.features``) stays in eval,
    unfrozen blocks included: their scale and shift still train, their statistics do not.
    """
    model.train()
    trunk = {id(m) for m in unwrap(model).features.modules()} if trunk_bn_frozen else set()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            if id(m) in trunk or not any(p.requires_grad for p in m.parameters(recurse=False)):
                m.eval()
    return model


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model inside a DistributedDataParallel (or DataParallel) wrapper."""
    return model.module if hasattr(model, "module") else model
