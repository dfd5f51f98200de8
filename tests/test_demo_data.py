"""The demo data generator: deterministic, labelled as documented, artifacts really differ."""

from __future__ import annotations

import hashlib
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from artifact_core.data import scan_labeled_folder
from artifact_core.demo_data import DEFECTS, generate, render_face


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
