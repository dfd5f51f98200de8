"""One image decoder for training, evaluation and scoring.

Every code path that turns file bytes into pixels goes through :func:`decode_image`, so
a file that trains also scores, and a file that breaks scoring breaks it the same way
everywhere. With a target size it also does the model's resize (:func:`resize_image`),
decoding large files at reduced scale first, so training, validation and scoring see the
same pixels for the same file. This module imports no torch: scoring's decode tasks use it.
"""

from __future__ import annotations

import io
import os
import warnings
from typing import Union

import numpy as np
from PIL import Image, ImageOps

# 8k x 8k: far beyond any face crop, far below what exhausts a worker's memory.
MAX_IMAGE_PIXELS = 64_000_000

ImageSource = Union[str, os.PathLike, bytes]


class ImageDecodeError(ValueError):
    """A file could not be decoded into an RGB image."""

    def __init__(self, source: str, reason: str) -> None:
        self.source = source
        self.reason = reason
        super().__init__(f"cannot decode image {source!r}: {reason}")


def _to_rgb(img: Image.Image, value_range: tuple[float, float] | None = None) -> Image.Image:
    """Convert any PIL mode (L, LA, P, RGBA, CMYK, I;16, I, F, ...) to 8-bit RGB.

    ``value_range``: the (low, high) that 16-bit/float greyscale is stretched from (default:
    this image's own; :func:`_shrink_before_rgb` passes the full-size image's).
    """
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        # 16-bit/float greyscale: PIL's convert("RGB") clips to 0..255 instead of
        # rescaling, which turns most 16-bit images white. Rescale by the actual range.
        # float32 and in place: a 16-bit file is small on disk, and float64 temporaries made it
        # cost over 20 bytes per pixel to decode (float32 holds every 16-bit value exactly)
        arr = np.array(img, dtype=np.float32)  # a writable copy (a float image would give a read-only view)
        lo, hi = (float(v) for v in value_range) if value_range else (float(np.nanmin(arr)), float(np.nanmax(arr)))
        scale = 255.0 / (hi - lo) if hi > lo else 0.0
        arr -= lo
        arr *= scale
        np.clip(arr, 0, 255, out=arr)
        return Image.fromarray(arr.astype(np.uint8)).convert("RGB")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        # Composite transparency over white rather than dropping alpha, which would
        # leave whatever colour sits under transparent pixels (often black).
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def resize_image(img: Image.Image, size: int) -> Image.Image:
    """Resize to ``size`` x ``size`` (squashed, as the model is trained) with PIL's bilinear filter.

    The one resize of evaluation and scoring (and of training before augmentation).
    PIL's bilinear widens its kernel when downsampling, so it is antialiased.
    """
    if img.size == (size, size):
        return img
    return img.resize((size, size), Image.Resampling.BILINEAR)


def _exif_upright(img: Image.Image) -> Image.Image:
    """Apply the EXIF orientation (phone photos are stored sideways with a rotate tag)."""
    try:
        ImageOps.exif_transpose(img, in_place=True)  # in place: no copy when there is no tag
    except Exception:  # noqa: BLE001 - a corrupt EXIF block must not lose good pixels
        pass
    return img


def _reduce(img: Image.Image, target_size: int, *, keep_aspect: bool = False) -> Image.Image:
    """Shrink by an integer box factor per axis, keeping each side at least twice the target:
    a box average is much cheaper per input pixel than the bilinear resize that follows.
    With ``keep_aspect`` one factor for both axes, set by the longer side (a preview)."""
    fx, fy = img.width // (2 * target_size), img.height // (2 * target_size)
    if keep_aspect:
        fx = fy = max(fx, fy)
    if max(fx, fy) < 2:
        return img
    return img.reduce((max(fx, 1), max(fy, 1)))


def _shrink_before_rgb(img: Image.Image, target_size: int, *,
                       keep_aspect: bool = False) -> tuple[Image.Image, tuple[float, float] | None]:
    """Box-reduce the modes whose conversion to RGB takes several full-size copies (alpha
    composited over white, 16-bit and float greyscale rescaled): 17-26 bytes per pixel.

    PIL's reduce() premultiplies alpha, so compositing afterwards matches compositing first
    up to rounding. Returns the image and, for 16-bit/float greyscale, the full-size range
    to stretch from, so the contrast is that of the whole image whatever the path.
    """
    mode = img.mode
    if mode.startswith("I;16"):
        img = img.convert("I")  # reduce() has no 16-bit mode; 32-bit integers keep every value
    if img.mode in ("I", "F"):
        return _reduce(img, target_size, keep_aspect=keep_aspect), img.getextrema()
    if mode == "PA" or (mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "L"):
        return _reduce(img, target_size, keep_aspect=keep_aspect), None
    return img, None


def decode_image(source: ImageSource, *, name: str | None = None, max_pixels: int = MAX_IMAGE_PIXELS,
                 target_size: int | None = None, max_side: int | None = None) -> Image.Image:
    """Decode a file path or raw bytes into a fully loaded, upright, 8-bit RGB PIL image.

    Args:
        source: a path, or the file's bytes (as Ray Data's ``read_binary_files`` gives).
        name: how to call the file in errors (defaults to the path, or "<bytes>").
        max_pixels: larger images are refused as decompression bombs.
        target_size: when given, the image comes back resized to ``target_size`` x
            ``target_size`` by :func:`resize_image`; a JPEG at least twice as large is
            decoded at 1/2, 1/4 or 1/8 scale (never below the target), other large images
            are box-reduced to at least twice the target first.
        max_side: when given instead (a preview), the image comes back with its aspect kept
            and its longer side at most ``max_side``, reduced the same cheap way first, so a
            preview of a huge file never holds it at full size.

    Returns:
        An RGB ``PIL.Image.Image`` with its pixels loaded and its EXIF orientation applied.

    Raises:
        ImageDecodeError: empty, truncated, not an image, or too large.
    """
    if target_size and max_side:
        raise ValueError("decode_image takes target_size or max_side, not both")
    label = name or (os.fspath(source) if not isinstance(source, bytes) else "<bytes>")
    try:
        if isinstance(source, bytes):
            if not source:
                raise ImageDecodeError(label, "file is empty")
            stream: io.IOBase = io.BytesIO(source)
        else:
            if os.path.getsize(source) == 0:
                raise ImageDecodeError(label, "file is empty")
            stream = open(source, "rb")
        with stream:
            with Image.open(stream) as img:
                width, height = img.size
                if width * height > max_pixels:
                    raise ImageDecodeError(
                        label, f"{width}x{height} pixels exceeds the limit of {max_pixels}"
                    )
                # PIL's own bomb check only warns below 2x its global limit; ours is a
                # hard per-call limit. Truncated files fail in load() (PIL's default
                # LOAD_TRUNCATED_IMAGES=False), never decode silently as half grey.
                shrink = target_size or max_side
                if shrink and img.format == "JPEG":
                    # DCT-domain downscaling: PIL picks the largest of 1/2, 1/4, 1/8 that keeps
                    # both sides >= the request, so the resize below still only downsamples.
                    img.draft(None, (shrink, shrink))
                with warnings.catch_warnings():
                    warnings.simplefilter("error", Image.DecompressionBombWarning)
                    img.load()
                out, value_range = _exif_upright(img), None
                if shrink:
                    out, value_range = _shrink_before_rgb(out, shrink, keep_aspect=bool(max_side))
                out = _to_rgb(out, value_range)
        if target_size:
            out = resize_image(_reduce(out, target_size), target_size)
        elif max_side:
            out = _reduce(out, max_side, keep_aspect=True)
            out.thumbnail((max_side, max_side), Image.Resampling.BILINEAR)
        return out
    except ImageDecodeError:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError,
            Image.DecompressionBombWarning) as exc:
        # PIL raises UnidentifiedImageError (an OSError) for non-images, OSError for
        # truncation, SyntaxError/ValueError for some corrupt headers.
        raise ImageDecodeError(label, f"{type(exc).__name__}: {exc}") from exc
