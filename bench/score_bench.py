"""Scoring throughput and memory: one image at a time vs the best plain PyTorch loop vs the Ray job.

    python bench/score_bench.py --out /tmp/bench                      # full size, see README
    python bench/score_bench.py --out /tmp/bench_small --n-png 40 --n-jpeg 60 --n-large 0

Generates (once, cached in --out) folders of 1024² PNG and 512² JPEG demo faces rendered at
that size (smooth shapes with sensor-like noise: they compress and decode like photos), and
one bundle (random calibrated MobileNetV2 at --image-size px, with model.onnx and
model.int8.onnx calibrated on the first images: speed does not depend on the weights). Then,
in one run, per folder:

- the per-image costs on one core: decode (read + decode + resize, the job's decoder) and
  inference per engine (chunks of 8, one thread), and the **ceiling** =
  cores / (decode ms + inference ms);
- (a) one image at a time: open, decode, predict (torch, as a notebook would);
- (b) the best plain PyTorch loop: a DataLoader with 1 decode worker
  (``decode_image(p, target_size=S)``), channels-last, chunks of 8, torch threads = cores;
- (c) the whole job as a user runs it, ``python jobs/score.py`` in its own process (Python,
  imports and Ray's start included; review page off), per engine/precision (torch fp32, onnx
  fp32, onnx int8) and per pipeline mode, and the defaults (all auto), each on a fresh local
  Ray as the script starts it on a laptop; then the defaults once more on a running
  single-node Ray cluster (``cluster/local_cluster.sh``, all cores), as under
  ``ray job submit``, where the job only connects;

columns: img/s, (c)/(b), peak PSS (summed over the driver and every Ray worker process) and
the share of the ceiling. With --n-large, the default job also runs on a --n-large JPEG folder
and on its first --n-jpeg files: throughput against the ceiling and peak memory 1k vs 10k.
Prints Markdown tables. Not a test: figures vary with the machine; run it alone on the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from artifact_core.bundle import BundleConfig, save_bundle
from artifact_core.config import HEADS, TrainConfig
from artifact_core.decode import decode_array
from artifact_core.demo_data import DEFECTS, render_face
from artifact_core.export_onnx import export_onnx
from artifact_core.images import decode_image
from artifact_core.model import build_model
from artifact_core.predict import ArtifactPredictor
from artifact_core.storage import read_file_bytes

ENGINES = (("torch", "fp32"), ("onnx", "fp32"), ("onnx", "int8"))
CHUNK = 8
REPO = Path(__file__).resolve().parents[1]


def _write_one(args: tuple[int, str, int, str]) -> None:
    seed, folder, size, fmt = args
    defect = DEFECTS[seed % len(DEFECTS)] if seed % 10 == 0 else None  # 1 in 10, as the demo data's artifact share
    img = render_face(seed, size=size, defect=defect)
    ext = "png" if fmt == "PNG" else "jpg"
    img.save(os.path.join(folder, f"image_{seed:05d}.{ext}"), format=fmt, quality=90)


def make_folder(folder: Path, n: int, size: int, fmt: str) -> Path:
    """n images of size x size in fmt, generated once (2 processes)."""
    folder.mkdir(parents=True, exist_ok=True)
    have = len(list(folder.iterdir()))
    if have < n:
        with ProcessPoolExecutor(2) as pool:
            list(pool.map(_write_one, [(i, str(folder), size, fmt) for i in range(have, n)], chunksize=16))
    return folder


def first_n(folder: Path, n: int, dest: Path) -> Path:
    """A folder of hard links to the first n files of ``folder`` (the same bytes on disk)."""
    dest.mkdir(parents=True, exist_ok=True)
    for p in sorted(folder.iterdir())[:n]:
        if not (dest / p.name).exists():
            os.link(p, dest / p.name)
    return dest


def make_bundle(path: Path, image_size: int, calibration: list[str], head: str) -> str:
    """Random MobileNetV2 with calibrated BatchNorm, plus model.onnx and model.int8.onnx."""
    path = path.with_name(f"{path.name}-{head}-{image_size}")
    if (path / "model.int8.onnx").is_file():
        return str(path)
    torch.manual_seed(0)
    model = build_model(weights="none", head=head)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None
    model.train()
    with torch.no_grad():
        model(torch.rand(16, 3, image_size, image_size))
    bundle = save_bundle(str(path), model.eval(), BundleConfig(image_size=image_size, head=head))
    export_onnx(bundle, calibration, int8=True)
    return bundle


def stage_costs(bundle: str, paths: list[str], n: int = 100) -> dict[str, float]:
    """ms per image on one core: decode (read + decode + resize) and each engine's inference."""
    torch.set_num_threads(1)
    size = ArtifactPredictor(bundle, engine="torch").config.image_size
    pick = paths[:: max(1, len(paths) // n)][:n]
    t = time.perf_counter()
    images = np.stack([decode_array(read_file_bytes(p), size) for p in pick])
    costs = {"decode_ms": 1000 * (time.perf_counter() - t) / len(pick)}
    batch = np.resize(images, (max(64, len(images)), *images.shape[1:]))
    for engine, precision in ENGINES:
        p = ArtifactPredictor(bundle, engine=engine, precision=precision, num_threads=1, cpu_micro_batch=CHUNK)
        p.predict_tensor(batch[:CHUNK])  # warm-up
        t = time.perf_counter()
        p.predict_tensor(batch)
        costs[f"{engine}_{precision}_ms"] = 1000 * (time.perf_counter() - t) / len(batch)
    torch.set_num_threads(os.cpu_count() or 1)
    return costs


class _Files(Dataset):
    def __init__(self, paths: list[str], size: int) -> None:
        self.paths, self.size = paths, size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        img = decode_image(self.paths[i], target_size=self.size)
        return torch.from_numpy(np.asarray(img, dtype=np.uint8).transpose(2, 0, 1).copy())


def seed_loop(bundle: str, paths: list[str]) -> float:
    """(a) one image at a time, as a notebook would (torch, all cores)."""
    torch.set_num_threads(os.cpu_count() or 1)
    p = ArtifactPredictor(bundle, engine="torch")
    size = p.config.image_size
    t = time.perf_counter()
    for path in paths:
        img = decode_image(path, target_size=size)
        p.predict_tensor(np.asarray(img, dtype=np.uint8).transpose(2, 0, 1)[None])
    return len(paths) / (time.perf_counter() - t)


def dataloader_loop(bundle: str, paths: list[str]) -> float:
    """(b) the best plain PyTorch loop found: 1 decode worker feeding uint8 chunks of 8 to the
    channels-last model, torch threads = cores (start-up of the worker included)."""
    torch.set_num_threads(os.cpu_count() or 1)
    bundle_ = ArtifactPredictor(bundle, engine="torch")
    model = bundle_.engine.model  # channels-last, eval
    mean, std = bundle_.engine.mean, bundle_.engine.std
    t = time.perf_counter()
    loader = DataLoader(_Files(paths, bundle_.config.image_size), batch_size=CHUNK, num_workers=1,
                        prefetch_factor=8, persistent_workers=False)
    with torch.inference_mode():
        for x in loader:
            x = ((x.float() / 255.0 - mean) / std).contiguous(memory_format=torch.channels_last)
            torch.sigmoid(model(x))
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
    """Samples PSS of this process, of ``pids`` (the job's driver) and of all Ray worker
    processes every 0.25 s."""

    def __init__(self, pids: tuple[int, ...] = ()) -> None:
        self.pids = pids

    def __enter__(self) -> "PeakMemory":
        self.peak, self._stop = 0, threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            total = sum(_pss_kb(p) for p in (os.getpid(), *self.pids, *_ray_pids()))
            self.peak = max(self.peak, total)
            time.sleep(0.25)

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._t.join()


class RunningCluster:
    """A single-node Ray cluster with every core (``cluster/local_cluster.sh``, its own temp dir
    and ports), started before the jobs that attach to it and stopped after them."""

    def __init__(self, cores: int) -> None:
        self.state = tempfile.mkdtemp(prefix="sb", dir="/tmp")  # short: Ray's socket paths are limited
        ray_bin = Path(sys.executable).with_name("ray")
        self.env = {**os.environ, "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "token"), "LC_DIR": self.state,
                    "LC_PORT_BASE": "6700", "LC_HEAD_CPUS": str(cores), "LC_WORKER_CPUS": "0",
                    **({"RAY": str(ray_bin)} if ray_bin.exists() else {})}

    def __enter__(self) -> str:
        out = subprocess.run(["bash", str(REPO / "cluster" / "local_cluster.sh"), "up"], env=self.env,
                             capture_output=True, text=True, timeout=180, check=True)
        os.environ["RAY_AUTH_MODE"] = self.env["RAY_AUTH_MODE"]
        time.sleep(5)  # let the node settle (idle workers, dashboard) as a cluster waiting for jobs would
        return dict(line.split("=", 1) for line in out.stdout.split() if "=" in line)["RAY_ADDRESS"]

    def __exit__(self, *exc: Any) -> None:
        subprocess.run(["bash", str(REPO / "cluster" / "local_cluster.sh"), "down"], env=self.env,
                       capture_output=True, timeout=120)
        shutil.rmtree(self.state, ignore_errors=True)


def ray_job(bundle: str, folder: Path, out: Path, address: str | None = None, **kw: Any) -> dict[str, Any]:
    """(c) the whole job as a user runs it: ``python jobs/score.py`` in its own process, on a fresh
    local Ray instance (its start counts) or attached to the running cluster at ``address``
    (as under ``ray job submit``: connecting counts). The review page is off (``--no-report``):
    its Grad-CAM actors would time something else."""
    shutil.rmtree(out, ignore_errors=True)
    args = [sys.executable, str(REPO / "jobs" / "score.py"), "--model", bundle, "--input", str(folder),
            "--output", str(out), "--no-report"]
    for k, v in kw.items():
        args += [f"--{k.replace('_', '-')}", str(v)]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update({"RAY_ADDRESS": address} if address else {})
    t = time.perf_counter()
    with open(out.with_suffix(".log"), "w") as log:
        proc = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT)
        with PeakMemory((proc.pid,)) as mem:
            rc = proc.wait()
    dt = time.perf_counter() - t
    if rc != 0:
        sys.exit(f"jobs/score.py failed ({rc}); see {out.with_suffix('.log')}")
    s = json.loads((out / "summary.json").read_text())
    # Where the time went: the process's start (Python, imports, Ray's start or connect), then
    # the job's own stages (summary.json's stage_seconds); "other" is what it did after its
    # CSV (histogram, manifest) and its exit.
    stages = {"start": dt - s["wall_seconds"], **s.get("stage_seconds", {})}
    stages["other"] = max(0.0, dt - sum(stages.values()))
    return {"img_s": s["files"] / dt, "peak_mib": mem.peak / 1024, "pipeline": (s.get("pipeline") or {}).get("mode"),
            "engine": s["engine"], "precision": s["precision"], "seconds": dt,
            "lanes": (s.get("pipeline") or {}).get("lanes"), "stages": {k: round(v, 2) for k, v in stages.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="work folder (images and bundle are cached here)")
    ap.add_argument("--n-png", type=int, default=1000, help="1024² PNG images, 0 = skip (default: %(default)s)")
    ap.add_argument("--n-jpeg", type=int, default=2000, help="512² JPEG images, 0 = skip (default: %(default)s)")
    ap.add_argument("--n-large", type=int, default=0,
                    help="also a JPEG folder of this many (e.g. 10000): default job vs the ceiling, and peak "
                         "memory against its first --n-jpeg files (default: %(default)s = skip)")
    ap.add_argument("--image-size", type=int, default=224, help="the bundle's input size (default: %(default)s)")
    ap.add_argument("--head", choices=HEADS, default=TrainConfig().head,
                    help="the bundle's head (default: %(default)s, training's default)")
    ap.add_argument("--pipelines", default="fused,split", help="pipeline modes for (c) (default: %(default)s)")
    a = ap.parse_args()
    out = Path(a.out)
    cores = os.cpu_count() or 1
    sets = {}
    if a.n_png:
        sets[f"{a.n_png} x 1024² PNG"] = make_folder(out / "png1024", a.n_png, 1024, "PNG")
    if a.n_jpeg:
        sets[f"{a.n_jpeg} x 512² JPEG"] = make_folder(out / "jpg512", a.n_jpeg, 512, "JPEG")
    calib = sorted(str(p) for folder in sets.values() for p in sorted(folder.iterdir())[:32])
    bundle = make_bundle(out / "bundle", a.image_size, calib, a.head)
    pipelines = [m for m in a.pipelines.split(",") if m]
    results: dict[str, Any] = {}
    for name, folder in sets.items():
        n = int(name.split(" x ")[0])
        paths = sorted(str(p) for p in folder.iterdir())[:n]
        folder = first_n(folder, n, out / f"{folder.name}_first{n}") if len(list(folder.iterdir())) > n else folder
        costs = stage_costs(bundle, paths)
        r: dict[str, Any] = {"costs": costs, "a": seed_loop(bundle, paths), "b": dataloader_loop(bundle, paths), "c": []}
        for engine, precision in ENGINES:
            for mode in pipelines:
                job = ray_job(bundle, folder, out / "pred", engine=engine, precision=precision, pipeline=mode)
                r["c"].append({**job, "label": f"{engine} {precision}, {mode}"})
                print(name, json.dumps(r["c"][-1]), flush=True)
        job = ray_job(bundle, folder, out / "pred")
        r["c"].append({**job, "label": f"defaults (auto: {job['engine']} {job['precision']}, {job['pipeline']})"})
        with RunningCluster(cores) as address:
            job = ray_job(bundle, folder, out / "pred", address=address)
        r["c"].append({**job, "label": "defaults, on a running Ray node (ray job submit)"})
        print(name, json.dumps(r["c"][-1]), flush=True)
        results[name] = r
        print(name, json.dumps({k: v for k, v in r.items() if k != "c"}), flush=True)

    print(f"\n{cores} cores, bundle {a.head} head, {a.image_size} px; ceiling = cores / (decode ms + inference ms per image "
          f"on one core); (c) is the whole job: Ray's start on a fresh local instance, or connecting to a running node")
    for name, r in results.items():
        c = r["costs"]
        ceiling = {f"{e} {p}": 1000 * cores / (c["decode_ms"] + c[f"{e}_{p}_ms"]) for e, p in ENGINES}
        print(f"\n### {name}\n\nper image on one core: decode {c['decode_ms']:.1f} ms; inference "
              + ", ".join(f"{e} {p} {c[f'{e}_{p}_ms']:.1f} ms" for e, p in ENGINES) + "\n")
        print("| row | img/s | vs (b) | peak PSS | ceiling | share of ceiling | fixed s | scoring stage img/s |")
        print("|---|---|---|---|---|---|---|---|")
        print(f"| (a) one at a time, torch | {r['a']:.1f} | {r['a'] / r['b']:.2f}x | – | "
              f"{ceiling['torch fp32']:.0f} | {r['a'] / ceiling['torch fp32']:.0%} | – | – |")
        print(f"| (b) DataLoader, 1 worker, torch | {r['b']:.1f} | 1.00x | – | "
              f"{ceiling['torch fp32']:.0f} | {r['b'] / ceiling['torch fp32']:.0%} | – | – |")
        for job in r["c"]:
            ceil = ceiling[f"{job['engine']} {job['precision']}"]
            # fixed: everything but the Ray Data stage (Ray start, setup, probe, CSV, ...);
            # the stage itself still holds the actors' start-up
            score_s = job["stages"].get("score", 0.0)
            fixed = job["seconds"] - score_s
            n = int(name.split(" x ")[0])
            print(f"| (c) Ray job, {job['label']} | {job['img_s']:.1f} | {job['img_s'] / r['b']:.2f}x | "
                  f"{job['peak_mib']:.0f} MiB | {ceil:.0f} | {job['img_s'] / ceil:.0%} | {fixed:.1f} | "
                  f"{n / score_s if score_s else 0:.0f} |")
        print("\nstages of the defaults rows (s): fresh local Ray " + json.dumps(r["c"][-2]["stages"])
              + "; running node " + json.dumps(r["c"][-1]["stages"]))
    if a.n_large:
        if not a.n_jpeg:
            sys.exit("--n-large needs --n-jpeg (the small folder of the memory check)")
        large = make_folder(out / f"jpg512_{a.n_large}", a.n_large, 512, "JPEG")
        small = first_n(large, a.n_jpeg, out / f"jpg512_{a.n_large}_first{a.n_jpeg}")
        paths = sorted(str(p) for p in large.iterdir())[:a.n_large]
        costs = stage_costs(bundle, paths)
        j_small, j_large = ray_job(bundle, small, out / "pred"), ray_job(bundle, large, out / "pred")
        ceil = 1000 * cores / (costs["decode_ms"] + costs[f"{j_large['engine']}_{j_large['precision']}_ms"])
        print(f"\n### defaults (auto: {j_large['engine']} {j_large['precision']}, {j_large['pipeline']}), 512² JPEG\n")
        print("| images | img/s | ceiling | share of ceiling | peak PSS |")
        print("|---|---|---|---|---|")
        for n, j in ((a.n_jpeg, j_small), (a.n_large, j_large)):
            print(f"| {n} | {j['img_s']:.1f} | {ceil:.0f} | {j['img_s'] / ceil:.0%} | {j['peak_mib']:.0f} MiB |")
        print(f"\npeak memory {a.n_large} vs {a.n_jpeg} images: {j_large['peak_mib'] / j_small['peak_mib']:.2f}x")
        for n, j in ((a.n_jpeg, j_small), (a.n_large, j_large)):
            print(f"stages of {n} images (s): {json.dumps(j['stages'])}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
