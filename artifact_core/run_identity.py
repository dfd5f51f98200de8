"""A run folder that knows which run it holds, so a rerun never mixes two experiments.

The first start of a run writes :data:`RUN_FILE` into ``<storage>/<name>/``: the config,
the fields that define the run, where the data was; and the exact split (file names and
labels of both parts) in :data:`SPLIT_JSON`, or :data:`SPLIT_PARQUET` for large folders.
A rerun resumes with the stored split: files added to the data folder since are ignored
(one log line), so training images never move into validation. A rerun whose identity
fields or data differ is refused with the differences named. ``--overwrite`` deletes only
the entries runs write (:func:`is_owned`), and only in a folder that holds a run record; a
folder holding nothing but what a first start killed before its record wrote is cleared and
started again (:func:`clear_interrupted_start`).

Each start also writes itself into the record as the run's holder (:func:`hold_run`, once its
workers fit, just before it trains): the latest start holds the run. A job whose run another start has claimed since (a rerun while it
still ran, ``--overwrite``) stops at its next epoch, before it reports a checkpoint, and does
not export (:func:`holder_lost`): two Train controllers on one folder would delete each
other's checkpoints and leave a record Ray cannot resume from.
"""

from __future__ import annotations

import datetime as dt
import io
import json
import logging
import os
import socket
import uuid
from dataclasses import dataclass
from typing import Any, Callable

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from artifact_core.config import effective_members, mirror_pass_acts
from artifact_core.storage import Location, redact_uri, temp_file_of, uri_without_credentials

log = logging.getLogger(__name__)

RUN_FILE = "run_config.json"
#: Ray Train's list of a run's checkpoints, which it resumes from.
SNAPSHOT_FILE = "checkpoint_manager_snapshot.json"
SPLIT_JSON = "split.json"
SPLIT_PARQUET = "split.parquet"
#: Above this many files the split is stored as Parquet (a JSON list of a million names is
#: slow to parse and large to keep).
SPLIT_JSON_MAX_FILES = 50_000
WRITER = "artifact-core training"
RECORD_VERSION = 1

#: Training flags that change what a run learns: a rerun with another value is another experiment.
IDENTITY_FIELDS = ("data_dir", "head", "image_size", "batch_size", "lr", "finetune_lr", "unfreeze_depth",
                   "weight_decay", "dropout", "val_fraction", "seed", "weights", "patience", "skip_unlabeled",
                   "head_cache_views", "oversample", "finetune_schedule", "finetune_bn", "test_time_flip",
                   "head_members", "head_cache_augment")
#: What runs recorded before a field existed trained with (their identity lacks the key).
LEGACY_IDENTITY = {"head": "global", "head_cache_views": 0, "oversample": 0.0, "finetune_schedule": "constant",
                   "finetune_bn": "batch", "test_time_flip": False, "head_members": 1, "head_cache_augment": True}
#: May be raised on a rerun (the run continues training from where it stopped), never lowered.
GROWABLE_FIELDS = ("head_epochs", "finetune_epochs")
#: A sweep samples these per trial, so they are not part of the sweep's identity.
SWEEP_SAMPLED_FIELDS = ("lr", "finetune_lr", "unfreeze_depth")
# Everything else (num_workers, cpus_per_worker, use_gpu, loader_workers, decode_cache_mb, head_cache_mb,
# max_failures, storage_path, name, overwrite, demo_train_images) says how a run executes,
# not what it is.

#: Entries of a run folder that training or a sweep writes; ``--overwrite`` deletes only these.
OWNED_NAMES = frozenset({RUN_FILE, SPLIT_JSON, SPLIT_PARQUET, "model", "trials", "tune", "results.csv",
                         "best_config.json", "tune_results.png", SNAPSHOT_FILE,
                         ".validate_storage_marker"})
#: Ray Train's checkpoint folders (``checkpoint_<timestamp>``).
OWNED_PREFIXES = ("checkpoint_",)
#: What a first start writes before its run record: the split (the record comes last).
START_FILES = (SPLIT_JSON, SPLIT_PARQUET)


class RunConflictError(ValueError):
    """The run folder holds another run (or no run); the message names why and what to do."""


class RunTakenOverError(RunConflictError):
    """Another start claimed the run folder while this job ran; the message names it."""


def new_holder() -> dict[str, Any]:
    """An id for this start (with where it runs, for the messages) to claim a run folder with."""
    return {"id": uuid.uuid4().hex, "host": socket.gethostname(), "pid": os.getpid(), "since": _now()}


def holder_lost(run: Location | None, holder_id: str) -> str:
    """Why ``run`` is no longer held by the start ``holder_id`` ("" while it is, or for no run folder).

    A record that cannot be read right now (an object store's passing error) leaves the run
    with its holder: only a readable record that names another start, or no record, takes
    the run away.
    """
    if run is None:
        return ""
    try:
        record = read_record(run)
    except (OSError, RunConflictError) as exc:
        log.warning("cannot check who holds run %s (%s); going on", redact_uri(run.uri), exc)
        return ""
    holder = (record or {}).get("holder")
    if record is not None and isinstance(holder, dict) and holder.get("id") == holder_id:
        return ""
    if record is None:
        why = f"its {RUN_FILE} is gone (--overwrite by another job, or the folder was deleted)"
    elif holder is None and "holder" in record:
        why = "another start cleared it and started it again (--overwrite)"
    elif isinstance(holder, dict):
        why = (f"another start claimed it (on {holder.get('host', '?')}, pid {holder.get('pid', '?')}, "
               f"at {holder.get('since', '?')})")
    else:
        why = "another start claimed it"
    return (f"run {redact_uri(run.uri)} was taken over while this job ran: {why}. This job stops without "
            f"reporting or exporting anything more, so the two do not write the same checkpoints; the "
            f"run continues in the job that claimed it")


def hold_run(run: Location | None, holder: dict[str, Any], config: dict[str, Any] | None = None, *,
             claim: dict[str, Any] | None = None) -> str:
    """Record ``holder`` (:func:`new_holder`) as the one start that holds ``run`` from now on,
    with its ``config`` (a resume's changes go into the record's history); returns its id.

    Called once the start has shown it can run (its workers fit the cluster), just before it
    trains: a rerun that fails on its way there leaves the job that holds the run training,
    and the record as it was (its epochs may still be lowered back). ``claim`` (from
    :func:`claim_run`'s caller: the record's ``start_id``, ``kind`` and
    ``extra_identity``) is checked again, since the record may have changed since the claim.

    Raises:
        RunTakenOverError: the run was started again (``--overwrite``) or deleted since the claim.
        RunConflictError: another start recorded settings since that this one may not follow
            (epochs it would lower).
    """
    if run is None:
        return holder["id"]
    record = read_record(run)
    shown = redact_uri(run.uri)
    if record is None or (claim is not None and record.get("start_id") != claim.get("start_id")):
        why = f"lost its {RUN_FILE}" if record is None else "was started again (--overwrite)"
        raise RunTakenOverError(f"run {shown} {why} by another job while this one prepared to train; this job "
                                f"stops without training")
    history = record.setdefault("history", [])
    if config is not None:
        config = _without_credentials(config)
        if claim is not None:
            diffs = differences(record, {"kind": claim.get("kind"), "config": config, "identity": identity_of(
                config, kind=claim.get("kind", "train"), extra=claim.get("extra_identity"))})
            if diffs:
                raise RunConflictError(f"run {shown} was resumed by another start with other settings while this "
                                       f"one prepared to train ({'; '.join(diffs)}); this job stops without training")
        before = _without_credentials(record.get("config", {}))  # (a record from before they were left out)
        changed = {k: (before.get(k), v) for k, v in config.items() if not _same(before.get(k), v)}
        # A start that trained before (a holder, or a record from before holders) makes this a
        # resume; a first start refused before it trained leaves a record nothing trained from.
        trained_before = record.get("holder", "legacy") is not None
        if trained_before or changed:
            history.append({"resumed": _now(), **({"changed": changed} if changed else {})})
        record["config"] = config
    record["holder"] = {**holder, "since": _now()}
    write_record(run, record)
    return holder["id"]


def check_holder(run: Location | None, holder_id: str) -> None:
    """Raise :class:`RunTakenOverError` when another start has claimed ``run`` (:func:`holder_lost`)."""
    why = holder_lost(run, holder_id)
    if why:
        raise RunTakenOverError(why)


@dataclass
class Split:
    """The exact train/validation split of a run, as names relative to the data folder."""

    root: str
    train_files: list[str]
    train_labels: list[int]
    val_files: list[str]
    val_labels: list[int]

    def files(self) -> set[str]:
        """Every file of the split (relative names)."""
        return set(self.train_files) | set(self.val_files)

    def absolute(self, base: str) -> dict[str, list]:
        """The split as the training loop takes it, with paths below ``base`` (a path on the data's filesystem)."""
        join = (lambda rel: f"{base.rstrip('/')}/{rel}")
        return {"train_paths": [join(f) for f in self.train_files], "train_labels": list(self.train_labels),
                "val_paths": [join(f) for f in self.val_files], "val_labels": list(self.val_labels)}


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def is_owned(name: str) -> bool:
    """True for a run-folder entry that training or a sweep writes (or the temporary file of one)."""
    return name in OWNED_NAMES or name.startswith(OWNED_PREFIXES) or temp_file_of(name) in OWNED_NAMES


def _is_start_file(name: str) -> bool:
    """True for what a first start writes before its record: the split, or a temporary file of it or of the record."""
    return name in START_FILES or temp_file_of(name) in (*START_FILES, RUN_FILE)


def identity_of(config: dict[str, Any], *, kind: str = "train", extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The fields of ``config`` that define a run of ``kind`` ("train" or "sweep"), plus ``extra``."""
    fields = [f for f in IDENTITY_FIELDS if not (kind == "sweep" and f in SWEEP_SAMPLED_FIELDS)]
    identity = {f: config.get(f) for f in fields}
    # The data folder without credentials: a rotated key is the same data (and no secret is
    # stored in the record's identity or printed in a difference).
    if isinstance(identity.get("data_dir"), str):
        identity["data_dir"] = uri_without_credentials(identity["data_dir"])
    # Whether validation (so checkpoint choice and the threshold) scored the mirror too: the
    # flag only acts on the trunk heads, so a global-head run is the same run either way.
    identity["test_time_flip"] = mirror_pass_acts(config.get("test_time_flip"), config.get("head"))
    # Likewise the global head has one classifier whatever --head-members says.
    identity["head_members"] = effective_members(config.get("head_members"), config.get("head"))
    return {**identity, **(extra or {})}


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        try:
            return abs(float(a) - float(b)) <= 1e-12 * max(1.0, abs(float(a)))
        except (TypeError, ValueError):
            return False
    return a == b


def differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Human-readable differences between two stored records' identity and epoch counts."""
    diffs = []
    old_id, new_id = dict(old.get("identity", {})), new.get("identity", {})
    if isinstance(old_id.get("data_dir"), str):  # (recorded before it was stored without credentials)
        old_id["data_dir"] = uri_without_credentials(old_id["data_dir"])
    for key in set(new_id) - set(old_id):  # recorded before the field existed
        old_id[key] = old.get("config", {}).get(key, LEGACY_IDENTITY.get(key))
    for key in sorted(set(old_id) | set(new_id)):
        if not _same(old_id.get(key), new_id.get(key)):
            diffs.append(f"{key}: {old_id.get(key)!r} before, {new_id.get(key)!r} now")
    if old.get("kind") != new.get("kind"):
        diffs.append(f"kind: {old.get('kind')!r} before, {new.get('kind')!r} now")
    for key in GROWABLE_FIELDS:
        a, b = old.get("config", {}).get(key), new.get("config", {}).get(key)
        if new.get("kind") == "sweep" and a is not None and b is not None and a != b:
            # A restored sweep runs on with the scheduler it pickled (ASHA's max_t) and never
            # reruns finished trials: new epoch counts would be recorded but not trained.
            diffs.append(f"{key}: {a} before, {b} now (a sweep continues with the epochs it started with)")
        elif a is not None and b is not None and b < a and old.get("holder", "legacy") is not None:
            # (a record no start has trained from yet may take fewer epochs)
            diffs.append(f"{key}: {a} before, {b} now (epochs may be raised to continue a run, not lowered)")
    return diffs


def read_record(run: Location) -> dict[str, Any] | None:
    """The run record of ``run``, or None when the folder has none.

    Raises:
        RunConflictError: the file exists but is not a record this version can read.
    """
    loc = run.join(RUN_FILE)
    if not loc.exists():
        return None
    try:
        raw = json.loads(loc.read_text())
    except ValueError as exc:
        raise RunConflictError(f"{redact_uri(loc.uri)} is not readable JSON ({exc}); choose a new --name") from exc
    if not isinstance(raw, dict):
        raise RunConflictError(f"{redact_uri(loc.uri)} is not a run record; choose a new --name")
    return raw


def _is_legacy(record: dict[str, Any]) -> bool:
    # Runs written before runs recorded their split saved the bare training config here.
    return record.get("writer") != WRITER and "image_size" in record and "storage_path" in record


def write_record(run: Location, record: dict[str, Any]) -> None:
    """Write the run record atomically."""
    record["updated"] = _now()
    run.join(RUN_FILE).write_text(json.dumps(record, indent=2, default=str))


def write_split(run: Location, split: Split) -> str:
    """Store the split in the run folder; returns the file name used."""
    n = len(split.train_files) + len(split.val_files)
    if n <= SPLIT_JSON_MAX_FILES:
        body = {"root": split.root,
                "train": {"files": split.train_files, "labels": [int(y) for y in split.train_labels]},
                "val": {"files": split.val_files, "labels": [int(y) for y in split.val_labels]}}
        run.join(SPLIT_JSON).write_text(json.dumps(body))
        return SPLIT_JSON
    # Names as bytes: one that is not UTF-8 (surrogate-escaped) is no Arrow string.
    table = pa.table({"part": ["train"] * len(split.train_files) + ["val"] * len(split.val_files),
                      "file": pa.array([os.fsencode(f) for f in split.train_files + split.val_files], pa.binary()),
                      "label": pa.array([*split.train_labels, *split.val_labels], pa.int8())})
    table = table.replace_schema_metadata({"root": os.fsencode(split.root)})
    buf = io.BytesIO()
    pq.write_table(table, buf)
    run.join(SPLIT_PARQUET).write_bytes(buf.getvalue())
    return SPLIT_PARQUET


def read_split(run: Location, name: str) -> Split:
    """Read the split stored as ``name`` (:data:`SPLIT_JSON` or :data:`SPLIT_PARQUET`)."""
    loc = run.join(name)
    if not loc.exists():
        raise RunConflictError(f"run folder {redact_uri(run.uri)} lists its split as {name} but the file is missing; "
                               f"pass --overwrite to restart the run or choose a new --name")
    if name == SPLIT_PARQUET:
        with loc.fs.open_input_file(loc.path) as f:
            table = pq.read_table(f)
        root = os.fsdecode((table.schema.metadata or {}).get(b"root", b""))
        d = table.to_pydict()
        # (bytes since names that are not UTF-8 are stored; text in splits written before)
        d["file"] = [os.fsdecode(f) if isinstance(f, bytes) else f for f in d["file"]]
        parts = {p: ([f for f, q in zip(d["file"], d["part"]) if q == p],
                     [int(y) for y, q in zip(d["label"], d["part"]) if q == p]) for p in ("train", "val")}
        return Split(root, *parts["train"], *parts["val"])
    body = json.loads(loc.read_text())
    return Split(body["root"], body["train"]["files"], body["train"]["labels"],
                 body["val"]["files"], body["val"]["labels"])


def clear_run(run: Location) -> list[str]:
    """``--overwrite``: delete the entries a run wrote in ``run``; anything else stays.

    Raises:
        RunConflictError: the folder is not empty and holds no run record (nothing is deleted).
    """
    names = run.children()
    if not names:
        return []
    if RUN_FILE not in names:
        raise RunConflictError(
            f"--overwrite refused: {redact_uri(run.uri)} holds no {RUN_FILE}, so it is not a run folder; "
            f"nothing was deleted (found e.g. {names[:3]}); choose another --name or --storage-path")
    record = read_record(run)
    # Another tool's run_config.json is no licence to delete its model/ or results.csv.
    if record is not None and record.get("writer") != WRITER and not _is_legacy(record):
        raise RunConflictError(
            f"--overwrite refused: {redact_uri(run.join(RUN_FILE).uri)} was not written by this project's training "
            f"or sweeps; nothing was deleted; choose another --name or --storage-path")
    # Ray's checkpoint list first, the record last: a kill part-way leaves neither a list
    # naming deleted checkpoints (a rerun Ray refuses as corrupted) nor, without a record, a
    # folder that --overwrite no longer accepts as a run's.
    first, last = SNAPSHOT_FILE, RUN_FILE
    removed = sorted((n for n in names if is_owned(n)), key=lambda n: (n != first, n == last, n))
    for name in removed:
        log.info("--overwrite: removing %s", redact_uri(run.join(name).uri))
        run.join(name).remove()
    kept = [n for n in names if not is_owned(n)]
    if kept:
        log.info("--overwrite: kept %d entr(y/ies) not written by runs in %s, e.g. %s", len(kept), redact_uri(run.uri), kept[:3])
    return removed


def clear_interrupted_start(run: Location, data_root: str, *, any_root: bool = False) -> list[str]:
    """Delete what a first start killed before it wrote its record left in ``run``; returns the names.

    A first start writes the split, then the record (each through a temporary file), and
    trains only after that: a folder that holds nothing but such files, and no record, is an
    interrupted first start with nothing trained in it, provided its split is one of this
    project's of ``data_root`` (a user's own ``split.json`` is no such thing), or of any data
    folder with ``any_root`` (``--overwrite``: the data folder may be spelled another way now).
    Any other folder is left as it is.
    """
    if run.join(RUN_FILE).exists():
        return []
    names = run.children()
    if not names or not all(_is_start_file(n) and run.join(n).info().type == pafs.FileType.File for n in names):
        return []
    for name in names:
        if name in START_FILES and not _split_of(run, name, None if any_root else data_root):
            return []
    log.warning("%s holds %s but no %s: its first start was interrupted; clearing it and starting again",
                redact_uri(run.uri), names, RUN_FILE)
    for name in names:
        run.join(name).remove()
    return names


def _split_of(run: Location, name: str, data_root: str | None) -> bool:
    """Whether ``run``'s file ``name`` is a split this project wrote (of ``data_root``, if given)."""
    try:
        split = read_split(run, name)
        return isinstance(split.root, str) and bool(split.files()) and data_root in (None, uri_without_credentials(split.root))
    except (OSError, ValueError, KeyError, TypeError, AttributeError, IndexError):
        return False


def stored_split_paths(run: Location, data_root: str, root: str) -> list[str] | None:
    """The files of ``run``'s stored split of ``data_root`` as paths below ``root`` (the same
    folder on its filesystem), sorted as a listing of the folder sorts them; None when ``run``
    holds no readable record and split of this project, or split another folder."""
    try:
        record = read_record(run)
        if record is None or record.get("writer") != WRITER:
            return None
        split = read_split(run, record.get("data", {}).get("split_file", SPLIT_JSON))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None  # claim_run names what is wrong
    if uri_without_credentials(split.root) != data_root:  # (a split stored before roots were redacted: its credentials)
        return None
    prefix = root.rstrip("/") + "/"
    return sorted(prefix + name for name in split.files())


def _without_credentials(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` with the credentials in its data and storage URIs blanked out."""
    return {**config, **{k: uri_without_credentials(config[k]) for k in ("data_dir", "storage_path")
                         if isinstance(config.get(k), str)}}


def claim_run(run: Location, *, config: dict[str, Any], kind: str, listed: list[str], data_root: str,
              make_split: Callable[[], Split], overwrite: bool = False,
              extra_identity: dict[str, Any] | None = None, weights_source: str | None = None,
              claim: dict[str, Any] | None = None) -> Split:
    """Start or resume the run in ``run`` and return the split it trains on.

    Args:
        run: the run folder ``<storage>/<name>``.
        config: this start's training config (data folder resolved).
        kind: "train" or "sweep" (their identities differ: a sweep samples the learning rates).
        listed: files now in the data folder, relative to it.
        data_root: the data folder as the user sees it (path or URI).
        make_split: computes a fresh split (first start or ``--overwrite``).
        overwrite: delete what an earlier run wrote here first.
        extra_identity: more fields that define the run (a sweep's search space).
        weights_source: where a first start's starting weights came from, recorded (a rerun
            that resumes from a checkpoint reports it instead of loading them again).
        claim: filled with the ``start_id`` of the record this claim checked, which
            :func:`hold_run` compares before the start trains.

    Raises:
        RunConflictError: naming the differences, with ``--name``/``--overwrite`` offered.
    """
    config = _without_credentials(config)  # (records are read by others; a key may rotate)
    shown = redact_uri(run.uri)
    new = {"writer": WRITER, "version": RECORD_VERSION, "kind": kind,
           "identity": identity_of(config, kind=kind, extra=extra_identity), "config": config}
    clear_interrupted_start(run, data_root, any_root=overwrite)
    fresh = None
    if overwrite:
        # The split before anything is deleted: listing a large folder takes a while, and a
        # kill then must not leave a run folder without its record (which --overwrite needs).
        fresh = make_split()
        clear_run(run)
    old = read_record(run)
    if old is None:
        names = run.children()
        if names and not overwrite:  # after --overwrite only entries runs do not write are left
            raise RunConflictError(
                f"run folder {shown} is not empty and holds no {RUN_FILE}, so it is not a run of this "
                f"project (found e.g. {names[:3]}); choose a new --name or --storage-path")
        record = {**new, **({"weights_source": weights_source} if weights_source else {})}
        split = _start(run, record, fresh if fresh is not None else make_split())
        if claim is not None:
            claim["start_id"] = record["start_id"]
        return split
    if _is_legacy(old):
        raise RunConflictError(
            f"run folder {shown} was written before runs stored their split, so resuming it could mix "
            f"data; pass --overwrite to restart it, or choose a new --name")
    if old.get("writer") != WRITER:
        raise RunConflictError(f"{redact_uri(run.join(RUN_FILE).uri)} is not a run record of this project; choose a new --name")
    diffs = differences(old, new)
    if diffs:
        raise RunConflictError(
            f"run {shown} was started with other settings ({'; '.join(diffs)}); resuming would mix two "
            f"experiments. Choose a new --name, or pass --overwrite to delete that run and start again")
    split = read_split(run, old.get("data", {}).get("split_file", SPLIT_JSON))
    now = set(listed)
    gone = sorted(split.files() - now)
    if gone:
        raise RunConflictError(
            f"{len(gone)} file(s) of run {shown}'s split are no longer in {data_root}, e.g. {gone[:3]}; "
            f"the data changed. Choose a new --name, or pass --overwrite to start the run again")
    added = sorted(now - split.files())
    if added:
        log.info("%d file(s) were added to %s since run %s started, e.g. %s; they are ignored: the run keeps "
                 "its stored split (start a new --name to train on them)", len(added), data_root, shown, added[:3])
    if claim is not None:
        claim["start_id"] = old.get("start_id")
    # The record takes this start's config (raised epochs) only when it trains (hold_run): a
    # rerun that fails before would otherwise leave a record no rerun may lower again.
    log.info("resuming run %s with its stored split (%d train, %d val)", shown,
             len(split.train_files), len(split.val_files))
    return split


def _start(run: Location, record: dict[str, Any], split: Split) -> Split:
    run.makedirs()
    split_file = write_split(run, split)
    now = _now()
    # start_id: which start created the record (a second --overwrite in the same second has
    # the same created stamp)
    record.update(created=now, start_id=uuid.uuid4().hex, history=[{"started": now}], holder=None,
                  data={"root": split.root, "files": len(split.train_files) + len(split.val_files),
                        "split_file": split_file})
    # Split first, record last: a record always points at a complete split.
    write_record(run, record)
    return split
