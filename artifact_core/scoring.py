"""Batch scoring of image folders with Ray Data, streaming into Parquet, then one CSV.

Two pipeline shapes (``--pipeline``, chosen by :func:`plan_pipeline`):

- split: list files -> read + decode + resize in parallel torch-free tasks
  (:func:`artifact_core.decode.decode_batch`; a broken file becomes an error row)
  -> :class:`ArtifactPredictor` actors (torch or ONNX Runtime) -> Parquet;
- fused: list files -> :class:`DecodingPredictor`, one actor per node (per GPU with
  ``--use-gpu``) whose threads decode and infer (no object-store hop for the pixels): with
  ONNX Runtime one lane per core, each decoding a chunk and running it through its own
  single-threaded session -> Parquet.

The CSV and ``summary.json`` are derived from the Parquet files once every file has a row,
so a CSV only exists when it is complete.
"""

from __future__ import annotations

import io
import json
import logging
import os
import posixpath
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray
import ray.data
from ray.data.datasource import FilenameProvider

from artifact_core import plots
from artifact_core.bundle import CONFIG_FILE, ONNX_INT8_FILE, WEIGHTS_FILE, load_bundle, read_bundle_config
from artifact_core.config import SCORE_PIPELINES, ScoreConfig
from artifact_core.data import IMAGE_EXTENSIONS, list_image_files
from artifact_core.decode import decode_array, decode_batch
from artifact_core.metrics import classification_metrics
from artifact_core.predict import (OUTPUT_COLUMNS, ArtifactPredictor, BundleChangedError, DecodingPredictor,
                                   resolve_engine)
from artifact_core.raycluster import check_fits
from artifact_core.score_output import (PAGE_FIRST, Manifest, OutputConflictError, ScoringIdentity, check_claimable,
                                        check_holder, mark_complete, part_run, prepare_output, read_manifest)
from artifact_core.storage import (Location, check_apart, display_path, file_sha256, read_file_bytes, redact_uri,
                                   resolve)

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


def list_input(input_uri: str, output_uri: str | None = None) -> tuple[list[str], pafs.FileSystem | None, str]:
    """Image files under a local folder or a pyarrow-filesystem URI (recursive, any case).

    Hidden files and folders are skipped in both cases; a linked folder that leads into the
    (local) output is not followed: the job's own figures are no input.

    Returns:
        (sorted paths, filesystem or None for local, normalized root).
    """
    out = resolve(output_uri) if output_uri else None
    return list_image_files(input_uri, exclude=[out.path] if out is not None and out.is_local else [])


def _check_distinct(shown: Sequence[str]) -> None:
    """Refuse, before anything is written, two files whose rows would carry the same path.

    Rows are keyed by the UTF-8 path (:func:`display_path`); a name with undecodable bytes
    and one spelling those bytes out as ``\\xNN`` would share a row and one result be lost.
    """
    seen: set[str] = set()
    for name in shown:
        if name in seen:
            raise ValueError(f"two input files would share the output row {name!r}: one name has bytes that are "
                             f"not UTF-8, the other spells them out as \\xNN; rename one")
        seen.add(name)


def _parts(parquet_dir: Location, manifest: Manifest, *, drop_foreign: bool = False,
           skip_foreign: bool = False) -> list[Location]:
    """The output's Parquet parts: those of the runs its manifest names.

    Args:
        drop_foreign: delete the parts of other runs instead (a resume, just after its claim:
            such a run lost the folder to a later claim and stopped at its finalize, or will),
            and the staged file of a compaction that was killed.
        skip_foreign: leave the parts of other runs out, deleting nothing (a look before the claim).

    Raises:
        OutputConflictError: a part of another run is there (another job writes into this
            output); nothing is deleted.
    """
    names = parquet_dir.children()
    parts = [n for n in names if n.endswith(".parquet") and not n.startswith(("_", "."))]
    if manifest.runs:
        foreign = [n for n in parts if part_run(n) not in manifest.runs]
        if foreign and skip_foreign and not drop_foreign:
            parts = [n for n in parts if n not in foreign]
        elif foreign and drop_foreign:
            log.warning("--resume: removing %d Parquet part(s) of runs that lost %s to a later claim, e.g. %s",
                        len(foreign), parquet_dir.uri, foreign[0])
            for name in foreign:
                parquet_dir.join(name).remove()
            parts = [n for n in parts if n not in foreign]
        elif foreign:
            raise OutputConflictError(
                f"{parquet_dir.uri} holds {foreign[0]!r}, written by another scoring job (runs of this output: "
                f"{', '.join(manifest.runs)}); nothing was published by this run. When no other job uses the "
                f"folder, rerun with --resume (parts of runs that lost the folder are dropped) or --overwrite")
    if drop_foreign:
        # What a compaction killed before its rename left: hidden from readers, but not kept.
        for name in names:
            if name.startswith("_") and ".parquet" in name:
                parquet_dir.join(name).remove()
    # In the order the runs wrote them (run ids are random): a later row is a later read.
    order = {run: i for i, run in enumerate(manifest.runs)}
    parts.sort(key=lambda n: (order.get(part_run(n), -1), n))
    return [parquet_dir.join(n) for n in parts]


#: Parts a --resume reads at once: an object store answers each read in tens of milliseconds,
#: and a big run has thousands of parts (one per written block).
PART_READ_THREADS = 16


def _scored_paths(part: Location) -> list[str] | pa.ArrowInvalid | OSError:
    """The paths of ``part``'s rows without an error, or the error reading it raised."""
    try:
        rows = pq.read_table(part.path, columns=["path", "error"], filesystem=part.fs)
    except (pa.ArrowInvalid, OSError) as exc:
        return exc
    ok = pc.fill_null(pc.equal(rows.column("error"), ""), True)
    return rows.column("path").filter(ok).to_pylist()


def _existing_rows(parts: list[Location], *, remove_corrupt: bool = True) -> set[str]:
    """Paths already scored without an error; a part cut short by a crash mid-write is removed
    (its rows are scored again; left in place and skipped without ``remove_corrupt``). Error
    rows are tried again: a read may have failed for a passing reason (a network timeout),
    and a file that is still broken gets its error row again."""
    done: set[str] = set()
    pool = ThreadPoolExecutor(max_workers=max(1, min(PART_READ_THREADS, len(parts))))
    try:
        futures = [pool.submit(_scored_paths, part) for part in parts]
        for i, part in enumerate(parts):
            result, futures[i] = futures[i].result(), None
            if isinstance(result, list):
                done.update(result)
                continue
            # Only a file that is not valid Parquet goes: a read that failed for any other reason
            # (network, permissions, memory) must not delete finished rows. A cut file is
            # ArrowInvalid; a local file with a corrupt footer is an OSError that no system call
            # raised (errno None); remote, that cannot be told from the network, so it stops.
            corrupt = isinstance(result, pa.ArrowInvalid) or (part.is_local and result.errno is None
                                                              and not isinstance(result, FileNotFoundError))
            if not corrupt:
                raise result
            if remove_corrupt:
                log.warning("removing unreadable partial output %s (%s); its rows are scored again", part.uri, result)
                part.remove()
    finally:
        # (a failure or Ctrl-C stops here: the reads still queued are dropped, not waited for)
        pool.shutdown(wait=False, cancel_futures=True)
    return done


def _rows_before_claim(cfg: ScoreConfig) -> set[str]:
    """What :func:`_existing_rows` will find after a ``--resume`` claims the output, read
    without writing or deleting anything (the claim may still be refused or not happen)."""
    output = resolve(cfg.output)
    manifest = read_manifest(output)
    parquet_dir = output.join(PARQUET_DIR)
    if manifest is None or not parquet_dir.exists():
        return set()
    return _existing_rows(_parts(parquet_dir, manifest, skip_foreign=True), remove_corrupt=False)


def _check_output(cfg: ScoreConfig, threshold: float, image_size: int) -> ScoringIdentity:
    """Check that ``--output`` can be claimed, deleting nothing (see :func:`check_claimable`);
    returns this run's identity."""
    output = resolve(cfg.output)
    check_apart(output, resolve(cfg.input), output_name="--output", source_name="the input")
    model = resolve(cfg.model)
    identity = ScoringIdentity(input=redact_uri(resolve(cfg.input).uri), model=redact_uri(model.uri),
                               model_sha256=file_sha256(model.join(WEIGHTS_FILE)),
                               threshold=threshold, image_size=image_size, precision=cfg.precision,
                               int8_sha256=file_sha256(model.join(ONNX_INT8_FILE)) if cfg.precision == "int8"
                               else "not used",
                               config_sha256=file_sha256(model.join(CONFIG_FILE)))
    check_claimable(output, identity, owned=list(OWNED_ENTRIES), resume=cfg.resume, overwrite=cfg.overwrite)
    return identity


def _prepare_output(cfg: ScoreConfig, threshold: float, image_size: int,
                    identity: ScoringIdentity | None = None) -> tuple[Location, Manifest]:
    """Check and claim ``--output`` (see :mod:`artifact_core.score_output`); returns the Parquet
    folder and the manifest, which holds this run's id.

    Derived files are deleted first: until the run completes nothing may look complete.
    """
    output = resolve(cfg.output)
    if identity is None:
        identity = _check_output(cfg, threshold, image_size)
    manifest = prepare_output(output, identity, owned=list(OWNED_ENTRIES), resume=cfg.resume,
                              overwrite=cfg.overwrite)
    for name in DERIVED_ENTRIES:
        output.join(name).remove(first=PAGE_FIRST)
    parquet_dir = output.join(PARQUET_DIR)
    parquet_dir.makedirs()
    return parquet_dir, manifest


#: auto picks split only when a CPU split of decode tasks and actors would reach this share of
#: the fused estimate: split decodes in separate processes (no shared GIL, no threads competing
#: with the engine), but pays an object-store hop per image and leaves cores idle when unbalanced.
SPLIT_MIN_SHARE = 0.9
#: files decoded and images inferred by the probe of ``--pipeline auto``
PROBE_FILES = 8
#: batches a fused actor works on at once (see :class:`DecodingPredictor`)
FUSED_CONCURRENT_CALLS = 2
#: most lanes per fused actor; on larger nodes each lane's session gets several threads. Each
#: lane holds its own ONNX Runtime session and arena (see LANE_MIB_AT_448), and only 2-lane
#: actors were measured.
MAX_LANES = 4
#: memory one lane's session holds beyond the first, for a chunk of 8 at 448 px (ONNX Runtime's
#: arena after one chunk, measured 250 MiB with the multiscale head); scaled by the input's pixels
LANE_MIB_AT_448 = 256


def lane_memory_mb(image_size: int, views: int = 1) -> int:
    """Memory one more lane of a fused actor needs at ``image_size`` (reserved in Ray), for a
    model that runs ``views`` images per input (2 with a test-time flip)."""
    return int(LANE_MIB_AT_448 * views * (image_size / 448) ** 2) + 1


@dataclass
class PipelinePlan:
    """How the scoring pipeline is laid out; recorded in ``summary.json``."""

    mode: str  # "fused" or "split"
    num_actors: int
    actor_cpus: float  # CPUs each actor reserves in Ray
    engine_threads: int  # the engine's intra-op threads (per lane)
    decode_threads: int = 0  # fused: decode threads per actor (with lanes: the lanes decode)
    lanes: int = 1  # fused with ONNX Runtime on CPU: threads that each decode and infer, one session each
    decode_ms: float | None = None  # probe: per image on one core (read + decode + resize)
    inference_ms: float | None = None  # probe: per image on one core
    estimate_fused: float | None = None  # images/s by the probe's costs
    estimate_split: float | None = None
    reason: str = ""


def default_num_actors(cfg: ScoreConfig) -> int:
    """Split pipeline: one actor per GPU, else half the CPUs: the other half decodes (an actor
    pool that takes every CPU starves the decode tasks and hangs).

    Counted on the nodes alive now, at least 1: on an autoscaling cluster that has no
    worker nodes yet (a 0-CPU head) that is one actor, which the autoscaler is then asked
    for; ``--num-actors`` scales out to nodes that do not exist yet."""
    res = ray.cluster_resources()
    if cfg.use_gpu:
        return max(1, int(res.get("GPU", 0)))
    return max(1, int(res.get("CPU", 1) // (2 * cfg.cpus_per_actor)))


def _node_cpus() -> list[int]:
    return [int(n["Resources"].get("CPU", 0)) for n in ray.nodes()
            if n.get("Alive") and n["Resources"].get("CPU", 0) >= 1]


def _gpu_nodes() -> list[tuple[int, int]]:
    """(CPUs, GPUs) of each alive node with a GPU."""
    return [(int(n["Resources"].get("CPU", 0)), int(n["Resources"]["GPU"])) for n in ray.nodes()
            if n.get("Alive") and n["Resources"].get("GPU", 0) >= 1]


def measure_stage_costs(cfg: ScoreConfig, paths: Sequence[str], fs: pafs.FileSystem | None,
                        image_size: int) -> tuple[float | None, float]:
    """Per-image cost on one core of read + decode and of inference, in ms, on a small probe.

    Decodes up to :data:`PROBE_FILES` files spread over ``paths`` (the ones that fail are
    skipped: None when none decodes), then times the engine scoring ``--engine`` on a batch of
    them with one thread.
    """
    pick = list(paths[:: max(1, len(paths) // PROBE_FILES)][:PROBE_FILES])
    images, times = [], []
    for p in pick:
        t = time.perf_counter()
        try:
            images.append(decode_array(read_file_bytes(p, fs), image_size, name=p))
        except Exception:  # noqa: BLE001 - a broken file says nothing about the cost
            continue
        times.append(time.perf_counter() - t)
    decode_ms = 1000 * float(np.median(times)) if times else None
    batch = np.stack(images) if images else np.zeros((1, 3, image_size, image_size), np.uint8)
    batch = np.resize(batch, (PROBE_FILES, *batch.shape[1:]))  # repeat up to a full probe batch
    torch_threads = None
    engine = resolve_engine(cfg.model, cfg.engine, cfg.precision)
    if engine == "torch":
        import torch  # the driver has it already (load_bundle); restore its thread count after
        torch_threads = torch.get_num_threads()
    try:
        predictor = ArtifactPredictor(cfg.model, engine=engine, precision=cfg.precision, num_threads=1)
        predictor.engine.predict(batch)  # warm-up: first-call allocations and kernel choice
        t = time.perf_counter()
        predictor.engine.predict(batch)
        inference_ms = 1000 * (time.perf_counter() - t) / len(batch)
    finally:
        if torch_threads:
            torch.set_num_threads(torch_threads)
    return decode_ms, inference_ms


def _estimates(cpus: int, decode_ms: float, inference_ms: float) -> tuple[float, float, int]:
    """Images/s per node of fused (every core decodes and infers) and of the best split into
    decode cores and actor cores; returns (fused, split, actor cores of that split)."""
    fused = 1000 * cpus / (decode_ms + inference_ms)
    best = (0.0, 1)
    for a in range(1, cpus):
        best = max(best, (1000 * min((cpus - a) / decode_ms, a / inference_ms), a))
    return fused, best[0], best[1]


def plan_pipeline(cfg: ScoreConfig, paths: Sequence[str], fs: pafs.FileSystem | None,
                  image_size: int) -> PipelinePlan:
    """Lay out the pipeline: ``--pipeline fused|split`` as asked; ``auto`` is split with
    ``--use-gpu`` (one GPU actor each, decode spread over the CPUs) or when no node has 2+
    CPUs, fused when no probe file decodes, and otherwise measures the stage costs
    (:func:`measure_stage_costs`) and picks split only when its best CPU split reaches
    :data:`SPLIT_MIN_SHARE` of the fused estimate. Fused on GPUs: one actor per GPU, each with
    (CPUs - 1) // GPUs decode threads of the smallest GPU node; fused with ONNX Runtime on CPU:
    a lane per core, up to :data:`MAX_LANES`. ``--num-actors`` overrides the actor count.

    Raises:
        ValueError: an unknown ``--pipeline``.
    """
    if cfg.pipeline not in SCORE_PIPELINES:
        raise ValueError(f"--pipeline must be one of {', '.join(SCORE_PIPELINES)}; got {cfg.pipeline!r}")
    node_cpus = _node_cpus() or [1]
    # A fused actor per node with 2+ CPUs (it leaves one to the write tasks), sized to fit the
    # smallest such node; 1-CPU nodes alone (test clusters) host one 1-CPU actor each but one.
    big = [c for c in node_cpus if c >= 2]
    cpus = min(big) if big else 1
    mode, reason = cfg.pipeline, "asked for"
    costs: dict[str, Any] = {}
    if mode == "auto" and cfg.use_gpu:
        mode, reason = "split", "auto with --use-gpu"
    elif mode == "auto" and not big:
        mode, reason = "split", "no node has 2 or more CPUs"
    elif mode == "auto":
        decode_ms, inference_ms = measure_stage_costs(cfg, paths, fs, image_size)
        costs = {"decode_ms": decode_ms, "inference_ms": inference_ms}
        if decode_ms is None:
            mode, reason = "fused", "no probe file decoded"
        else:
            fused, split, _ = _estimates(cpus, decode_ms, inference_ms)
            costs.update(estimate_fused=fused * len(big), estimate_split=split * len(big))
            mode = "split" if split >= SPLIT_MIN_SHARE * fused else "fused"
            reason = f"split would reach {split / fused:.0%} of fused (split needs {SPLIT_MIN_SHARE:.0%})"
    if mode == "fused":
        # Actors reserve one CPU less than a node has: Ray Data's write tasks need a free CPU
        # (an actor pool that reserves every CPU hangs, ray-project/ray#44687).
        if cfg.use_gpu:
            # An actor per GPU; the actors of one node share its cores (one left to the writes),
            # and each reserves the cores its decode threads use.
            nodes = _gpu_nodes()
            threads = max(1, min(((c - 1) // g for c, g in nodes), default=cpus - 1))
            plan = PipelinePlan("fused", max(1, sum(g for _, g in nodes)), max(cfg.cpus_per_actor, float(threads)),
                                threads, threads, reason=reason)
        else:  # one actor per node using all its cores
            n = len(big) or max(1, len(node_cpus) - 1)
            plan = PipelinePlan("fused", n, float(max(1, cpus - 1)), cpus, cpus, reason=reason)
            if resolve_engine(cfg.model, cfg.engine, cfg.precision) == "onnx":
                # a lane per core, each a single-threaded session (see DecodingPredictor); past
                # MAX_LANES cores the lanes' sessions share them
                plan.lanes = min(cpus, MAX_LANES)
                plan.engine_threads = max(1, cpus // plan.lanes)
        if cfg.num_actors:
            # As asked, more than the nodes alive included: on an autoscaling cluster that is
            # how scoring scales out (the fit check then waits for the nodes).
            plan.num_actors = cfg.num_actors
    else:
        n = cfg.num_actors or default_num_actors(cfg)
        if not cfg.num_actors and not cfg.use_gpu and costs.get("decode_ms"):
            # actors get the share of the CPUs that inference takes; at least one CPU decodes
            total = sum(node_cpus)
            share = total * costs["inference_ms"] / (costs["decode_ms"] + costs["inference_ms"])
            n = int(min(max(1, round(share / cfg.cpus_per_actor)), max(1, (total - 1) // cfg.cpus_per_actor)))
        plan = PipelinePlan("split", n, cfg.cpus_per_actor, max(1, int(cfg.cpus_per_actor)), reason=reason)
    for k, v in costs.items():
        setattr(plan, k, v)
    if costs.get("decode_ms") is not None:
        log.info("pipeline: decode %.1f ms/img, inference %.1f ms/img (one core each); estimates fused "
                 "%.0f img/s, split %.0f img/s -> %s (%s)", plan.decode_ms, plan.inference_ms,
                 plan.estimate_fused, plan.estimate_split, plan.mode, reason)
    if plan.lanes > 1:
        log.info("pipeline fused: %d actor(s) x %g CPU, %d lanes each (decode + an engine of %d thread(s))",
                 plan.num_actors, plan.actor_cpus, plan.lanes, plan.engine_threads)
    else:
        log.info("pipeline %s: %d actor(s) x %g CPU, %d engine thread(s)%s", plan.mode, plan.num_actors,
                 plan.actor_cpus, plan.engine_threads,
                 f", {plan.decode_threads} decode thread(s)" if plan.mode == "fused" else "")
    return plan


def actor_memory_bytes(cfg: ScoreConfig, plan: PipelinePlan, image_size: int, views: int) -> int:
    """Ray ``memory`` one scoring actor reserves: ``--actor-memory-mb``, and in the fused
    mode a session's worth more for every lane beyond the first."""
    extra = (plan.lanes - 1) * lane_memory_mb(image_size, views) if plan.mode == "fused" else 0
    return int((cfg.actor_memory_mb + extra) * 2**20)


def build_dataset(cfg: ScoreConfig, paths: list[str], fs: pafs.FileSystem | None, root: str,
                  image_size: int, plan: PipelinePlan | int, *, views: int = 1,
                  weights_sha256: str | None = None) -> ray.data.Dataset:
    """The lazy Ray Data pipeline from files to prediction rows.

    Args:
        plan: the layout (:func:`plan_pipeline`); a bare int means the split pipeline with
            that many actors.
        views: images the model runs per input (2 for a bundle with a test-time flip): sizes
            the memory each extra lane reserves.
        weights_sha256: the ``model.pt`` the run recorded; an actor that finds other weights
            (the bundle exported again since) refuses to start.
    """
    if isinstance(plan, int):
        plan = PipelinePlan("split", plan, cfg.cpus_per_actor, max(1, int(cfg.cpus_per_actor)))
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
    predictor_kwargs = {"bundle_dir": cfg.model, "use_gpu": cfg.use_gpu, "threshold": cfg.threshold,
                        "num_threads": plan.engine_threads,
                        "engine": resolve_engine(cfg.model, cfg.engine, cfg.precision, use_gpu=cfg.use_gpu),
                        "precision": cfg.precision, "expected_weights_sha256": weights_sha256}
    common = {"batch_size": cfg.batch_size, "batch_format": "numpy",
              "compute": ray.data.ActorPoolStrategy(size=plan.num_actors), "num_cpus": plan.actor_cpus,
              "num_gpus": 1 if cfg.use_gpu else 0, "memory": actor_memory_bytes(cfg, plan, image_size, views)}
    if plan.mode == "fused":
        # Two calls per actor in flight, run concurrently: the next batch decodes (and Ray Data
        # batches it) while this one is in the engine; an engine takes one chunk at a time
        # (DecodingPredictor). One call at a time left the engine idle at every batch's start.
        common["compute"] = ray.data.ActorPoolStrategy(size=plan.num_actors,
                                                       max_concurrent_calls_per_actor=FUSED_CONCURRENT_CALLS,
                                                       enable_true_multi_threading=FUSED_CONCURRENT_CALLS > 1)
        return ds.map_batches(DecodingPredictor, **common, fn_constructor_kwargs={
            **predictor_kwargs, "image_size": image_size, "root": root, "fs": fs,
            "decode_threads": plan.decode_threads, "lanes": plan.lanes})
    ds = ds.map_batches(decode_batch, batch_size=cfg.batch_size, batch_format="numpy", num_cpus=1,
                        fn_kwargs={"image_size": image_size, "root": root, "fs": fs})
    # The actors reserve memory for the model and their batches. That also keeps Ray Data
    # from fusing decode into them (it fuses ops with equal resource requests): fused that
    # way, decode and inference would run one after the other in the actor; apart, decode
    # tasks on the free CPUs overlap inference.
    return ds.map_batches(ArtifactPredictor, **common, fn_constructor_kwargs=predictor_kwargs)


class MissingRowsError(ValueError):
    """Listed files have no row in the output (a part was lost, or the input changed while scoring)."""


def _compact(parquet_dir: Location, parts: list[Location], table: pa.Table, run_id: str) -> None:
    """Replace ``parts`` by one part holding ``table`` (one row per listed file).

    The new part is complete before any old one goes: a kill in between leaves duplicate
    rows, which the next finalize removes again, never a file without its row.
    """
    buf = io.BytesIO()
    pq.write_table(table, buf)
    final = parquet_dir.join(f"{run_id}_compacted.parquet")
    # Written under a name Parquet readers skip ('_'), then renamed: a kill mid-write leaves
    # nothing that breaks reading the folder.
    staged = parquet_dir.join(f"_{run_id}_compacted.parquet")
    staged.write_bytes(buf.getvalue())
    del buf
    final.fs.move(staged.path, final.path)
    for part in parts:
        if part.path != final.path:
            part.remove()


def finalize(cfg: ScoreConfig, expected: list[str], *, threshold: float, wall_seconds: float,
             scored_now: int, run_id: str, pipeline: PipelinePlan | None = None,
             stage_seconds: dict[str, float] | None = None) -> dict[str, Any]:
    """Check one row per file, then write the CSV, summary and histogram atomically.

    Args:
        expected: the display paths (:func:`display_path`) of every listed file.
        wall_seconds: the run's time so far; the CSV written here is added to it.
        run_id: this run's id (:func:`artifact_core.score_output.prepare_output`); finalize
            refuses when another run has claimed the folder since.
        stage_seconds: where that time went (recorded in the summary; ``finalize`` is added).
    """
    t_final = time.time()
    output = resolve(cfg.output)
    parquet_dir = output.join(PARQUET_DIR)
    parts = _parts(parquet_dir, check_holder(output, run_id, published=False))
    table = (pq.read_table([p.path for p in parts], columns=list(OUTPUT_COLUMNS), filesystem=parquet_dir.fs)
             if parts else pa.table({c: [] for c in OUTPUT_COLUMNS}))
    # A resumed crash may have left a file scored twice: keep its first row. A file whose error
    # row a --resume read again keeps the later row (parts are in run order): its score, or
    # the reason it fails now (a timeout then, a cut file now).
    paths = table.column("path").to_pylist()
    failed = pc.fill_null(pc.not_equal(table.column("error"), ""), False).to_pylist()
    first: dict[str, int] = {}
    for i, p in enumerate(paths):
        if p not in first or failed[first[p]]:
            first[p] = i
    missing = sorted(set(expected) - first.keys())
    if missing:
        raise MissingRowsError(f"{len(missing)} file(s) have no prediction row in {output.uri}, e.g. {missing[:3]}; "
                               f"rerun with --resume")
    table = table.take(pa.array([first[p] for p in expected]))
    if table.num_rows != len(paths):
        # Rows of files scored twice, or of files gone from the input since an earlier run:
        # the Parquet output keeps one row per listed file, as the CSV does.
        log.info("rewriting %s as one row per listed file (%d rows before, %d now)", parquet_dir.uri,
                 len(paths), table.num_rows)
        check_holder(output, run_id, published=False)  # (reading the rows took a while)
        _compact(parquet_dir, parts, table, run_id)
    table = table.sort_by("filename")
    buf = io.BytesIO()
    pacsv.write_csv(table, buf)
    # Checked again before each file it publishes: another job's claim since (which deleted
    # the derived files) finds this run's CSV or summary beside its own manifest only if it
    # came in the moment between a check and its write (a manifest cannot be locked).
    check_holder(output, run_id, published=False)
    output.join(CSV_FILE).write_bytes(buf.getvalue())

    finalize_seconds = time.time() - t_final
    wall_seconds += finalize_seconds
    stage_seconds = {**(stage_seconds or {}), "finalize": finalize_seconds}
    pred = table.column("predicted_class").to_numpy()
    conf = table.column("confidence").to_numpy(zero_copy_only=False)
    ok = pred >= 0
    failed = table.filter(pc.less(table.column("predicted_class"), 0)).slice(0, 10)
    summary = {
        "files": len(expected), "scored": int(ok.sum()), "errors": int((~ok).sum()),
        "predicted": {"0 (artifact)": int((pred == 0).sum()), "1 (artifact-free)": int((pred == 1).sum())},
        "mean_confidence": float(np.mean(conf[ok])) if ok.any() else None,
        # (credentials in a URI blanked out: the summary and the page are made to be shared)
        "model": redact_uri(resolve(cfg.model).uri), "threshold": threshold,
        "input": redact_uri(resolve(cfg.input).uri),
        "engine": resolve_engine(cfg.model, cfg.engine, cfg.precision, use_gpu=cfg.use_gpu),
        "precision": cfg.precision,
        "pipeline": asdict(pipeline) if pipeline else None,  # None: nothing was left to score
        "wall_seconds": wall_seconds, "scored_this_run": scored_now,
        # setup: bundle, listing, output claim; plan: the stage-cost probe; score: Ray Data
        # (actor start-up included); finalize: one row per file checked, CSV written
        "stage_seconds": {k: round(v, 3) for k, v in stage_seconds.items()},
        "images_per_second": scored_now / wall_seconds if wall_seconds > 0 else None,
        "error_examples": failed.select(["filename", "error"]).to_pylist(),
    }
    check_holder(output, run_id)
    output.join(SUMMARY_FILE).write_text(json.dumps(summary, indent=2))
    if ok.any():
        with tempfile.TemporaryDirectory() as tmp:
            local = os.path.join(tmp, HIST_FILE)
            plots.confidence_histogram(conf[ok], pred[ok], local)
            check_holder(output, run_id)
            output.join(HIST_FILE).upload(local)
    mark_complete(output, run_id, files=len(expected), scored_this_run=scored_now)
    return summary


def run_scoring(cfg: ScoreConfig) -> dict[str, Any]:
    """Score every image under ``cfg.input`` into ``cfg.output``; returns the summary.

    Every listed file gets exactly one row: files that cannot be read or decoded at their
    turn get an error row. The output folder is checked, the run planned and fitted to the
    cluster, and only then claimed with a manifest (:mod:`artifact_core.score_output`), so
    ``--overwrite`` only ever deletes what scoring wrote, and only once the run can start.
    """
    t0 = time.time()
    cfg.validate()
    # Absolute paths: the actors may run in another working directory (an attached cluster).
    cfg.output, cfg.input, cfg.model = (resolve(p).uri for p in (cfg.output, cfg.input, cfg.model))
    # Fail fast here, not in every actor: a bad --engine, a missing ONNX file, a bundle that
    # does not load. Only the torch engine needs torch; with ONNX the driver reads the config
    # alone and never imports torch (seconds of start-up).
    engine = resolve_engine(cfg.model, cfg.engine, cfg.precision, use_gpu=cfg.use_gpu)
    bundle_config = load_bundle(cfg.model).config if engine == "torch" else read_bundle_config(cfg.model)
    if cfg.pipeline not in SCORE_PIPELINES:
        raise ValueError(f"--pipeline must be one of {', '.join(SCORE_PIPELINES)}; got {cfg.pipeline!r}")
    threshold = float(bundle_config.threshold if cfg.threshold is None else cfg.threshold)
    paths, fs, root = list_input(cfg.input, cfg.output)
    if not paths:
        raise ValueError(f"no image files ({' '.join(IMAGE_EXTENSIONS)}) found under {redact_uri(cfg.input)!r}")
    shown = [display_path(p) for p in paths]
    _check_distinct(shown)
    identity = _check_output(cfg, threshold, bundle_config.image_size)
    if bundle_config.weights_sha256 and identity.model_sha256 != bundle_config.weights_sha256:
        # exported again between reading the config (size, flip, threshold) and hashing the weights
        raise BundleChangedError(f"model bundle {redact_uri(cfg.model)} was exported again while this job started "
                                 f"(its model.pt is not the one its config.json was read with); run it again")
    plan = None
    stages = {"setup": time.time() - t0}
    # Planned and fitted to the cluster before the claim: --overwrite deletes the earlier
    # results, and a claim, --resume's too, unpublishes the CSV, summary and page; a cluster
    # too small for this run must cost neither.
    before = _rows_before_claim(cfg) if cfg.resume else set()
    todo = [p for p, d in zip(paths, shown) if d not in before]
    if todo:
        plan = _plan_and_fit(cfg, todo, fs, bundle_config, stages)
    parquet_dir, manifest = _prepare_output(cfg, threshold, bundle_config.image_size, identity)
    done = _existing_rows(_parts(parquet_dir, manifest, drop_foreign=True)) if cfg.resume else set()
    todo = [p for p, d in zip(paths, shown) if d not in done]
    log.info("%d image file(s) under %s; %d already scored, %d to score", len(paths), cfg.input,
             len(paths) - len(todo), len(todo))
    if todo:
        if plan is None:
            plan = _plan_and_fit(cfg, todo, fs, bundle_config, stages)
        t = time.time()
        ds = build_dataset(cfg, todo, fs, display_path(root), bundle_config.image_size, plan,
                           views=2 if bundle_config.test_time_flip else 1, weights_sha256=identity.model_sha256)
        # Parts named after the run: finalize keeps only the parts of runs this output names.
        ds.write_parquet(parquet_dir.path, filesystem=parquet_dir.fs,
                         filename_provider=FilenameProvider(dataset_uuid=manifest.run_id, file_format="parquet"))
        stages["score"] = time.time() - t
    summary = finalize(cfg, shown, threshold=threshold, wall_seconds=time.time() - t0, scored_now=len(todo),
                       run_id=manifest.run_id, pipeline=plan, stage_seconds=stages)
    from artifact_core.report import report_after_scoring  # the page reads the finished outputs
    try:
        return report_after_scoring(cfg, summary, run_id=manifest.run_id)
    except OutputConflictError as exc:
        # This run's rows were complete, then another job claimed the folder: its files are not ours to touch.
        log.warning("no review page: %s", exc)
        summary["report"] = {"path": None, "reason": "another scoring job claimed the output"}
        return summary
    except Exception as exc:  # noqa: BLE001 - the predictions are complete: a failed page must not fail the job
        log.warning("the review page could not be written (%s: %s); the predictions are complete", type(exc).__name__,
                    exc, exc_info=log.isEnabledFor(logging.DEBUG))
        summary["report"] = {"path": None, "reason": f"failed: {type(exc).__name__}: {exc}"}
        try:
            check_holder(resolve(cfg.output), manifest.run_id)
        except OutputConflictError as lost:
            log.warning("summary.json not rewritten: %s", lost)
            return summary
        resolve(cfg.output).join(SUMMARY_FILE).write_text(json.dumps(summary, indent=2))
        return summary


def _plan_and_fit(cfg: ScoreConfig, todo: list[str], fs: pafs.FileSystem | None, bundle_config: Any,
                  stages: dict[str, float]) -> PipelinePlan:
    """The pipeline for ``todo`` (its probe's time in ``stages["plan"]``), once it fits the
    cluster (waiting for an autoscaler, ``--wait-for-resources``)."""
    t = time.time()
    plan = plan_pipeline(cfg, todo, fs, bundle_config.image_size)
    stages["plan"] = time.time() - t
    check_fits(num_workers=plan.num_actors, cpus_per_worker=plan.actor_cpus,
               gpus_per_worker=1.0 if cfg.use_gpu else 0.0, reserved_cpus=1.0, what="scoring",
               memory_per_worker=actor_memory_bytes(cfg, plan, bundle_config.image_size,
                                                    2 if bundle_config.test_time_flip else 1),
               wait_s=cfg.wait_for_resources)
    return plan


def read_labels(labels_csv: str) -> list[tuple[str, int]]:
    """The ``(filename, label)`` rows of a labels CSV (``~`` expanded), checked.

    Called before scoring too: a bad labels file should stop the job before hours of work.

    Raises:
        FileNotFoundError, ValueError: naming the file and what was expected.
    """
    path = os.path.expanduser(labels_csv)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"labels file {labels_csv!r} does not exist (expected CSV with filename,label)")
    try:
        # names as text: a file called 007.png must not become the number 7
        truth = pacsv.read_csv(path, parse_options=pacsv.ParseOptions(newlines_in_values=True),
                               convert_options=pacsv.ConvertOptions(
                                   column_types={"filename": pa.string(), "label": pa.string()})).to_pydict()
    except pa.ArrowInvalid as exc:
        raise ValueError(f"labels file {labels_csv!r} is not a readable CSV with filename,label ({exc})") from exc
    if "filename" not in truth or "label" not in truth:
        raise ValueError(f"{labels_csv!r} must have columns filename,label; found {sorted(truth)}")
    rows = []
    for row, (name, y) in enumerate(zip(truth["filename"], truth["label"]), start=1):
        value = _label_value(y)
        if value is None:
            raise ValueError(f"{labels_csv!r} data row {row} ({name!r}): label {y!r} is not 0 (artifact) or 1 "
                             f"(artifact-free)")
        rows.append((str(name), value))
    if not rows:
        raise ValueError(f"labels file {labels_csv!r} has no data rows (expected CSV with filename,label)")
    return rows


def _label_value(text: str | None) -> int | None:
    """0 or 1 from a label cell ("1", " 0 ", "1.0" as a float column writes it), else None."""
    try:
        value = float((text or "").strip())
    except ValueError:
        return None
    return int(value) if value in (0.0, 1.0) else None


def evaluate_against_labels(output: str, labels_csv: str) -> dict[str, Any]:
    """Metrics of a finished scoring output against a ``filename,label`` CSV.

    A label's ``filename`` is matched to a scored file's path under the input folder, else to
    the one scored file of that base name (a CSV of bare names for a folder with sub-folders);
    error rows count as wrong predictions. The metrics hold what was compared:
    ``labels_matched``, ``labels_unmatched`` (with up to 5 ``unmatched_examples``) and
    ``scored_without_label`` (scored files no label names), which a partial match needs beside
    its F1.
    """
    truth = read_labels(labels_csv)
    csv = resolve(output).join(CSV_FILE)
    with csv.fs.open_input_stream(csv.path) as f:
        pred = pacsv.read_csv(f, parse_options=pacsv.ParseOptions(newlines_in_values=True),
                              convert_options=pacsv.ConvertOptions(column_types={"filename": pa.string()})).to_pydict()
    by_name = dict(zip(pred["filename"], pred["predicted_class"]))
    by_base: dict[str, list[str]] = {}
    for name in by_name:
        by_base.setdefault(posixpath.basename(name), []).append(name)
    pairs, unmatched, used = [], [], set()
    for name, y in truth:
        if name not in by_name and len(by_base.get(name, ())) == 1:
            name = by_base[name][0]
        if name in by_name:
            pairs.append((y, int(by_name[name])))
            used.add(name)
        else:
            unmatched.append(name)
    if not pairs:
        raise ValueError(f"no file in {labels_csv!r} matches a scored filename in {redact_uri(output)!r} "
                         f"(e.g. {unmatched[0]!r}; scored e.g. {next(iter(by_name), None)!r})")
    y_true = [t for t, _ in pairs]
    # An error row (-1) is a miss: predict the opposite of the truth.
    y_pred = [p if p >= 0 else 1 - t for t, p in pairs]
    return {**classification_metrics(y_true, y_pred), "labels_matched": len(pairs), "labels_unmatched": len(unmatched),
            "unmatched_examples": unmatched[:5], "scored_without_label": len(set(by_name) - used)}
