"""The torch-free decode path: EXIF orientation, reduced-scale decode, same pixels as validation."""

from __future__ import annotations

import os

import io
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from artifact_core.decode import decode_array, decode_batch
from artifact_core.images import NOT_AN_IMAGE, decode_image, resize_image
from conftest import REPO, write_image


def smooth_image(width: int, height: int) -> Image.Image:
    """A photo-like image (smooth gradients plus detail) that JPEG compresses realistically."""
    y, x = np.mgrid[0:height, 0:width]
    arr = np.stack([(np.sin(x / 37) + 1) * 120, (np.cos(y / 23) + 1) * 120, (x * 255 // width)], -1)
    return Image.fromarray(arr.astype(np.uint8))


def test_decode_module_does_not_import_torch():
    code = ("import sys, artifact_core.decode\n"
            "bad = [m for m in ('torch', 'torchvision') if m in sys.modules]\n"
            "assert not bad, bad\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr


@pytest.mark.parametrize("target", [None, 16])
def test_exif_rotated_jpeg_comes_out_upright(tmp_path, target):
    upright = np.zeros((60, 40, 3), dtype=np.uint8)  # 40 wide, 60 tall: red top, blue bottom
    upright[:30] = (230, 20, 20)
    upright[30:] = (20, 20, 230)
    # A phone stores the sensor's landscape pixels and a tag: orientation 6 = "rotate 90 deg
    # clockwise to display".
    stored = Image.fromarray(upright).transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6
    p = tmp_path / "phone.jpg"
    stored.save(p, "JPEG", quality=95, exif=exif.tobytes())
    assert Image.open(p).size == (60, 40)
    img = decode_image(str(p), target_size=target)
    arr = np.asarray(img).astype(int)
    h = arr.shape[0]
    assert img.size == ((40, 60) if target is None else (16, 16))
    assert arr[: h // 3, :, 0].mean() > 180 and arr[: h // 3, :, 2].mean() < 60  # red on top
    assert arr[-h // 3:, :, 2].mean() > 180 and arr[-h // 3:, :, 0].mean() < 60  # blue below


@pytest.mark.parametrize("fmt,size,target", [("JPEG", (1024, 768), 128), ("JPEG", (900, 900), 224),
                                             ("PNG", (1024, 1024), 128)])
def test_reduced_decode_is_close_to_full_decode_and_resize(fmt, size, target):
    buf = io.BytesIO()
    smooth_image(*size).save(buf, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    data = buf.getvalue()
    fast = np.asarray(decode_image(data, target_size=target)).astype(float)
    full = np.asarray(resize_image(decode_image(data), target)).astype(float)
    assert fast.shape == full.shape == (target, target, 3)
    diff = np.abs(fast - full)
    assert diff.mean() < 1.5, diff.mean()
    # it really took the cheap path (else this test would prove nothing)
    assert diff.max() > 0


def test_jpeg_draft_never_goes_below_the_target():
    buf = io.BytesIO()
    smooth_image(1000, 300).save(buf, "JPEG")  # 300 / 128 < 4: at most 1/2 scale on that side
    with Image.open(io.BytesIO(buf.getvalue())) as img:
        img.draft(None, (128, 128))
        assert min(img.size) >= 128
    assert decode_image(buf.getvalue(), target_size=128).size == (128, 128)


def _batch(paths):
    """A batch as scoring's dataset hands it over: the listed paths as bytes."""
    return {"raw_path": np.array([os.fsencode(str(p)) for p in paths], dtype=object)}


def test_decode_batch_equals_what_validation_sees(tmp_path):
    import torch

    from artifact_core.dataset import ImageFileDataset
    from artifact_core.predict import TorchEngine
    from artifact_core.transforms import eval_resize, eval_transform, normalize

    paths = [write_image(tmp_path / "small.png", size=20),  # upsampled
             write_image(tmp_path / "odd.jpg", size=97, fmt="JPEG"),
             write_image(tmp_path / "palette.png", mode="P"),
             tmp_path / "big.jpg", tmp_path / "wide.png", tmp_path / "deep16.png"]
    smooth_image(700, 500).save(paths[3], "JPEG")
    smooth_image(600, 200).save(paths[4])
    Image.fromarray((np.arange(80 * 80, dtype=np.uint16).reshape(80, 80) * 9)).save(paths[5])
    size = 48
    out = decode_batch(_batch(paths), image_size=size, root=str(tmp_path))
    assert list(out["error"]) == [""] * len(paths)
    assert list(out["filename"]) == [p.name for p in paths]
    assert out["image"].dtype == np.uint8 and out["image"].shape == (len(paths), 3, size, size)
    # validation: the dataset with the same target size and the eval transform
    val = ImageFileDataset([str(p) for p in paths], [1] * len(paths), eval_transform(image_size=size), target_size=size)
    expected = torch.stack([val[i][0] for i in range(len(paths))])
    got = normalize()(torch.from_numpy(out["image"]))
    assert torch.allclose(got, expected, atol=1e-6)
    # the engines' own normalization (on the device) is the same arithmetic
    engine = TorchEngine.__new__(TorchEngine)
    engine.mean = torch.tensor([0.485, 0.456, 0.406]).view(1, -1, 1, 1)
    engine.std = torch.tensor([0.229, 0.224, 0.225]).view(1, -1, 1, 1)
    assert torch.allclose(engine.normalize(torch.from_numpy(out["image"])), expected, atol=1e-5)
    # an image too small to decode reduced: with or without the target size, same pixels
    assert np.array_equal(decode_array(str(paths[0]), size), eval_resize(image_size=size)(decode_image(str(paths[0]))).numpy())


def test_decode_batch_turns_failures_into_error_rows(tmp_path):
    good = write_image(tmp_path / "a.png")
    bad = tmp_path / "b.png"
    bad.write_text("not an image")
    out = decode_batch(_batch([good, bad]), image_size=16, root=str(tmp_path))
    assert out["error"][0] == "" and out["error"][1] == NOT_AN_IMAGE
    assert out["image"][0].any() and not out["image"][1].any()


def test_filename_is_relative_for_a_root_that_is_not_utf8_or_is_slash(tmp_path):
    """The ``filename`` column is relative to --input whether its own name has bytes that are
    not UTF-8 (given as listed, or as scoring's driver shows it) or it is "/"."""
    from artifact_core.data import list_image_files
    from artifact_core.storage import display_path

    root = os.path.join(os.fsencode(str(tmp_path)), b"in_caf\xe9")
    os.makedirs(os.path.join(root, b"sub"))
    Image.new("RGB", (16, 16)).save(os.fsdecode(os.path.join(root, b"sub", b"x\xff.png")))
    paths, fs, listed_root = list_image_files(os.fsdecode(root))
    assert listed_root.endswith("in_caf\udce9")
    for given in (listed_root, display_path(listed_root)):
        out = decode_batch(_batch(paths), image_size=16, root=given, fs=fs)
        assert list(out["error"]) == [""] and list(out["filename"]) == ["sub/x\\xff.png"]
    plain = write_image(tmp_path / "plain.png", size=16)
    out = decode_batch(_batch([plain]), image_size=16, root="/")
    assert list(out["filename"]) == [str(plain)[1:]]
