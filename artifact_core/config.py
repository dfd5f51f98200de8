"""The typed configurations of the jobs (train, sweep, score) and their command-line flags.

Defaults live in the dataclasses only; the flags read them from there."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

from artifact_core.storage import folder_name, is_uri, redact_uri


#: Validation metrics that may drive selection (``--select-metric``); every epoch reports all
#: of them and higher is better for each.
SELECT_METRICS = ("val_ap_artifact", "val_roc_auc", "val_micro_f1", "val_macro_f1",
                  "val_f1_artifact", "val_recall_artifact")

#: The network every bundle holds (torchvision's MobileNetV2) and the normalization it expects.
ARCHITECTURE = "mobilenet_v2"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: ``--head`` choices. ``multiscale``: MobileNetV2 up to the end of its stride-16 stage, with
#: the stride-8 stage's map pooled onto the same grid beside it, a small per-location
#: classifier and top-k pooling (small defects); ``local``: the same without the stride-8 map;
#: ``global``: the whole network, global average pooling and a linear layer (torchvision's
#: classifier layout).
HEADS = ("multiscale", "local", "global")
#: ``--finetune-schedule`` choices (see train_loop.scheduled_lr).
FINETUNE_SCHEDULES = ("cosine", "constant")
#: ``--finetune-bn`` choices.
FINETUNE_BN = ("frozen", "batch")
#: Heads built on the stride-16 trunk (:data:`LOCAL_TRUNK_BLOCKS` blocks).
TRUNK_HEADS = ("multiscale", "local")
#: Blocks the local head keeps: 0..13 end the 96-channel stage at stride 16. The deeper
#: stride-32 blocks see a 1024 px face through 32 px cells and average a small defect away:
#: a linear probe on them finds none of the subtle demo defects, one on blocks 7..13 does.
LOCAL_TRUNK_BLOCKS = 14
#: The block whose output (the end of the stride-8 stage, 32 channels) the multiscale head
#: adds: probes on frozen ImageNet features at 448 px found small defects better there than
#: at stride 16, and best in both together.
MULTISCALE_TAP_BLOCK = 6


def feature_blocks(head: str) -> int:
    """Blocks in ``model.features`` for a head: the most ``--unfreeze-depth`` can unfreeze."""
    return LOCAL_TRUNK_BLOCKS if head in TRUNK_HEADS else 19


#: ``--image-size auto``: the training images' own short side (median of a sample), rounded
#: down to a multiple of 32 and kept within these bounds. Never upsampling saves compute on
#: small images; the cap keeps a 1024 px folder affordable on CPUs. Measured on the subtle
#: demo data (1024 px faces, few-pixel defects): frozen-feature probes score test AP <= 0.18
#: at 224 px, 0.70 at 448 and 0.77 at 640; trained end to end with phase 2 on the plain
#: cached views, 768 px found 84-90 % of the held-out artifacts at micro F1 0.960-0.978 (four
#: runs; 448 px: 72-76 % at 0.970-0.972) and raised test AP from 0.85 to 0.87-0.92, at 3.8x
#: the training and 2.7x the scoring time (``--image-size 448`` trades it back).
AUTO_IMAGE_SIZE_MIN = 224
AUTO_IMAGE_SIZE_MAX = 768


def auto_image_size(native_side: int | None) -> int:
    """The input size ``--image-size auto`` picks for images whose short side is ``native_side``
    (None: unknown, the lower bound)."""
    if not native_side:
        return AUTO_IMAGE_SIZE_MIN
    return max(AUTO_IMAGE_SIZE_MIN, min(AUTO_IMAGE_SIZE_MAX, native_side // 32 * 32))


def effective_members(members: Any, head: Any) -> int:
    """How many per-cell classifiers ``--head-members`` gives the model of ``head``: the global
    head has one."""
    return int(members) if head in TRUNK_HEADS and members is not None else 1


def mirror_pass_acts(flag: Any, head: Any) -> bool:
    """Whether ``--test-time-flip`` changes the model of ``head``: only the trunk heads flip."""
    return bool(flag) and head in TRUNK_HEADS


def parse_image_size(value: str) -> int | str:
    """``--image-size`` values: ``auto`` or a whole number of pixels."""
    if value == "auto":
        return value
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'auto' or a number of pixels, got {value!r}") from None


#: Where the demo lives when no data folder is given: <storage>/demo_data, run <storage>/demo.
DEMO_DATA_FOLDER = "demo_data"
DEMO_RUN_NAME = "demo"


@dataclass
class TrainConfig:
    """Everything that defines a training run; saved with the run and inside the bundle."""

    data_dir: str | None = None
    storage_path: str = "runs"
    name: str | None = None
    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    #: "multiscale" or "local" (per-location evidence, top-k pooled; finds small defects) or
    #: "global" (see HEADS)
    head: str = "multiscale"
    batch_size: int = 16
    #: pixels, or "auto" (resolved by prepare_run from the data: see auto_image_size)
    image_size: int | str = "auto"
    # Phase 1 trains on cached trunk features (head_cache_views), so its epochs are cheap; the
    # local head needs many of them to find a subtle defect among ~100 positives.
    head_epochs: int = 60
    finetune_epochs: int = 4
    lr: float = 1e-3
    finetune_lr: float = 3e-4
    #: phase 2's learning rate over its steps: "cosine" (a one-epoch warm-up, then a cosine
    #: decay) or "constant"
    finetune_schedule: str = "cosine"
    #: the unfrozen blocks' BatchNorm in phase 2: "frozen" (running statistics kept, scale and
    #: shift train) or "batch" (statistics from each worker's batches)
    finetune_bn: str = "frozen"
    unfreeze_depth: int = 6
    weight_decay: float = 1e-4
    dropout: float = 0.2
    val_fraction: float = 0.2
    seed: int = 42
    weights: str = "imagenet"
    max_failures: int = 1
    patience: int = 3
    #: phase 1 computes the frozen trunk's features for this many views of each image once
    #: (see head_cache_augment) and trains the head on them; 0 = decode and run the trunk every epoch
    head_cache_views: int = 2
    #: phase 1's cached views: the plain image as validation and scoring see it and, with two
    #: views, its mirror; True: augmented views (the train preset). On the subtle data the
    #: plain views made fewer test errors at 448 and 768 px (at 448 px they ranked the test
    #: set worse: AP 0.815 against 0.847), and the 768 px default recipe was measured with
    #: them. Ray Data ingest streams augmented images whatever this says.
    head_cache_augment: bool = False
    #: MiB of memory each worker may spend on cached trunk features (phase 1's views, phase
    #: 2's validation). 2 GiB holds the two views of about 1,500 training images per worker,
    #: and their validation share, at 768 px. Phase 1's training views over it go to disk
    #: (:mod:`artifact_core.spill`); otherwise a phase whose cache would be larger streams images.
    head_cache_mb: int = 2048
    loader_workers: int = 0
    #: MiB of decoded, resized images each training worker keeps for later epochs (0 = off)
    decode_cache_mb: int = 1024
    skip_unlabeled: bool = False
    demo_train_images: int = 600
    # Drives checkpoint choice, patience, ASHA and the best sweep trial. Average precision
    # of the artifact class by default: under a 1:9 imbalance micro F1 rewards a model that
    # never finds an artifact, AP cannot be won that way. Allowed: SELECT_METRICS.
    select_metric: str = "val_ap_artifact"
    # > 0: draw training images with replacement so that this share are artifacts (the loss
    # weights then balance the drawn mix); 0: every image once per epoch, class-weighted loss.
    oversample: float = 0.0
    #: seconds to wait for an autoscaler to add nodes; None: 600 with an autoscaler, 0 without
    wait_for_resources: float | None = None
    #: delete what an earlier run wrote in <storage>/<name> and start again (only a run folder)
    overwrite: bool = False
    #: training ingest: "dataloader" (decode in the worker) or "ray-data" (Ray Data streaming_split)
    ingest: str = "dataloader"
    #: local and multiscale heads: validation, the bundle and scoring also score each image's
    #: mirror and keep the stronger artifact evidence (twice the inference)
    test_time_flip: bool = True
    #: local and multiscale heads: independent per-cell classifiers trained side by side on
    #: the same features, their image logits averaged (seeds alone move a single head's test
    #: AP by 0.1; the mean of several is steadier)
    head_members: int = 5

    @property
    def ensemble_members(self) -> int:
        """Per-cell classifiers in the model this config builds (1 for the global head)."""
        return effective_members(self.head_members, self.head)

    @property
    def flips_at_test_time(self) -> bool:
        """Whether the model this config builds scores the mirrored image too (not the global head)."""
        return mirror_pass_acts(self.test_time_flip, self.head)

    def validate_paths(self) -> "TrainConfig":
        """Raise ``ValueError`` for an empty ``--data-dir`` (None: the demo's), ``--name`` (None:
        the data folder's), ``--storage-path`` or ``--weights``."""
        for flag, value, expected in (("--data-dir", self.data_dir, "a folder path or URI (leave it out for the demo)"),
                                      ("--name", self.name, "a folder name (leave it out for the data folder's name)"),
                                      ("--storage-path", self.storage_path, "a folder path or URI"),
                                      ("--weights", self.weights, "imagenet, torchvision, bundled, none or a file")):
            if value is not None and not (isinstance(value, str) and value.strip()):
                raise ValueError(f"{flag} must be {expected}, got {value!r}")
        return self

    def validate(self) -> "TrainConfig":
        """Raise ``ValueError`` naming the first flag out of range."""
        self.validate_paths()
        name_problem = None if self.name is None else run_name_problem(self.name, in_uri=is_uri(self.storage_path))
        checks = [
            ("--num-workers", self.num_workers >= 1, "at least 1"),
            # (Ray's granularity is 1/10000 of a CPU: less rounds to nothing)
            ("--cpus-per-worker", self.cpus_per_worker >= 0.0001 and math.isfinite(self.cpus_per_worker),
             "0.0001 or more and finite"),
            ("--batch-size", self.batch_size >= 1, "at least 1"),
            ("--image-size", self.image_size == "auto" or (isinstance(self.image_size, int) and self.image_size >= 32),
             "'auto' or at least 32"),
            ("--head-epochs", self.head_epochs >= 0, "0 or more"),
            ("--finetune-epochs", self.finetune_epochs >= 0, "0 or more"),
            ("--head-epochs/--finetune-epochs", self.head_epochs + self.finetune_epochs >= 1, "at least 1 epoch in total"),
            ("--lr", self.lr > 0 and math.isfinite(self.lr), "above 0 and finite"),
            ("--finetune-lr", self.finetune_lr > 0 and math.isfinite(self.finetune_lr), "above 0 and finite"),
            ("--weight-decay", self.weight_decay >= 0 and math.isfinite(self.weight_decay), "0 or more and finite"),
            ("--finetune-schedule", self.finetune_schedule in FINETUNE_SCHEDULES, f"one of {', '.join(FINETUNE_SCHEDULES)}"),
            ("--finetune-bn", self.finetune_bn in FINETUNE_BN, f"one of {', '.join(FINETUNE_BN)}"),
            ("--head", self.head in HEADS, f"one of {', '.join(HEADS)}"),
            # (0 with phase-2 epochs would be a second head phase without phase 2's schedule)
            ("--unfreeze-depth", (1 if self.finetune_epochs > 0 else 0) <= self.unfreeze_depth
             <= feature_blocks(self.head),
             f"in {1 if self.finetune_epochs > 0 else 0}..{feature_blocks(self.head)} for the {self.head} head"
             f"{' with phase-2 epochs' if self.finetune_epochs > 0 else ''}"),
            ("--val-fraction", 0 < self.val_fraction < 1, "in (0, 1)"),
            ("--seed", 0 <= self.seed < 2**32, "in 0..2**32-1"),
            ("--loader-workers", self.loader_workers >= 0, "0 or more"),
            ("--max-failures", self.max_failures >= -1, "-1 (unlimited) or more"),
            ("--patience", self.patience >= 0, "0 (off) or more"),
            ("--head-cache-views", self.head_cache_views >= 0, "0 (off) or more"),
            ("--head-cache-views", self.head_cache_augment or self.head_cache_views in (0, 1, 2),
             "0, 1 (the plain image) or 2 (and its mirror) unless --head-cache-augment"),
            ("--head-cache-mb", self.head_cache_mb >= 0, "0 or more"),
            ("--head-members", 1 <= self.head_members <= 64, "in 1..64"),
            ("--decode-cache-mb", self.decode_cache_mb >= 0, "0 (off) or more"),
            ("--dropout", 0 <= self.dropout < 1, "in [0, 1)"),
            ("--select-metric", self.select_metric in SELECT_METRICS, f"one of {', '.join(SELECT_METRICS)}"),
            ("--oversample", 0 <= self.oversample < 1, "0 (off) or a share in (0, 1)"),
            # Ray Data's shards are the split as it is: the oversampler would never draw
            ("--oversample", self.oversample == 0 or self.ingest == "dataloader",
             "0 with --ingest ray-data (its shards are not oversampled)"),
            ("--wait-for-resources", self.wait_for_resources is None or self.wait_for_resources >= 0, "0 or more seconds"),
            ("--ingest", self.ingest in ("dataloader", "ray-data"), "'dataloader' or 'ray-data'"),
            ("--name", name_problem is None, f"one folder name, {name_problem}"),
        ]
        for flag, ok, expected in checks:
            if not ok:
                value = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
                key = flag.split("/")[0].lstrip("-").replace("-", "_")
                raise ValueError(f"{flag} must be {expected}, got {value.get(key)!r}")
        return self

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (JSON-safe)."""
        return dataclasses.asdict(self)

    def shareable_dict(self) -> dict[str, Any]:
        """:meth:`to_dict` without credentials in its URIs: for files that travel (bundles, sweep results)."""
        d = self.to_dict()
        for key in ("data_dir", "storage_path"):
            if isinstance(d.get(key), str):
                d[key] = redact_uri(d[key])
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        """Build from a dict, ignoring keys this version does not know."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def save(self, path: str) -> None:
        """Write as indented JSON."""
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=2)


WAIT_HELP = ("when the cluster is too small, how long to wait for its autoscaler to add nodes "
             "(asking it for what the job needs); 0 = fail at once (default: 600 with an autoscaler, 0 without)")


def add_training_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add every training flag (shared by jobs/train.py and jobs/tune.py)."""
    d = TrainConfig()
    g = parser.add_argument_group("data")
    g.add_argument("--data-dir", default=None,
                   help="folder of image_<idx>_<0|1>.<ext> files (default: generate demo data under --storage-path)")
    g.add_argument("--val-fraction", type=float, default=d.val_fraction, help="stratified validation share (default: %(default)s)")
    g.add_argument("--skip-unlabeled", action="store_true", help="skip files without a label in their name instead of failing")
    g.add_argument("--demo-train-images", type=int, default=d.demo_train_images,
                   help="training images generated when --data-dir is not given (default: %(default)s)")
    g = parser.add_argument_group("run")
    g.add_argument("--storage-path", default=d.storage_path,
                   help="where runs are written; shared storage (NFS, s3://) on multi-node clusters (default: ./%(default)s)")
    g.add_argument("--name", default=None, help="run name; rerunning with the same name resumes (default: demo, or the data folder's name; jobs/tune.py appends -sweep)")
    g.add_argument("--overwrite", action="store_true",
                   help="delete what an earlier run wrote in <storage-path>/<name> and start again")
    g.add_argument("--num-workers", type=int, default=d.num_workers, help="data-parallel workers (default: %(default)s)")
    g.add_argument("--use-gpu", action="store_true", help="one GPU per worker, mixed precision")
    g.add_argument("--cpus-per-worker", type=float, default=d.cpus_per_worker, help="CPUs reserved per worker (default: %(default)s)")
    g.add_argument("--ingest", choices=["dataloader", "ray-data"], default=d.ingest,
                   help="training ingest: a DataLoader per worker, or Ray Data streaming_split across "
                        "workers (decode in Ray Data tasks; leave CPUs free for them) (default: %(default)s)")
    g.add_argument("--loader-workers", type=int, default=d.loader_workers, help="DataLoader processes per worker (default: %(default)s)")
    g.add_argument("--decode-cache-mb", type=int, default=d.decode_cache_mb,
                   help="MiB of decoded, resized images each training worker keeps so later epochs neither read "
                        "nor decode them again (validation's shard first, then training images); not used with "
                        "--loader-workers; 0 = off (default: %(default)s)")
    g.add_argument("--wait-for-resources", type=float, default=d.wait_for_resources, metavar="SECONDS",
                   help=WAIT_HELP)
    g.add_argument("--max-failures", type=int, default=d.max_failures, help="worker-group restarts from the last checkpoint (default: %(default)s)")
    g.add_argument("--seed", type=int, default=d.seed, help="split and init seed (default: %(default)s)")
    g = parser.add_argument_group("model and optimisation")
    g.add_argument("--weights", default=d.weights, help="imagenet (torchvision's cached file, else download, else the copy shipped in the package) | "
                        "torchvision (cache or download only) | bundled (shipped copy only) | none | "
                        "PATH to a state dict (default: %(default)s)")
    g.add_argument("--image-size", type=parse_image_size, default=d.image_size,
                   help=f"square input size in pixels, or auto: the images' short side, kept within "
                        f"{AUTO_IMAGE_SIZE_MIN}..{AUTO_IMAGE_SIZE_MAX} (default: %(default)s)")
    g.add_argument("--batch-size", type=int, default=d.batch_size, help="per worker (default: %(default)s)")
    g.add_argument("--head-epochs", type=int, default=d.head_epochs, help="phase 1 epochs, backbone frozen (default: %(default)s)")
    g.add_argument("--finetune-epochs", type=int, default=d.finetune_epochs, help="phase 2 epochs (default: %(default)s)")
    g.add_argument("--lr", type=float, default=d.lr, help="phase 1 learning rate (default: %(default)s)")
    g.add_argument("--finetune-lr", type=float, default=d.finetune_lr, help="phase 2 learning rate (default: %(default)s)")
    g.add_argument("--finetune-schedule", choices=FINETUNE_SCHEDULES, default=d.finetune_schedule,
                   help="phase 2 learning-rate schedule: cosine (one epoch of linear warm-up, then a cosine decay "
                        "to 5%% of --finetune-lr) or constant (default: %(default)s)")
    g.add_argument("--finetune-bn", choices=FINETUNE_BN, default=d.finetune_bn,
                   help="BatchNorm of the unfrozen blocks in phase 2: frozen (ImageNet running statistics kept, "
                        "scale and shift train) or batch (statistics from each worker's batches) (default: %(default)s)")
    g.add_argument("--head", choices=HEADS, default=d.head,
                   help="multiscale: MobileNetV2 to stride 16 with its stride-8 map pooled beside it, a classifier per "
                        "16 px cell, top-k pooled (small defects, and a map of where they are); local: the same without "
                        "the stride-8 map; global: the whole network, average pooled (default: %(default)s)")
    g.add_argument("--unfreeze-depth", type=int, default=d.unfreeze_depth,
                   help="feature blocks unfrozen in phase 2, 0..14 (multiscale and local heads) or 0..19 (global) "
                        "(default: %(default)s)")
    g.add_argument("--weight-decay", type=float, default=d.weight_decay, help="AdamW weight decay (default: %(default)s)")
    g.add_argument("--dropout", type=float, default=d.dropout, help="dropout before the head (default: %(default)s)")
    g.add_argument("--patience", type=int, default=d.patience, help="epochs without a gain of --select-metric before a phase stops early, 0 = off (default: %(default)s)")
    g.add_argument("--head-cache-views", type=int, default=d.head_cache_views,
                   help="phase 1: run the frozen trunk over this many views of each image once (the plain image "
                        "and its mirror, augmented draws with --head-cache-augment) and "
                        "train the head on the cached features (see --head-cache-mb); "
                        "0 = every epoch from images (default: %(default)s)")
    g.add_argument("--head-cache-augment", action=argparse.BooleanOptionalAction, default=d.head_cache_augment,
                   help="phase 1's cached views are augmented (flip, rotation, shear, zoom, brightness); off: the "
                        "plain image and, with --head-cache-views 2, its mirror (default: off; --ingest ray-data "
                        "streams augmented images)")
    g.add_argument("--head-cache-mb", type=int, default=d.head_cache_mb,
                   help="MiB of cached trunk features each worker may hold (phase 1's views, phase 2's validation); "
                        "phase 1's training views over it go to a memory-mapped file in the temp dir (TMPDIR; CPU "
                        "workers, disk room permitting); else a phase that needs more streams images; "
                        "0 = always stream (default: %(default)s)")
    g.add_argument("--oversample", type=float, default=d.oversample,
                   help="share of artifact images among each epoch's draws, e.g. 0.3 (drawn with replacement; "
                        "the loss weights balance the drawn mix); 0 = off; not with --ingest ray-data "
                        "(default: %(default)s)")
    g.add_argument("--test-time-flip", action=argparse.BooleanOptionalAction, default=d.test_time_flip,
                   help="local and multiscale heads: validation, the bundle and scoring also score each image's mirror "
                        "and keep the stronger artifact evidence, at twice the inference (default: on)")
    g.add_argument("--head-members", type=int, default=d.head_members,
                   help="local and multiscale heads: independent per-cell classifiers trained side by side, their "
                        "image logits averaged; 1 = a single classifier (default: %(default)s)")
    g.add_argument("--select-metric", choices=SELECT_METRICS, default=d.select_metric,
                   help="validation metric that picks the checkpoint, drives patience, ASHA and the best sweep "
                        "trial (default: %(default)s, average precision of the artifact class)")
    return parser


#: Characters a run name may use under object storage: URI path characters that need no
#: escaping (RFC 3986 unreserved and sub-delims, ':' and '@').
URI_NAME_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~!$&'()*+,;=:@")


def run_name_problem(name: str, *, in_uri: bool = False) -> str | None:
    """Why ``name`` cannot be a run folder, or None.

    It is one path component. Under object storage (``in_uri``) it is also written into URIs
    that are parsed again, where ``#`` would start a fragment (silently cut off: two runs
    would share a folder), ``?`` a query and ``%`` an escape, and a space or a non-ASCII
    letter does not parse at all; there only :data:`URI_NAME_CHARS` are accepted.
    """
    if not name or name in (".", ".."):
        return "not empty, '.' or '..'"
    bad = sorted({c for c in name if c in "/\\" or ord(c) < 32 or ord(c) == 127
                  or (in_uri and c not in URI_NAME_CHARS)})
    if bad:
        return (f"without {', '.join(repr(c) for c in bad)}"
                + (" (under object storage: letters, digits and -._~!$&'()*+,;=:@ only)" if in_uri else ""))
    return None


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """Fill a :class:`TrainConfig` from parsed flags, with absolute paths and a run name."""
    cfg = TrainConfig.from_dict(vars(args))
    # An empty value (an unset shell variable) is an error, not the demo's data, the working
    # folder or random weights: checked before the paths are made absolute.
    cfg.validate_paths()
    cfg.storage_path = absolute_storage_path(cfg.storage_path)
    if cfg.data_dir:
        cfg.data_dir = absolute_storage_path(cfg.data_dir)  # a URI stays as it is
    if not cfg.name:
        cfg.name = folder_name(cfg.data_dir) if cfg.data_dir else DEMO_RUN_NAME
    return cfg


def absolute_storage_path(path: str) -> str:
    """Absolute local path, or a URI (``s3://``, ``gs://``...) unchanged.

    Ray Train workers change directory into the session folder, so a relative
    path would land somewhere else on every worker.
    """
    if is_uri(path):
        return path
    return os.path.abspath(os.path.expanduser(path))


@dataclass
class SweepConfig:
    """The search space and sweep settings; training settings live in ``base``."""

    base: TrainConfig
    num_samples: int = 4
    max_concurrent_trials: int | None = None
    lr_min: float = 1e-4
    lr_max: float = 1e-2
    finetune_lr_ratio_min: float = 0.03
    finetune_lr_ratio_max: float = 0.3
    unfreeze_depths: list[int] = field(default_factory=lambda: [2, 4, 6])
    lrs: list[float] | None = None  # a grid instead of log-uniform sampling
    image_sizes: list[int] | None = None  # a choice of input sizes instead of base.image_size
    scheduler: str = "asha"
    # None: phase 2's first epoch at the full rate (SweepConfig.resolved_grace_period). The
    # swept unfreeze depth and phase-2 rate act only in phase 2; rungs inside phase 1 would
    # stop trials on head-only epochs that those parameters never touched.
    grace_period: int | None = None
    resume: bool = False

    def resolved_grace_period(self) -> int:
        """``grace_period``, or by default the first phase-2 epoch at its full rate: the second
        (``head_epochs + 2``) under the cosine schedule, whose first epoch is its warm-up from
        0, when phase 2 has a third epoch left to run; else the first. Capped at the run's length."""
        b = self.base
        total = b.head_epochs + b.finetune_epochs
        warm_up = 1 if b.finetune_schedule == "cosine" and b.finetune_epochs >= 3 else 0
        g = self.grace_period if self.grace_period is not None else b.head_epochs + 1 + warm_up
        return max(1, min(g, total))

    def validate(self) -> "SweepConfig":
        """Raise ``ValueError`` naming the flag out of range."""
        self.base.validate()
        if self.num_samples < 1:
            raise ValueError(f"--num-samples must be at least 1, got {self.num_samples}")
        if not (0 < self.lr_min <= self.lr_max and math.isfinite(self.lr_max)):
            raise ValueError(f"need 0 < --lr-min <= --lr-max, both finite, got {self.lr_min} and {self.lr_max}")
        if self.lrs is not None and (not self.lrs or not all(math.isfinite(x) and x > 0 for x in self.lrs)):
            raise ValueError(f"--lrs must be learning rates above 0, got {self.lrs}")
        if not (0 < self.finetune_lr_ratio_min <= self.finetune_lr_ratio_max
                and math.isfinite(self.finetune_lr_ratio_max)):
            raise ValueError(f"need 0 < --finetune-lr-ratio-min <= --finetune-lr-ratio-max, both finite, got "
                             f"{self.finetune_lr_ratio_min} and {self.finetune_lr_ratio_max}")
        if self.max_concurrent_trials is not None and self.max_concurrent_trials < 1:
            raise ValueError(f"--max-concurrent-trials must be at least 1 (omit it for as many as fit), "
                             f"got {self.max_concurrent_trials}")
        blocks = feature_blocks(self.base.head)
        low = 1 if self.base.finetune_epochs > 0 else 0  # (see TrainConfig.validate)
        if not self.unfreeze_depths or any(not low <= d <= blocks for d in self.unfreeze_depths):
            raise ValueError(f"--unfreeze-depths must be values in {low}..{blocks} for the {self.base.head} head, "
                             f"got {self.unfreeze_depths}")
        if self.scheduler not in ("asha", "none"):
            raise ValueError(f"--scheduler must be 'asha' or 'none', got {self.scheduler!r}")
        if self.grace_period is not None and self.grace_period < 1:
            raise ValueError(f"--grace-period must be at least 1, got {self.grace_period}")
        if self.image_sizes is not None and (not self.image_sizes or any(s < 32 for s in self.image_sizes)):
            raise ValueError(f"--image-sizes must be values of at least 32, got {self.image_sizes}")
        return self


def add_sweep_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the sweep flags of jobs/tune.py (training flags come from :func:`add_training_args`)."""
    d = SweepConfig(base=TrainConfig())
    g = parser.add_argument_group("sweep")
    g.add_argument("--num-samples", type=int, default=d.num_samples, help="trials, or with --lrs trials per rate (default: %(default)s)")
    g.add_argument("--max-concurrent-trials", type=int, default=d.max_concurrent_trials,
                   help="(default: as many as fit the cluster)")
    g.add_argument("--lr-min", type=float, default=d.lr_min, help="phase-1 LR, log-uniform lower bound (default: %(default)s)")
    g.add_argument("--lr-max", type=float, default=d.lr_max, help="phase-1 LR upper bound (default: %(default)s)")
    g.add_argument("--lrs", type=float, nargs="+", default=d.lrs, help="a grid of phase-1 LRs instead of sampling")
    g.add_argument("--finetune-lr-ratio-min", type=float, default=d.finetune_lr_ratio_min,
                   help="phase-2 LR = phase-1 LR x ratio, log-uniform lower bound (default: %(default)s)")
    g.add_argument("--finetune-lr-ratio-max", type=float, default=d.finetune_lr_ratio_max, help="(default: %(default)s)")
    g.add_argument("--unfreeze-depths", type=int, nargs="+", default=d.unfreeze_depths,
                   help="choices of K (default: %(default)s)")
    g.add_argument("--scheduler", choices=["asha", "none"], default=d.scheduler, help="(default: %(default)s)")
    g.add_argument("--image-sizes", type=int, nargs="+", default=d.image_sizes,
                   help="choices of the square input size, e.g. 224 320 448 (default: --image-size only)")
    g.add_argument("--grace-period", type=int, default=d.grace_period,
                   help="epochs before ASHA may stop a trial (default: the first phase-2 epoch at the full "
                        "rate, where unfreeze depth and phase-2 LR act: --head-epochs + 2 under the cosine "
                        "schedule, whose first epoch is its warm-up, else + 1)")
    g.add_argument("--resume", action="store_true",
                   help="continue an interrupted sweep of the same --name (a plain rerun does too; this only "
                        "warns when there is nothing to continue)")
    return parser


def sweep_from_args(args: argparse.Namespace, base: TrainConfig) -> SweepConfig:
    """Fill a :class:`SweepConfig` from parsed ``jobs/tune.py`` flags. Without ``--name`` the
    sweep's folder is ``<run name>-sweep``, apart from a training run on the same data."""
    if args.name is None:
        base.name = f"{base.name}-sweep"
    names = {f.name for f in dataclasses.fields(SweepConfig)} - {"base"}
    return SweepConfig(base=base, **{k: v for k, v in vars(args).items() if k in names})


SCORE_ENGINES = ("auto", "torch", "onnx")
SCORE_PRECISIONS = ("fp32", "int8")
SCORE_PIPELINES = ("auto", "fused", "split")


@dataclass
class ScoreConfig:
    """Settings of one scoring run."""

    model: str
    input: str
    output: str
    batch_size: int = 64
    num_actors: int | None = None
    cpus_per_actor: float = 1.0
    use_gpu: bool = False
    threshold: float | None = None
    resume: bool = False
    overwrite: bool = False
    object_store_budget_mb: int = 512
    actor_memory_mb: int = 1024
    engine: str = "auto"  # auto: ONNX Runtime on CPU when the bundle has model.onnx, torch on GPU
    precision: str = "fp32"  # int8: the bundle's model.int8.onnx (ONNX Runtime, CPU)
    pipeline: str = "auto"  # fused: decode+infer in one actor; split: decode tasks -> actors; auto: measured
    report: bool | None = None  # the review page: None = when at most report_top images are flagged
    report_top: int = 500
    report_uncertain: int = 50
    #: seconds to wait for an autoscaler to add nodes; None: 600 with an autoscaler, 0 without
    wait_for_resources: float | None = None

    def validate(self) -> "ScoreConfig":
        """Raise ``ValueError`` naming the flag out of range (the paths are checked when opened)."""
        def finite(x: float | None) -> bool:
            return x is not None and math.isfinite(x)

        checks = [
            *((flag, isinstance(path, str) and path.strip() != "", "a folder path or URI", path)
              for flag, path in (("--model", self.model), ("--input", self.input), ("--output", self.output))),
            ("--batch-size", self.batch_size >= 1, "at least 1", self.batch_size),
            ("--num-actors", self.num_actors is None or self.num_actors >= 1, "at least 1", self.num_actors),
            ("--cpus-per-actor", finite(self.cpus_per_actor) and self.cpus_per_actor > 0, "above 0",
             self.cpus_per_actor),
            # (outside [0, 1] is allowed: above 1 flags every image, which tests and audits use)
            ("--threshold", self.threshold is None or finite(self.threshold), "a number", self.threshold),
            ("--object-store-budget-mb", self.object_store_budget_mb >= 1, "at least 1", self.object_store_budget_mb),
            ("--actor-memory-mb", self.actor_memory_mb >= 1, "at least 1", self.actor_memory_mb),
            ("--engine", self.engine in SCORE_ENGINES, f"one of {', '.join(SCORE_ENGINES)}", self.engine),
            ("--precision", self.precision in SCORE_PRECISIONS, f"one of {', '.join(SCORE_PRECISIONS)}",
             self.precision),
            ("--pipeline", self.pipeline in SCORE_PIPELINES, f"one of {', '.join(SCORE_PIPELINES)}", self.pipeline),
            ("--report-top", self.report_top >= 0, "0 or more", self.report_top),
            ("--report-uncertain", self.report_uncertain >= 0, "0 or more", self.report_uncertain),
            ("--wait-for-resources", self.wait_for_resources is None  # (inf: wait as long as it takes)
             or (not math.isnan(self.wait_for_resources) and self.wait_for_resources >= 0), "0 or more seconds",
             self.wait_for_resources),
        ]
        for flag, ok, expected, value in checks:
            if not ok:
                raise ValueError(f"{flag} must be {expected}, got {value!r}")
        return self


#: where the demo's training run writes (``jobs/train.py`` without arguments)
DEMO_STORAGE = TrainConfig().storage_path


def add_score_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add ``jobs/score.py``'s flags to ``p``; omitted paths mean the demo's (see :func:`score_from_args`)."""
    d = ScoreConfig(model="", input="", output="")
    p.add_argument("--model", default=None, help=f"model bundle folder (default: ./{DEMO_STORAGE}/{DEMO_RUN_NAME}/model)")
    p.add_argument("--input", default=None,
                   help=f"image folder, searched recursively; local path or pyarrow URI such as s3://bucket/dir "
                        f"(default: ./{DEMO_STORAGE}/{DEMO_DATA_FOLDER}/test)")
    p.add_argument("--output", default=None,
                   help=f"output folder (default: ./{DEMO_STORAGE}/{DEMO_RUN_NAME}/predictions, which the demo, run "
                        f"with neither --input nor --output, replaces)")
    p.add_argument("--labels", default=None,
                   help="optional CSV filename,label to report micro F1 against (default for the demo: its test_labels.csv)")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="images per model call (default: %(default)s)")
    p.add_argument("--num-actors", type=int, default=None,
                   help="predictor actors (default: fused, one per node or per GPU; split, one per GPU, "
                        "else the CPUs' share that inference takes when auto measured it, else half the "
                        "CPUs / --cpus-per-actor)")
    p.add_argument("--cpus-per-actor", type=float, default=d.cpus_per_actor, help="CPUs per predictor actor in the split pipeline (default: %(default)s)")
    p.add_argument("--use-gpu", action="store_true", help="one GPU per predictor actor")
    p.add_argument("--engine", choices=SCORE_ENGINES, default=d.engine,
                   help="inference engine; auto: ONNX Runtime on CPU when the bundle has model.onnx, "
                        "else PyTorch; PyTorch on GPU (default: %(default)s)")
    p.add_argument("--precision", choices=SCORE_PRECISIONS, default=d.precision,
                   help="int8: the bundle's model.int8.onnx in ONNX Runtime (CPU); see README (default: %(default)s)")
    p.add_argument("--pipeline", choices=SCORE_PIPELINES, default=d.pipeline,
                   help="fused: each actor decodes in threads while its engine runs, using its node's CPUs; "
                        "split: decode tasks feed predictor actors; auto: measures decode and inference "
                        "cost on a few files and picks (see README) (default: %(default)s)")
    p.add_argument("--object-store-budget-mb", type=int, default=d.object_store_budget_mb,
                   help="object store memory the pipeline's blocks may use; keeps memory flat (default: %(default)s)")
    p.add_argument("--wait-for-resources", type=float, default=d.wait_for_resources, metavar="SECONDS", help=WAIT_HELP)
    p.add_argument("--threshold", type=float, default=None, help="override the bundle's decision threshold")
    g = p.add_argument_group("review page (<output>/report/index.html)")
    r = g.add_mutually_exclusive_group()
    r.add_argument("--report", dest="report", action="store_const", const=True, default=d.report,
                   help="always write the page (with more than --report-top flagged: the top ones and a count of the rest)")
    r.add_argument("--no-report", dest="report", action="store_const", const=False, help="never write it")
    g.add_argument("--report-top", type=int, default=d.report_top,
                   help="flagged images shown, most confident first; without --report/--no-report the page is "
                        "written when at most this many are flagged (default: %(default)s)")
    g.add_argument("--report-uncertain", type=int, default=d.report_uncertain,
                   help="images closest to the threshold shown as well (default: %(default)s)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--resume", action="store_true", help="score the files without a row, or with an error row, in an existing output "
                                                                "(same model and settings)")
    g.add_argument("--overwrite", action="store_true", help="replace an existing output")
    return p


def score_from_args(args: argparse.Namespace) -> tuple[ScoreConfig, str | None]:
    """The run's settings and labels CSV (if any); omitted paths are the demo's.

    Raises:
        ValueError: a flag out of range (:meth:`ScoreConfig.validate`).
    """
    demo = os.path.abspath(DEMO_STORAGE)
    labels = args.labels
    if args.input is None:
        labels = labels or os.path.join(demo, DEMO_DATA_FOLDER, "test_labels.csv")
    # Only the demo as a whole (neither --input nor --output) replaces its own earlier output:
    # another folder scored into the demo's default output must not delete those results.
    demo_rerun = args.input is None and args.output is None and not args.resume
    # (an empty value, such as an unset shell variable, is an error, not "the demo's")
    model, input_, output = (os.path.join(demo, DEMO_RUN_NAME, "model") if args.model is None else args.model,
                             os.path.join(demo, DEMO_DATA_FOLDER, "test") if args.input is None else args.input,
                             os.path.join(demo, DEMO_RUN_NAME, "predictions") if args.output is None else args.output)
    if demo_rerun and not args.overwrite:
        from artifact_core.score_output import OutputConflictError, scored_input
        from artifact_core.storage import resolve

        other = scored_input(resolve(output))
        if other is not None and other != redact_uri(resolve(input_).uri):
            raise OutputConflictError(
                f"the demo's output {output} holds the scores of another input ({other}); nothing was deleted. "
                f"Pass --overwrite to replace them, or --output to score the demo elsewhere")
    cfg = ScoreConfig(
        model=model, input=input_, output=output,
        batch_size=args.batch_size, num_actors=args.num_actors, cpus_per_actor=args.cpus_per_actor,
        use_gpu=args.use_gpu, engine=args.engine, precision=args.precision, pipeline=args.pipeline, threshold=args.threshold,
        object_store_budget_mb=args.object_store_budget_mb,
        resume=args.resume, overwrite=args.overwrite or demo_rerun,
        report=args.report, report_top=args.report_top, report_uncertain=args.report_uncertain,
        wait_for_resources=args.wait_for_resources,
    )
    return cfg.validate(), labels
