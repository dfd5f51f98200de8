"""The demo data generator: deterministic, labelled as documented, artifacts really differ."""

from __future__ import annotations

import csv
import hashlib
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from artifact_core.data import scan_labeled_folder
from artifact_core import demo_data
from artifact_core.demo_data import (DEFECTS, SUBTLE_DEFECTS, defect_kinds, generate, render_face, render_subtle_face,
                                     save_defect_gallery)


def _digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_generate_layout_and_ratio(tmp_path):
    info = generate(str(tmp_path / "d"), n_train=40, n_test=10, size=64, seed=3)
    folder = scan_labeled_folder(info["train"])
    assert len(folder.paths) == 40 and folder.counts() == {0: 4, 1: 36}
    test_files = sorted(p.name for p in (tmp_path / "d" / "test").iterdir())
    assert len(test_files) == 10 and all("_" in f and f.count("_") == 1 for f in test_files)
    rows = (tmp_path / "d" / "test_labels.csv").read_text().splitlines()
    assert rows[0] == "filename,label" and len(rows) == 11
    assert Image.open(tmp_path / "d" / "sample_grid.png").size[0] == 8 * 128


def test_generate_is_deterministic(tmp_path):
    generate(str(tmp_path / "a"), n_train=12, n_test=2, size=48, seed=5)
    generate(str(tmp_path / "b"), n_train=12, n_test=2, size=48, seed=5)
    assert _digest(tmp_path / "a" / "train") == _digest(tmp_path / "b" / "train")


@pytest.mark.parametrize("defect", DEFECTS)
def test_each_defect_changes_the_face(defect):
    clean = np.asarray(render_face(7, size=96), dtype=np.int16)
    broken = np.asarray(render_face(7, size=96, defect=defect), dtype=np.int16)
    changed = (np.abs(clean - broken).max(axis=2) > 30).mean()
    assert 0.003 < changed < 0.5, f"{defect} changed {changed:.1%} of the pixels"


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="artifact_fraction"):
        generate(str(tmp_path), artifact_fraction=1.5)
    with pytest.raises(ValueError, match="unknown defect"):
        render_face(1, defect="nope")


def test_command_line(tmp_path):
    out = subprocess.run([sys.executable, "-m", "artifact_core.demo_data", str(tmp_path / "cli"),
                          "--n-train", "10", "--n-test", "2", "--size", "32"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert len(list((tmp_path / "cli" / "train").iterdir())) == 10
    out = subprocess.run([sys.executable, "-m", "artifact_core.demo_data", str(tmp_path / "sub"), "--difficulty", "subtle",
                          "--n-train", "10", "--n-test", "2", "--size", "64", "--workers", "1"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert Image.open(next((tmp_path / "sub" / "train").iterdir())).size == (64, 64)


def test_easy_images_unchanged():
    # The easy demo's pixels for fixed seeds, so the README's figures stay reproducible.
    # (A Pillow upgrade that changes its drawing or resampling may change these legitimately.)
    digests = [hashlib.sha256(np.asarray(render_face(s, size=64, defect=d)).tobytes()).hexdigest()[:16]
               for s, d in ((1, None), (2, "text"), (3, "smear"))]
    assert digests == ["1a7de78b30840934", "9c59fec1702afb63", "b0f7268f027ca5e9"]


@pytest.mark.parametrize("defect", SUBTLE_DEFECTS)
def test_subtle_defects_are_small_local_and_visible(defect):
    # Same seed with and without the defect: the same face, light and noise, so the
    # difference is the defect alone. Small (under 2 % of the pixels) and leaving the image's
    # global statistics as they were, yet strong enough somewhere to be seen.
    for seed in range(8):
        clean = np.asarray(render_subtle_face(seed, size=256), dtype=np.int16)
        broken = np.asarray(render_subtle_face(seed, size=256, defect=defect), dtype=np.int16)
        diff = np.abs(clean - broken).max(axis=2)
        assert diff.max() >= 12, f"{defect} (seed {seed}) is invisible: max change {diff.max()}"
        assert (diff > 8).mean() < 0.02, f"{defect} (seed {seed}) changed {(diff > 8).mean():.1%}"
        assert np.abs(clean.mean(axis=(0, 1)) - broken.mean(axis=(0, 1))).max() < 1.0


def test_generate_subtle(tmp_path):
    info = generate(str(tmp_path / "s"), n_train=30, n_test=6, size=96, seed=4, difficulty="subtle")
    folder = scan_labeled_folder(info["train"])
    assert len(folder.paths) == 30 and folder.counts() == {0: 3, 1: 27}
    assert Image.open(folder.paths[0]).size == (96, 96)
    assert Image.open(tmp_path / "s" / "sample_grid.png").size[0] == 8 * 256
    # the files do not depend on the number of rendering processes
    generate(str(tmp_path / "p"), n_train=30, n_test=6, size=96, seed=4, difficulty="subtle", workers=2)
    assert _digest(tmp_path / "s" / "train") == _digest(tmp_path / "p" / "train")
    assert _digest(tmp_path / "s" / "test") == _digest(tmp_path / "p" / "test")
    with pytest.raises(ValueError, match="difficulty"):
        generate(str(tmp_path / "x"), difficulty="hard")
    # the defect of every artifact image is known from the same arguments, and it is the one drawn:
    # the image equals the same face rendered with that defect
    kinds = defect_kinds(n_train=30, n_test=6, seed=4, difficulty="subtle")
    artifacts = sorted(os.path.basename(p) for p, y in zip(folder.paths, folder.labels) if y == 0)
    assert sorted(kinds["train"]) == artifacts and set(kinds["train"].values()) <= set(SUBTLE_DEFECTS)
    test_labels = dict(csv.reader(open(info["test_labels"])))
    assert sorted(kinds["test"]) == sorted(n for n, y in test_labels.items() if y == "0")
    face_seed = next(f for _, name, _, f, _ in demo_data._plan(30, 6, 0.1, 4, SUBTLE_DEFECTS) if name == artifacts[0])
    drawn = render_subtle_face(face_seed, size=96, defect=kinds["train"][artifacts[0]])
    assert np.array_equal(np.asarray(drawn), np.asarray(Image.open(tmp_path / "s" / "train" / artifacts[0])))


def test_defect_gallery(tmp_path):
    path = save_defect_gallery(str(tmp_path / "g.png"), size=128, tile=64)
    assert Image.open(path).size[1] > len(SUBTLE_DEFECTS) * 64


def test_the_installed_commands_take_their_arguments_from_the_command_line():
    """Each [project.scripts] entry is called with no arguments by its console script."""
    import importlib
    import inspect
    import tomllib

    from conftest import REPO

    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts
    for name, target in scripts.items():
        module, func = target.split(":")
        fn = getattr(importlib.import_module(module), func)
        required = [p for p in inspect.signature(fn).parameters.values() if p.default is p.empty
                    and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
        assert not required, f"{name} -> {target} needs {[p.name for p in required]}"
