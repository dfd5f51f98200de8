"""Torch-free decoding for scoring's Ray Data tasks: bytes -> resized uint8 batches.

Ray pickles :func:`decode_batch` by reference to this module, so every decode worker
imports it: it must not import torch (about 1 GB and seconds of start-up per process).
``tests/test_decode.py`` checks that in a fresh interpreter.
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np
import pyarrow.fs as pafs

from artifact_core.images import ImageDecodeError, ImageSource, decode_image
from artifact_core.storage import FileReadError, display_path, read_file_bytes


def decode_array(source: ImageSource, image_size: int, *, name: str | None = None) -> np.ndarray:
    """One file -> (3, S, S) uint8, exactly the pixels validation feeds the model.

    Raises:
        ImageDecodeError: as :func:`~artifact_core.images.decode_image`.
    """
    img = decode_image(source, name=name, target_size=image_size)
    return np.asarray(img, dtype=np.uint8).transpose(2, 0, 1)


def decode_paths(paths: Sequence[str], image_size: int) -> np.ndarray:
    """Files -> (N, 3, S, S) uint8; the first undecodable file raises ImageDecodeError."""
    out = np.zeros((len(paths), 3, image_size, image_size), dtype=np.uint8)
    for i, p in enumerate(paths):
        out[i] = decode_array(p, image_size)
    return out


def _relative_names(paths: Sequence[str], root: str) -> list[str]:
    """The ``filename`` column: each shown path (:func:`display_path`) relative to ``root``.

    ``root`` may come as listed (a name that is not UTF-8 surrogate-escaped) or already shown
    (``\\xNN``, as scoring's driver passes it): shown twice it stays the same, so the two
    shown forms are compared, and a root with such bytes still prefixes its paths. Showing
    does not change where a '/' falls, so cutting the shown path is cutting the listed one.
    ``rstrip``: a root of "/" is its own prefix.
    """
    prefix = display_path(root).rstrip("/") + "/"
    return [p[len(prefix):] if p.startswith(prefix) else p for p in paths]


def decode_batch(batch: dict[str, np.ndarray], *, image_size: int, root: str,
                 fs: pafs.FileSystem | None = None) -> dict[str, np.ndarray]:
    """Listed paths -> resized uint8 (N, 3, S, S) with the shared decoder; failures become errors.

    Each file is read here, at its turn, so a file that vanished, turned unreadable or is no
    regular file after listing gets an error row instead of stopping the job. Paths arrive
    as bytes (``raw_path``) so names that are not valid UTF-8 still reach their file. The
    predictor normalizes: shipping uint8 moves a quarter of the bytes of float32 through
    the object store.
    """
    raw_paths = [bytes(r) for r in batch["raw_path"]]
    n = len(raw_paths)
    images = np.zeros((n, 3, image_size, image_size), dtype=np.uint8)
    errors = np.full(n, "", dtype=object)
    paths = [display_path(os.fsdecode(r)) for r in raw_paths]
    for i, (raw, path) in enumerate(zip(raw_paths, paths)):
        try:
            data = read_file_bytes(raw if fs is None else os.fsdecode(raw), fs)
            images[i] = decode_array(data, image_size, name=path)
        except (FileReadError, ImageDecodeError) as exc:
            errors[i] = exc.reason
        except Exception as exc:  # noqa: BLE001 - one odd file must never stop the job
            errors[i] = f"{type(exc).__name__}: {exc}"
    rel = _relative_names(paths, root)
    return {"path": np.asarray(paths, dtype=object), "filename": np.asarray(rel, dtype=object),
            "image": images, "error": errors}
