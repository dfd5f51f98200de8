"""The shared decoder: odd-but-valid images decode to RGB, broken ones raise ImageDecodeError."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from artifact_core.images import ImageDecodeError, decode_image
from conftest import write_image


@pytest.mark.parametrize("mode,fmt,ext", [
    ("RGB", "PNG", "png"), ("RGBA", "PNG", "png"), ("L", "PNG", "png"), ("P", "PNG", "png"),
    ("LA", "PNG", "png"), ("CMYK", "JPEG", "jpg"), ("RGB", "WEBP", "webp"), ("RGB", "BMP", "bmp"),
])
def test_odd_but_valid_modes_decode_to_rgb(tmp_path, mode, fmt, ext):
    p = write_image(tmp_path / f"x.{ext}", mode=mode, fmt=fmt)
    img = decode_image(str(p))
    assert img.mode == "RGB" and img.size == (48, 48)
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


def test_transparent_pixels_become_white(tmp_path):
    p = tmp_path / "alpha.png"
    Image.new("RGBA", (8, 8), (0, 0, 0, 0)).save(p)
    assert np.asarray(decode_image(str(p))).min() == 255


@pytest.mark.parametrize("content,reason", [
    (b"", "empty"),
    (b"this is not an image", "UnidentifiedImageError"),
])
def test_broken_bytes_raise_naming_the_file(tmp_path, content, reason):
    p = tmp_path / "bad.png"
    p.write_bytes(content)
    with pytest.raises(ImageDecodeError) as err:
        decode_image(str(p))
    assert "bad.png" in str(err.value) and reason in str(err.value)


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


# measured peaks in bytes per pixel: 6 (16-bit), 8 (RGBA) and 9 (palette with transparency)
# now; 26, 20 and 17 before (and about 10 for 16-bit with float32 alone)
@pytest.mark.parametrize("mode,limit", [("I;16", 9), ("RGBA", 12), ("P", 12)])
def test_large_16bit_alpha_and_palette_images_decode_in_little_memory(tmp_path, mode, limit):
    """A few-MB PNG may hold 25 MP of 16-bit grey, RGBA or a palette with transparency: at a
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
