"""Memory behaviour of PyTorch's eager passes on CPU: glibc's allocator settings and how many
images a no-grad pass may take at once.

On CPU, MobileNetV2 at 448 px spends more time in the kernel than in its convolutions when it
runs a batch of 16: every large activation is a fresh ``mmap`` whose pages fault in one by
one, and is unmapped again when freed (glibc maps any block above its mmap threshold, at most
32 MiB, and gives back free heap above its trim threshold). ``bench/cpu_memory_bench.py``
measures it. Two changes remove nearly all of it:

- :func:`tune_malloc`: a fixed mmap threshold at glibc's ceiling and a trim threshold that
  keeps freed heap for the next batch, so activations up to 32 MiB reuse warm pages;
- :func:`images_per_pass`: images per pass such that no activation exceeds that ceiling (one
  image at 448 px, six at 224 px). A convolution does the same work per image at any batch
  size on CPU, so small passes lose nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

#: glibc's ceiling for ``M_MMAP_THRESHOLD`` on 64-bit (``DEFAULT_MMAP_THRESHOLD_MAX``): any
#: block larger than this is always mmapped, and its pages fault in afresh on every use.
MMAP_THRESHOLD_MAX = 32 * 2**20
#: Freed heap kept for reuse (bytes) before glibc returns it to the system: all of it, in
#: practice. Training workers and scoring actors run the same shapes for their whole life, so
#: memory given back would only fault in again at the next batch.
TRIM_THRESHOLD = 2**31 - 1
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameter numbers (malloc.h)

log = logging.getLogger(__name__)
_tuned: bool | None = None


def tune_malloc() -> bool:
    """Set glibc's mmap threshold to :data:`MMAP_THRESHOLD_MAX` and its trim threshold to
    :data:`TRIM_THRESHOLD` for this process (once); False where the C library is not glibc.

    Process-wide: memory freed by anything in the process stays with it for reuse.
    """
    global _tuned
    if _tuned is not None:
        return _tuned
    _tuned = False
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            libc.gnu_get_libc_version  # glibc only: musl's mallopt accepts and ignores everything
            _tuned = bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX)) and bool(
                libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
        except (OSError, AttributeError):
            _tuned = False
    if not _tuned:
        log.info("malloc settings unchanged (not glibc): large CPU activations are mapped afresh per batch")
    return _tuned


def largest_output_bytes(module: nn.Module, run: Callable[[], Any]) -> int:
    """Bytes of the largest tensor that ``module`` or any of its submodules returns while
    ``run()`` runs (under no grad)."""
    largest = 0

    def hook(_m: nn.Module, _inputs: Any, output: Any) -> None:
        nonlocal largest
        for t in output if isinstance(output, (tuple, list)) else (output,):
            if isinstance(t, torch.Tensor):
                largest = max(largest, t.numel() * t.element_size())

    handles = [m.register_forward_hook(hook) for m in module.modules()]
    try:
        with torch.no_grad():
            run()
    finally:
        for h in handles:
            h.remove()
    return largest


def images_per_pass(per_image_bytes: int, *, limit: int = MMAP_THRESHOLD_MAX) -> int:
    """How many images a pass may take so that an activation of ``per_image_bytes`` per image
    stays within ``limit`` (at least one)."""
    return max(1, limit // max(1, per_image_bytes))


def trunk_images_per_pass(model: nn.Module, image_size: int) -> int:
    """:func:`images_per_pass` for ``model.features`` at ``image_size`` (one dry run of one
    image; BatchNorm is put in eval for it and restored)."""
    features = model.features
    was_training = {m: m.training for m in features.modules()}
    features.eval()
    try:
        device = next(features.parameters()).device
        x = torch.zeros(1, 3, image_size, image_size, device=device).contiguous(memory_format=torch.channels_last)
        per_image = largest_output_bytes(features, lambda: features(x))
    finally:
        for m, mode in was_training.items():
            m.training = mode
    return images_per_pass(per_image)


def use_cpu_passes(model: nn.Module, image_size: int) -> int:
    """Set a model up for CPU passes: :func:`tune_malloc`, then its ``images_per_pass`` from
    :func:`trunk_images_per_pass` (models without the attribute keep whole batches; 0 then)."""
    tune_malloc()
    if not hasattr(model, "images_per_pass"):
        return 0
    model.images_per_pass = trunk_images_per_pass(model, image_size)
    return model.images_per_pass
