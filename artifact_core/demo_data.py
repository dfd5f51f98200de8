"""Deterministic procedural face images, some with generator-style artifacts.

Run ``python -m artifact_core.demo_data OUT`` to write::

    OUT/train/image_<idx>_<label>.png   labelled (0 = artifact, 1 = artifact-free), about 1:9
    OUT/test/image_<idx>.png            unlabelled
    OUT/test_labels.csv                 filename,label for the test folder
    OUT/sample_grid.png                 a labelled preview

Clean faces vary in pose, size, skin tone, hair, eyes, mouth and background. Artifact
faces get one defect of the kinds generative models produce: a third eye, a misplaced
eye, a doubled or melted mouth, a smeared skin patch, stray text, strongly asymmetric
eyes, or a piece of a mask.

``--difficulty subtle`` draws the same faces at 512-1024 px with moles, uneven lighting and
skin texture on every face, and gives artifact faces one small, low-contrast defect of the
kinds real generators leave (:data:`SUBTLE_DEFECTS`): a skin blob, a discoloured patch, a
doubled contour, a distorted feature, a duplicated part, or mismatched eyes, each drawn
at a random size and strength. Clean and artifact faces come from the same generator, so
only the defect tells them apart. The default ``easy`` data is unchanged.
"""

from __future__ import annotations

import argparse
import csv
import inspect
import logging
import math
import multiprocessing
import os
import random
import sys
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from artifact_core.data import ARTIFACT, CLEAN

DEFECTS = ("third_eye", "misplaced_eye", "double_mouth", "smear", "text", "asymmetric_eyes", "mask_piece")
SUBTLE_DEFECTS = ("skin_blob", "discoloured_patch", "doubled_contour", "distorted_feature", "duplicated_part",
                  "mismatched_eyes")
DIFFICULTIES = ("easy", "subtle")
_SKIN = [(255, 224, 196), (241, 194, 150), (224, 172, 125), (198, 134, 66), (141, 85, 36), (92, 56, 30)]
_HAIR = [(20, 15, 10), (60, 40, 25), (120, 80, 40), (200, 160, 90), (150, 150, 150), (160, 50, 20)]
_TINTS = [(90, 160, 90), (90, 110, 200), (170, 90, 170), (200, 190, 80)]
_IRIS = [(70, 50, 30), (40, 90, 160), (60, 120, 70), (110, 80, 50)]


@dataclass
class _Face:
    cx: float
    cy: float
    rx: float
    ry: float
    skin: tuple
    eye_dx: float
    eye_y: float
    eye_r: float
    mouth_y: float
    mouth_w: float
    tilt: float


def _jitter(rng: random.Random, color: tuple, amount: int = 18) -> tuple:
    return tuple(max(0, min(255, c + rng.randint(-amount, amount))) for c in color)


def _eye(draw: ImageDraw.ImageDraw, x: float, y: float, r: float, iris: tuple) -> None:
    draw.ellipse([x - 1.6 * r, y - r, x + 1.6 * r, y + r], fill=(250, 250, 245), outline=(40, 30, 30), width=max(1, int(r / 4)))
    draw.ellipse([x - 0.8 * r, y - 0.8 * r, x + 0.8 * r, y + 0.8 * r], fill=iris)
    draw.ellipse([x - 0.35 * r, y - 0.35 * r, x + 0.35 * r, y + 0.35 * r], fill=(10, 10, 10))


def _mouth(draw: ImageDraw.ImageDraw, x: float, y: float, w: float, smile: float, color: tuple) -> None:
    box = [x - w / 2, y - w * 0.25 - smile, x + w / 2, y + w * 0.25 + smile]
    draw.arc(box, start=10, end=170, fill=color, width=max(2, int(w / 8)))


def _draw_face(rng: random.Random, size: int) -> tuple[Image.Image, _Face, dict]:
    top = _jitter(rng, rng.choice([(180, 200, 220), (220, 210, 190), (90, 110, 130), (200, 180, 200), (120, 140, 110)]), 30)
    bottom = _jitter(rng, top, 60)
    img = Image.new("RGB", (size, size))
    draw = ImageDraw.Draw(img)
    for yy in range(size):  # vertical gradient background
        t = yy / size
        draw.line([(0, yy), (size, yy)], fill=tuple(int(a * (1 - t) + b * t) for a, b in zip(top, bottom)))
    s = size / 256
    face = _Face(
        cx=size / 2 + rng.uniform(-14, 14) * s, cy=size / 2 + rng.uniform(-6, 12) * s,
        rx=rng.uniform(62, 78) * s, ry=rng.uniform(80, 96) * s, skin=_jitter(rng, rng.choice(_SKIN), 12),
        eye_dx=rng.uniform(24, 32) * s, eye_y=rng.uniform(-22, -12) * s, eye_r=rng.uniform(7, 10) * s,
        mouth_y=rng.uniform(38, 50) * s, mouth_w=rng.uniform(34, 48) * s, tilt=rng.uniform(-6, 6) * s,
    )
    hair = _jitter(rng, rng.choice(_HAIR), 10)
    # hair behind the head, neck, head, ears
    draw.ellipse([face.cx - face.rx * 1.12, face.cy - face.ry * 1.15, face.cx + face.rx * 1.12,
                  face.cy + face.ry * rng.uniform(0.1, 0.9)], fill=hair)
    draw.rectangle([face.cx - face.rx * 0.4, face.cy + face.ry * 0.7, face.cx + face.rx * 0.4, size], fill=_jitter(rng, face.skin, 6))
    for side in (-1, 1):
        ex = face.cx + side * face.rx * 0.98
        draw.ellipse([ex - 10 * s, face.cy - 14 * s, ex + 10 * s, face.cy + 14 * s], fill=face.skin)
    draw.ellipse([face.cx - face.rx, face.cy - face.ry, face.cx + face.rx, face.cy + face.ry], fill=face.skin)
    # fringe
    draw.chord([face.cx - face.rx * 1.02, face.cy - face.ry * 1.08, face.cx + face.rx * 1.02,
                face.cy - face.ry * rng.uniform(0.2, 0.5)], start=180, end=360, fill=hair)
    iris = rng.choice(_IRIS)
    brow = tuple(int(c * 0.6) for c in hair)
    for side in (-1, 1):
        x = face.cx + side * face.eye_dx
        y = face.cy + face.eye_y + side * face.tilt * 0.3
        _eye(draw, x, y, face.eye_r, iris)
        draw.line([x - 14 * s, y - 16 * s + rng.uniform(-2, 2) * s, x + 14 * s, y - 17 * s], fill=brow, width=max(2, int(4 * s)))
    nose = tuple(int(c * 0.8) for c in face.skin)
    draw.line([face.cx, face.cy - 4 * s, face.cx - 6 * s, face.cy + 20 * s, face.cx + 4 * s, face.cy + 22 * s], fill=nose, width=max(2, int(3 * s)))
    lips = _jitter(rng, (170, 70, 70), 25)
    _mouth(draw, face.cx, face.cy + face.mouth_y, face.mouth_w, rng.uniform(0, 8) * s, lips)
    extra = {"iris": iris, "lips": lips, "hair": hair}
    return img, face, extra


def _add_defect(rng: random.Random, img: Image.Image, face: _Face, extra: dict, defect: str) -> Image.Image:
    size = img.size[0]
    s = size / 256
    draw = ImageDraw.Draw(img)
    if defect == "third_eye":
        x = face.cx + rng.uniform(-12, 12) * s
        y = face.cy + face.eye_y + rng.choice([-30, 24]) * s
        _eye(draw, x, y, face.eye_r * rng.uniform(0.9, 1.2), extra["iris"])
    elif defect == "misplaced_eye":
        side = rng.choice([-1, 1])
        x = face.cx + side * face.eye_dx
        y = face.cy + face.eye_y
        draw.ellipse([x - 2 * face.eye_r, y - 1.3 * face.eye_r, x + 2 * face.eye_r, y + 1.3 * face.eye_r], fill=face.skin)
        _eye(draw, x + side * rng.uniform(4, 12) * s, y + rng.uniform(22, 34) * s, face.eye_r, extra["iris"])
    elif defect == "double_mouth":
        dy = rng.uniform(12, 18) * s
        _mouth(draw, face.cx + rng.uniform(-8, 8) * s, face.cy + face.mouth_y - dy, face.mouth_w * rng.uniform(0.8, 1.1), 3 * s, extra["lips"])
        if rng.random() < 0.5:  # melted: drip the lower lip down
            y0 = face.cy + face.mouth_y
            for _ in range(4):
                x = face.cx + rng.uniform(-face.mouth_w / 2, face.mouth_w / 2)
                draw.line([x, y0, x + rng.uniform(-4, 4) * s, y0 + rng.uniform(10, 22) * s], fill=extra["lips"], width=max(2, int(4 * s)))
    elif defect == "smear":
        w = int(rng.uniform(40, 64) * s)
        x0 = int(face.cx + rng.uniform(-face.rx * 0.7, face.rx * 0.7 - w))
        y0 = int(face.cy + rng.uniform(-face.ry * 0.5, face.ry * 0.5 - w))
        box = (x0, y0, x0 + w, y0 + w)
        patch = img.crop(box).filter(ImageFilter.GaussianBlur(radius=4 * s))
        patch = patch.transform(patch.size, Image.Transform.AFFINE, (1, rng.uniform(-0.8, 0.8), 0, 0.3, 1, 0),
                                  fillcolor=face.skin)
        streak = ImageDraw.Draw(patch)
        for _ in range(6):
            yy = rng.uniform(0, w)
            streak.line([0, yy, w, yy + rng.uniform(-6, 6)], fill=_jitter(rng, face.skin, 50), width=max(1, int(3 * s)))
        img.paste(patch, box[:2])
    elif defect == "text":
        letters = "".join(rng.choice("ABCDEFGHKMNPRSTWXZ0123456789") for _ in range(rng.randint(3, 6)))
        x = rng.uniform(6, size * 0.5)
        y = rng.choice([rng.uniform(4, size * 0.15), rng.uniform(size * 0.8, size * 0.9), face.cy + rng.uniform(-10, 10) * s])
        color = rng.choice([(255, 255, 255), (0, 0, 0), (230, 40, 40)])
        # PIL's default bitmap font is tiny; draw it large so it survives resizing.
        layer = Image.new("L", (len(letters) * 8 + 4, 14), 0)
        ImageDraw.Draw(layer).text((2, 1), letters, fill=255)
        scale = rng.uniform(2.0, 3.0) * s
        layer = layer.resize((int(layer.width * scale), int(layer.height * scale)), Image.Resampling.NEAREST)
        img.paste(Image.new("RGB", layer.size, color), (int(x), int(y)), layer)
    elif defect == "asymmetric_eyes":
        side = rng.choice([-1, 1])
        x = face.cx + side * face.eye_dx
        y = face.cy + face.eye_y + side * face.tilt * 0.3
        _eye(draw, x, y, face.eye_r * rng.uniform(1.7, 2.1), rng.choice(_IRIS))
    elif defect == "mask_piece":
        color = rng.choice([(120, 170, 210), (230, 230, 235), (40, 40, 50)])
        y = face.cy + rng.uniform(5, 20) * s
        pts = [(face.cx - face.rx * rng.uniform(0.2, 0.9), y), (face.cx + face.rx * rng.uniform(0.1, 0.5), y + rng.uniform(-6, 6) * s),
               (face.cx + face.rx * rng.uniform(0.0, 0.4), y + rng.uniform(30, 50) * s), (face.cx - face.rx * rng.uniform(0.3, 0.8), y + rng.uniform(25, 45) * s)]
        draw.polygon(pts, fill=color)
        draw.line([pts[0], (face.cx - face.rx * 1.05, face.cy - 4 * s)], fill=color, width=max(1, int(2 * s)))
    else:
        raise ValueError(f"unknown defect {defect!r}; expected one of {DEFECTS}")
    return img


def render_face(seed: int, *, size: int = 256, defect: str | None = None) -> Image.Image:
    """One face image; ``defect`` (one of :data:`DEFECTS`) adds an artifact."""
    rng = random.Random(seed)
    big = size * 2  # draw at 2x, then downsample: cheap anti-aliasing
    img, face, extra = _draw_face(rng, big)
    if defect is not None:
        img = _add_defect(rng, img, face, extra, defect)
    img = img.rotate(rng.uniform(-8, 8), resample=Image.Resampling.BILINEAR, fillcolor=img.getpixel((0, 0)))
    img = img.resize((size, size), Image.Resampling.LANCZOS)
    # light sensor-like noise so "clean" is not perfectly flat colour
    # (numpy, seeded: PIL's effect_noise uses the C library's unseeded rand)
    noise = np.random.default_rng(seed).normal(0.0, rng.uniform(3, 7), (size, size, 1))
    return Image.fromarray(np.clip(np.asarray(img, dtype=np.float32) + noise, 0, 255).astype(np.uint8))


# ---------------------------------------------------------------------------------------
# Subtle difficulty: small, low-contrast defects on faces with natural nuisances.
# Everything works on float arrays in local windows, so a 1024 px image costs tens of ms.


def _window(shape: tuple, cx: float, cy: float, half: float) -> tuple[slice, slice, np.ndarray, np.ndarray]:
    """Slices of a square window around (cx, cy), clipped to the image, and its pixel grids."""
    h, w = shape[:2]
    x0, x1 = max(0, int(cx - half)), min(w, int(cx + half) + 1)
    y0, y1 = max(0, int(cy - half)), min(h, int(cy + half) + 1)
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    return slice(y0, y1), slice(x0, x1), yy, xx


def _soft_ellipse(yy: np.ndarray, xx: np.ndarray, cx: float, cy: float, rx: float, ry: float,
                  angle: float = 0.0) -> np.ndarray:
    """1 inside, falling smoothly to 0 at the rim (no hard edge a detector could key on)."""
    c, s_ = math.cos(angle), math.sin(angle)
    dx, dy = xx - cx, yy - cy
    u, v = (dx * c + dy * s_) / max(rx, 1e-3), (-dx * s_ + dy * c) / max(ry, 1e-3)
    return np.exp(-((u * u + v * v) ** 1.5) * 1.5).astype(np.float32)


def _tint(arr: np.ndarray, mask_win: tuple, target: np.ndarray, alpha: float) -> None:
    """Blend the window towards ``target`` (an RGB triple or an array) by ``alpha * mask``."""
    ys, xs, mask = mask_win
    a = (alpha * mask)[..., None]
    arr[ys, xs] = arr[ys, xs] * (1 - a) + target * a


def _nuisance(rng: random.Random, arr: np.ndarray, face: _Face, s: float) -> None:
    """What every subtle face gets, clean or not: uneven light, skin texture, a few moles."""
    h, w = arr.shape[:2]
    # Light from one side: a smooth +-6 % gradient.
    ang = rng.uniform(0, 2 * math.pi)
    gy, gx = np.linspace(-1, 1, h, dtype=np.float32)[:, None], np.linspace(-1, 1, w, dtype=np.float32)[None, :]
    arr *= (1 + rng.uniform(0.02, 0.06) * (gx * math.cos(ang) + gy * math.sin(ang)))[..., None]
    # Low-frequency texture: a coarse random field upsampled (cheap, seeded).
    coarse = np.random.default_rng(rng.randrange(2**31)).normal(0, 1, (24, 24)).astype(np.float32)
    field = np.asarray(Image.fromarray(coarse, "F").resize((w, h), Image.Resampling.BICUBIC))
    arr += (rng.uniform(2.0, 5.0) * field)[..., None]
    for _ in range(rng.randint(0, 4)):
        x = face.cx + rng.uniform(-0.75, 0.75) * face.rx
        y = face.cy + rng.uniform(-0.6, 0.7) * face.ry
        r = rng.uniform(1.2, 3.0) * s
        ys, xs, yy, xx = _window(arr.shape, x, y, 3 * r)
        _tint(arr, (ys, xs, _soft_ellipse(yy, xx, x, y, r, r)),
              np.asarray(face.skin, dtype=np.float32) * rng.uniform(0.45, 0.7), rng.uniform(0.6, 0.9))


def _face_point(rng: random.Random, face: _Face, s: float) -> tuple[float, float]:
    """A point on the skin: cheek, forehead or chin, away from eyes and mouth."""
    where = rng.choice(["cheek", "forehead", "chin"])
    side = rng.choice([-1, 1])
    if where == "cheek":
        return face.cx + side * rng.uniform(0.35, 0.65) * face.rx, face.cy + rng.uniform(0.05, 0.35) * face.ry
    if where == "forehead":
        return face.cx + rng.uniform(-0.35, 0.35) * face.rx, face.cy + face.eye_y - rng.uniform(26, 36) * s
    return face.cx + rng.uniform(-0.3, 0.3) * face.rx, face.cy + face.mouth_y + rng.uniform(18, 26) * s


def _eye_center(face: _Face, side: int) -> tuple[float, float]:
    return face.cx + side * face.eye_dx, face.cy + face.eye_y + side * face.tilt * 0.3


def _remap(arr: np.ndarray, ys: slice, xs: slice, sy: np.ndarray, sx: np.ndarray) -> None:
    """Resample the window at source coordinates (sy, sx), bilinear."""
    h, w = arr.shape[:2]
    sy, sx = np.clip(sy, 0, h - 1.001), np.clip(sx, 0, w - 1.001)
    y0, x0 = sy.astype(np.int64), sx.astype(np.int64)
    fy, fx = (sy - y0)[..., None], (sx - x0)[..., None]
    a, b = arr[y0, x0], arr[y0, x0 + 1]
    c, d = arr[y0 + 1, x0], arr[y0 + 1, x0 + 1]
    arr[ys, xs] = (a * (1 - fx) + b * fx) * (1 - fy) + (c * (1 - fx) + d * fx) * fy


def _subtle_defect(rng: random.Random, arr: np.ndarray, face: _Face, extra: dict, defect: str, s: float) -> None:
    """One small, low-contrast defect drawn into ``arr`` (float RGB, drawing coordinates)."""
    skin = np.asarray(face.skin, dtype=np.float32)
    if defect == "skin_blob":
        # A lump of off-colour skin with its own highlight, as GAN "droplet" artifacts.
        x, y = _face_point(rng, face, s)
        r = rng.uniform(5, 12) * s
        ys, xs, yy, xx = _window(arr.shape, x, y, 3 * r)
        shift = np.asarray([rng.uniform(-1, 1) for _ in range(3)], dtype=np.float32)
        shift = shift / (np.abs(shift).max() + 1e-6) * rng.uniform(14, 30)
        mask = _soft_ellipse(yy, xx, x, y, r * rng.uniform(0.7, 1.3), r, rng.uniform(0, math.pi))
        _tint(arr, (ys, xs, mask), np.clip(skin + shift, 0, 255), rng.uniform(0.5, 0.9))
        hx, hy = x - 0.3 * r, y - 0.3 * r
        _tint(arr, (ys, xs, _soft_ellipse(yy, xx, hx, hy, 0.3 * r, 0.25 * r)), np.minimum(skin + 40, 255),
              rng.uniform(0.2, 0.45))
    elif defect == "discoloured_patch":
        # Part of a feature or of the skin takes a wrong hue (an iris, the lips, a cheek).
        target = rng.choice(["iris", "lips", "skin"])
        if target == "iris":
            x, y = _eye_center(face, rng.choice([-1, 1]))
            r = face.eye_r * rng.uniform(0.6, 0.9)
        elif target == "lips":
            x = face.cx + rng.uniform(-0.35, 0.35) * face.mouth_w
            y = face.cy + face.mouth_y + face.mouth_w * 0.2
            r = face.mouth_w * rng.uniform(0.15, 0.28)
        else:
            x, y = _face_point(rng, face, s)
            r = rng.uniform(10, 20) * s
        ys, xs, yy, xx = _window(arr.shape, x, y, 3 * r)
        mask = np.zeros_like(yy)
        for _ in range(rng.randint(2, 4)):  # an irregular union of blobs
            mask = np.maximum(mask, _soft_ellipse(yy, xx, x + rng.uniform(-0.5, 0.5) * r, y + rng.uniform(-0.4, 0.4) * r,
                                                  r * rng.uniform(0.5, 0.9), r * rng.uniform(0.4, 0.8)))
        win = arr[ys, xs]
        # A hue far from the region's own (a green tint on a green iris would not show).
        here = (win * mask[..., None]).sum(axis=(0, 1)) / max(float(mask.sum()), 1e-6)
        tints = sorted(_TINTS, key=lambda t: -float(np.abs(np.asarray(t) / np.mean(t) - here / max(here.mean(), 1e-6)).sum()))
        tint = np.asarray(rng.choice(tints[:2]), dtype=np.float32)
        # Keep the local brightness, change the hue: blend towards the tint scaled to the pixel's luminance.
        lum = win.mean(axis=2, keepdims=True)
        target_px = tint / tint.mean() * lum
        a = (rng.uniform(0.25, 0.5) * mask)[..., None]
        arr[ys, xs] = win * (1 - a) + target_px * a
    elif defect == "doubled_contour":
        # A faint second outline beside a real one: the jaw, a brow, or the mouth line.
        part = rng.choice(["jaw", "brow", "mouth"])
        layer = Image.new("L", (arr.shape[1], arr.shape[0]), 0)
        d = ImageDraw.Draw(layer)
        off = (rng.uniform(3, 8) * s * rng.choice([-1, 1]), rng.uniform(2, 6) * s * rng.choice([-1, 1]))
        width = max(1, int(rng.uniform(1.5, 3) * s))
        if part == "jaw":
            start = rng.uniform(10, 120)
            box = [face.cx - face.rx + off[0], face.cy - face.ry + off[1], face.cx + face.rx + off[0], face.cy + face.ry + off[1]]
            d.arc(box, start=start, end=start + rng.uniform(35, 70), fill=255, width=width)
            color = None  # a shadow line: darkens whatever lies under it (skin, hair or background)
        elif part == "brow":
            x, y = _eye_center(face, rng.choice([-1, 1]))
            d.line([x - 14 * s + off[0], y - 16 * s + off[1], x + 14 * s + off[0], y - 17 * s + off[1]],
                   fill=255, width=max(1, int(3 * s)))
            color = None  # brows may lie under the fringe: a shadow shows on hair too
        else:
            w_, x, y = face.mouth_w, face.cx + off[0], face.cy + face.mouth_y + off[1]
            d.arc([x - w_ / 2, y - w_ * 0.25, x + w_ / 2, y + w_ * 0.25], start=20, end=160, fill=255, width=width)
            color = np.asarray(extra["lips"], dtype=np.float32)
        box = layer.getbbox() or (0, 0, 1, 1)  # an empty layer (never seen) draws nothing
        pad = int(3 * s)
        x0, y0, x1, y1 = max(0, box[0] - pad), max(0, box[1] - pad), box[2] + pad, box[3] + pad
        mask = np.asarray(layer.crop((x0, y0, x1, y1)).filter(ImageFilter.GaussianBlur(0.8 * s)), dtype=np.float32) / 255
        ys, xs = slice(y0, y0 + mask.shape[0]), slice(x0, x0 + mask.shape[1])
        mask = mask[: arr[ys, xs].shape[0], : arr[ys, xs].shape[1]]
        if color is None:
            arr[ys, xs] *= (1 - rng.uniform(0.25, 0.45) * mask)[..., None]
        else:
            _tint(arr, (ys, xs, mask), color, rng.uniform(0.35, 0.7))
    elif defect == "distorted_feature":
        # A local warp: an eye, the mouth or the nose tip bent out of shape.
        part = rng.choice(["eye", "eye", "mouth", "nose"])
        if part == "eye":
            (x, y), r = _eye_center(face, rng.choice([-1, 1])), face.eye_r * 2.2
        elif part == "mouth":
            x, y, r = face.cx + rng.uniform(-0.3, 0.3) * face.mouth_w, face.cy + face.mouth_y, face.mouth_w * 0.5
        else:
            x, y, r = face.cx - 2 * s, face.cy + 18 * s, 12 * s
        ys, xs, yy, xx = _window(arr.shape, x, y, r)
        dx, dy = xx - x, yy - y
        dist = np.sqrt(dx * dx + dy * dy) / r
        fall = np.clip(1 - dist, 0, 1) ** 2
        amp = rng.uniform(0.18, 0.35) * r
        theta = rng.uniform(0, 2 * math.pi)
        k = rng.uniform(1.5, 3.5)
        # a smooth wave displacement plus a little swirl
        wave = np.sin(k * (dx * math.cos(theta) + dy * math.sin(theta)) / r * math.pi)
        swirl = rng.uniform(-0.6, 0.6) * fall
        cs, sn = np.cos(swirl), np.sin(swirl)
        sx = x + dx * cs - dy * sn + amp * fall * wave * math.cos(theta + math.pi / 2)
        sy = y + dx * sn + dy * cs + amp * fall * wave * math.sin(theta + math.pi / 2)
        _remap(arr, ys, xs, sy, sx)
    elif defect == "duplicated_part":
        # A piece of a feature copied a little way off, half transparent: a second pupil,
        # a ghost eye, a repeated bit of brow or lip.
        part = rng.choice(["pupil", "brow", "eye", "lip"])
        if part == "pupil":
            (x, y), r = _eye_center(face, rng.choice([-1, 1])), face.eye_r * 0.7
            off = (rng.uniform(0.5, 0.9) * face.eye_r * rng.choice([-1, 1]), rng.uniform(-0.3, 0.3) * face.eye_r)
        elif part == "brow":
            x, y = _eye_center(face, rng.choice([-1, 1]))
            y, r = y - 16 * s, 9 * s
            off = (rng.uniform(-6, 6) * s, -rng.uniform(7, 12) * s)
        elif part == "eye":
            (x, y), r = _eye_center(face, rng.choice([-1, 1])), face.eye_r * 1.3
            off = (rng.uniform(-0.5, 0.5) * face.eye_r, rng.uniform(1.2, 1.8) * face.eye_r * rng.choice([-1, 1]))
        else:
            # centred on the bottom of the lip arc, so the copy carries lip, not skin
            x, y, r = face.cx + rng.uniform(-0.2, 0.2) * face.mouth_w, face.cy + face.mouth_y + 0.25 * face.mouth_w, face.mouth_w * 0.3
            off = (rng.uniform(-4, 4) * s, rng.uniform(7, 12) * s * rng.choice([-1, 1]))
        src_ys, src_xs, yy, xx = _window(arr.shape, x, y, 1.6 * r)
        patch = arr[src_ys, src_xs].copy()
        mask = _soft_ellipse(yy, xx, x, y, r, r)
        h, w = arr.shape[:2]
        # kept inside the image, so every artifact image really has its defect
        ty = min(max(0, src_ys.start + int(off[1])), h - patch.shape[0])
        tx = min(max(0, src_xs.start + int(off[0])), w - patch.shape[1])
        dst = (slice(ty, ty + patch.shape[0]), slice(tx, tx + patch.shape[1]))
        a = (rng.uniform(0.35, 0.7) * mask)[..., None]
        arr[dst] = arr[dst] * (1 - a) + patch * a
    elif defect == "mismatched_eyes":
        # One eye differs from the other: its iris in another colour, its pupil larger.
        side = rng.choice([-1, 1])
        x, y = _eye_center(face, side)
        r = face.eye_r
        ys, xs, yy, xx = _window(arr.shape, x, y, 1.2 * r)
        iris = _soft_ellipse(yy, xx, x, y, 0.75 * r, 0.75 * r)
        other = np.asarray(rng.choice([c for c in _IRIS if c != extra["iris"]]), dtype=np.float32)
        _tint(arr, (ys, xs, iris * (1 - _soft_ellipse(yy, xx, x, y, 0.35 * r, 0.35 * r))), other, rng.uniform(0.45, 0.8))
        pupil = rng.uniform(1.25, 1.6)
        _tint(arr, (ys, xs, _soft_ellipse(yy, xx, x, y, 0.35 * r * pupil, 0.35 * r * pupil)),
              np.asarray((10, 10, 10), dtype=np.float32), 0.9)
    else:
        raise ValueError(f"unknown subtle defect {defect!r}; expected one of {SUBTLE_DEFECTS}")


def render_subtle_face(seed: int, *, size: int = 1024, defect: str | None = None) -> Image.Image:
    """One face of the subtle set; ``defect`` (one of :data:`SUBTLE_DEFECTS`) adds an artifact.

    The same seed with and without a defect gives the same face, light, pose and noise:
    the defect is the only difference.
    """
    rng = random.Random(seed)
    # Drawn at the final size: 2x supersampling would cost 4x at 1024 px, and the bilinear
    # rotation below smooths the edges alike for both classes.
    img, face, extra = _draw_face(rng, size)
    s = size / 256
    angle, sigma = rng.uniform(-8, 8), rng.uniform(2, 5)
    arr = np.asarray(img, dtype=np.float32).copy()
    _nuisance(rng, arr, face, s)
    if defect is not None:
        # Its own random stream: the face's draws above stay the same with or without a defect.
        _subtle_defect(random.Random(seed * 1_000_003 + 17), arr, face, extra, defect, s)
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    img = img.rotate(angle, resample=Image.Resampling.BILINEAR, fillcolor=img.getpixel((0, 0)))
    noise = np.random.default_rng(seed).standard_normal((size, size, 1), dtype=np.float32) * sigma
    return Image.fromarray(np.clip(np.asarray(img, dtype=np.float32) + noise, 0, 255).astype(np.uint8))


def _labels(n: int, artifact_fraction: float, rng: random.Random) -> list[int]:
    n_art = max(1, int(round(n * artifact_fraction))) if n >= 2 else 0
    labels = [ARTIFACT] * n_art + [CLEAN] * (n - n_art)
    rng.shuffle(labels)
    return labels


def _render(difficulty: str, face_seed: int, size: int, defect: str | None) -> Image.Image:
    if difficulty == "subtle":
        return render_subtle_face(face_seed, size=size, defect=defect)
    return render_face(face_seed, size=size, defect=defect)


def _render_and_save(job: tuple) -> None:
    """Worker task: render one image and write it (top level, so process pools can pickle it)."""
    difficulty, face_seed, size, defect, path = job
    img = _render(difficulty, face_seed, size, defect)
    # Subtle images are large and noisy: zlib level 1 writes them about 3x faster than the
    # default level 6 for files about 6 % larger. Easy images keep PIL's default bytes.
    img.save(path, **({"compress_level": 1} if difficulty == "subtle" else {}))


def _plan(n_train: int, n_test: int, artifact_fraction: float, seed: int,
          kinds: Sequence[str]) -> list[tuple[str, str, int, int, str | None]]:
    """Every file of a data set: (split, file name, label, face seed, defect kind or None).

    The draws from one seeded generator (labels, then one face seed per image) depend on
    nothing else (not on the number of rendering processes), so neither do the files.
    """
    rng = random.Random(seed)
    rows = []
    for split, n in (("train", n_train), ("test", n_test)):
        for idx, label in enumerate(_labels(n, artifact_fraction, rng)):
            face_seed = rng.randrange(2**31)
            name = f"image_{idx}_{label}.png" if split == "train" else f"image_{idx}.png"
            rows.append((split, name, label, face_seed, kinds[face_seed % len(kinds)] if label == ARTIFACT else None))
    return rows


def defect_kinds(*, n_train: int, n_test: int, artifact_fraction: float = 0.1, seed: int = 0,
                 difficulty: str = "easy") -> dict[str, dict[str, str]]:
    """The defect drawn into each artifact image of the set :func:`generate` writes with the same
    arguments: ``{"train": {file name: kind}, "test": {...}}`` (clean images are absent).

    For per-kind figures (which defects a model finds) without storing anything beside the images.
    """
    kinds = SUBTLE_DEFECTS if difficulty == "subtle" else DEFECTS
    out: dict[str, dict[str, str]] = {"train": {}, "test": {}}
    for split, name, _, _, defect in _plan(n_train, n_test, artifact_fraction, seed, kinds):
        if defect is not None:
            out[split][name] = defect
    return out


def generate(out_dir: str, *, n_train: int = 400, n_test: int = 100, size: int | None = None,
             artifact_fraction: float = 0.1, seed: int = 0, grid: bool = True, difficulty: str = "easy",
             workers: int = 1) -> dict:
    """Write the demo data set (see module docstring); the same seed gives the same files.

    Args:
        size: image side; default 256 (easy) or 1024 (subtle).
        difficulty: ``easy`` (blatant defects, :data:`DEFECTS`) or ``subtle`` (small,
            low-contrast ones, :data:`SUBTLE_DEFECTS`).
        workers: processes rendering in parallel; the files do not depend on it.

    Returns:
        {"train": folder, "test": folder, "test_labels": csv path, "counts": {...}}.
    """
    if not 0 < artifact_fraction < 1:
        raise ValueError(f"artifact_fraction must be in (0, 1), got {artifact_fraction}")
    if difficulty not in DIFFICULTIES:
        raise ValueError(f"difficulty must be one of {DIFFICULTIES}, got {difficulty!r}")
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    size = size or (1024 if difficulty == "subtle" else 256)
    kinds = SUBTLE_DEFECTS if difficulty == "subtle" else DEFECTS
    train_dir, test_dir = os.path.join(out_dir, "train"), os.path.join(out_dir, "test")
    os.makedirs(train_dir, exist_ok=True)
    os.makedirs(test_dir, exist_ok=True)
    counts = {"train": {ARTIFACT: 0, CLEAN: 0}, "test": {ARTIFACT: 0, CLEAN: 0}}
    test_rows = []
    jobs: list[tuple] = []
    sample_jobs: list[tuple] = []
    for split, name, label, face_seed, defect in _plan(n_train, n_test, artifact_fraction, seed, kinds):
        if split == "test":
            test_rows.append((name, label))
        counts[split][label] += 1
        jobs.append((difficulty, face_seed, size, defect, os.path.join(train_dir if split == "train" else test_dir, name)))
        if grid and len(sample_jobs) < 16 and (label == ARTIFACT or sum(1 for j in sample_jobs if j[3] is None) < 8):
            sample_jobs.append(jobs[-1])
    if workers == 1:
        for job in jobs:
            _render_and_save(job)
    else:
        # The platform's default start method (fork on Linux): spawn would re-import the
        # caller's main module, which fails for stdin and notebooks. Generate before starting
        # Ray or other threads.
        with multiprocessing.Pool(workers) as pool:
            for _ in pool.imap_unordered(_render_and_save, jobs, chunksize=8):
                pass
    labels_csv = os.path.join(out_dir, "test_labels.csv")
    with open(labels_csv, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["filename", "label"])
        w.writerows(test_rows)
    if grid and sample_jobs:
        samples = [(Image.open(j[4]).convert("RGB"), ARTIFACT if j[3] else CLEAN) for j in sample_jobs]
        save_grid(samples, os.path.join(out_dir, "sample_grid.png"), cell=256 if difficulty == "subtle" else 128)
    return {"train": train_dir, "test": test_dir, "test_labels": labels_csv, "counts": counts}


def save_grid(samples: list[tuple[Image.Image, int]], path: str, *, cell: int = 128) -> None:
    """A preview grid; artifact images get a red frame, clean ones green."""
    cols = 8
    rows = math.ceil(len(samples) / cols)
    grid = Image.new("RGB", (cols * cell, rows * cell), (255, 255, 255))
    for i, (img, label) in enumerate(samples):
        tile = img.resize((cell - 8, cell - 8))
        framed = Image.new("RGB", (cell, cell), (200, 30, 30) if label == ARTIFACT else (30, 160, 60))
        framed.paste(tile, (4, 4))
        grid.paste(framed, ((i % cols) * cell, (i // cols) * cell))
    grid.save(path)


def save_defect_gallery(path: str, *, size: int = 1024, seed: int = 0, tile: int = 256) -> str:
    """A figure of every subtle defect: per row the whole face (downscaled), then the same
    place at native resolution without and with the defect.

    The face, light and noise are the same with and without the defect, so the crop is
    centred on the pixels the defect changed.
    """
    rng = random.Random(seed)
    rows = []
    for defect in SUBTLE_DEFECTS:
        face_seed = rng.randrange(2**31)
        clean = render_subtle_face(face_seed, size=size)
        broken = render_subtle_face(face_seed, size=size, defect=defect)
        diff = np.abs(np.asarray(broken, dtype=np.int16) - np.asarray(clean, dtype=np.int16)).max(axis=2)
        ys, xs = np.nonzero(diff > 6)
        cy, cx = (int(ys.mean()), int(xs.mean())) if ys.size else (size // 2, size // 2)
        x0, y0 = min(max(0, cx - tile // 2), size - tile), min(max(0, cy - tile // 2), size - tile)
        box = (x0, y0, x0 + tile, y0 + tile)
        row = Image.new("RGB", (3 * tile + 8, tile + 22), (255, 255, 255))
        full = broken.resize((tile, tile), Image.Resampling.LANCZOS)
        ImageDraw.Draw(full).rectangle([v * tile / size for v in box], outline=(220, 30, 30), width=2)
        for i, im in enumerate((full, clean.crop(box), broken.crop(box))):
            row.paste(im, (i * (tile + 4), 22))
        label = f"{defect}: whole face | native pixels, clean | native pixels, with the defect"
        ImageDraw.Draw(row).text((4, 5), label, fill=(0, 0, 0))
        rows.append(row)
    out = Image.new("RGB", (rows[0].width, sum(r.height for r in rows)), (255, 255, 255))
    for i, r in enumerate(rows):
        out.paste(r, (0, i * r.height))
    out.save(path, optimize=True)
    return path


def get_args_parser() -> argparse.ArgumentParser:
    """Command-line flags of ``python -m artifact_core.demo_data OUT`` (defaults: :func:`generate`'s)."""
    d = {k: v.default for k, v in inspect.signature(generate).parameters.items()}
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out_dir", help="folder to write train/, test/, test_labels.csv, sample_grid.png into")
    p.add_argument("--n-train", type=int, default=d["n_train"], help="labelled images (default: %(default)s)")
    p.add_argument("--n-test", type=int, default=d["n_test"], help="unlabelled images (default: %(default)s)")
    p.add_argument("--difficulty", choices=DIFFICULTIES, default=d["difficulty"],
                   help="easy: blatant defects; subtle: small, low-contrast ones (default: %(default)s)")
    p.add_argument("--size", type=int, default=d["size"], help="image side in pixels (default: 256 easy, 1024 subtle)")
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                   help="rendering processes; the files do not depend on it (default: %(default)s)")
    p.add_argument("--artifact-fraction", type=float, default=d["artifact_fraction"],
                   help="share of artifact images (default: %(default)s)")
    p.add_argument("--seed", type=int, default=d["seed"], help="(default: %(default)s)")
    return p


def main(a: argparse.Namespace) -> None:
    """Generate the data set the flags describe and say where it went."""
    info = generate(a.out_dir, n_train=a.n_train, n_test=a.n_test, size=a.size,
                    artifact_fraction=a.artifact_fraction, seed=a.seed, difficulty=a.difficulty, workers=a.workers)
    print(f"wrote {info['train']} {info['counts']['train']} and {info['test']} {info['counts']['test']}")


def cli() -> int:
    """``python -m artifact_core.demo_data`` and the ``artifact-demo-data`` command: exit status 2
    with one line for bad input."""
    from artifact_core.jobs_common import run_job

    return run_job(main, get_args_parser().parse_args(), logging.getLogger(__name__))


if __name__ == "__main__":
    sys.exit(cli())
