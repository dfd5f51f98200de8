"""The shared decoder: odd-but-valid images decode to RGB, broken ones raise ImageDecodeError."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from artifact_core.images import NOT_AN_IMAGE, ImageDecodeError, decode_image
from conftest import write_image


@pytest.mark.parametrize("mode,fmt,ext", [
    ("RGB", "PNG", "png"), ("RGBA", "PNG", "png"), ("L", "PNG", "png"), ("P", "PNG", "png"),
    ("LA", "PNG", "png"), ("CMYK", "JPEG", "jpg"), ("RGB", "WEBP", "webp"), ("RGB", "BMP", "bmp"),
])
def test_odd_but_valid_modes_decode_to_rgb(tmp_path, mode, fmt, ext):
    p = write_image(tmp_path / f"x.{ext}", mode=mode, fmt=fmt)
    img = decode_image(str(p))
    assert img.mode == "RGB" and img.size == (48, 48)
    # the picture's colours, as PIL converts them (these have no transparency to composite)
    with Image.open(p) as ref:
        expected = np.asarray(ref.convert("RGB")).astype(int)
    assert np.abs(np.asarray(img).astype(int) - expected).max() <= 3
    # the same bytes decode the same way
    assert np.array_equal(np.asarray(decode_image(p.read_bytes(), name="x")), np.asarray(img))


def test_16bit_greyscale_is_rescaled_not_clipped(tmp_path):
    arr = np.linspace(0, 65535, 64 * 64, dtype=np.uint16).reshape(64, 64)
    p = tmp_path / "deep.png"
    Image.fromarray(arr).save(p)  # uint16 -> mode I;16
    out = np.asarray(decode_image(str(p)))
    assert out.shape == (64, 64, 3)
    assert out.min() == 0 and out.max() == 255
    assert 100 < out.mean() < 155  # a ramp, not a white square


@pytest.mark.parametrize("target", [None, 16])
def test_16bit_greyscale_comes_down_by_bit_depth_like_its_8bit_copy(target):
    """The same picture saved with 16 bits and with 8 gives the same pixels (not a stretch by
    each image's own range, which made a flat 16-bit grey black)."""
    ramp = np.tile(np.linspace(100, 160, 64).round().astype(np.uint8), (64, 1))
    eight = _saved(Image.fromarray(ramp), "PNG")
    sixteen = _saved(Image.fromarray(ramp.astype(np.uint16) * 257), "PNG")
    flat = _saved(Image.fromarray(np.full((64, 64), 40000, np.uint16)), "PNG")
    a, b = (np.asarray(decode_image(d, target_size=target)).astype(int) for d in (eight, sixteen))
    assert np.abs(a - b).max() <= 1 and a.min() >= 99 and a.max() <= 161
    assert (np.asarray(decode_image(flat, target_size=target)) == round(40000 / 257)).all()


def test_transparent_pixels_become_white(tmp_path):
    p = tmp_path / "alpha.png"
    Image.new("RGBA", (8, 8), (0, 0, 0, 0)).save(p)
    assert np.asarray(decode_image(str(p))).min() == 255


def test_a_bmp_whose_alpha_is_unset_everywhere_is_opaque_not_blank():
    """32-bit BMPs with an alpha mask often leave alpha at 0 (browsers show them opaque); a
    PNG that is transparent everywhere stays white (test above)."""
    import struct

    w = h = 4
    pixels = bytes([10, 20, 200, 0] * w * h)  # BGRA, alpha 0
    dib = struct.pack("<IiiHHIIiiII", 108, w, h, 1, 32, 3, len(pixels), 2835, 2835, 0, 0)
    dib += struct.pack("<IIII", 0x00FF0000, 0x0000FF00, 0x000000FF, 0xFF000000) + b"BGRs" + bytes(48)
    offset = 14 + len(dib)
    bmp = b"BM" + struct.pack("<IHHI", offset + len(pixels), 0, 0, offset) + dib + pixels
    assert Image.open(io.BytesIO(bmp)).mode == "RGBA"
    assert np.asarray(decode_image(bmp))[0, 0].tolist() == [200, 20, 10]


@pytest.mark.parametrize("content,reason", [
    (b"", "empty"),
    (b"this is not an image", NOT_AN_IMAGE),
])
def test_broken_bytes_raise_naming_the_file(tmp_path, content, reason):
    p = tmp_path / "bad.png"
    p.write_bytes(content)
    with pytest.raises(ImageDecodeError) as err:
        decode_image(str(p))
    assert "bad.png" in str(err.value) and reason in str(err.value)


@pytest.mark.parametrize("source", ["path", "bytes"])
def test_a_non_image_reads_as_such_not_as_a_memory_address(tmp_path, source):
    p = tmp_path / "notes.png"
    p.write_text("meeting notes, saved with the wrong name")
    with pytest.raises(ImageDecodeError) as err:
        decode_image(str(p) if source == "path" else p.read_bytes(), name=str(p))
    assert err.value.reason == NOT_AN_IMAGE == "not a recognised image (expected PNG, JPEG, WebP or BMP content)"
    assert str(err.value) == f"cannot decode image {str(p)!r}: {NOT_AN_IMAGE}"


EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nnewpath 0 0 moveto 10 10 lineto stroke\nshowpage\n%%EOF\n"


def _saved(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


@pytest.mark.parametrize("kind", ["eps", "gif", "tiff"])
def test_only_the_listed_formats_are_opened(tmp_path, monkeypatch, kind):
    """PostScript named .png must never reach Ghostscript (it runs the program); formats
    outside .png .jpg .jpeg .webp .bmp are refused whatever the name says."""
    from PIL import EpsImagePlugin

    ran = []

    def ghostscript(*args, **kwargs):
        ran.append(args)
        raise OSError("Ghostscript ran the file")

    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", ghostscript)
    content = {"eps": EPS, "gif": _saved(Image.new("P", (8, 8)), "GIF"),
               "tiff": _saved(Image.new("RGB", (8, 8)), "TIFF")}[kind]
    p = tmp_path / "face_1.png"
    p.write_bytes(content)
    for target in (None, 4):
        with pytest.raises(ImageDecodeError) as err:
            decode_image(str(p), target_size=target)
        assert err.value.reason == NOT_AN_IMAGE
    assert not ran


def test_an_mpo_camera_jpeg_decodes_at_reduced_scale_like_a_jpeg():
    """Cameras write JPEGs with a second frame, which PIL opens as MPO: decoded the same
    cheap way (DCT-domain draft) and to the same pixels as the first frame alone."""
    rng = np.random.default_rng(0)
    frame = Image.fromarray(rng.integers(0, 255, (512, 512, 3), dtype=np.uint8))
    mpo = _saved(frame, "MPO", save_all=True, append_images=[frame.transpose(Image.Transpose.FLIP_LEFT_RIGHT)])
    jpeg = _saved(frame, "JPEG")
    assert Image.open(io.BytesIO(mpo)).format == "MPO"
    for target in (None, 64):
        assert np.array_equal(np.asarray(decode_image(mpo, target_size=target)),
                              np.asarray(decode_image(jpeg, target_size=target)))


def test_decoding_leaves_the_warning_filters_alone(tmp_path, monkeypatch):
    """warnings.catch_warnings() swaps process-wide state: fused scoring decodes on several
    threads, so one decode's filter would leak into (or be undone under) another's."""
    import warnings

    swaps = []
    real = warnings.catch_warnings
    monkeypatch.setattr(warnings, "catch_warnings", lambda *a, **k: swaps.append(a) or real(*a, **k))
    p = tmp_path / "bomb.png"
    Image.new("L", (1200, 1000)).save(p)
    sizes = [decode_image(str(p), target_size=32).size]
    with pytest.raises(ImageDecodeError, match="exceeds the limit"):
        decode_image(str(p), max_pixels=1_000_000)
    monkeypatch.undo()
    assert sizes == [(32, 32)] and not swaps


def _trns_png(kind: str, side: int) -> bytes:
    """A PNG whose left half is transparent by a tRNS colour key (no alpha channel), the rest a
    mid-grey picture."""
    half = side // 2
    if kind == "RGB":
        arr = np.full((side, side, 3), (90, 140, 60), np.uint8)
        arr[:, :half] = (0, 0, 0)
        return _saved(Image.fromarray(arr), "PNG", transparency=(0, 0, 0))
    if kind == "L":
        arr = np.full((side, side), 120, np.uint8)
        arr[:, :half] = 7
        return _saved(Image.fromarray(arr), "PNG", transparency=7)
    if kind == "I;16":
        arr = np.tile(np.linspace(20000, 40000, side).astype(np.uint16), (side, 1))
        arr[:, :half] = 3
        return _saved(Image.fromarray(arr), "PNG", transparency=3)
    arr = np.full((side, side, 3), (90, 140, 60), np.uint8)  # P: a palette entry marked transparent
    arr[:, :half] = (0, 0, 0)
    return _saved(Image.fromarray(arr).convert("P"), "PNG", transparency=0)


@pytest.mark.parametrize("kind", ["RGB", "L", "I;16", "P"])
@pytest.mark.parametrize("side,target", [(16, None), (256, 32)])
def test_a_trns_colour_key_is_transparency_in_every_mode(kind, side, target):
    """PNG's tRNS chunk makes one colour transparent in RGB, L and 16-bit grey (palette entries
    in P): composited over white like an alpha channel, also on the reduced path."""
    data = _trns_png(kind, side)
    with Image.open(io.BytesIO(data)) as img:
        assert img.mode == kind and "transparency" in img.info
    out = np.asarray(decode_image(data, target_size=target)).astype(int)
    n = out.shape[1]
    assert (out[:, : n // 2 - 1] == 255).all(), out[0]  # the keyed half is white, not the key's colour
    right = out[:, n // 2 + 1:]
    if kind == "I;16":
        # the visible ramp (about 30000..40000) by bit depth: about 117..156
        assert 105 < right[..., 0].min() < 130 and 145 < right[..., 0].max() < 160
    else:
        assert (right < 250).all() and right.max() > 0  # the picture stays


def test_a_trns_key_that_no_pixel_uses_changes_nothing():
    arr = np.tile(np.linspace(0, 65535, 32).astype(np.uint16), (32, 1))
    keyed = _saved(Image.fromarray(arr), "PNG", transparency=12345)
    plain = _saved(Image.fromarray(arr), "PNG")
    assert np.array_equal(np.asarray(decode_image(keyed)), np.asarray(decode_image(plain)))


def test_truncated_file_raises(tmp_path):
    p = write_image(tmp_path / "t.jpg", size=256, fmt="JPEG")
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageDecodeError, match="t.jpg"):
        decode_image(str(p))


def test_decompression_bomb_is_refused(tmp_path):
    p = tmp_path / "bomb.png"
    Image.new("L", (3000, 3000)).save(p)  # 9 MP, tiny file
    with pytest.raises(ImageDecodeError, match="exceeds the limit"):
        decode_image(str(p), max_pixels=1_000_000)
    assert decode_image(str(p)).size == (3000, 3000)  # fine under the default limit


# measured peaks in bytes per pixel: 6 (16-bit), 8 (RGBA), 9 (palette with transparency) and
# 8 (RGB with a tRNS key: 4 to load, a mask, no alpha channel) now; 26, 20 and 17 before (and
# about 10 for 16-bit with float32 alone)
@pytest.mark.parametrize("mode,limit", [("I;16", 9), ("RGBA", 12), ("P", 12), ("RGB-key", 10)])
def test_large_16bit_alpha_and_palette_images_decode_in_little_memory(tmp_path, mode, limit):
    """A few-MB PNG may hold 25 MP of 16-bit grey, RGBA, a palette with transparency or RGB
    with a tRNS key: at a
    target size those are shrunk before their conversion to RGB, whose full-size copies cost
    16-26 bytes per pixel (a folder of them could exhaust a scoring actor). Measured in a
    fresh process."""
    import subprocess
    import sys

    side = 5000
    ramp = np.add.outer(*[np.linspace(0, 1, side, dtype=np.float32)] * 2)
    if mode == "I;16":
        img = Image.frombytes("I;16", (side, side), (ramp * 30000).astype("<u2").tobytes())
    elif mode == "RGBA":
        rgba = np.zeros((side, side, 4), np.uint8)
        rgba[..., 1] = 200
        rgba[..., 3] = (ramp * 127).astype(np.uint8)
        img = Image.fromarray(rgba, "RGBA")
    elif mode == "RGB-key":  # black marked transparent by a tRNS key, the rest a green ramp
        rgb = np.zeros((side, side, 3), np.uint8)
        rgb[..., 1] = (ramp * 127).astype(np.uint8)
        img = Image.fromarray(rgb, "RGB")
        img.info["transparency"] = (0, 0, 0)
    else:  # index 0 transparent, the rest a grey ramp
        img = Image.frombytes("P", (side, side), (ramp * 127).astype(np.uint8).tobytes())
        img.putpalette([v for i in range(256) for v in (i, i, i)])
        img.info["transparency"] = 0
    img.save(tmp_path / "big.png", compress_level=1)
    del img, ramp
    # VmHWM, the peak of this process image (ru_maxrss would carry pytest's from the fork)
    code = ("import numpy as np\n"
            "from artifact_core.images import decode_image\n"
            "def peak():\n"
            "    return int(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1]) * 1024\n"
            "before = peak()\n"
            f"out = decode_image({str(tmp_path / 'big.png')!r}, target_size=224)\n"
            "print(peak() - before, *out.size, float(np.asarray(out).std()))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    grew, width, height, spread = out.stdout.split()
    assert (int(width), int(height)) == (224, 224) and float(spread) > 5, out.stdout  # the ramp survived
    per_pixel = int(grew) / side**2
    assert per_pixel < limit, f"decoding took {per_pixel:.1f} bytes per pixel"


def _png_with_key(width: int, bitdepth: int, colortype: int, row: bytes, key: bytes) -> bytes:
    """A one-row PNG written by hand with a tRNS colour key (PIL cannot write these)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, 1, bitdepth, colortype, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"tRNS", key)
            + chunk(b"IDAT", zlib.compress(b"\x00" + row)) + chunk(b"IEND", b""))


def test_png_keys_in_file_units_meet_the_pixels_pil_unpacks():
    import struct

    # 2-bit grey 0,1,2,3 with key 1: PIL unpacks the pixels to 0,85,170,255 but not the key
    low = _png_with_key(4, 2, 0, bytes([0b00011011]), struct.pack(">H", 1))
    assert np.asarray(decode_image(low))[0, :, 0].tolist() == [0, 255, 170, 255]
    # 16-bit RGB: key (0,0,0) has no 8-bit counterpart; the dark opaque pixel must not turn white
    deep = _png_with_key(2, 16, 2, struct.pack(">HHHHHH", 30000, 30000, 30000, 100, 100, 100),
                         struct.pack(">HHH", 0, 0, 0))
    assert np.asarray(decode_image(deep))[0, 1].tolist() == [0, 0, 0]


def test_png_key_units_read_tiles_as_older_pillow_gives_them():
    """Pillow 10 gives a tile as a plain tuple (no ``.args``); pyproject allows it."""
    import io
    import struct

    from PIL import Image

    from artifact_core.images import _key_in_pixel_units

    img = Image.open(io.BytesIO(_png_with_key(4, 2, 0, bytes([0b00011011]), struct.pack(">H", 1))))
    img.tile = [tuple(img.tile[0])]
    _key_in_pixel_units(img)
    assert img.info["transparency"] == 85


def _noise(size: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8))


def test_a_jpeg_of_thousands_of_scans_is_refused_before_decoding():
    """Each scan passes over the whole image: a small file repeating one scan would take minutes."""
    data = _saved(_noise(64), "JPEG", progressive=True)
    sos = [i for i in range(len(data) - 1) if data[i:i + 2] == b"\xff\xda"]
    dht = data.rfind(b"\xff\xc4", 0, sos[1])  # a refinement scan with its Huffman table
    scan = data[dht:sos[2]]
    assert np.asarray(decode_image(data)).shape == (64, 64, 3)  # the honest file: about 10 scans
    hostile = data[:-2] + scan * 300 + b"\xff\xd9"
    with pytest.raises(ImageDecodeError, match=r"more than 100 JPEG scans"):
        decode_image(hostile, name="scans.jpg")


def test_a_jpeg_cut_short_and_zero_filled_is_refused_not_decoded_as_garbage():
    """What a preallocated download leaves when it stops: the right length, zeros at the end.
    libjpeg decodes such a file without an error."""
    data = _saved(_noise(96), "JPEG", quality=90)
    cut = len(data) // 2
    with pytest.raises(ImageDecodeError, match=r"half\.jpg': truncated JPEG"):
        decode_image(data[:cut] + bytes(len(data) - cut), name="half.jpg")


def test_valid_jpegs_and_webps_with_odd_bytes_still_decode():
    """The structural checks read markers, not byte patterns: what follows the end of the image
    (a motion photo's video, padding), marker bytes inside a comment or between segments, and a
    lossy WebP whose flat end encodes as zero bytes are all fine."""
    base = _saved(_noise(64), "JPEG", progressive=True, comment=b"\xff\xda" * 200)
    rng = np.random.default_rng(1)
    trailer = bytes(rng.integers(0, 256, 1 << 20, dtype=np.uint8)) + b"\xff\xda" * 150  # no end marker after
    stray = base.replace(b"\xff\xdb", b"\x00\x00\xff\xdb", 1)  # extraneous bytes before a marker
    for data in (base, base + trailer, base + bytes(4096), stray):
        assert decode_image(data, target_size=32).size == (32, 32)
    flat = _saved(Image.new("RGB", (2048, 2048), (200, 30, 30)), "WEBP", quality=80)
    assert flat.endswith(bytes(64))  # libwebp's flat end: a run of zero bytes
    assert decode_image(flat, target_size=32).getpixel((5, 5)) == pytest.approx((200, 30, 30), abs=3)


def test_what_decodes_far_bigger_than_its_pixel_count_is_refused_from_the_header():
    # WebP decodes whole, at about four times PNG's bytes per pixel: a quarter of the limit
    webp = _saved(Image.new("RGB", (1100, 1000)), "WEBP", lossless=True)
    png = _saved(Image.new("RGB", (1100, 1000)), "PNG")
    with pytest.raises(ImageDecodeError, match=r"1100x1000 pixels exceeds the limit of 1000000 for WebP"):
        decode_image(webp, max_pixels=3_000_000, target_size=32)
    assert decode_image(png, max_pixels=3_000_000, target_size=32).size == (32, 32)
    assert decode_image(webp, max_pixels=3_300_000, target_size=32).size == (32, 32)
    # a strip within the pixel limit whose rows alone would cost over a GB at 64,000,000 of them
    strip = _saved(Image.new("L", (1, 70_000)), "PNG")
    with pytest.raises(ImageDecodeError, match=r"1x70000 pixels: a side exceeds the limit of 65535"):
        decode_image(strip, target_size=32)


def test_a_fifo_or_device_named_like_an_image_is_refused_by_path(tmp_path):
    import os

    fifo = tmp_path / "fifo.png"
    os.mkfifo(fifo)  # opening it without O_NONBLOCK would wait for a writer forever
    link = tmp_path / "zero.png"
    link.symlink_to("/dev/zero")
    for p in (fifo, link):
        with pytest.raises(ImageDecodeError, match=rf"{p.name}.*not a regular file"):
            decode_image(str(p), target_size=32)


def test_a_cut_header_of_an_accepted_format_is_called_truncated():
    png = _saved(_noise(32), "PNG")
    with pytest.raises(ImageDecodeError, match="truncated or corrupt PNG header"):
        decode_image(png[:36], name="cut.png")
    with pytest.raises(ImageDecodeError, match=NOT_AN_IMAGE.replace("(", r"\(").replace(")", r"\)")):
        decode_image(b"GIF89a" + bytes(40), name="gif.png")
