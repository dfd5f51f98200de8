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
import re
from typing import Union

import numpy as np
from PIL import Image, ImageChops, ImageOps, UnidentifiedImageError
# The plugins of ACCEPTED_FORMATS, imported here: Image.open with a formats list only tries
# plugins already loaded (WebP is not among those PIL loads by itself).
from PIL import BmpImagePlugin, JpegImagePlugin, PngImagePlugin, WebPImagePlugin  # noqa: F401

from artifact_core.storage import FileReadError, read_file_bytes

# 8k x 8k: far beyond any face crop, far below what exhausts a worker's memory.
MAX_IMAGE_PIXELS = 64_000_000
#: The longest side accepted (JPEG's own limit). PIL keeps a pointer and more per row, so a
#: 1 x 64,000,000 strip, within the pixel limit, would take over a GB to decode.
MAX_IMAGE_SIDE = 65_535
#: WebP decodes whole, through about four full-size RGBA copies (16 bytes per pixel against
#: PNG's 4-5): its pixel limit is this share of ``max_pixels`` (21 MP by default: 4096 x 4096
#: and 4608 x 4608 pass).
WEBP_PIXEL_SHARE = 3
#: Scans in one JPEG (progressive encoders write about 10). Each scan passes over the whole
#: image, so a small file of thousands of scans would take minutes to decode.
MAX_JPEG_SCANS = 100
#: The first bytes of each accepted format, to name it when PIL cannot read its header.
_SIGNATURES = ((b"\x89PNG\r\n\x1a\n", "PNG"), (b"\xff\xd8\xff", "JPEG"), (b"BM", "BMP"))

#: What PIL may open, whatever the file's name says: the content of the listed extensions
#: (PNG, JPEG, WebP, BMP; data.IMAGE_EXTENSIONS). Left open, PIL would also parse PostScript named .png and
#: hand it to Ghostscript to run. Camera JPEGs that carry a second frame (MPO) open through
#: the JPEG entry (PIL registers no opener of its own for MPO), with ``format`` "MPO".
ACCEPTED_FORMATS = ("PNG", "JPEG", "WEBP", "BMP")
#: Formats that :meth:`PIL.Image.Image.draft` can decode at 1/2, 1/4 or 1/8 scale.
_DRAFT_FORMATS = ("JPEG", "MPO")
_DEEP_GREY = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")
NOT_AN_IMAGE = "not a recognised image (expected PNG, JPEG, WebP or BMP content)"

ImageSource = Union[str, os.PathLike, bytes]


class ImageDecodeError(ValueError):
    """A file could not be decoded into an RGB image."""

    def __init__(self, source: str, reason: str) -> None:
        self.source = source
        self.reason = reason
        super().__init__(f"cannot decode image {source!r}: {reason}")


def _has_key(img: Image.Image) -> bool:
    """True when PNG's tRNS chunk marks a colour (or palette entries) as transparent."""
    return "transparency" in img.info


def _key_in_pixel_units(img: Image.Image) -> None:
    """Bring a PNG's tRNS key to the units of the pixels PIL will unpack (before ``load``).

    PIL unpacks 1/2/4-bit greyscale to 0..255 and 16-bit RGB to 8 bits, but keeps the key as
    the file states it: a 2-bit key 1 would never match its pixels (now 85), and a 16-bit key
    would match unrelated 8-bit pixels. Low-bit keys are scaled; a 16-bit RGB key has no exact
    8-bit counterpart (many 16-bit colours share one 8-bit value), so it is dropped, the
    image then read as opaque.
    """
    key = img.info.get("transparency")
    if key is None or img.format != "PNG" or not img.tile:
        return
    tile = img.tile[0]  # (a plain tuple before Pillow 11: index, not .args)
    raw = tile[3] if len(tile) > 3 else None
    if not isinstance(raw, str):
        return
    if img.mode == "L" and raw in ("L;1", "L;2", "L;4") and isinstance(key, int):
        img.info["transparency"] = key * 255 // (2 ** int(raw[2:]) - 1)
    elif img.mode == "RGB" and raw.startswith("RGB;16"):
        del img.info["transparency"]


def _key_to_white(img: Image.Image) -> Image.Image:
    """Composite the pixels that a tRNS colour key marks transparent over white, for RGB, L
    and 16-bit greyscale; the key leaves ``info``. Other modes come back as they are.

    A key makes a pixel fully transparent or fully opaque, so compositing is setting the keyed
    pixels to white: no alpha channel (4 more bytes per pixel, and a premultiplied copy in
    reduce()), and a box reduce afterwards averages what compositing first would. RGB and L
    are changed in place; 16-bit grey gets its white, 65535.
    """
    key = img.info.get("transparency")
    if img.mode == "L" and isinstance(key, int):
        del img.info["transparency"]
        return img.point([255 if v == key else v for v in range(256)])
    if img.mode == "RGB" and isinstance(key, tuple) and len(key) == 3:
        del img.info["transparency"]
        hit = None
        for band, k in enumerate(key):  # one band at a time: the mask costs 2-3 bytes per pixel
            match = img.getchannel(band).point([255 if v == k else 0 for v in range(256)])
            hit = match if hit is None else ImageChops.darker(hit, match)
        img.paste((255, 255, 255), mask=hit)
        return img
    if img.mode not in ("I;16", "I;16B", "I;16L", "I;16N", "I") or not isinstance(key, int):
        return img
    del img.info["transparency"]
    arr = np.array(img)  # a writable copy, 2 bytes per pixel for 16-bit
    arr[arr == key] = 65535
    return Image.fromarray(arr)


def _unset_bmp_alpha(img: Image.Image) -> Image.Image:
    """A BMP whose alpha is zero everywhere without its alpha: writers of 32-bit BMPs with an
    alpha mask often leave it unset, and browsers show such files opaque. Over white, the
    picture would be a blank."""
    if img.format == "BMP" and img.mode == "RGBA" and img.getchannel("A").getextrema() == (0, 0):
        return img.convert("RGB")
    return img


def _to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode (L, LA, P, RGBA, CMYK, I;16, I, F, ...) to 8-bit RGB.

    Transparency, from an alpha channel or a tRNS colour key (RGB, L, 16-bit grey, palette),
    is composited over white. 16-bit greyscale comes down by its bit depth (v / 257).
    """
    if _has_key(img):
        img = _key_to_white(img)
    if img.mode == "RGB":
        return img
    if img.mode in _DEEP_GREY:
        # By the bit depth, as viewers show it and as 16-bit RGB comes down: the same picture
        # saved with 8 or 16 bits gives the model the same pixels (a stretch by each image's
        # own range would not). PIL's convert("RGB") clips to 0..255 instead, turning most
        # 16-bit images white. float32 in place: float64 temporaries cost 20+ bytes per pixel.
        arr = np.array(img, dtype=np.float32)  # a writable copy (a float image would give a read-only view)
        arr *= 255.0 / 65535.0
        np.rint(arr, out=arr)
        np.clip(arr, 0, 255, out=arr)
        return Image.fromarray(arr.astype(np.uint8)).convert("RGB")
    if img.mode in ("RGBA", "LA", "PA") or _has_key(img):
        # Composite transparency over white rather than dropping alpha, which would
        # leave whatever colour sits under transparent pixels (often black). convert()
        # turns the keys left (palette entries, 1-bit) into alpha.
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


def _shrink_before_rgb(img: Image.Image, target_size: int, *, keep_aspect: bool = False) -> Image.Image:
    """Box-reduce the modes whose conversion to RGB takes several full-size copies (alpha
    composited over white, 16-bit greyscale rescaled): 17-26 bytes per pixel.

    PIL's reduce() premultiplies alpha, so compositing afterwards matches compositing first
    up to rounding.
    """
    if _has_key(img):
        img = _key_to_white(img)  # before the reduce, which would blur the key away
    mode = img.mode
    if mode.startswith("I;16"):
        img = img.convert("I")  # reduce() has no 16-bit mode; 32-bit integers keep every value
    if mode == "PA" or (mode == "P" and _has_key(img)):
        img = img.convert("RGBA")
    if img.mode in ("I", "F", "RGBA", "LA", "L"):
        return _reduce(img, target_size, keep_aspect=keep_aspect)
    return img


def _format_by_signature(data: bytes) -> str | None:
    """The accepted format whose signature ``data`` starts with, if any."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WebP"
    return next((fmt for magic, fmt in _SIGNATURES if data.startswith(magic)), None)


def _check_header(img: Image.Image, data: bytes, label: str, max_pixels: int) -> None:
    """Refuse, before any pixel is decoded, what would cost far more than its file size.

    PIL's own bomb check (in open) only warns below 2x its global limit; this is a hard
    per-call limit. (Not by turning PIL's warning into an error: warnings.catch_warnings()
    swaps process-wide state, and fused scoring decodes on several threads at once.)
    """
    width, height = img.size
    limit = max_pixels // WEBP_PIXEL_SHARE if img.format == "WEBP" else max_pixels
    if width * height > limit:
        kind = " for WebP, which decodes whole" if img.format == "WEBP" else ""
        raise ImageDecodeError(label, f"{width}x{height} pixels exceeds the limit of {limit}{kind}")
    if max(width, height) > MAX_IMAGE_SIDE:
        raise ImageDecodeError(label, f"{width}x{height} pixels: a side exceeds the limit of {MAX_IMAGE_SIDE}")
    if img.format in _DRAFT_FORMATS:
        scans, complete = _jpeg_scans(data)
        if scans > MAX_JPEG_SCANS:
            raise ImageDecodeError(label, f"more than {MAX_JPEG_SCANS} JPEG scans (the limit)")
        if not complete:
            # libjpeg only warns and fills the rest: a download cut short (or zero-filled
            # where it stopped) would decode as a half-garbage picture
            raise ImageDecodeError(label, "truncated JPEG: the data ends before its end-of-image marker")


def _jpeg_scans(data: bytes) -> tuple[int, bool]:
    """(scans, complete) of a JPEG's first image, by walking its markers: segments by their
    lengths, a scan's entropy-coded data up to the next marker (an FF there is followed by 00
    or a restart marker). Stops at the first end-of-image marker, so what follows (an MPO's
    second frame, a motion photo's video) is not read; stops early past the scan limit."""
    i, n, scans = 2, len(data), 0
    while i + 1 < n:
        if data[i] != 0xFF:  # stray bytes between segments: libjpeg skips them, with a warning
            i = data.find(b"\xff", i)
            if i < 0:
                return scans, False
            continue
        skip = _JPEG_NO_LENGTH.match(data, i)  # fill bytes, markers without a length: in C, not a byte a turn
        if skip:
            i = skip.end()
            continue
        marker = data[i + 1]
        if marker == 0xD9:
            return scans, True
        if i + 4 > n:
            return scans, False
        i += 2 + int.from_bytes(data[i + 2:i + 4], "big")
        if marker != 0xDA:
            continue
        scans += 1
        if scans > MAX_JPEG_SCANS:
            return scans, False
        end = _JPEG_SCAN_END.search(data, i)  # the scan's entropy-coded data ends at a marker
        if end is None:
            return scans, False
        i = end.start()
    return scans, False


#: A run of fill bytes and length-less markers (TEM, RSTn) between segments.
_JPEG_NO_LENGTH = re.compile(rb"(?:\xff(?=\xff)|\xff[\x01\xd0-\xd7])+")
#: The first FF in entropy-coded data that starts a marker: not a stuffed FF 00, a restart
#: marker or a fill byte (the last FF of a run is the marker's).
_JPEG_SCAN_END = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")


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
        ImageDecodeError: empty, unreadable, truncated, not an image of :data:`ACCEPTED_FORMATS`,
            or too costly to decode (see :func:`_check_header`).
        ValueError: both ``target_size`` and ``max_side`` given.
    """
    if target_size and max_side:
        raise ValueError("decode_image takes target_size or max_side, not both")
    label = name or (os.fspath(source) if not isinstance(source, bytes) else "<bytes>")
    try:
        # A path is read as scoring reads a listed file: a FIFO or device named like an image
        # is refused without blocking, and the size limit is the same.
        data = source if isinstance(source, bytes) else read_file_bytes(os.fspath(source))
    except FileReadError as exc:
        raise ImageDecodeError(label, exc.reason) from exc
    if not data:
        raise ImageDecodeError(label, "file is empty")
    try:
        with Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS) as img:
            _check_header(img, data, label, max_pixels)
            _key_in_pixel_units(img)
            # Truncated files fail in load() (PIL's default LOAD_TRUNCATED_IMAGES=False),
            # never decode silently as half grey.
            shrink = target_size or max_side
            if shrink and img.format in _DRAFT_FORMATS:
                # DCT-domain downscaling: PIL picks the largest of 1/2, 1/4, 1/8 that keeps
                # both sides >= the request, so the resize below still only downsamples.
                img.draft(None, (shrink, shrink))
            img.load()
            out = _exif_upright(_unset_bmp_alpha(img))
            if shrink:
                out = _shrink_before_rgb(out, shrink, keep_aspect=bool(max_side))
            out = _to_rgb(out)
        if target_size:
            out = resize_image(_reduce(out, target_size), target_size)
        elif max_side:
            out = _reduce(out, max_side, keep_aspect=True)
            out.thumbnail((max_side, max_side), Image.Resampling.BILINEAR)
        return out
    except ImageDecodeError:
        raise
    except UnidentifiedImageError as exc:
        # PIL's own message names a stream object by its memory address
        known = _format_by_signature(data)
        if data.startswith(b"version https://git-lfs"):  # a clone without `git lfs pull`
            raise ImageDecodeError(label, "a Git LFS pointer file, not the image itself (fetch the images with "
                                          "`git lfs pull`)") from exc
        raise ImageDecodeError(label, f"truncated or corrupt {known} header" if known else NOT_AN_IMAGE) from exc
    except MemoryError as exc:
        raise ImageDecodeError(label, "out of memory while decoding") from exc
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError,
            Image.DecompressionBombWarning) as exc:
        # PIL raises OSError for truncation, SyntaxError/ValueError for some corrupt headers.
        raise ImageDecodeError(label, f"{type(exc).__name__}: {exc}") from exc
