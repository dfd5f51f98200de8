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
an earlier model from a current one; config.json records it too (``weights_sha256``) and is
written last, so a bundle whose export was interrupted, or whose files come from two exports,
refuses to load instead of pairing new weights with an old threshold.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import pickle
import platform
import re
import tempfile
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pyarrow.fs as pafs

if TYPE_CHECKING:  # torch is imported where weights are written or read: reading a config
    import torch   # (ONNX scoring actors) must not cost torch's import
    from torch import nn

from artifact_core.config import ARCHITECTURE, HEADS, IMAGENET_MEAN, IMAGENET_STD, TRUNK_HEADS
from artifact_core.labels import LABEL_NAMES
from artifact_core.storage import Location, file_sha256, is_uri, redact_uri, resolve

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
    #: sha256 of the model.pt written with this config; None in bundles written before it was recorded
    weights_sha256: str | None = None
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
    # An earlier bundle's config goes first and the new one comes last: a write killed midway
    # leaves no config.json (or one naming other weights) rather than new weights with an old
    # threshold, also where that config is too old to record its weights.
    config_path = os.path.join(out_dir, CONFIG_FILE)
    if os.path.lexists(config_path):
        os.remove(config_path)
    # So do the files an earlier export derived from its model (ONNX, int8 calibration set):
    # a kill before the new ones are made must not leave them beside the new weights.
    for name in OPTIONAL_FILES:
        if os.path.lexists(os.path.join(out_dir, name)):
            os.remove(os.path.join(out_dir, name))
    tmp = os.path.join(out_dir, WEIGHTS_FILE + ".tmp")
    torch.save(state, tmp)
    config.weights_sha256 = file_sha256(resolve(tmp))
    os.replace(tmp, os.path.join(out_dir, WEIGHTS_FILE))
    write_json_atomic(os.path.join(out_dir, METRICS_FILE), metrics or {})
    write_json_atomic(config_path, config.__dict__)
    return out_dir


#: Files of a bundle that an export writes only when it can (ONNX); a new export deletes them first.
OPTIONAL_FILES = (ONNX_FILE, ONNX_INT8_FILE, CALIBRATION_FILE)


def upload_bundle(local_dir: str, dest: Location) -> None:
    """Copy the bundle written in ``local_dir`` to ``dest`` (object storage), replacing the one there.

    The destination's config.json and ONNX files go first and config.json comes back last:
    a copy killed midway leaves a bundle that refuses to load, and an ONNX export that failed
    or was skipped this time leaves no ONNX model of earlier weights behind.
    """
    names = sorted(n for n in os.listdir(local_dir) if os.path.isfile(os.path.join(local_dir, n)))
    if CONFIG_FILE not in names or WEIGHTS_FILE not in names:
        raise FileNotFoundError(f"{local_dir} is not a complete bundle (expected {WEIGHTS_FILE} and {CONFIG_FILE})")
    for name in (CONFIG_FILE, *OPTIONAL_FILES):
        dest.join(name).remove()
    for name in [n for n in names if n != CONFIG_FILE] + [CONFIG_FILE]:
        dest.join(name).upload(os.path.join(local_dir, name))


def read_bundle_config(path: str) -> BundleConfig:
    """The config of a bundle folder (local, or a URI such as ``s3://``), without building the model.

    Every field is checked, and a config that records its ``model.pt`` (``weights_sha256``)
    must sit beside that very file.

    Raises:
        FileNotFoundError: the folder or one of its files is missing.
        ValueError: the config is not a bundle this version can read (naming the file and the
            field), or belongs to other weights than the bundle's ``model.pt``.
    """
    return _read_config(resolve(path), redact_uri(path))  # (messages reach logs: no credentials)


def _read_config(bundle: Location, shown: str) -> BundleConfig:
    """:func:`read_bundle_config` of ``bundle``, whose errors call it ``shown``."""
    if not bundle.is_dir():
        raise FileNotFoundError(f"model bundle {shown!r} does not exist (expected a folder with {WEIGHTS_FILE} and {CONFIG_FILE})")
    for name in (WEIGHTS_FILE, CONFIG_FILE):
        if bundle.join(name).info().type != pafs.FileType.File:
            hint = (" (config.json is written last: an export that was interrupted leaves none; rerun the "
                    "training job with the same --storage-path and --name to export it again)"
                    if name == CONFIG_FILE else "")
            raise FileNotFoundError(f"model bundle {shown!r} has no {name}{hint}")
    where = f"{shown.rstrip('/')}/{CONFIG_FILE}"
    try:
        raw = json.loads(bundle.join(CONFIG_FILE).read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{where} is not readable JSON ({exc}); export the bundle again") from exc
    if not isinstance(raw, dict):
        raise ValueError(f"{where} holds a {type(raw).__name__}, expected an object of bundle settings")
    known = set(BundleConfig.__dataclass_fields__)
    config = BundleConfig(**{k: v for k, v in raw.items() if k in known})
    if not _is_int(config.format) or config.format > BUNDLE_FORMAT or config.architecture != ARCHITECTURE \
            or config.head not in HEADS:
        raise ValueError(f"{shown!r}: bundle format {config.format!r} / architecture {config.architecture!r} "
                         f"/ head {config.head!r} is not readable here "
                         f"(expected format <= {BUNDLE_FORMAT}, {ARCHITECTURE!r}, a head in {HEADS})")
    _check_fields(config, where)
    if config.weights_sha256 is not None:
        _check_weights(config, weights_sha256(bundle.uri), shown)
    return config


def _check_weights(config: BundleConfig, actual: str, shown: str) -> None:
    """Refuse weights whose sha256 (``actual``) is not the one ``config`` was written with."""
    if config.weights_sha256 is not None and actual != config.weights_sha256:
        raise ValueError(
            f"model bundle {shown!r}: its {WEIGHTS_FILE} (sha256 {actual[:12]}...) is not the one its "
            f"{CONFIG_FILE} was written with (sha256 {config.weights_sha256[:12]}...): an export was "
            f"interrupted, or the files come from two exports. Export it again: rerun the training job "
            f"with the same --storage-path and --name (it resumes and exports), or copy the whole folder again")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _is_rgb(v: Any, *, positive: bool = False) -> bool:
    return isinstance(v, list) and len(v) == 3 and all(_is_number(x) and (x > 0 or not positive) for x in v)


def _check_fields(config: BundleConfig, where: str) -> None:
    """Refuse a config value scoring would misuse (a NaN threshold flags every image).

    Raises:
        ValueError: naming ``where`` (the config file), the field, what it must be and its value.
    """
    checks = [
        ("format", config.format >= 1, f"a whole number in 1..{BUNDLE_FORMAT}"),
        ("threshold", _is_number(config.threshold) and 0 <= config.threshold <= 1, "a finite number in [0, 1]"),
        ("image_size", _is_int(config.image_size) and config.image_size >= 32, "a whole number of pixels, at least 32"),
        ("dropout", _is_number(config.dropout) and 0 <= config.dropout < 1, "a number in [0, 1)"),
        ("num_outputs", _is_int(config.num_outputs) and config.num_outputs == 1, "1 (one logit: artifact-free)"),
        ("head_members", _is_int(config.head_members) and 1 <= config.head_members <= 64
         and (config.head_members == 1 or config.head in TRUNK_HEADS),
         f"a whole number in 1..64 (1 for the {config.head} head)" if config.head not in TRUNK_HEADS
         else "a whole number in 1..64"),
        ("test_time_flip", isinstance(config.test_time_flip, bool)
         and (not config.test_time_flip or config.head in TRUNK_HEADS),
         f"false for the {config.head} head" if config.head not in TRUNK_HEADS else "true or false"),
        ("mean", _is_rgb(config.mean), "a list of 3 finite numbers (R, G, B)"),
        ("std", _is_rgb(config.std, positive=True), "a list of 3 finite numbers above 0 (R, G, B)"),
        ("labels", isinstance(config.labels, dict), "an object"),
        ("train_config", isinstance(config.train_config, dict), "an object"),
        ("versions", isinstance(config.versions, dict), "an object"),
        ("weights_sha256", config.weights_sha256 is None
         or (isinstance(config.weights_sha256, str) and re.fullmatch(r"[0-9a-f]{64}", config.weights_sha256)),
         "the sha256 of model.pt (64 hex digits)"),
    ]
    for name, ok, expected in checks:
        if not ok:
            raise ValueError(f"{where}: {name} must be {expected}, got {getattr(config, name)!r}; "
                             f"export the bundle again")


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


def read_metrics(path: str) -> dict[str, Any]:
    """A local bundle's ``metrics.json`` ({} when it has none)."""
    metrics_path = os.path.join(path, METRICS_FILE)
    if not os.path.isfile(metrics_path):
        return {}
    with open(metrics_path) as f:
        return json.load(f)


def update_metrics(path: str, key: str, value: Any) -> dict[str, Any]:
    """Set ``metrics[key] = value`` in a bundle's ``metrics.json`` (atomically); returns the metrics."""
    metrics = read_metrics(path)
    metrics[key] = value
    write_json_atomic(os.path.join(path, METRICS_FILE), metrics)
    return metrics


def _download_bundle(uri: str, local: str) -> None:
    """Copy a bundle's files from a URI (``s3://``...) into the local folder ``local``."""
    remote = resolve(uri)
    if not remote.is_dir():
        raise FileNotFoundError(f"model bundle {redact_uri(uri)!r} does not exist (expected a folder with {WEIGHTS_FILE} and {CONFIG_FILE})")
    for name in (WEIGHTS_FILE, CONFIG_FILE, METRICS_FILE):
        src = remote.join(name)
        if src.exists():
            with src.fs.open_input_stream(src.path) as f, open(os.path.join(local, name), "wb") as out:
                out.write(f.read())


def load_bundle(path: str, *, device: str | torch.device = "cpu") -> Bundle:
    """Rebuild the model from a bundle folder (local, or a URI downloaded first), in eval mode on ``device``.

    Raises:
        FileNotFoundError: the folder or one of its files is missing.
        ValueError: the config is not a bundle this version can read, or ``model.pt`` is not
            the model it describes (each naming the file).
    """
    if is_uri(path) and not resolve(path).is_local:
        with tempfile.TemporaryDirectory() as tmp:
            _download_bundle(path, tmp)
            bundle = _load(tmp, redact_uri(path), device)
        bundle.path = path
        return bundle
    local = resolve(path).path  # file:// URIs become local paths
    bundle = _load(local, path, device)
    bundle.path = os.path.abspath(local)
    return bundle


def _load(local: str, shown: str, device: str | torch.device) -> Bundle:
    """:func:`load_bundle` of the local folder ``local``, whose errors call it ``shown``."""
    import torch

    from artifact_core.model import build_model
    config = _read_config(resolve(local), shown)
    model = build_model(weights="none", dropout=config.dropout, num_outputs=config.num_outputs, head=config.head,
                        test_time_flip=config.test_time_flip, members=config.head_members)
    weights = f"{shown.rstrip('/')}/{WEIGHTS_FILE}"
    # Hashed and loaded from one read: an export of the same run in between must not pair
    # these weights with the other export's config (threshold, flip, head).
    with open(os.path.join(local, WEIGHTS_FILE), "rb") as f:
        data = f.read()
    _check_weights(config, hashlib.sha256(data).hexdigest(), shown)
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        model.load_state_dict(state)
    except (RuntimeError, TypeError, ValueError, KeyError, AttributeError, EOFError, OSError,
            pickle.UnpicklingError) as exc:
        if isinstance(exc, OSError) and not isinstance(exc, EOFError) and exc.errno is not None:
            raise  # (missing, no permission, I/O: not a model mismatch)
        if isinstance(exc, pickle.UnpicklingError):
            # torch's own advice would be to load with weights_only=False: never for a bundle
            raise ValueError(f"{weights} holds pickled objects, not a state dict of tensors; it is not loaded "
                             f"(a bundle's weights are a state dict: export the bundle again)") from None
        detail = " ".join(str(exc).split())
        raise ValueError(f"{weights} is not the model its {CONFIG_FILE} describes (head {config.head!r}, "
                         f"{config.head_members} member(s), format {config.format}): {type(exc).__name__}: "
                         f"{detail[:400]}{'...' if len(detail) > 400 else ''}; export the bundle again") from exc
    metrics: dict[str, Any] = {}
    metrics_path = os.path.join(local, METRICS_FILE)
    if os.path.isfile(metrics_path):
        try:
            with open(metrics_path) as f:
                metrics = json.load(f)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"{shown.rstrip('/')}/{METRICS_FILE} is not readable JSON ({exc})") from exc
    return Bundle(model=model.to(device).eval(), config=config, metrics=metrics, path=local)
