"""A scoring output folder that knows what it holds, so replacing it never deletes user data.

The first write of a scoring run creates :data:`MANIFEST_FILE` in ``--output``: who wrote
it, when, from which input and model, and which entries of the folder it owns.
``--overwrite`` deletes only those entries; a non-empty folder without the manifest is
never written to. ``--resume`` is refused when the model (its weights, precision, int8 file
or config), threshold, image size or input differ, so one output never mixes two models.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
from dataclasses import asdict, dataclass, field
from typing import Any

from artifact_core.storage import Location

log = logging.getLogger(__name__)

MANIFEST_FILE = "scoring_manifest.json"
WRITER = "artifact-core scoring"
MANIFEST_VERSION = 1


class OutputConflictError(ValueError):
    """The output folder cannot be used as asked; the message says why and what to do."""


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
    if not loc.exists():
        return None
    try:
        raw = json.loads(loc.read_text())
        if raw.get("writer") != WRITER:
            raise ValueError(f"writer is {raw.get('writer')!r}")
        return Manifest(identity=ScoringIdentity(**raw["identity"]), entries=list(raw["entries"]),
                        created=raw["created"], updated=raw["updated"], complete=bool(raw.get("complete")),
                        version=int(raw.get("version", 1)), history=list(raw.get("history", [])))
    except (ValueError, KeyError, TypeError) as exc:
        raise OutputConflictError(
            f"{loc.uri} is not a scoring manifest this version can read ({exc}); "
            f"the folder is left untouched: choose another --output") from exc


def write_manifest(output: Location, manifest: Manifest) -> None:
    """Write (or replace) the manifest atomically."""
    manifest.updated = _now()
    output.join(MANIFEST_FILE).write_text(manifest.to_json())


_LABELS = {"model_sha256": "model weights (sha256 of model.pt)", "precision": "--precision",
           "int8_sha256": "int8 model (sha256 of model.int8.onnx)", "config_sha256": "bundle config (sha256 of config.json)"}
#: fields an older manifest may lack (recorded as ""): compared only when it has them
_RECORDED_LATER = ("precision", "int8_sha256", "config_sha256")


def _differences(old: ScoringIdentity, new: ScoringIdentity) -> list[str]:
    diffs = []
    for name in ("input", "model_sha256", "threshold", "image_size", *_RECORDED_LATER):
        a, b = getattr(old, name), getattr(new, name)
        if name in _RECORDED_LATER and a == "":
            continue
        same = abs(a - b) < 1e-12 if isinstance(a, float) and isinstance(b, (int, float)) else a == b
        if not same:
            diffs.append(f"{_LABELS.get(name, name)}: {a!r} before, {b!r} now")
    return diffs


def prepare_output(output: Location, identity: ScoringIdentity, *, owned: list[str],
                   resume: bool, overwrite: bool) -> Manifest:
    """Make ``output`` ready for a run and return its manifest (already written).

    Args:
        output: the ``--output`` folder.
        identity: this run's input, model, precision and threshold.
        owned: the entries (direct children) a scoring run writes; only these are ever deleted.
        resume: keep existing rows (same identity required; see :func:`_differences`).
        overwrite: delete the entries an earlier run listed in its manifest first.

    Raises:
        OutputConflictError: the folder is not empty and has no manifest, it exists and
            neither flag was given, or ``resume`` meets another identity.
    """
    kind = output.info().type.name
    if kind == "File":
        raise OutputConflictError(f"--output {output.uri} is a file; expected a folder")
    names = output.children()
    manifest = read_manifest(output) if names else None
    if names and manifest is None:
        raise OutputConflictError(
            f"--output {output.uri} is not empty and holds no {MANIFEST_FILE}, so it was not written by "
            f"scoring; nothing was deleted. Choose a new or empty folder (found e.g. {names[:3]})")
    if manifest is not None and not (resume or overwrite):
        raise OutputConflictError(
            f"output {output.uri} already holds a scoring run; pass --resume to add the missing rows "
            f"or --overwrite to replace it")
    now = _now()
    if manifest is not None and resume:
        diffs = _differences(manifest.identity, identity)
        if diffs:
            raise OutputConflictError(
                f"cannot --resume {output.uri}: it was scored with other settings ({'; '.join(diffs)}); "
                f"pass --overwrite to replace it or choose another --output")
        # A manifest from before a field was recorded learns it now, so later resumes check it.
        unknown = {k: getattr(identity, k) for k in _RECORDED_LATER if getattr(manifest.identity, k) == ""}
        if unknown:
            log.warning("--resume: %s has no record of %s; taking this run's", output.uri, ", ".join(unknown))
            manifest.identity = dataclasses.replace(manifest.identity, **unknown)
        manifest.complete = False
        manifest.history.append({"resumed": now})
    else:
        if manifest is not None:  # overwrite: only what scoring wrote goes
            for name in sorted(set(manifest.entries) & set(owned)):
                if name in names:
                    log.info("--overwrite: removing %s", output.join(name).uri)
                    output.join(name).remove()
        manifest = Manifest(identity=identity, entries=list(owned), created=now, updated=now,
                            history=[{"started": now}])
    output.makedirs()
    write_manifest(output, manifest)
    return manifest


def mark_complete(output: Location, **facts: Any) -> None:
    """Record in the manifest that every file has its row and the derived files are written."""
    manifest = read_manifest(output)
    if manifest is None:
        return
    manifest.complete = True
    manifest.history.append({"finished": _now(), **facts})
    write_manifest(output, manifest)
