"""Image folders: listing, labels from file names, splits, class weights (torch-free; the
torch Dataset over these files is :mod:`artifact_core.dataset`)."""

from __future__ import annotations

import collections
import contextlib
import errno
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn, Sequence

import numpy as np
import pyarrow.fs as pafs

from artifact_core.labels import ARTIFACT, CLEAN, LABEL_NAMES  # noqa: F401 (re-exported)
from artifact_core.storage import open_listed_file, redact_uri, resolve

log = logging.getLogger(__name__)


IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".jpe", ".jfif", ".webp", ".bmp")
LABEL_PATTERN = "'<name>_<0|1>.<ext>' (0 = artifact, 1 = artifact-free)"
# \Z, not $: '$' also matches before a trailing newline, so 'x_1\n.png' would read as label 1
_LABEL_RE = re.compile(r"_([01])\Z")


def is_image_file(name: str) -> bool:
    """True when ``name`` has one of :data:`IMAGE_EXTENSIONS` (case-insensitive)."""
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _log_skipped(names: Sequence[str], folder: str) -> None:
    """One line for the files a listing left out by their extension (hidden ones aside): a
    TIFF or HEIC among the images gets no row and no error, so the count must be said."""
    if not names:
        return
    kinds = collections.Counter(os.path.splitext(n)[1].lower() or "(no extension)" for n in names)
    shown = ", ".join(f"{ext} {n}" for ext, n in kinds.most_common(5))
    log.warning("%d file(s) under %s are not listed: not image files by their extension (%s%s; e.g. %r). "
                "Listed: %s", len(names), redact_uri(folder), shown, ", ..." if len(kinds) > 5 else "",
                names[0], " ".join(IMAGE_EXTENSIONS))


class FolderListingError(OSError):
    """A folder below an image folder could not be listed (its images would be lost unseen)."""

    def __init__(self, folder: str, root: str, reason: str) -> None:
        self.folder = folder
        self.root = root
        self.reason = reason
        super().__init__(f"cannot list folder {folder!r} under the image folder {root!r}: {reason}; "
                         f"the images below it would be left out unseen, so make it readable "
                         f"or move it out of the folder")


def _reason(exc: OSError) -> str:
    return exc.strerror or f"{type(exc).__name__}: {exc}"


def _check_link(path: str, top: str) -> None:
    """A link that is not an image: fine when it points to a file; an error when its target
    cannot be looked at; a warning when the target is gone (a dangling link holds nothing)."""
    try:
        os.stat(path)
    except FileNotFoundError:
        log.warning("skipping %s: a link whose target %r does not exist", path, os.readlink(path))
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            log.warning("skipping %s: a link that loops (%s)", path, _reason(exc))
            return
        raise FolderListingError(path, top, _reason(exc)) from exc


def list_images(folder: str | os.PathLike, *, exclude: Sequence[str] = ()) -> list[str]:
    """List image files below ``folder``, recursively, as sorted absolute paths.

    Hidden files and folders (names starting with '.') are skipped. Linked folders are
    followed, each real folder listed once (a link back up the tree is not a loop; a folder
    reached twice does not list its images twice); a link to a folder above ``folder`` is not
    followed (it would list the folder's surroundings), nor one into ``exclude`` (scoring's
    output). A linked folder whose target is gone is logged and skipped.

    Raises:
        FileNotFoundError: the folder does not exist.
        NotADirectoryError: the path is a file.
        FolderListingError: a folder below it cannot be read (permissions, I/O error).
    """
    root = Path(folder).expanduser()
    if not root.exists():
        raise FileNotFoundError(f"image folder {str(root)!r} does not exist")
    if not root.is_dir():
        raise NotADirectoryError(f"{str(root)!r} is not a folder of images")
    top = os.fspath(root)

    def fail(exc: OSError) -> NoReturn:
        # os.walk's default is to skip a folder it cannot list, losing its images in silence
        raise FolderListingError(os.fspath(exc.filename or top), top, _reason(exc)) from exc

    def key(path: str) -> tuple[int, int]:
        st = os.stat(path)  # follows links: the real folder's identity
        return st.st_dev, st.st_ino

    try:
        seen = {key(top)}
    except OSError as exc:
        fail(exc)
    # The folder's ancestors and the excluded folders count as seen: a link to one of them is
    # never entered.
    up = os.path.realpath(top)
    while os.path.dirname(up) != up:
        up = os.path.dirname(up)
        with contextlib.suppress(OSError):
            seen.add(key(up))
    for path in exclude:
        with contextlib.suppress(OSError):  # (an output that does not exist yet holds nothing)
            seen.add(key(path))
    found, skipped = [], []
    for dirpath, dirnames, filenames in os.walk(top, onerror=fail, followlinks=True):
        keep = []
        for d in sorted(dirnames):  # sorted: which path of a folder reached twice is kept does not vary
            if d.startswith("."):
                continue
            sub = os.path.join(dirpath, d)
            try:
                ident = key(sub)
            except OSError as exc:
                fail(exc)
            if ident in seen:
                log.info("not listing %s again: the same folder is listed through another path", sub)
                continue
            seen.add(ident)
            keep.append(d)
        dirnames[:] = keep
        for f in filenames:
            if f.startswith("."):
                continue
            if is_image_file(f):
                found.append(os.path.join(dirpath, f))
            elif os.path.islink(os.path.join(dirpath, f)) and not os.path.exists(os.path.join(dirpath, f)):
                # os.walk files a linked folder it cannot stat among the file names: an
                # unmounted shard, or a target it may not look at, would vanish unseen.
                _check_link(os.path.join(dirpath, f), top)
            else:
                skipped.append(os.path.relpath(os.path.join(dirpath, f), top))
    _log_skipped(sorted(skipped), top)
    return sorted(os.path.abspath(p) for p in found)


def list_image_files(folder: str, *, exclude: Sequence[str] = ()) -> tuple[list[str], pafs.FileSystem | None, str]:
    """Image files below a local folder or a pyarrow filesystem URI (recursive, hidden skipped;
    ``exclude``: local folders a linked folder must not lead into, see :func:`list_images`).

    Returns:
        (sorted paths on the filesystem, the filesystem or None for local, the normalized root).

    Raises:
        FileNotFoundError / NotADirectoryError: the folder is missing or a file.
    """
    loc = resolve(folder)
    if loc.is_local:
        return list_images(loc.path, exclude=exclude), None, loc.path
    kind = loc.info().type
    if kind == pafs.FileType.File:
        raise NotADirectoryError(f"{folder!r} is not a folder of images")
    if kind != pafs.FileType.Directory:
        raise FileNotFoundError(f"image folder {folder!r} does not exist")
    infos = loc.fs.get_file_info(pafs.FileSelector(loc.path, recursive=True))
    prefix = loc.path + "/"
    visible = [i for i in infos if i.type == pafs.FileType.File
               and not any(part.startswith(".") for part in i.path[len(prefix):].split("/"))]
    paths = sorted(i.path for i in visible if is_image_file(i.base_name))
    _log_skipped(sorted(i.path[len(prefix):] for i in visible if not is_image_file(i.base_name)), folder)
    return paths, loc.fs, loc.path


def native_short_side(paths: Sequence[str], fs: pafs.FileSystem | None = None, *, sample: int = 32) -> int | None:
    """Median short side of up to ``sample`` images spread over ``paths``, from their headers.

    PIL reads only the header to know the size, so this decodes no pixels; files that cannot
    be read are left out (the workers count them). None when none could be read.
    """
    from PIL import Image

    from artifact_core.images import ACCEPTED_FORMATS

    if not paths:
        return None
    step = max(1, len(paths) // sample)
    sides = []
    for path in list(paths)[::step][:sample]:
        try:
            with open_listed_file(path, fs) as stream, Image.open(stream, formats=ACCEPTED_FORMATS) as img:
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


def distinct_files(paths: Sequence[str], labels: Sequence[int]) -> list[int]:
    """Indices of ``paths`` (local files) with each file once: a file reached through a link,
    or a hard link under a second name, would otherwise be two images, and a split could put
    it on both sides (validation would score an image it trained on). The first name in
    sorted order is kept. A file system that reports no inode numbers (0) keeps every name.
    One ``stat`` a file, when a run draws its split (not on a resume)."""
    seen: dict[tuple[int, int], int] = {}
    keep, clashes = [], []
    for i, p in enumerate(paths):
        try:
            st = os.stat(p)
            ident = (st.st_dev, st.st_ino) if st.st_ino else None
        except OSError:
            ident = None  # (the loaders report it unreadable)
        if ident is not None and ident in seen:
            first = seen[ident]
            if labels[first] != labels[i]:
                clashes.append(f"{paths[first]!r} ({labels[first]}) and {p!r} ({labels[i]})")
            continue
        if ident is not None:
            seen[ident] = i
        keep.append(i)
    if len(keep) < len(paths):
        log.warning("%d image name(s) are another name (a link) of a file already listed; each file is used once",
                    len(paths) - len(keep))
    if clashes:
        log.warning("one file under two names with different labels, the first kept: %s", "; ".join(clashes[:3]))
    return keep


#: Files of each class opened before training (spread over the class).
READABLE_SAMPLE = 8


def check_classes_readable(paths: Sequence[str], labels: Sequence[int], fs: pafs.FileSystem | None = None, *,
                           sample: int = READABLE_SAMPLE) -> None:
    """Refuse a folder where none of a class's sampled files decodes.

    Training skips unreadable files; when all of a class is unreadable (a clone without
    `git lfs pull`, HEIC files named .png) it would train a useless model without a word,
    or end as "diverged" when nothing at all reads.

    Raises:
        ValueError: naming the class, a file and the reason.
    """
    from artifact_core.images import ImageDecodeError, decode_image
    from artifact_core.storage import FileReadError, read_file_bytes

    for c in sorted(set(labels)):
        members = [p for p, y in zip(paths, labels) if y == c]
        spread = np.linspace(0, len(members) - 1, min(sample, len(members))).round().astype(int)
        picks = [members[i] for i in sorted(set(spread))]
        reasons = []
        for p in picks:
            try:
                decode_image(read_file_bytes(p, fs) if fs is not None else p, name=p, target_size=16)
                break
            except (ImageDecodeError, FileReadError, OSError) as exc:
                reasons.append((p, getattr(exc, "reason", None) or str(exc)))
        else:
            first, why = reasons[0]
            raise ValueError(f"none of {len(picks)} {LABEL_NAMES[c]} image(s) ({c}) sampled from {len(members)} "
                             f"could be read, e.g. {first!r}: {why}; training would learn nothing of that class")


def stratified_split(labels: Sequence[int], *, val_fraction: float = 0.2,
                     seed: int = 42) -> tuple[np.ndarray, np.ndarray]:
    """Split indices into train/val keeping the class ratio in both.

    Every class with at least two members keeps at least one in each part; a class with
    one member always goes to training (see :func:`check_split`).

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
        if len(idx) >= 2:
            n_val = min(max(int(round(len(idx) * val_fraction)), 1), len(idx) - 1)
        else:
            n_val = 0  # the model cannot learn a class it never trains on; validation can go without
        val_idx.extend(idx[:n_val])
        train_idx.extend(idx[n_val:])
    return np.sort(np.asarray(train_idx, dtype=np.int64)), np.sort(np.asarray(val_idx, dtype=np.int64))


def _counts(labels: Sequence[int]) -> str:
    return ", ".join(f"{sum(1 for y in labels if y == c)} {name} ({c})" for c, name in LABEL_NAMES.items())


def check_split(train_labels: Sequence[int], val_labels: Sequence[int], val_fraction: float) -> list[str]:
    """Check that a train/validation split can train a model and tune its threshold.

    Args:
        train_labels / val_labels: the labels of the two parts.
        val_fraction: the ``--val-fraction`` that made the split (named in the messages).

    Returns:
        Warnings, one line each: a class missing from validation (training works, but the
        threshold cannot be tuned nor that class's recall and AP measured).

    Raises:
        ValueError: training or validation is empty, or a class is missing from training;
            the message gives the per-class counts of both parts.
    """
    parts = f"train: {_counts(train_labels)}; validation: {_counts(val_labels)}"
    if not len(train_labels):
        raise ValueError(f"the split leaves training empty ({parts}); lower --val-fraction "
                         f"(now {val_fraction:g}) or add images")
    if not len(val_labels):
        raise ValueError(f"the split leaves validation empty ({parts}): each class needs at least 2 images "
                         f"to be in both parts (--val-fraction {val_fraction:g}); add images")
    in_train, in_val = {int(y) for y in train_labels}, {int(y) for y in val_labels}
    absent = [c for c in LABEL_NAMES if c not in in_train]
    if absent:
        # a fresh split keeps a class with one image in training: this is an older, stored split
        # or a class that has no image at all
        names = " and ".join(f"{LABEL_NAMES[c]} ({c})" for c in absent)
        raise ValueError(f"the split leaves no {names} image in training ({parts}): the model cannot learn it; "
                         f"add images of that class, or split again (a new split keeps a class with a single "
                         f"image in training) or with a lower --val-fraction (now {val_fraction:g})")
    missing = [c for c in LABEL_NAMES if c not in in_val]
    return [f"validation holds no {LABEL_NAMES[c]} ({c}) image ({parts}): the threshold cannot be tuned, "
            f"that class's recall and AP are not measured, and no epoch can be chosen for skill (by AP the "
            f"last one is kept, not the one that calls every image {LABEL_NAMES[1 - c]}); a class needs at least 2 "
            f"images to be in both parts (--val-fraction {val_fraction:g})" for c in missing]


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
