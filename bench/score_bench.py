"""Scoring throughput and memory: one-at-a-time loop vs batched DataLoader vs the Ray Data job.

    python bench/score_bench.py --out /tmp/bench [--n 1000] [--rss-n 10000]

Generates folders of 1024x1024 PNG and 512x512 JPEG faces (cached in --out), builds one
bundle (ImageNet-free: calibrated random MobileNetV2, 224 px; speed does not depend on the
weights), then in one run measures images/s of
  (a) a seed-style loop: open, transform and predict one image at a time,
  (b) a plain batched torch DataLoader loop (num_workers=0, and =1 for reference),
  (c) the Ray Data job (artifact_core.scoring.run_scoring, default actors),
and the peak memory (PSS summed over the driver and every Ray worker process) of (c) on
--n and on --rss-n images. Prints a Markdown table. Not a test: figures vary with the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from artifact_core.bundle import BundleConfig, save_bundle
from artifact_core.demo_data import render_face
from artifact_core.images import decode_image
from artifact_core.model import build_model
from artifact_core.predict import ArtifactPredictor
from artifact_core.transforms import eval_transform


def _write_one(args: tuple[int, str, int, str]) -> None:
    seed, folder, size, fmt = args
    img = render_face(seed, size=256).resize((size, size), Image.Resampling.BICUBIC)
    # per-pixel noise so files cost what real photos cost to decode
    arr = np.asarray(img, dtype=np.int16) + np.random.default_rng(seed).integers(-12, 13, (size, size, 3))
    img = Image.fromarray(arr.clip(0, 255).astype(np.uint8))
    ext = "png" if fmt == "PNG" else "jpg"
    img.save(os.path.join(folder, f"image_{seed}.{ext}"), format=fmt, quality=90)


def make_folder(folder: Path, n: int, size: int, fmt: str) -> Path:
    """n images of size x size in fmt, generated once (2 processes)."""
    folder.mkdir(parents=True, exist_ok=True)
    have = len(list(folder.iterdir()))
    if have < n:
        with ProcessPoolExecutor(2) as pool:
            list(pool.map(_write_one, [(i, str(folder), size, fmt) for i in range(have, n)], chunksize=16))
    return folder


def make_bundle(path: Path) -> str:
    torch.manual_seed(0)
    model = build_model(weights="none")
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None
    model.train()
    with torch.no_grad():
        model(torch.rand(16, 3, 224, 224))
    return save_bundle(str(path), model.eval(), BundleConfig(image_size=224))


class _Files(Dataset):
    def __init__(self, paths, tf):
        self.paths, self.tf = paths, tf

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        return self.tf(decode_image(self.paths[i]))


def seed_loop(bundle: str, paths: list[str]) -> float:
    """(a) one image at a time, as a notebook would."""
    p = ArtifactPredictor(bundle)
    tf = eval_transform(image_size=p.config.image_size)
    t = time.perf_counter()
    for path in paths:
        p.predict_tensor(tf(Image.open(path).convert("RGB"))[None])
    return len(paths) / (time.perf_counter() - t)


def dataloader_loop(bundle: str, paths: list[str], workers: int) -> float:
    """(b) batched DataLoader, same decoder and transform as the job."""
    p = ArtifactPredictor(bundle)
    loader = DataLoader(_Files(paths, eval_transform(image_size=p.config.image_size)), batch_size=64,
                        num_workers=workers)
    t = time.perf_counter()
    for x in loader:
        p.predict_tensor(x)
    return len(paths) / (time.perf_counter() - t)


def _pss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _ray_pids() -> list[int]:
    pids = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/cmdline", "rb") as f:
                    cmd = f.read()
            except OSError:
                continue
            if cmd.startswith(b"ray::") or b"default_worker.py" in cmd:
                pids.append(int(d))
    return pids


class PeakMemory:
    """Samples PSS of this process plus all Ray worker processes every 0.25 s."""

    def __enter__(self):
        self.peak, self._stop = 0, threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            total = _pss_kb(os.getpid()) + sum(_pss_kb(p) for p in _ray_pids())
            self.peak = max(self.peak, total)
            time.sleep(0.25)

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()


def ray_job(bundle: str, folder: Path, out: Path) -> tuple[float, float]:
    """(c) the Ray Data job; returns (images/s, peak PSS in MiB)."""
    from artifact_core.scoring import ScoreConfig, run_scoring

    shutil.rmtree(out, ignore_errors=True)
    with PeakMemory() as mem:
        t = time.perf_counter()
        s = run_scoring(ScoreConfig(model=bundle, input=str(folder), output=str(out)))
        dt = time.perf_counter() - t
    return s["files"] / dt, mem.peak / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="work folder (images are cached here)")
    ap.add_argument("--n", type=int, default=1000, help="images per format (default: %(default)s)")
    ap.add_argument("--rss-n", type=int, default=10000, help="images for the memory comparison, 0 = skip (default: %(default)s)")
    a = ap.parse_args()
    import ray

    out = Path(a.out)
    bundle = make_bundle(out / "bundle")
    sets = {"1024² PNG": make_folder(out / "png1024", a.n, 1024, "PNG"),
            "512² JPEG": make_folder(out / "jpg512", a.n, 512, "JPEG")}
    ray.init()
    rows = {}
    for name, folder in sets.items():
        paths = sorted(str(p) for p in folder.iterdir())[: a.n]
        r = {"a_seed_loop": seed_loop(bundle, paths),
             "b_dataloader_w0": dataloader_loop(bundle, paths, 0),
             "b_dataloader_w1": dataloader_loop(bundle, paths, 1)}
        r["c_ray_data"], r["c_peak_mib"] = ray_job(bundle, folder, out / f"pred_{folder.name}")
        rows[name] = r
        print(name, json.dumps(r), flush=True)
    mem = {}
    if a.rss_n:
        small = make_folder(out / f"jpg512_{a.rss_n}", a.rss_n, 512, "JPEG")
        sub = out / f"jpg512_first{a.n}"  # the same files: hard links to the first n
        sub.mkdir(exist_ok=True)
        for p in sorted(small.iterdir())[: a.n]:
            if not (sub / p.name).exists():
                os.link(p, sub / p.name)
        mem[a.n] = ray_job(bundle, sub, out / "pred_mem_small")
        mem[a.rss_n] = ray_job(bundle, small, out / "pred_mem_large")
    print()
    print("| images | (a) one at a time | (b) DataLoader, 0 workers | (b) DataLoader, 1 worker | (c) Ray Data job | (c)/(b, 0 w.) | (c)/(a) | (c) peak PSS |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {a.n} x {name} | {r['a_seed_loop']:.1f}/s | {r['b_dataloader_w0']:.1f}/s | {r['b_dataloader_w1']:.1f}/s | "
              f"{r['c_ray_data']:.1f}/s | {r['c_ray_data'] / r['b_dataloader_w0']:.2f}x | "
              f"{r['c_ray_data'] / r['a_seed_loop']:.2f}x | {r['c_peak_mib']:.0f} MiB |")
    if mem:
        (n1, (s1, m1)), (n2, (s2, m2)) = sorted(mem.items())
        print(f"\nRay Data job, 512² JPEG: {n1} images {s1:.1f}/s peak {m1:.0f} MiB; "
              f"{n2} images {s2:.1f}/s peak {m2:.0f} MiB; ratio {m2 / m1:.2f}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
