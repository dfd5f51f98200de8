"""Shared fixtures: generated image folders and one Ray cluster per test session.

The Ray cluster is a real ``ray start --head`` (loopback only, its own temp dir), so
tests can both ``ray.init(address=...)`` and ``ray job submit`` against it, and the
suite pays Ray's start-up once.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
RAY_BIN = str(Path(sys.executable).parent / "ray")


def write_image(path: Path, *, size: int = 48, mode: str = "RGB", color=(200, 120, 90), fmt: str | None = None) -> Path:
    """A small image file in any PIL mode."""
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.zeros((size, size, 3), dtype=np.uint8)
    arr[...] = color
    arr[size // 4: size // 2, size // 4: size // 2] = 255 - np.asarray(color, dtype=np.uint8)
    img = Image.fromarray(arr, "RGB")
    if mode != "RGB":
        img = img.convert(mode)
    img.save(path, format=fmt)
    return path


def make_easy_folder(root: Path, *, n: int = 40, size: int = 40, artifact_every: int = 4, seed: int = 0) -> Path:
    """A labelled folder a small net separates easily: artifacts carry a bright square."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        label = 0 if i % artifact_every == 0 else 1
        arr = (rng.normal(110, 20, (size, size, 3))).clip(0, 255).astype(np.uint8)
        if label == 0:
            y, x = rng.integers(0, size // 2, 2)
            arr[y:y + size // 2, x:x + size // 2] = (255, 20, 20)
        Image.fromarray(arr).save(root / f"image_{i}_{label}.png")
    return root


@pytest.fixture
def easy_folder(tmp_path: Path) -> Path:
    return make_easy_folder(tmp_path / "train")


@pytest.fixture(scope="session")
def ray_cluster():
    """Address of a 2-CPU head node started for this test session, stopped afterwards."""
    import ray

    temp = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # short: Ray's socket paths have a length limit
    port = 6390
    env = {**os.environ, "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "token")}
    cmd = [RAY_BIN, "start", "--head", f"--port={port}", "--num-cpus=2", "--num-gpus=0",
           "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1", "--dashboard-port=8275",
           f"--temp-dir={temp}", "--include-dashboard=true", "--disable-usage-stats"]
    subprocess.run(cmd, check=True, env=env, capture_output=True, timeout=120)
    os.environ["RAY_AUTH_MODE"] = env["RAY_AUTH_MODE"]
    address = f"127.0.0.1:{port}"
    try:
        ray.init(address=address, log_to_driver=True)
        yield {"address": address, "dashboard": "http://127.0.0.1:8275", "env": env}
    finally:
        ray.shutdown()
        subprocess.run([RAY_BIN, "stop", "--force"], env=env, capture_output=True, timeout=120)
        shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture
def ray_session(ray_cluster):
    """The session cluster, connected (reconnects if a test shut Ray down)."""
    import ray

    if not ray.is_initialized():
        ray.init(address=ray_cluster["address"])
    return ray_cluster


def wait_for(predicate, timeout: float = 60.0, interval: float = 0.5) -> bool:
    end = time.time() + timeout
    while time.time() < end:
        if predicate():
            return True
        time.sleep(interval)
    return False
