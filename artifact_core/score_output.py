"""A scoring output folder that knows what it holds, so replacing it never deletes user data.

The first write of a scoring run creates :data:`MANIFEST_FILE` in ``--output``: who wrote
it, when, from which input and model, and which entries of the folder it owns.
``--overwrite`` deletes only those entries; a non-empty folder without the manifest is
never written to. ``--resume`` is refused when the model (its weights, precision, int8 file
or config), threshold, image size or input differ, so one output never mixes two models.

Each claim draws a run id. The manifest names the run that holds the folder now and every
run whose rows it keeps (the first and its resumes); scoring names its Parquet parts after
its run id. A second job that claims the same folder afresh while the first runs is found
out before either publishes: the first sees another run id in the manifest, the second
sees parts no run of its own wrote. (A ``--resume`` adopts the earlier run's parts: it
cannot tell a running job from a killed one.)
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any

from artifact_core.storage import Location, redact_uri, temp_file_of, uri_without_credentials

log = logging.getLogger(__name__)

MANIFEST_FILE = "scoring_manifest.json"
WRITER = "artifact-core scoring"
MANIFEST_VERSION = 1


class OutputConflictError(ValueError):
    """The output folder cannot be used as asked; the message says why and what to do."""


def is_temp_leftover(name: str, owned: list[str]) -> bool:
    """Whether ``name`` is the temporary file of an interrupted write of an owned entry or the manifest."""
    base = temp_file_of(name)
    return base is not None and (base in owned or base == MANIFEST_FILE)


@dataclass
class ScoringIdentity:
    """What makes two scoring runs comparable: resuming with another model would mix them."""

    input: str
    model: str
    model_sha256: str
    threshold: float
    image_size: int
    # Empty in manifests written before they were recorded (not compared then). fp32 runs in
    # PyTorch or ONNX Runtime give the same probabilities (checked at export), so the engine
    # is not part of the identity; int8 is another model, and config.json holds the
    # preprocessing and the test-time flip.
    precision: str = ""
    int8_sha256: str = ""
    config_sha256: str = ""


@dataclass
class Manifest:
    """The content of :data:`MANIFEST_FILE`."""

    identity: ScoringIdentity
    entries: list[str]
    created: str
    updated: str
    complete: bool = False
    #: the run that holds the folder now ("" in manifests written before run ids)
    run_id: str = ""
    #: the runs whose Parquet parts belong to this output (empty before run ids: every part)
    runs: list[str] = field(default_factory=list)
    writer: str = WRITER
    version: int = MANIFEST_VERSION
    history: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> str:
        """Indented JSON."""
        return json.dumps(asdict(self), indent=2)


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def read_manifest(output: Location) -> Manifest | None:
    """The manifest of ``output``, or None when it has none.

    Raises:
        OutputConflictError: the file exists but is not a manifest this version wrote.
    """
    loc = output.join(MANIFEST_FILE)
    try:
        if not loc.exists():
            return None
        raw = json.loads(loc.read_text())
        if not isinstance(raw, dict):
            raise ValueError(f"expected a JSON object, found {type(raw).__name__}")
        if raw.get("writer") != WRITER:
            raise ValueError(f"writer is {raw.get('writer')!r}")
        return Manifest(identity=ScoringIdentity(**raw["identity"]), entries=list(raw["entries"]),
                        created=raw["created"], updated=raw["updated"], complete=bool(raw.get("complete")),
                        run_id=str(raw.get("run_id", "")), runs=[str(r) for r in raw.get("runs", [])],
                        version=int(raw.get("version", 1)), history=list(raw.get("history", [])))
    except OSError as exc:
        # (not "not a manifest": a network error must not send a resumable output away)
        raise OutputConflictError(f"cannot read {loc.uri} ({exc}); nothing was changed: try again") from exc
    except (ValueError, KeyError, TypeError) as exc:
        raise OutputConflictError(
            f"{loc.uri} is not a scoring manifest this version can read ({exc}); "
            f"the folder is left untouched: choose another --output") from exc


def scored_input(output: Location) -> str | None:
    """The input the scoring run in ``output`` scored, or None when it holds none."""
    manifest = read_manifest(output)
    return manifest.identity.input if manifest is not None else None


def write_manifest(output: Location, manifest: Manifest) -> None:
    """Write (or replace) the manifest atomically."""
    manifest.updated = _now()
    output.join(MANIFEST_FILE).write_text(manifest.to_json())


#: Deleted first from an owned folder (a web page, the review page's): see Location.remove.
PAGE_FIRST = ("index.html",)

_LABELS = {"model_sha256": "model weights (sha256 of model.pt)", "precision": "--precision",
           "int8_sha256": "int8 model (sha256 of model.int8.onnx)", "config_sha256": "bundle config (sha256 of config.json)"}
#: fields an older manifest may lack (recorded as ""): compared only when it has them
_RECORDED_LATER = ("precision", "int8_sha256", "config_sha256")


def _differences(old: ScoringIdentity, new: ScoringIdentity) -> list[str]:
    diffs = []
    for name in ("input", "model_sha256", "threshold", "image_size", *_RECORDED_LATER):
        a, b = getattr(old, name), getattr(new, name)
        if name == "input":  # one folder however its URI is spelled, with or without a key (older manifests hold it unredacted)
            a, b = uri_without_credentials(a), uri_without_credentials(b)
        if name in _RECORDED_LATER and a == "":
            continue
        same = abs(a - b) < 1e-12 if isinstance(a, float) and isinstance(b, (int, float)) else a == b
        if not same:
            diffs.append(f"{_LABELS.get(name, name)}: {a!r} before, {b!r} now")
    return diffs


def check_claimable(output: Location, identity: ScoringIdentity, *, owned: list[str], resume: bool,
                    overwrite: bool) -> None:
    """Raise what :func:`prepare_output` would raise, writing and deleting nothing: a job checks
    this before its other checks, and claims (``--overwrite``: deletes) only after them."""
    _inspect(output, identity, owned=owned, resume=resume, overwrite=overwrite)


def _inspect(output: Location, identity: ScoringIdentity, *, owned: list[str], resume: bool,
             overwrite: bool) -> tuple[list[str], list[str], Manifest | None]:
    """(entries, leftovers of killed writes, manifest) of ``output``, after the conflict checks."""
    kind = output.info().type.name
    if kind == "File":
        raise OutputConflictError(f"--output {output.uri} is a file; expected a folder")
    names = output.children()
    # A write killed half-way leaves its temporary file; that alone is no foreign content.
    leftovers = [n for n in names if is_temp_leftover(n, owned)]
    names = [n for n in names if n not in leftovers]
    manifest = read_manifest(output) if names else None
    if names and manifest is None:
        raise OutputConflictError(
            f"--output {output.uri} is not empty and holds no {MANIFEST_FILE}, so it was not written by "
            f"scoring; nothing was deleted. Choose a new or empty folder (found e.g. {names[:3]})")
    if manifest is not None and not (resume or overwrite):
        raise OutputConflictError(
            f"output {output.uri} already holds a scoring run; pass --resume to add the missing rows "
            f"or --overwrite to replace it")
    if manifest is not None and resume:
        diffs = _differences(manifest.identity, identity)
        if diffs:
            raise OutputConflictError(
                f"cannot --resume {output.uri}: it was scored with other settings ({'; '.join(diffs)}); "
                f"pass --overwrite to replace it or choose another --output")
    return names, leftovers, manifest


def prepare_output(output: Location, identity: ScoringIdentity, *, owned: list[str],
                   resume: bool, overwrite: bool) -> Manifest:
    """Make ``output`` ready for a run and return its manifest (already written).

    Args:
        output: the ``--output`` folder.
        identity: this run's input, model, precision and threshold.
        owned: the entries (direct children) a scoring run writes, in the order it writes them
            (``--overwrite`` deletes them in reverse); only these are ever deleted.
        resume: keep existing rows (same identity required; see :func:`_differences`).
        overwrite: delete the entries an earlier run listed in its manifest first.

    Raises:
        OutputConflictError: the folder is not empty and has no manifest, it exists and
            neither flag was given, or ``resume`` meets another identity.
    """
    names, leftovers, manifest = _inspect(output, identity, owned=owned, resume=resume, overwrite=overwrite)
    for name in leftovers:
        log.info("removing %s, left by an interrupted write", output.join(name).uri)
        output.join(name).remove()
    now = _now()
    run_id = uuid.uuid4().hex[:12]
    if manifest is not None and resume:
        # A manifest from before a field was recorded learns it now, so later resumes check it.
        unknown = {k: getattr(identity, k) for k in _RECORDED_LATER if getattr(manifest.identity, k) == ""}
        if unknown:
            log.warning("--resume: %s has no record of %s; taking this run's", output.uri, ", ".join(unknown))
            manifest.identity = dataclasses.replace(manifest.identity, **unknown)
        manifest.complete = False
        manifest.run_id = run_id
        if manifest.runs:  # (none recorded: an output from before run ids, whose parts all count)
            manifest.runs.append(run_id)
        manifest.history.append({"resumed": now, "run_id": run_id})
    else:
        old = manifest
        manifest = Manifest(identity=identity, entries=list(owned), created=now, updated=now,
                            run_id=run_id, runs=[run_id], history=[{"started": now, "run_id": run_id}])
        if old is not None:  # overwrite: only what scoring wrote goes
            # Claimed first (not complete, this run's parts only): a kill or a failed delete
            # below leaves an output that says it is unfinished, never the old "complete"
            # manifest over half-deleted predictions. Then the derived files go before the
            # rows they were made from (``owned`` lists them in the order they are written).
            write_manifest(output, manifest)
            for name in reversed(owned):
                if name in old.entries and name in names:
                    log.info("--overwrite: removing %s", output.join(name).uri)
                    output.join(name).remove(first=PAGE_FIRST)
    output.makedirs()
    write_manifest(output, manifest)
    return manifest


def check_holder(output: Location, run_id: str, *, published: bool = True) -> Manifest:
    """The manifest, after checking that run ``run_id`` still holds ``output``.

    Raises:
        OutputConflictError: another run claimed the folder since (two jobs on one
            ``--output``), or its manifest is gone. ``published``: whether this run has
            written its CSV and summary yet (the message says so).
    """
    manifest = read_manifest(output)
    if manifest is None or manifest.run_id != run_id:
        holder = "its manifest is gone" if manifest is None else f"run {manifest.run_id or '(unknown)'} holds it now"
        done = ("the files it published (CSV, summary) are not marked complete" if published
                else "nothing was published by this run")
        raise OutputConflictError(
            f"another scoring job claimed {output.uri} while this one (run {run_id}) ran ({holder}); {done}. "
            f"When no other job uses the folder, rerun with --resume (parts of runs that lost the "
            f"folder are dropped) or --overwrite")
    return manifest


def part_run(name: str) -> str:
    """The run id a Parquet part's name starts with (scoring writes ``<run id>_...parquet``)."""
    return name.split("_", 1)[0]


def mark_complete(output: Location, run_id: str, **facts: Any) -> None:
    """Record in the manifest that every file has its row and the derived files are written.

    Raises:
        OutputConflictError: run ``run_id`` no longer holds the folder.
    """
    manifest = check_holder(output, run_id)
    manifest.complete = True
    manifest.history.append({"finished": _now(), **facts})
    write_manifest(output, manifest)
