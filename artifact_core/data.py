"""Image folders: listing, labels from file names, splits, class weights (torch-free; the
torch Dataset over these files is :mod:`artifact_core.dataset`)."""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pyarrow.fs as pafs

from artifact_core.labels import ARTIFACT, CLEAN, LABEL_NAMES  # noqa: F401 (re-exported)
from artifact_core.storage import open_listed_file, resolve

log = logging.getLogger(__name__)


IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
LABEL_PATTERN = "'<name>_<0|1>.<ext>' (0 = artifact, 1 = artifact-free)"
_LABEL_RE = re.compile(r"_([01])$")


def is_image_file(name: str) -> bool:
    """True when ``name`` has one of :data:`IMAGE_EXTENSIONS` (case-insensitive)."""
    return name.lower().endswith(IMAGE_EXTENSIONS)


def list_images(folder: str | os.PathLike) -> list[str]:
    """List image files below ``folder``, recursively, as sorted absolute paths.

    Raises:
        FileNotFoundError: the folder does not exist.
        NotADirectoryError: the path is a file.
    """
    root = Path(folder).expanduser()
    if not root.exists():
        raise FileNotFoundError(f"image folder {str(root)!r} does not exist")
    if not root.is_dir():
        raise NotADirectoryError(f"{str(root)!r} is not a folder of images")
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        found.extend(os.path.join(dirpath, f) for f in filenames
                     if is_image_file(f) and not f.startswith("."))
    return sorted(os.path.abspath(p) for p in found)


def list_image_files(folder: str) -> tuple[list[str], pafs.FileSystem | None, str]:
    """Image files below a local folder or a pyarrow filesystem URI (recursive, hidden skipped).

    Returns:
        (sorted paths on the filesystem, the filesystem or None for local, the normalized root).

    Raises:
        FileNotFoundError / NotADirectoryError: the folder is missing or a file.
    """
    loc = resolve(folder)
    if loc.is_local:
        return list_images(loc.path), None, loc.path
    kind = loc.info().type
    if kind == pafs.FileType.File:
        raise NotADirectoryError(f"{folder!r} is not a folder of images")
    if kind != pafs.FileType.Directory:
        raise FileNotFoundError(f"image folder {folder!r} does not exist")
    infos = loc.fs.get_file_info(pafs.FileSelector(loc.path, recursive=True))
    prefix = loc.path + "/"
    paths = sorted(i.path for i in infos if i.type == pafs.FileType.File and is_image_file(i.base_name)
                   and not any(part.startswith(".") for part in i.path[len(prefix):].split("/")))
    return paths, loc.fs, loc.path


def native_short_side(paths: Sequence[str], fs: pafs.FileSystem | None = None, *, sample: int = 32) -> int | None:
    """Median short side of up to ``sample`` images spread over ``paths``, from their headers.

    PIL reads only the header to know the size, so this decodes no pixels; files that cannot
    be read are left out (the workers count them). None when none could be read.
    """
    from PIL import Image

    if not paths:
        return None
    step = max(1, len(paths) // sample)
    sides = []
    for path in list(paths)[::step][:sample]:
        try:
            with open_listed_file(path, fs) as stream, Image.open(stream) as img:
                sides.append(min(img.size))
        except Exception:  # noqa: BLE001 - any unreadable file just leaves the sample
            continue
    return int(np.median(sides)) if sides else None


def parse_label(path: str | os.PathLike) -> int:
    """Read the label from a file name ``<anything>_<label>.<ext>``.

    Raises:
        ValueError: naming the file and the expected pattern.
    """
    name = os.path.basename(os.fspath(path))
    stem, ext = os.path.splitext(name)
    match = _LABEL_RE.search(stem)
    if not match or not is_image_file(name):
        raise ValueError(f"cannot read label from {name!r}: expected {LABEL_PATTERN}")
    return int(match.group(1))


@dataclass
class LabeledFolder:
    """Image paths with labels, plus what was skipped while scanning."""

    paths: list[str]
    labels: list[int]
    skipped: list[str] = field(default_factory=list)
    #: where the paths live: None for local files, else the pyarrow filesystem (picklable)
    fs: Any = None
    #: the listed folder as a path on ``fs``; paths are below it
    root: str = ""

    def counts(self) -> dict[int, int]:
        """Number of images per label."""
        return {c: int(sum(1 for y in self.labels if y == c)) for c in (ARTIFACT, CLEAN)}


def scan_labeled_folder(folder: str | os.PathLike, *, skip_unlabeled: bool = False) -> LabeledFolder:
    """List a training folder and parse every label (no image is opened).

    Args:
        folder: root of the labelled images (searched recursively): a local path or a URI.
        skip_unlabeled: skip names without a label (listed in ``skipped``) instead of raising.

    Raises:
        FileNotFoundError / NotADirectoryError: the folder is missing.
        ValueError: no images, an unparsable name (unless skipped), or only one class.
    """
    paths, fs, root = list_image_files(os.fspath(folder))
    if not paths:
        raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under {os.fspath(folder)!r}")
    kept, labels, skipped = [], [], []
    for p in paths:
        try:
            labels.append(parse_label(p))
            kept.append(p)
        except ValueError:
            skipped.append(p)
    if skipped and not skip_unlabeled:
        # the path under the folder: in nested folders the base name alone is ambiguous
        first = skipped[0][len(root):].lstrip("/") if root and skipped[0].startswith(root) else skipped[0]
        raise ValueError(f"cannot read label from {first!r} under {os.fspath(folder)!r}: expected {LABEL_PATTERN}; "
                         f"{len(skipped)} of {len(paths)} image file(s) lack one (--skip-unlabeled trains on the rest)")
    if skipped:
        log.warning("skipped %d file(s) without a label in their name under %s", len(skipped), folder)
    if not kept:
        raise ValueError(f"no file under {os.fspath(folder)!r} matches {LABEL_PATTERN}")
    present = sorted(set(labels))
    if len(present) < 2:
        only = LABEL_NAMES[present[0]]
        raise ValueError(
            f"{os.fspath(folder)!r} holds only class {present[0]} ({only}); "
            f"training needs examples of both 0 (artifact) and 1 (artifact-free)"
        )
    return LabeledFolder(kept, labels, skipped, fs=fs, root=root)


def stratified_split(labels: Sequence[int], *, val_fraction: float = 0.2,
                     seed: int = 42) -> tuple[np.ndarray, np.ndarray]:
    """Split indices into train/val keeping the class ratio in both.

    Every class with at least two members keeps at least one in each part.

    Returns:
        (train_indices, val_indices), each sorted.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    y = np.asarray(labels)
    rng = np.random.default_rng(seed)
    train_idx, val_idx = [], []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        rng.shuffle(idx)
        n_val = int(round(len(idx) * val_fraction))
        if len(idx) >= 2:
            n_val = min(max(n_val, 1), len(idx) - 1)
        val_idx.extend(idx[:n_val])
        train_idx.extend(idx[n_val:])
    return np.sort(np.asarray(train_idx, dtype=np.int64)), np.sort(np.asarray(val_idx, dtype=np.int64))


def class_weights(labels: Sequence[int], num_classes: int = 2) -> np.ndarray:
    """'Balanced' weights ``n / (num_classes * n_c)``, as scikit-learn computes them.

    Raises:
        ValueError: a class has no example.
    """
    y = np.asarray(labels)
    counts = np.bincount(y, minlength=num_classes).astype(np.float64)
    if (counts == 0).any():
        missing = [int(c) for c in np.flatnonzero(counts == 0)]
        raise ValueError(f"cannot weight classes: no example of class {missing}")
    return len(y) / (num_classes * counts)
