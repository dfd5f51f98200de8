"""Torch-free decoding for scoring's Ray Data tasks: bytes -> resized uint8 batches.

Ray pickles :func:`decode_batch` by reference to this module, so every decode worker
imports it: it must not import torch (about 1 GB and seconds of start-up per process).
``tests/test_decode.py`` checks that in a fresh interpreter.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from artifact_core.images import ImageDecodeError, ImageSource, decode_image


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


def decode_batch(batch: dict[str, np.ndarray], *, image_size: int, root: str) -> dict[str, np.ndarray]:
    """Bytes -> resized uint8 (N, 3, S, S) with the shared decoder; failures become errors.

    The predictor normalizes: shipping uint8 moves a quarter of the bytes of float32
    through the object store.
    """
    n = len(batch["path"])
    images = np.zeros((n, 3, image_size, image_size), dtype=np.uint8)
    errors = np.full(n, "", dtype=object)
    for i, (data, path) in enumerate(zip(batch["bytes"], batch["path"])):
        try:
            images[i] = decode_array(bytes(data), image_size, name=path)
        except ImageDecodeError as exc:
            errors[i] = exc.reason
        except Exception as exc:  # noqa: BLE001 - one odd file must never stop the job
            errors[i] = f"{type(exc).__name__}: {exc}"
    rel = [p[len(root) + 1:] if p.startswith(root + "/") else p for p in batch["path"]]
    return {"path": np.asarray(batch["path"], dtype=object), "filename": np.asarray(rel, dtype=object),
            "image": images, "error": errors}
