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
