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
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from artifact_core.data import ARTIFACT, CLEAN

DEFECTS = ("third_eye", "misplaced_eye", "double_mouth", "smear", "text", "asymmetric_eyes", "mask_piece")
_SKIN = [(255, 224, 196), (241, 194, 150), (224, 172, 125), (198, 134, 66), (141, 85, 36), (92, 56, 30)]
_HAIR = [(20, 15, 10), (60, 40, 25), (120, 80, 40), (200, 160, 90), (150, 150, 150), (160, 50, 20)]
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


def _labels(n: int, artifact_fraction: float, rng: random.Random) -> list[int]:
    n_art = max(1, int(round(n * artifact_fraction))) if n >= 2 else 0
    labels = [ARTIFACT] * n_art + [CLEAN] * (n - n_art)
    rng.shuffle(labels)
    return labels


def generate(out_dir: str, *, n_train: int = 400, n_test: int = 100, size: int = 256,
             artifact_fraction: float = 0.1, seed: int = 0, grid: bool = True) -> dict:
    """Write the demo data set (see module docstring); the same seed gives the same files.

    Returns:
        {"train": folder, "test": folder, "test_labels": csv path, "counts": {...}}.
    """
    if not 0 < artifact_fraction < 1:
        raise ValueError(f"artifact_fraction must be in (0, 1), got {artifact_fraction}")
    rng = random.Random(seed)
    train_dir, test_dir = os.path.join(out_dir, "train"), os.path.join(out_dir, "test")
    os.makedirs(train_dir, exist_ok=True)
    os.makedirs(test_dir, exist_ok=True)
    counts = {"train": {ARTIFACT: 0, CLEAN: 0}, "test": {ARTIFACT: 0, CLEAN: 0}}
    test_rows = []
    samples: list[tuple[Image.Image, int]] = []
    for split, n in (("train", n_train), ("test", n_test)):
        for idx, label in enumerate(_labels(n, artifact_fraction, rng)):
            face_seed = rng.randrange(2**31)
            defect = DEFECTS[face_seed % len(DEFECTS)] if label == ARTIFACT else None
            img = render_face(face_seed, size=size, defect=defect)
            if split == "train":
                img.save(os.path.join(train_dir, f"image_{idx}_{label}.png"))
            else:
                name = f"image_{idx}.png"
                img.save(os.path.join(test_dir, name))
                test_rows.append((name, label))
            counts[split][label] += 1
            if grid and len(samples) < 16 and (label == ARTIFACT or sum(1 for _, y in samples if y == CLEAN) < 8):
                samples.append((img, label))
    labels_csv = os.path.join(out_dir, "test_labels.csv")
    with open(labels_csv, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["filename", "label"])
        w.writerows(test_rows)
    if grid and samples:
        save_grid(samples, os.path.join(out_dir, "sample_grid.png"))
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


def main() -> None:
    """Command-line entry: ``python -m artifact_core.demo_data OUT``."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out_dir", help="folder to write train/, test/, test_labels.csv, sample_grid.png into")
    p.add_argument("--n-train", type=int, default=400, help="labelled images (default: %(default)s)")
    p.add_argument("--n-test", type=int, default=100, help="unlabelled images (default: %(default)s)")
    p.add_argument("--size", type=int, default=256, help="image side in pixels (default: %(default)s)")
    p.add_argument("--artifact-fraction", type=float, default=0.1, help="share of artifact images (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    a = p.parse_args()
    info = generate(a.out_dir, n_train=a.n_train, n_test=a.n_test, size=a.size,
                    artifact_fraction=a.artifact_fraction, seed=a.seed)
    print(f"wrote {info['train']} {info['counts']['train']} and {info['test']} {info['counts']['test']}")


if __name__ == "__main__":
    main()
