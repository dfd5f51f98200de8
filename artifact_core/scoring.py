"""Batch scoring of image folders with Ray Data, streaming into Parquet, then one CSV.

Pipeline: list files -> ``read_binary_files`` -> decode + eval transform in parallel
tasks (a broken file becomes an error row) -> :class:`ArtifactPredictor` actors -> Parquet.
The CSV and ``summary.json`` are derived from the Parquet files once every file has a row,
so a CSV only exists when it is complete.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray
import ray.data

from artifact_core import plots
from artifact_core.bundle import load_bundle
from artifact_core.config import ScoreConfig
from artifact_core.data import is_image_file, list_images
from artifact_core.images import ImageDecodeError, decode_image
from artifact_core.metrics import classification_metrics
from artifact_core.predict import OUTPUT_COLUMNS, ArtifactPredictor
from artifact_core.raycluster import check_fits
from artifact_core.transforms import eval_resize

log = logging.getLogger(__name__)

PARQUET_DIR = "predictions.parquet"
CSV_FILE = "predictions.csv"
SUMMARY_FILE = "summary.json"
HIST_FILE = "confidence_hist.png"


def list_input(input_uri: str) -> tuple[list[str], pafs.FileSystem | None, str]:
    """Image files under a local folder or a pyarrow-filesystem URI (recursive, any case).

    Returns:
        (sorted paths, filesystem or None for local, normalized root).
    """
    if "://" not in input_uri:
        root = os.path.abspath(os.path.expanduser(input_uri))
        return list_images(root), None, root
    fs, root = pafs.FileSystem.from_uri(input_uri)
    info = fs.get_file_info(root)
    if info.type != pafs.FileType.Directory:
        raise FileNotFoundError(f"input {input_uri!r} is not a folder")
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=True))
    paths = sorted(i.path for i in infos if i.type == pafs.FileType.File and is_image_file(i.base_name))
    return paths, fs, root.rstrip("/")


def decode_batch(batch: dict[str, np.ndarray], *, image_size: int, root: str) -> dict[str, np.ndarray]:
    """Bytes -> resized uint8 (N, 3, S, S) with the shared decoder; failures become errors.

    The predictor normalizes (the second half of the eval transform): shipping uint8
    moves a quarter of the bytes through the object store.
    """
    tf = eval_resize(image_size=image_size)
    n = len(batch["path"])
    images = np.zeros((n, 3, image_size, image_size), dtype=np.uint8)
    errors = np.full(n, "", dtype=object)
    for i, (data, path) in enumerate(zip(batch["bytes"], batch["path"])):
        try:
            images[i] = tf(decode_image(bytes(data), name=path)).numpy()
        except ImageDecodeError as exc:
            errors[i] = exc.reason
        except Exception as exc:  # noqa: BLE001 - one odd file must never stop the job
            errors[i] = f"{type(exc).__name__}: {exc}"
    rel = [p[len(root) + 1:] if p.startswith(root + "/") else p for p in batch["path"]]
    return {"path": np.asarray(batch["path"], dtype=object), "filename": np.asarray(rel, dtype=object),
            "image": images, "error": errors}


def _existing_rows(parquet_dir: str) -> set[str]:
    """Paths already scored; unreadable part files (a crash mid-write) are removed."""
    done: set[str] = set()
    if not os.path.isdir(parquet_dir):
        return done
    for name in sorted(os.listdir(parquet_dir)):
        f = os.path.join(parquet_dir, name)
        if not name.endswith(".parquet"):
            continue
        try:
            done.update(pq.read_table(f, columns=["path"]).column("path").to_pylist())
        except Exception as exc:  # noqa: BLE001 - any unreadable part is rescored
            log.warning("removing unreadable partial output %s (%s); its rows are scored again", f, exc)
            os.remove(f)
    return done


def _prepare_output(cfg: ScoreConfig) -> str:
    parquet_dir = os.path.join(cfg.output, PARQUET_DIR)
    if os.path.exists(cfg.output) and os.listdir(cfg.output) and not (cfg.resume or cfg.overwrite):
        raise FileExistsError(f"output {cfg.output!r} already exists; pass --resume to add the missing rows "
                              f"or --overwrite to replace it")
    if cfg.overwrite and os.path.exists(cfg.output):
        shutil.rmtree(cfg.output)
    os.makedirs(parquet_dir, exist_ok=True)
    # Derived files go first: until the run completes nothing may look complete.
    for name in (CSV_FILE, SUMMARY_FILE, HIST_FILE):
        if os.path.exists(os.path.join(cfg.output, name)):
            os.remove(os.path.join(cfg.output, name))
    return parquet_dir


def default_num_actors(cfg: ScoreConfig) -> int:
    """One actor per GPU, else half the CPUs: the other half decodes (an actor pool that
    takes every CPU starves the decode tasks and hangs)."""
    res = ray.cluster_resources()
    if cfg.use_gpu:
        return max(1, int(res.get("GPU", 0)))
    return max(1, int(res.get("CPU", 1) // (2 * cfg.cpus_per_actor)))


def build_dataset(cfg: ScoreConfig, paths: list[str], fs: pafs.FileSystem | None, root: str,
                  image_size: int, num_actors: int) -> ray.data.Dataset:
    """The lazy Ray Data pipeline from files to prediction rows."""
    # A fixed object-store budget for this job's blocks keeps memory flat whatever the folder
    # size; Ray Data's default budget is a share of the whole store, filled more the longer a
    # job runs. It must be set before the dataset is created (datasets copy the context).
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.resource_limits = ctx.execution_options.resource_limits.copy(
        object_store_memory=cfg.object_store_budget_mb * 2**20)
    ds = ray.data.read_binary_files(paths, include_paths=True, filesystem=fs)
    ds = ds.map_batches(decode_batch, batch_size=cfg.batch_size, batch_format="numpy", num_cpus=1,
                        fn_kwargs={"image_size": image_size, "root": root})
    # The actors reserve memory for the model and their batches. That also keeps Ray Data
    # from fusing decode into them (it fuses ops with equal resource requests): fused, decode
    # and inference run one after the other in the actor; apart, decode tasks on the free
    # CPUs overlap inference.
    return ds.map_batches(
        ArtifactPredictor, batch_size=cfg.batch_size, batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=num_actors),
        num_cpus=cfg.cpus_per_actor, num_gpus=1 if cfg.use_gpu else 0, memory=cfg.actor_memory_mb * 2**20,
        fn_constructor_kwargs={"bundle_dir": cfg.model, "use_gpu": cfg.use_gpu, "threshold": cfg.threshold,
                               "num_threads": max(1, int(cfg.cpus_per_actor))},
    )


def finalize(cfg: ScoreConfig, expected: list[str], *, threshold: float, wall_seconds: float,
             scored_now: int) -> dict[str, Any]:
    """Check one row per file, then write the CSV, summary and histogram atomically."""
    parquet_dir = os.path.join(cfg.output, PARQUET_DIR)
    table = pq.read_table(parquet_dir, columns=list(OUTPUT_COLUMNS))
    # A resumed crash may have left a file scored twice: keep its first row.
    paths = table.column("path").to_pylist()
    first: dict[str, int] = {}
    for i, p in enumerate(paths):
        first.setdefault(p, i)
    missing = sorted(set(expected) - first.keys())
    if missing:
        raise RuntimeError(f"{len(missing)} file(s) have no prediction row, e.g. {missing[:3]}; rerun with --resume")
    table = table.take(pa.array([first[p] for p in expected])).sort_by("filename")
    tmp = os.path.join(cfg.output, CSV_FILE + ".tmp")
    pacsv.write_csv(table, tmp)
    os.replace(tmp, os.path.join(cfg.output, CSV_FILE))

    pred = table.column("predicted_class").to_numpy()
    conf = table.column("confidence").to_numpy(zero_copy_only=False)
    ok = pred >= 0
    failed = table.filter(pc.less(table.column("predicted_class"), 0)).slice(0, 10)
    summary = {
        "files": len(expected), "scored": int(ok.sum()), "errors": int((~ok).sum()),
        "predicted": {"0 (artifact)": int((pred == 0).sum()), "1 (artifact-free)": int((pred == 1).sum())},
        "mean_confidence": float(np.mean(conf[ok])) if ok.any() else None,
        "model": os.path.abspath(cfg.model), "threshold": threshold, "input": cfg.input,
        "wall_seconds": wall_seconds, "scored_this_run": scored_now,
        "images_per_second": scored_now / wall_seconds if wall_seconds > 0 else None,
        "error_examples": failed.select(["filename", "error"]).to_pylist(),
    }
    tmp = os.path.join(cfg.output, SUMMARY_FILE + ".tmp")
    with open(tmp, "w") as f:
        json.dump(summary, f, indent=2)
    os.replace(tmp, os.path.join(cfg.output, SUMMARY_FILE))
    if ok.any():
        plots.confidence_histogram(conf[ok], pred[ok], os.path.join(cfg.output, HIST_FILE))
    return summary


def run_scoring(cfg: ScoreConfig) -> dict[str, Any]:
    """Score every image under ``cfg.input`` into ``cfg.output``; returns the summary."""
    t0 = time.time()
    cfg.output = os.path.abspath(os.path.expanduser(cfg.output))
    bundle = load_bundle(cfg.model)  # fail fast here, not in every actor
    threshold = float(bundle.config.threshold if cfg.threshold is None else cfg.threshold)
    paths, fs, root = list_input(cfg.input)
    if not paths:
        raise ValueError(f"no image files (.png .jpg .jpeg .webp .bmp) found under {cfg.input!r}")
    parquet_dir = _prepare_output(cfg)
    done = _existing_rows(parquet_dir) if cfg.resume else set()
    todo = [p for p in paths if p not in done]
    log.info("%d image file(s) under %s; %d already scored, %d to score", len(paths), cfg.input,
             len(paths) - len(todo), len(todo))
    if todo:
        num_actors = cfg.num_actors or default_num_actors(cfg)
        check_fits(num_workers=num_actors, cpus_per_worker=cfg.cpus_per_actor,
                   gpus_per_worker=1.0 if cfg.use_gpu else 0.0, reserved_cpus=1.0, what="scoring")
        ds = build_dataset(cfg, todo, fs, root, bundle.config.image_size, num_actors)
        ds.write_parquet(parquet_dir)
    summary = finalize(cfg, paths, threshold=threshold, wall_seconds=time.time() - t0, scored_now=len(todo))
    from artifact_core.report import report_after_scoring  # the page reads the finished outputs
    return report_after_scoring(cfg, summary)


def evaluate_against_labels(output: str, labels_csv: str) -> dict[str, Any]:
    """Metrics of a finished scoring output against a ``filename,label`` CSV.

    Error rows count as wrong predictions; files missing from the labels are ignored.
    """
    if not os.path.isfile(labels_csv):
        raise FileNotFoundError(f"labels file {labels_csv!r} does not exist (expected CSV with filename,label)")
    truth = pacsv.read_csv(labels_csv).to_pydict()
    if "filename" not in truth or "label" not in truth:
        raise ValueError(f"{labels_csv!r} must have columns filename,label; found {sorted(truth)}")
    pred = pacsv.read_csv(os.path.join(output, CSV_FILE)).to_pydict()
    by_name = dict(zip(pred["filename"], pred["predicted_class"]))
    pairs = [(int(y), int(by_name[f])) for f, y in zip(truth["filename"], truth["label"]) if f in by_name]
    if not pairs:
        raise ValueError(f"no file in {labels_csv!r} matches a scored filename in {output!r}")
    y_true = [t for t, _ in pairs]
    # An error row (-1) is a miss: predict the opposite of the truth.
    y_pred = [p if p >= 0 else 1 - t for t, p in pairs]
    return classification_metrics(y_true, y_pred)
