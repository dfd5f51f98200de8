"""The model bundle: a folder that training writes and scoring reads.

Layout::

    model.pt        state dict of the MobileNetV2 with its binary head
    config.json     architecture, image size, normalization, label meaning, threshold, versions
    metrics.json    validation metrics (and training history when training wrote it)
    model.onnx      optional: the same model for ONNX Runtime (dynamic batch), see export_onnx
    model.int8.onnx optional: statically quantized (QDQ, per-channel) copy
    calibration.json optional: the images int8 was calibrated and evaluated on

Both ONNX files record the sha256 of the ``model.pt`` they were made from
(:data:`ONNX_SOURCE_KEY` in their metadata), so scoring can tell an ONNX file left from
an earlier model from a current one.
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pyarrow.fs as pafs

if TYPE_CHECKING:  # torch is imported where weights are written or read: reading a config
    import torch   # (ONNX scoring actors) must not cost torch's import
    from torch import nn

from artifact_core.config import ARCHITECTURE, HEADS, IMAGENET_MEAN, IMAGENET_STD
from artifact_core.labels import LABEL_NAMES
from artifact_core.storage import file_sha256, is_uri, resolve

#: the newest format this version reads; 2 = the model also scores the mirrored image
#: (``test_time_flip``), which a reader of format 1 would silently skip; 3 = several per-cell
#: classifiers (``head_members``), which an older reader cannot build
BUNDLE_FORMAT = 3
WEIGHTS_FILE = "model.pt"
CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.json"
ONNX_FILE = "model.onnx"
ONNX_INT8_FILE = "model.int8.onnx"
CALIBRATION_FILE = "calibration.json"
#: key in an ONNX model's metadata_props: sha256 of the model.pt it was exported from
ONNX_SOURCE_KEY = "artifact_core.model_pt_sha256"

# (uri, size, mtime) -> sha256: each version of a model.pt is hashed once per process
# (every scoring actor and lane checks its ONNX model against it).
_WEIGHTS_SHA256: dict[tuple[str, int | None, int | None], str] = {}


@dataclass
class BundleConfig:
    """What a scorer needs to rebuild and use the model without guessing."""

    image_size: int = 224
    threshold: float = 0.5
    dropout: float = 0.2
    num_outputs: int = 1
    architecture: str = ARCHITECTURE
    #: model.HEADS; bundles written before the local head existed have the global one
    head: str = "global"
    mean: list[float] = field(default_factory=lambda: list(IMAGENET_MEAN))
    std: list[float] = field(default_factory=lambda: list(IMAGENET_STD))
    labels: dict[str, str] = field(default_factory=lambda: {str(k): v for k, v in LABEL_NAMES.items()})
    output: str = "sigmoid(logit) = P(class 1, artifact-free); class 1 when it is >= threshold"
    train_config: dict[str, Any] = field(default_factory=dict)
    #: where the starting weights came from (torchvision cache, download, the shipped copy, a file);
    #: None in bundles written before it was recorded.
    weights_source: str | None = None
    versions: dict[str, str] = field(default_factory=dict)
    #: local and multiscale heads: the model also scores the mirrored image and keeps the
    #: lower "artifact-free" logit (the threshold was tuned on those scores)
    test_time_flip: bool = False
    #: local and multiscale heads: independent per-cell classifiers whose image logits are averaged
    head_members: int = 1
    format: int = 1


@dataclass
class Bundle:
    """A loaded bundle: the model in eval mode plus its config and metrics."""

    model: nn.Module
    config: BundleConfig
    metrics: dict[str, Any]
    path: str


def _versions() -> dict[str, str]:
    import torch
    import torchvision

    from artifact_core import __version__
    out = {"artifact_core": __version__, "torch": torch.__version__,
           "torchvision": torchvision.__version__, "python": platform.python_version()}
    try:
        import ray
        out["ray"] = ray.__version__
    except ImportError:  # scoring a bundle does not need Ray
        pass
    return out


def write_json_atomic(path: str, obj: Any) -> None:
    """Write JSON via a temporary file and a rename: readers never see half a file."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, default=float)
    os.replace(tmp, path)


def save_bundle(out_dir: str, model: nn.Module, config: BundleConfig,
                metrics: dict[str, Any] | None = None) -> str:
    """Write ``model.pt``, ``config.json`` and ``metrics.json`` into ``out_dir``.

    Returns:
        ``out_dir``.
    """
    import torch

    from artifact_core.model import head_name, unwrap
    if config.architecture != ARCHITECTURE:
        raise ValueError(f"unsupported architecture {config.architecture!r}; expected {ARCHITECTURE!r}")
    head = head_name(unwrap(model))
    if config.head != head:
        raise ValueError(f"the model has the {head} head but the bundle config says {config.head!r}")
    if config.test_time_flip != bool(getattr(unwrap(model), "test_time_flip", False)):
        raise ValueError(f"the bundle config says test_time_flip={config.test_time_flip}, the model does not")
    if config.head_members != int(getattr(unwrap(model), "members", 1)):
        raise ValueError(f"the bundle config says head_members={config.head_members}, "
                         f"the model has {getattr(unwrap(model), 'members', 1)}")
    os.makedirs(out_dir, exist_ok=True)
    config.versions = config.versions or _versions()
    config.format = 3 if config.head_members > 1 else 2 if config.test_time_flip else 1
    state = {k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()}
    tmp = os.path.join(out_dir, WEIGHTS_FILE + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, os.path.join(out_dir, WEIGHTS_FILE))
    write_json_atomic(os.path.join(out_dir, CONFIG_FILE), config.__dict__)
    write_json_atomic(os.path.join(out_dir, METRICS_FILE), metrics or {})
    return out_dir


def read_bundle_config(path: str) -> BundleConfig:
    """The config of a bundle folder (local, or a URI such as ``s3://``), without building the model.

    Raises:
        FileNotFoundError: the folder or one of its files is missing.
        ValueError: the config is not a bundle this version can read.
    """
    bundle = resolve(path)
    if not bundle.is_dir():
        raise FileNotFoundError(f"model bundle {path!r} does not exist (expected a folder with {WEIGHTS_FILE} and {CONFIG_FILE})")
    for name in (WEIGHTS_FILE, CONFIG_FILE):
        if bundle.join(name).info().type != pafs.FileType.File:
            raise FileNotFoundError(f"model bundle {path!r} has no {name}")
    raw = json.loads(bundle.join(CONFIG_FILE).read_text())
    known = set(BundleConfig.__dataclass_fields__)
    config = BundleConfig(**{k: v for k, v in raw.items() if k in known})
    if config.format > BUNDLE_FORMAT or config.architecture != ARCHITECTURE or config.head not in HEADS:
        raise ValueError(f"{path!r}: bundle format {config.format} / architecture {config.architecture!r} "
                         f"/ head {config.head!r} is not readable here "
                         f"(expected format <= {BUNDLE_FORMAT}, {ARCHITECTURE!r}, a head in {HEADS})")
    return config


def weights_sha256(path: str) -> str:
    """sha256 of a bundle's ``model.pt`` (local folder or URI), hashed once per process per version of the file.

    Raises:
        FileNotFoundError: the bundle has no ``model.pt``.
    """
    weights = resolve(path).join(WEIGHTS_FILE)
    info = weights.info()
    if info.type != pafs.FileType.File:
        raise FileNotFoundError(f"model bundle {path!r} has no {WEIGHTS_FILE}")
    # Size and modification time in the key: a model.pt rewritten in place is hashed again.
    key = (weights.uri, info.size, info.mtime_ns)
    if key not in _WEIGHTS_SHA256:
        _WEIGHTS_SHA256[key] = file_sha256(weights)
    return _WEIGHTS_SHA256[key]


def update_metrics(path: str, key: str, value: Any) -> dict[str, Any]:
    """Set ``metrics[key] = value`` in a bundle's ``metrics.json`` (atomically); returns the metrics."""
    metrics_path = os.path.join(path, METRICS_FILE)
    metrics: dict[str, Any] = {}
    if os.path.isfile(metrics_path):
        with open(metrics_path) as f:
            metrics = json.load(f)
    metrics[key] = value
    write_json_atomic(metrics_path, metrics)
    return metrics


def _download_bundle(uri: str, local: str) -> None:
    """Copy a bundle's files from a URI (``s3://``...) into the local folder ``local``."""
    remote = resolve(uri)
    if not remote.is_dir():
        raise FileNotFoundError(f"model bundle {uri!r} does not exist (expected a folder with {WEIGHTS_FILE} and {CONFIG_FILE})")
    for name in (WEIGHTS_FILE, CONFIG_FILE, METRICS_FILE):
        src = remote.join(name)
        if src.exists():
            with src.fs.open_input_stream(src.path) as f, open(os.path.join(local, name), "wb") as out:
                out.write(f.read())


def load_bundle(path: str, *, device: str | torch.device = "cpu") -> Bundle:
    """Rebuild the model from a bundle folder (local, or a URI downloaded first), in eval mode on ``device``.

    Raises:
        FileNotFoundError: the folder or one of its files is missing.
        ValueError: the config is not a bundle this version can read.
    """
    if is_uri(path) and not resolve(path).is_local:
        with tempfile.TemporaryDirectory() as tmp:
            _download_bundle(path, tmp)
            bundle = load_bundle(tmp, device=device)
        bundle.path = path
        return bundle
    import torch

    from artifact_core.model import build_model
    path = resolve(path).path  # file:// URIs become local paths
    config = read_bundle_config(path)
    model = build_model(weights="none", dropout=config.dropout, num_outputs=config.num_outputs, head=config.head,
                        test_time_flip=config.test_time_flip, members=config.head_members)
    state = torch.load(os.path.join(path, WEIGHTS_FILE), map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    metrics = {}
    metrics_path = os.path.join(path, METRICS_FILE)
    if os.path.isfile(metrics_path):
        with open(metrics_path) as f:
            metrics = json.load(f)
    return Bundle(model=model.to(device).eval(), config=config, metrics=metrics, path=os.path.abspath(path))
