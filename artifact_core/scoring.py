"""Batch scoring of image folders with Ray Data, streaming into Parquet, then one CSV.

Pipeline: list files -> read + decode + resize in parallel torch-free
tasks (:func:`artifact_core.decode.decode_batch`; a broken file becomes an error row)
-> :class:`ArtifactPredictor` actors (torch or ONNX Runtime) -> Parquet.
The CSV and ``summary.json`` are derived from the Parquet files once every file has a row,
so a CSV only exists when it is complete.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import tempfile
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
from artifact_core.bundle import WEIGHTS_FILE, load_bundle
from artifact_core.config import ScoreConfig
from artifact_core.data import list_image_files
from artifact_core.decode import decode_batch
from artifact_core.metrics import classification_metrics
from artifact_core.predict import OUTPUT_COLUMNS, ArtifactPredictor, resolve_engine
from artifact_core.raycluster import check_fits
from artifact_core.score_output import ScoringIdentity, mark_complete, prepare_output
from artifact_core.storage import Location, check_apart, display_path, resolve

log = logging.getLogger(__name__)

PARQUET_DIR = "predictions.parquet"
CSV_FILE = "predictions.csv"
SUMMARY_FILE = "summary.json"
HIST_FILE = "confidence_hist.png"
REPORT_DIR = "report"
#: Written only once every file has its row; deleted when a run starts.
DERIVED_ENTRIES = (CSV_FILE, SUMMARY_FILE, HIST_FILE, REPORT_DIR, f"{REPORT_DIR}.tmp")
#: Everything a scoring run may create in ``--output``: the only entries --overwrite deletes.
OWNED_ENTRIES = (PARQUET_DIR, *DERIVED_ENTRIES)


def list_input(input_uri: str) -> tuple[list[str], pafs.FileSystem | None, str]:
    """Image files under a local folder or a pyarrow-filesystem URI (recursive, any case).

    Hidden files and folders are skipped in both cases.

    Returns:
        (sorted paths, filesystem or None for local, normalized root).
    """
    return list_image_files(input_uri)


def _existing_rows(parquet_dir: Location) -> set[str]:
    """Paths already scored; unreadable part files (a crash mid-write) are removed."""
    done: set[str] = set()
    for name in parquet_dir.children():
        part = parquet_dir.join(name)
        if not name.endswith(".parquet"):
            continue
        try:
            done.update(pq.read_table(part.path, columns=["path"], filesystem=part.fs).column("path").to_pylist())
        except Exception as exc:  # noqa: BLE001 - any unreadable part is rescored
            log.warning("removing unreadable partial output %s (%s); its rows are scored again", part.uri, exc)
            part.remove()
    return done


def _file_sha256(loc: Location) -> str:
    h = hashlib.sha256()
    with loc.fs.open_input_stream(loc.path) as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _prepare_output(cfg: ScoreConfig, threshold: float, image_size: int) -> Location:
    """Check and claim ``--output`` (see :mod:`artifact_core.score_output`); returns the Parquet folder.

    Derived files are deleted first: until the run completes nothing may look complete.
    """
    output = resolve(cfg.output)
    check_apart(output, resolve(cfg.input), output_name="--output", source_name="the input")
    model = resolve(cfg.model)
    identity = ScoringIdentity(input=resolve(cfg.input).uri, model=model.uri,
                               model_sha256=_file_sha256(model.join(WEIGHTS_FILE)),
                               threshold=threshold, image_size=image_size)
    prepare_output(output, identity, owned=list(OWNED_ENTRIES), resume=cfg.resume, overwrite=cfg.overwrite)
    for name in DERIVED_ENTRIES:
        output.join(name).remove()
    parquet_dir = output.join(PARQUET_DIR)
    parquet_dir.makedirs()
    return parquet_dir


def default_num_actors(cfg: ScoreConfig) -> int:
    """One actor per GPU, else half the CPUs: the other half decodes (an actor pool that
    takes every CPU starves the decode tasks and hangs).

    Counted on the nodes alive now, at least 1: on an autoscaling cluster that has no
    worker nodes yet (a 0-CPU head) that is one actor, which the autoscaler is then asked
    for; ``--num-actors`` scales out to nodes that do not exist yet."""
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
    # The dataset starts from the listed paths, not from read_binary_files: each decode task
    # reads its files itself, so a file that vanished or cannot be opened becomes an error
    # row instead of failing a read task (and its whole block). Paths travel as bytes:
    # names that are not valid UTF-8 still reach the file.
    raw = [os.fsencode(p) for p in paths]
    step = max(1, cfg.batch_size)
    blocks = [pa.table({"raw_path": pa.array(raw[i:i + step], pa.binary())}) for i in range(0, len(raw), step)]
    ds = ray.data.from_arrow(blocks)
    ds = ds.map_batches(decode_batch, batch_size=cfg.batch_size, batch_format="numpy", num_cpus=1,
                        fn_kwargs={"image_size": image_size, "root": root, "fs": fs})
    # The actors reserve memory for the model and their batches. That also keeps Ray Data
    # from fusing decode into them (it fuses ops with equal resource requests): fused, decode
    # and inference run one after the other in the actor; apart, decode tasks on the free
    # CPUs overlap inference.
    return ds.map_batches(
        ArtifactPredictor, batch_size=cfg.batch_size, batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=num_actors),
        num_cpus=cfg.cpus_per_actor, num_gpus=1 if cfg.use_gpu else 0, memory=cfg.actor_memory_mb * 2**20,
        fn_constructor_kwargs={"bundle_dir": cfg.model, "use_gpu": cfg.use_gpu, "threshold": cfg.threshold,
                               "num_threads": max(1, int(cfg.cpus_per_actor)),
                               "engine": resolve_engine(cfg.model, cfg.engine, cfg.precision, use_gpu=cfg.use_gpu),
                               "precision": cfg.precision},
    )


def finalize(cfg: ScoreConfig, expected: list[str], *, threshold: float, wall_seconds: float,
             scored_now: int) -> dict[str, Any]:
    """Check one row per file, then write the CSV, summary and histogram atomically.

    Args:
        expected: the display paths (:func:`display_path`) of every listed file.
    """
    output = resolve(cfg.output)
    parquet_dir = output.join(PARQUET_DIR)
    table = pq.read_table(parquet_dir.path, columns=list(OUTPUT_COLUMNS), filesystem=parquet_dir.fs)
    # A resumed crash may have left a file scored twice: keep its first row.
    paths = table.column("path").to_pylist()
    first: dict[str, int] = {}
    for i, p in enumerate(paths):
        first.setdefault(p, i)
    missing = sorted(set(expected) - first.keys())
    if missing:
        raise RuntimeError(f"{len(missing)} file(s) have no prediction row, e.g. {missing[:3]}; rerun with --resume")
    table = table.take(pa.array([first[p] for p in expected])).sort_by("filename")
    buf = io.BytesIO()
    pacsv.write_csv(table, buf)
    output.join(CSV_FILE).write_bytes(buf.getvalue())

    pred = table.column("predicted_class").to_numpy()
    conf = table.column("confidence").to_numpy(zero_copy_only=False)
    ok = pred >= 0
    failed = table.filter(pc.less(table.column("predicted_class"), 0)).slice(0, 10)
    summary = {
        "files": len(expected), "scored": int(ok.sum()), "errors": int((~ok).sum()),
        "predicted": {"0 (artifact)": int((pred == 0).sum()), "1 (artifact-free)": int((pred == 1).sum())},
        "mean_confidence": float(np.mean(conf[ok])) if ok.any() else None,
        "model": resolve(cfg.model).uri, "threshold": threshold, "input": cfg.input,
        "engine": resolve_engine(cfg.model, cfg.engine, cfg.precision, use_gpu=cfg.use_gpu),
        "precision": cfg.precision,
        "wall_seconds": wall_seconds, "scored_this_run": scored_now,
        "images_per_second": scored_now / wall_seconds if wall_seconds > 0 else None,
        "error_examples": failed.select(["filename", "error"]).to_pylist(),
    }
    output.join(SUMMARY_FILE).write_text(json.dumps(summary, indent=2))
    if ok.any():
        with tempfile.TemporaryDirectory() as tmp:
            local = os.path.join(tmp, HIST_FILE)
            plots.confidence_histogram(conf[ok], pred[ok], local)
            output.join(HIST_FILE).upload(local)
    mark_complete(output, files=len(expected), scored_this_run=scored_now)
    return summary


def run_scoring(cfg: ScoreConfig) -> dict[str, Any]:
    """Score every image under ``cfg.input`` into ``cfg.output``; returns the summary.

    Every listed file gets exactly one row: files that cannot be read or decoded at their
    turn get an error row. The output folder is claimed with a manifest first
    (:mod:`artifact_core.score_output`), so ``--overwrite`` only ever deletes what scoring wrote.
    """
    t0 = time.time()
    cfg.output = resolve(cfg.output).uri
    bundle = load_bundle(cfg.model)  # fail fast here, not in every actor
    resolve_engine(cfg.model, cfg.engine, cfg.precision, use_gpu=cfg.use_gpu)  # a bad --engine too
    threshold = float(bundle.config.threshold if cfg.threshold is None else cfg.threshold)
    paths, fs, root = list_input(cfg.input)
    if not paths:
        raise ValueError(f"no image files (.png .jpg .jpeg .webp .bmp) found under {cfg.input!r}")
    parquet_dir = _prepare_output(cfg, threshold, bundle.config.image_size)
    done = _existing_rows(parquet_dir) if cfg.resume else set()
    shown = [display_path(p) for p in paths]
    todo = [p for p, d in zip(paths, shown) if d not in done]
    log.info("%d image file(s) under %s; %d already scored, %d to score", len(paths), cfg.input,
             len(paths) - len(todo), len(todo))
    if todo:
        num_actors = cfg.num_actors or default_num_actors(cfg)
        check_fits(num_workers=num_actors, cpus_per_worker=cfg.cpus_per_actor,
                   gpus_per_worker=1.0 if cfg.use_gpu else 0.0, reserved_cpus=1.0, what="scoring",
                   wait_s=cfg.wait_for_resources)
        ds = build_dataset(cfg, todo, fs, display_path(root), bundle.config.image_size, num_actors)
        ds.write_parquet(parquet_dir.path, filesystem=parquet_dir.fs)
    summary = finalize(cfg, shown, threshold=threshold, wall_seconds=time.time() - t0, scored_now=len(todo))
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
    csv = resolve(output).join(CSV_FILE)
    with csv.fs.open_input_stream(csv.path) as f:
        pred = pacsv.read_csv(f).to_pydict()
    by_name = dict(zip(pred["filename"], pred["predicted_class"]))
    pairs = [(int(y), int(by_name[f])) for f, y in zip(truth["filename"], truth["label"]) if f in by_name]
    if not pairs:
        raise ValueError(f"no file in {labels_csv!r} matches a scored filename in {output!r}")
    y_true = [t for t, _ in pairs]
    # An error row (-1) is a miss: predict the opposite of the truth.
    y_pred = [p if p >= 0 else 1 - t for t, p in pairs]
    return classification_metrics(y_true, y_pred)
