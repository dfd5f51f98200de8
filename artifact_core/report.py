"""The review page of a scoring run: ``<output>/report/index.html``.

After scoring, the flagged images (the most confident first, up to ``top``) and the most
uncertain ones (probability closest to the threshold) are decoded again in a Ray Data actor
that loads the bundle once and returns, per image, a JPEG thumbnail and an overlay of where the
model sees the artifact (:mod:`artifact_core.explain`: the head's per-cell evidence, or Grad-CAM
for the global head). The driver writes them under
``report/img/`` and renders one static page: no server, no CDN, no external script or style,
images as relative files, so the folder works from a shared drive or a bucket. The grid's data
sits in an embedded JSON block and is paged by a small inline script (100 cards a page,
``loading="lazy"``), which keeps the page light at 10,000 flagged images. File names only ever
reach the page as JSON (``<``, ``>``, ``&`` escaped) read with ``JSON.parse`` and shown through
``textContent``, or through :func:`html.escape`, so a file name cannot inject markup or script.

Torch (the heatmaps) is imported by the heatmap actors only: the scoring job's driver, which calls
:func:`report_after_scoring` at its end, stays free of it (seconds of start-up and about 1 GB).
"""

from __future__ import annotations

import datetime as _dt
import html
import io
import json
import logging
import math
import os
import re
import shutil
import tempfile
import uuid
from typing import Any, Iterable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.fs as pafs
from PIL import Image

from artifact_core.images import ImageDecodeError, decode_image
from artifact_core.storage import (FileReadError, Location, display_path, read_file_bytes, redact_uri, resolve,
                                   undisplay_path)

log = logging.getLogger(__name__)

REPORT_DIR = "report"
INDEX_FILE = "index.html"
IMG_DIR = "img"
PAGE_SIZE = 100
# Names of the scoring outputs the page reads (the same as artifact_core.scoring's).
_CSV_FILE = "predictions.csv"
_SUMMARY_FILE = "summary.json"
_HIST_FILE = "confidence_hist.png"


class HeatmapActor:
    """Callable class for ``Dataset.map_batches``: loads the bundle once per actor.

    Input batch (numpy format): ``path``; the actor reads each file itself, so a file that
    vanished or cannot be opened since scoring becomes that image's error. Output per row: ``path``, ``thumb`` and ``overlay`` (JPEG bytes of
    the image at most ``thumb_size`` px on its long side, aspect kept, and of the same with
    the artifact heatmap blended in), ``prob_artifact_free`` and ``error`` ("" when fine; a
    file that cannot be decoded gets its reason and empty images instead of failing the job).
    """

    def __init__(self, bundle_dir: str, *, thumb_size: int = 192, use_gpu: bool = False,
                 num_threads: int | None = None, jpeg_quality: int = 85, fs: pafs.FileSystem | None = None,
                 threshold: float | None = None) -> None:
        import torch

        from artifact_core.explain import Explainer

        self.fs = fs
        if num_threads:
            torch.set_num_threads(num_threads)
        # (the threshold scoring used: the evidence maps' middle is where an image is flagged)
        self.explainer = Explainer(bundle_dir, device="cuda" if use_gpu else "cpu", threshold=threshold)
        self.thumb_size = thumb_size
        self.jpeg_quality = jpeg_quality

    def _jpeg(self, image: Image.Image | np.ndarray) -> bytes:
        img = Image.fromarray(image) if isinstance(image, np.ndarray) else image
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=self.jpeg_quality)
        return buf.getvalue()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["path"])
        thumbs = np.array([b""] * n, dtype=object)
        overlays = np.array([b""] * n, dtype=object)
        errors = np.full(n, "", dtype=object)
        prob = np.full(n, np.nan)
        decoded: list[tuple[int, Any, Image.Image]] = []
        for i, raw in enumerate(batch["path"]):
            path = _as_path(raw)
            try:
                data = read_file_bytes(path, self.fs)
                # The model input is decoded exactly as scoring decodes it; the thumbnail
                # separately, reduced in the decoder, never at full size.
                decoded.append((i, self.explainer.pixels(data, name=str(path)),
                                decode_image(data, name=str(path), max_side=self.thumb_size)))
            except (FileReadError, ImageDecodeError) as exc:
                errors[i] = exc.reason
            except Exception as exc:  # noqa: BLE001 - one odd file must never stop the report
                errors[i] = f"{type(exc).__name__}: {exc}"
        if decoded:
            import torch

            from artifact_core.explain import overlay

            probs, maps = self.explainer.explain_uint8(torch.stack([x for _, x, _ in decoded]))
            for (i, _, thumb), p, heat in zip(decoded, probs, maps):
                thumbs[i] = self._jpeg(thumb)
                # The map covers the square model input; resizing it to the thumbnail's
                # aspect puts it back over the pixels it came from.
                overlays[i] = self._jpeg(overlay(thumb, heat, cmap=self.explainer.cmap))
                prob[i] = p
        return {"path": np.asarray(batch["path"], dtype=object), "thumb": thumbs, "overlay": overlays,
                "prob_artifact_free": prob, "error": errors.astype(str)}


def select_rows(table: pa.Table, *, threshold: float, top: int, uncertain: int) -> tuple[list[dict], list[dict], int]:
    """Pick the page's images from the final predictions table.

    Returns:
        (flagged: predicted artifacts by confidence, highest first, at most ``top``;
        uncertain: the ``uncertain`` scored images closest to the threshold that are not
        already in ``flagged``; total number of flagged images).
    """
    cols = ["filename", "path", "predicted_class", "confidence", "prob_artifact_free"]
    table = table.select(cols)
    # Arrow compute, not Python rows: a run can have millions of rows and the page needs hundreds.
    flagged_all = table.filter(pc.equal(table.column("predicted_class"), 0))
    flagged = flagged_all.sort_by([("confidence", "descending"), ("filename", "ascending")]).slice(0, max(0, top))
    scored = table.filter(pc.greater_equal(table.column("predicted_class"), 0))
    scored = scored.append_column("distance", pc.abs(pc.subtract(scored.column("prob_artifact_free"), threshold)))
    # The closest top + uncertain rows are enough to skip those already shown as flagged.
    closest = scored.sort_by([("distance", "ascending"), ("filename", "ascending")]).slice(0, max(0, top) + max(0, uncertain))
    shown = set(flagged.column("path").to_pylist())
    rest = [r for r in closest.select(cols).to_pylist() if r["path"] not in shown]
    return flagged.to_pylist(), rest[:max(0, uncertain)], flagged_all.num_rows


def _read_predictions(output_dir: str) -> pa.Table:
    path = os.path.join(output_dir, _CSV_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path!r} does not exist: the report needs a finished scoring output")
    types = {"filename": pa.string(), "path": pa.string(), "error": pa.string(), "predicted_class": pa.int64(),
             "confidence": pa.float64(), "prob_artifact_free": pa.float64()}
    # The CSV, not the Parquet parts: it has exactly one row per file (a resumed crash may have
    # left a file twice in the Parquet). Empty strings stay strings (an empty error means "fine").
    # Names may hold newlines (quoted): without newlines_in_values pyarrow cuts its 1 MiB blocks
    # at any newline, so a large CSV with such a name fails to parse.
    return pacsv.read_csv(path, parse_options=pacsv.ParseOptions(newlines_in_values=True),
                          convert_options=pacsv.ConvertOptions(column_types=types, strings_can_be_null=False))


def _filesystem(input_uri: str | None) -> pafs.FileSystem | None:
    """The scored input's filesystem (None for local files), through the one storage layer."""
    loc = resolve(input_uri) if input_uri else None
    return None if loc is None or loc.is_local else loc.fs


def _as_path(value: Any) -> str:
    """A path as it travels through Ray Data (bytes) or a local batch (str), as a str."""
    return os.fsdecode(bytes(value)) if isinstance(value, (bytes, bytearray, np.bytes_)) else str(value)


def _source_path(shown: str, fs: pafs.FileSystem | None) -> str:
    """The file a CSV ``path`` names: as written, or (local files) with its ``\\xNN`` bytes restored."""
    if fs is not None or os.path.lexists(shown):
        return shown
    raw = undisplay_path(shown)
    return raw if raw != shown and os.path.lexists(raw) else shown


#: Larger differences between the heatmap's probability and the row's are shown on the card.
PROB_DRIFT = 0.02


def _drift(heatmap: dict[str, Any], row_prob: float, threshold: float) -> str:
    """Why a card's heatmap may not explain its row: the model that drew it gives another
    P(artifact) for the file, by more than :data:`PROB_DRIFT` or on the other side of the
    threshold ("" when neither, or no heatmap)."""
    prob = heatmap.get("prob")
    if heatmap.get("error") or prob is None or not math.isfinite(prob):
        return ""
    # Near the threshold a tiny difference flips the decision, and with it the map's reading
    # (its middle is the threshold): the uncertain cards are exactly those.
    # (beyond the engines' own rounding: ONNX and PyTorch fp32 differ by about 1e-6)
    crosses = (prob < threshold) != (row_prob < threshold) and abs(prob - row_prob) > 1e-4
    if abs(prob - row_prob) <= PROB_DRIFT and not crosses:
        return ""
    side = ", on the other side of the threshold, so its map reads the other way" if crosses else ""
    return (f"the heatmap's model gives P(artifact) {1.0 - prob:.3f} for this file, the row {1.0 - row_prob:.3f}"
            f"{side}: the file changed since scoring, or it was scored another way (int8, GPU)")


def _missing(paths: Sequence[str], fs: pafs.FileSystem | None) -> set[str]:
    """The paths that are not (or no longer) files."""
    if fs is None:
        return {p for p in paths if not os.path.isfile(p)}
    return {p for p, info in zip(paths, fs.get_file_info(list(paths))) if info.type != pafs.FileType.File}


def _heatmaps_ray(paths: list[str], bundle_dir: str, fs: pafs.FileSystem | None, *, thumb_size: int,
                  num_actors: int, cpus_per_actor: float, use_gpu: bool, batch_size: int,
                  threshold: float | None = None) -> Iterable[dict[str, np.ndarray]]:
    import ray.data

    # From the path list, not read_binary_files: the actor reads each file and turns a failure
    # into that image's error, and names Ray's path handling would trip on (newlines) pass.
    # As bytes: a name that is not UTF-8 (surrogate-escaped) is no Arrow string.
    blocks = [pa.table({"path": pa.array([os.fsencode(p) for p in paths[i:i + batch_size]], pa.binary())})
              for i in range(0, len(paths), batch_size)]
    ds = ray.data.from_arrow(blocks)
    ds = ds.map_batches(
        HeatmapActor, batch_size=batch_size, batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=num_actors), num_cpus=cpus_per_actor,
        num_gpus=1 if use_gpu else 0,
        fn_constructor_kwargs={"bundle_dir": bundle_dir, "thumb_size": thumb_size, "use_gpu": use_gpu,
                               "num_threads": max(1, int(cpus_per_actor)), "fs": fs, "threshold": threshold},
    )
    yield from ds.iter_batches(batch_size=batch_size, batch_format="numpy")


def _heatmaps_local(paths: list[str], bundle_dir: str, fs: pafs.FileSystem | None, *, thumb_size: int,
                    batch_size: int, threshold: float | None = None) -> Iterable[dict[str, np.ndarray]]:
    actor = HeatmapActor(bundle_dir, thumb_size=thumb_size, fs=fs, threshold=threshold)
    for start in range(0, len(paths), batch_size):
        yield actor({"path": np.array(paths[start:start + batch_size], dtype=object)})


def write_report(output_dir: str, *, top: int = 500, uncertain: int = 50, bundle_dir: str | None = None,
                 input_uri: str | None = None, use_ray: bool = True, num_actors: int = 1, cpus_per_actor: float = 1.0, use_gpu: bool = False,
                 thumb_size: int = 192, batch_size: int = 16) -> dict[str, Any]:
    """Write ``<output_dir>/report/`` from a finished scoring output.

    Args:
        output_dir: a scoring output folder (``predictions.csv``, ``summary.json``).
        top: at most this many flagged images, the most confident first.
        uncertain: this many more images, those closest to the threshold.
        bundle_dir: the model (default: the one named in ``summary.json``).
        input_uri: the scored input (default: the one named in ``summary.json``, which has
            credentials in a URI blanked out).
        use_ray: compute heatmaps in Ray Data actors (False: in this process, for small sets).
        num_actors, cpus_per_actor, use_gpu: the actor pool.
        thumb_size: long side of thumbnails and overlays in pixels.

    Returns:
        The summary's ``report`` entry: path of index.html, images shown, flagged counts.
    """
    with open(os.path.join(output_dir, _SUMMARY_FILE)) as f:
        summary = json.load(f)
    bundle_dir = bundle_dir or summary["model"]
    threshold = float(summary["threshold"])
    table = _read_predictions(output_dir)
    flagged, unsure, n_flagged = select_rows(table, threshold=threshold, top=top, uncertain=uncertain)
    selected = flagged + unsure
    fs = _filesystem(input_uri or summary.get("input"))
    # The CSV shows a name with bytes that are not UTF-8 as \xNN: read the file by its real name.
    shown_of = {_source_path(r["path"], fs): r["path"] for r in selected}
    paths = list(shown_of)

    final = os.path.join(output_dir, REPORT_DIR)
    tmp = final + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(os.path.join(tmp, IMG_DIR))
    index = {p: i for i, p in enumerate(paths)}
    # Image files are new names on every run: a page left open (or cached) that loads its
    # thumbnails lazily gets a 404 from a newer report, never another image beside its name.
    token = uuid.uuid4().hex[:8]
    # A file removed since scoring would make the whole read fail: it gets a card with the reason.
    results: dict[str, dict[str, Any]] = {shown_of[p]: {"error": "file no longer exists", "prob": float("nan")}
                                          for p in _missing(paths, fs)}
    paths = [p for p in paths if shown_of[p] not in results]
    if paths:
        log.info("report: heatmaps for %d image(s) (%d flagged of %d, %d uncertain)", len(paths), len(flagged),
                 n_flagged, len(unsure))
        batches = (_heatmaps_ray(paths, bundle_dir, fs, thumb_size=thumb_size, num_actors=num_actors,
                                 cpus_per_actor=cpus_per_actor, use_gpu=use_gpu, batch_size=batch_size,
                                 threshold=threshold)
                   if use_ray else _heatmaps_local(paths, bundle_dir, fs, thumb_size=thumb_size, batch_size=batch_size,
                                                   threshold=threshold))
        for batch in batches:
            for path, thumb, cam, prob, err in zip(batch["path"], batch["thumb"], batch["overlay"],
                                                   batch["prob_artifact_free"], batch["error"]):
                path = _as_path(path)
                i = index[path]
                entry: dict[str, Any] = {"error": str(err), "prob": float(prob)}
                if not err:
                    # Files are named by position, never by the image's name: nothing from a
                    # file name ends up in a URL.
                    entry["thumb"] = f"{IMG_DIR}/{token}_{i:06d}.jpg"
                    entry["overlay"] = f"{IMG_DIR}/{token}_{i:06d}_cam.jpg"
                    for rel, data in ((entry["thumb"], thumb), (entry["overlay"], cam)):
                        with open(os.path.join(tmp, rel), "wb") as f:
                            f.write(bytes(data))
                results[shown_of[path]] = entry

    def card(r: dict) -> dict[str, Any]:
        res = results.get(r["path"], {"error": "no heatmap returned for this file"})
        out = {"f": r["filename"], "c": round(r["confidence"], 4), "pa": round(1.0 - r["prob_artifact_free"], 4),
               "p": r["predicted_class"], "t": res.get("thumb", ""), "o": res.get("overlay", ""), "e": res["error"]}
        drift = _drift(res, r["prob_artifact_free"], threshold)
        if drift:
            out["d"] = drift
        return out

    cards_flagged = [card(r) for r in flagged]
    cards_unsure = [card(r) for r in unsure]
    hist = os.path.join(output_dir, _HIST_FILE)
    has_hist = os.path.isfile(hist)
    if has_hist:
        shutil.copyfile(hist, os.path.join(tmp, _HIST_FILE))
    errors = table.filter(pc.not_equal(table.column("error"), "")).select(["filename", "error"])
    from artifact_core.bundle import read_bundle_config

    try:
        trunk_head = read_bundle_config(bundle_dir).head in ("multiscale", "local")
    except (OSError, ValueError):  # (every card then says why it has no heatmap)
        trunk_head = True
    page = render_page(summary, cards_flagged, cards_unsure, n_flagged=n_flagged,
                       errors=errors.slice(0, 200).to_pylist(), n_errors=errors.num_rows, has_hist=has_hist,
                       heatmap="evidence" if trunk_head else "grad-cam")
    # (backslashreplace: a name that slipped through undecodable must not cost the whole page)
    with open(os.path.join(tmp, INDEX_FILE), "w", encoding="utf-8", errors="backslashreplace") as f:
        f.write(page)
    # Swap in the finished folder: a report that exists is complete.
    _remove_report(resolve(final))
    os.replace(tmp, final)
    shown = sum(1 for c in cards_flagged + cards_unsure if not c["e"])
    return {"path": os.path.join(final, INDEX_FILE), "images_shown": shown, "flagged": n_flagged,
            "flagged_shown": len(cards_flagged), "flagged_left_out": n_flagged - len(cards_flagged),
            "uncertain_shown": len(cards_unsure),
            "heatmap_errors": sum(1 for c in cards_flagged + cards_unsure if c["e"])}


def report_after_scoring(cfg: Any, summary: dict[str, Any], run_id: str | None = None) -> dict[str, Any]:
    """The scoring job's hook: write the page if ``cfg`` asks for it, record it in summary.json.

    ``cfg.report``: True always, False never, None when at most ``cfg.report_top`` images are
    flagged. A report left from an earlier run of the same output is removed when no new one is
    written, so the page never disagrees with the predictions. With ``run_id`` (the scoring
    run's), nothing is written unless that run still holds the output.

    Returns:
        ``summary`` with its ``report`` entry.

    Raises:
        OutputConflictError: another job claimed the output since (its files stay untouched).
    """
    from artifact_core.score_output import check_holder

    def still_ours() -> None:
        # The page is built minutes after the run marked its output complete: a job that
        # claimed the folder meanwhile (--overwrite) must not get this run's page or summary.
        if run_id is not None:
            check_holder(resolve(cfg.output), run_id)

    still_ours()
    n_flagged = int(summary["predicted"]["0 (artifact)"])
    if cfg.report is False:
        entry: dict[str, Any] = {"path": None, "reason": "turned off (--no-report)"}
    elif cfg.report is None and n_flagged > cfg.report_top:
        entry = {"path": None, "reason": f"{n_flagged} images flagged, more than --report-top {cfg.report_top}; "
                                         f"pass --report for a page with the top {cfg.report_top}"}
    else:
        entry = _write_report_anywhere(cfg)
    output = resolve(cfg.output)
    if entry["path"] is None:
        still_ours()
        _remove_report(output.join(REPORT_DIR))
        log.info("no report: %s", entry["reason"])
    else:
        log.info("report: %s (%d image(s))", entry["path"], entry["images_shown"])
    summary["report"] = entry
    still_ours()
    output.join(_SUMMARY_FILE).write_text(json.dumps(summary, indent=2))
    return summary


def _remove_report(report: Location) -> None:
    """Delete a report folder, its ``index.html`` first.

    An object store deletes a folder object by object: removing the page first means that a
    run stopped half way leaves no page, rather than a page whose images are gone.
    """
    report.remove(first=(INDEX_FILE,))


def _write_report_anywhere(cfg: Any) -> dict[str, Any]:
    """:func:`write_report` for a local output, or built in a temporary folder and uploaded.

    An object store has no folder rename, so the upload goes file by file: the old page is
    removed first and the new ``index.html`` uploaded last, so a page that exists has all its files.
    """
    output = resolve(cfg.output)
    kwargs = {"top": cfg.report_top, "uncertain": cfg.report_uncertain, "bundle_dir": cfg.model,
              "input_uri": cfg.input, "cpus_per_actor": min(1.0, cfg.cpus_per_actor), "use_gpu": cfg.use_gpu}
    if output.is_local:
        return write_report(output.path, **kwargs)
    with tempfile.TemporaryDirectory() as tmp:
        for name in (_CSV_FILE, _SUMMARY_FILE, _HIST_FILE):
            if output.join(name).exists():
                with output.fs.open_input_stream(output.join(name).path) as src, open(os.path.join(tmp, name), "wb") as dst:
                    dst.write(src.read())
        entry = write_report(tmp, **kwargs)
        built, index = os.path.join(tmp, REPORT_DIR), os.path.join(tmp, INDEX_FILE)
        os.replace(os.path.join(built, INDEX_FILE), index)  # held back: uploaded once the rest is there
        remote = output.join(REPORT_DIR)
        _remove_report(remote)
        pafs.copy_files(built, remote.path, destination_filesystem=output.fs)
        remote.join(INDEX_FILE).upload(index)
    entry["path"] = redact_uri(output.join(REPORT_DIR, INDEX_FILE).uri)  # summary.json is shared
    return entry


def _json_for_script(obj: Any) -> str:
    """JSON safe inside ``<script type="application/json">``: no ``</script>``, no ``<!--``."""
    text = json.dumps(obj, ensure_ascii=False, allow_nan=False)
    return (text.replace("&", "\\u0026").replace("<", "\\u003c").replace(">", "\\u003e")
            .replace("\u2028", "\\u2028").replace("\u2029", "\\u2029"))


def _fmt(v: Any, spec: str = "") -> str:
    if v is None:
        return "–"
    return format(v, spec) if spec else str(v)


def render_page(summary: dict[str, Any], flagged: Sequence[dict], uncertain: Sequence[dict], *, n_flagged: int,
                errors: Sequence[dict], n_errors: int, has_hist: bool, heatmap: str = "evidence") -> str:
    """The self-contained HTML of the report (inline CSS and JS, images as relative files).
    ``heatmap`` says what the overlays show: ``"evidence"`` (the multiscale and local heads'
    per-cell evidence) or ``"grad-cam"`` (the global head)."""
    e = html.escape
    pred = summary.get("predicted", {})
    left_out = n_flagged - len(flagged)
    rows = [
        ("images", _fmt(summary.get("files"))),
        ("flagged as artifact (class 0)", _fmt(pred.get("0 (artifact)"))),
        ("artifact-free (class 1)", _fmt(pred.get("1 (artifact-free)"))),
        ("unreadable (error rows)", _fmt(summary.get("errors"))),
        ("decision threshold on P(artifact-free)", _fmt(summary.get("threshold"), ".4f")),
        ("mean confidence", _fmt(summary.get("mean_confidence"), ".4f")),
        # (a folder name that is not UTF-8 as \xNN, as the rows show file names: the page is UTF-8)
        ("model", display_path(_fmt(summary.get("model")))),
        ("input", display_path(_fmt(summary.get("input")))),
    ]
    table_html = "\n".join(f"<tr><th>{e(k)}</th><td>{e(v)}</td></tr>" for k, v in rows)
    note = (f"<p class=\"note\">Showing the {len(flagged)} most confident of {n_flagged} flagged images; "
            f"{left_out} left out (all are in <code>predictions.csv</code>).</p>" if left_out > 0 else "")
    err_html = ""
    if n_errors:
        items = "\n".join(f"<tr><td>{e(str(r['filename']))}</td><td>{e(str(r['error']))}</td></tr>" for r in errors)
        more = (f"<p class=\"note\">and {n_errors - len(errors)} more in <code>predictions.csv</code>.</p>"
                if n_errors > len(errors) else "")
        err_html = (f"<section id=\"errors\"><h2>Unreadable files ({n_errors})</h2>"
                    f"<table class=\"errors\"><tr><th>file</th><th>error</th></tr>{items}</table>{more}</section>")
    hist_html = (f"<img class=\"hist\" src=\"{_HIST_FILE}\" alt=\"confidence histogram\">" if has_hist
                 else "<p class=\"note\">no histogram (no image was scored)</p>")
    data = _json_for_script({"flagged": list(flagged), "uncertain": list(uncertain), "pageSize": PAGE_SIZE})
    created = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return fill_template(_PAGE, {"TABLE": table_html, "NOTE": note, "ERRORS": err_html, "HIST": hist_html,
                                 "CREATED": e(created), "NFLAGGED": str(n_flagged),
                                 "NUNSURE": str(len(uncertain)), "DATA": data, "HEATMAP": _HEATMAP_NOTES[heatmap]})


#: What the overlays show, by head (the page's note under the summary).
_HEATMAP_NOTES = {
    "evidence": "the model's own evidence for an artifact in each 16 px cell (the cells its score is pooled "
                "from), on one scale for every image with its middle (white) at the decision threshold: red = "
                "a cell that reads as artifact at this threshold, blue = clean. An image is flagged when its "
                "strongest cells together pass the middle, so a lone red cell can sit on an image that is not.",
    "grad-cam": "a Grad-CAM heatmap of where the model sees artifact evidence (last feature block, scaled per "
                "image: red = strongest in this image, also in a clean one).",
}


_PLACEHOLDER = re.compile(r"%%(\w+)%%")


def fill_template(template: str, values: dict[str, str]) -> str:
    """Replace every ``%%NAME%%`` in ``template`` with ``values[NAME]``, in one pass.

    One pass, because the values carry file names: a name containing ``%%DATA%%`` must stay
    text, not be filled in by a later replacement.

    Raises:
        ValueError: the template names a placeholder that ``values`` lacks, or the other way round.
    """
    names = set(_PLACEHOLDER.findall(template))
    if names != values.keys():
        raise ValueError(f"page template placeholders {sorted(names)} do not match the values given "
                         f"{sorted(values)}: missing {sorted(names - values.keys())}, "
                         f"unused {sorted(values.keys() - names)}")
    # A function as replacement: the value is inserted as is (no backslash escapes processed).
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)], template)


_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>artifact-core scoring report</title>
<style>
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0 auto;max-width:1400px;padding:16px 20px;color:#1d232a;background:#f6f7f9}
h1{font-size:1.4em;margin:.2em 0}h2{font-size:1.15em;margin:1.2em 0 .4em}
.top{display:flex;gap:24px;flex-wrap:wrap;align-items:flex-start}
table.summary{border-collapse:collapse;background:#fff;font-size:.9em}
table.summary th,table.summary td{padding:4px 10px;border-bottom:1px solid #e3e6ea;text-align:left;vertical-align:top}
table.summary td{font-family:ui-monospace,monospace;word-break:break-all;max-width:420px}
img.hist{max-width:640px;width:100%;background:#fff;border:1px solid #e3e6ea}
.note{color:#5b6570;font-size:.9em}
.bar{display:flex;gap:8px;align-items:center;margin:.4em 0;font-size:.9em;flex-wrap:wrap}
.bar input{padding:3px 6px}.bar button{padding:3px 10px}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(300px,1fr));gap:10px}
.card{background:#fff;border:1px solid #e3e6ea;border-radius:6px;padding:6px;margin:0}
.card.flag{border-left:4px solid #d64545}.card.unsure{border-left:4px solid #d6a145}
.pair{display:grid;grid-template-columns:1fr 1fr;gap:4px}
.pair img{width:100%;aspect-ratio:1/1;object-fit:contain;background:#eef0f3;display:block}
.card figcaption{font-size:.8em;margin-top:4px}
.fn{font-family:ui-monospace,monospace;white-space:nowrap;overflow:hidden;text-overflow:ellipsis}
.err{color:#b42318}
table.errors{border-collapse:collapse;font-size:.85em;background:#fff}
table.errors td,table.errors th{padding:3px 8px;border-bottom:1px solid #e3e6ea;text-align:left;font-family:ui-monospace,monospace;word-break:break-all;max-width:560px}
img.broken{outline:2px solid #b42318}
</style>
</head>
<body>
<h1>Scoring report</h1>
<p class="note">Created %%CREATED%%. Each card: the image and, beside it, %%HEATMAP%%</p>
<div class="top">
<table class="summary">
%%TABLE%%
</table>
%%HIST%%
</div>
<noscript><p class="err">The image grids need JavaScript; the numbers above and predictions.csv do not.</p></noscript>
<section id="flagged"><h2>Flagged as artifact (%%NFLAGGED%%)</h2>%%NOTE%%<div class="bar"></div><div class="grid"></div></section>
<section id="uncertain"><h2>Most uncertain (%%NUNSURE%%, probability closest to the threshold)</h2><div class="bar"></div><div class="grid"></div></section>
%%ERRORS%%
<script type="application/json" id="report-data">%%DATA%%</script>
<script>
(function () {
  "use strict";
  var data = JSON.parse(document.getElementById("report-data").textContent);
  var body = document.body;
  function el(tag, cls, text) {
    var n = document.createElement(tag);
    if (cls) n.className = cls;
    if (text !== undefined) n.textContent = text;
    return n;
  }
  // Counts for people and for the browser test: images in the page, loaded, broken, pending.
  function recount() {
    var imgs = document.images, loaded = 0, broken = 0;
    for (var i = 0; i < imgs.length; i++) {
      if (imgs[i].complete) { if (imgs[i].naturalWidth > 0) loaded++; else { broken++; imgs[i].classList.add("broken"); } }
    }
    body.setAttribute("data-images", String(imgs.length));
    body.setAttribute("data-loaded", String(loaded));
    body.setAttribute("data-broken", String(broken));
    body.setAttribute("data-pending", String(imgs.length - loaded - broken));
  }
  function image(src, alt) {
    var img = el("img");
    img.loading = "lazy";
    img.decoding = "async";
    img.alt = alt;
    img.addEventListener("load", recount);
    img.addEventListener("error", recount);
    img.src = src;
    return img;
  }
  function card(item, kind) {
    var fig = el("figure", "card " + kind);
    if (item.t) {
      var pair = el("div", "pair");
      pair.appendChild(image(item.t, "image"));
      pair.appendChild(image(item.o, "heatmap"));
      fig.appendChild(pair);
    }
    var cap = el("figcaption");
    var fn = el("div", "fn", item.f);
    fn.title = item.f;
    cap.appendChild(fn);
    cap.appendChild(el("div", "", (item.p === 0 ? "artifact" : "artifact-free") + ", confidence " +
      item.c.toFixed(3) + ", P(artifact) " + item.pa.toFixed(3)));
    if (item.e) cap.appendChild(el("div", "err", "no heatmap: " + item.e));
    if (item.d) cap.appendChild(el("div", "err", item.d));
    fig.appendChild(cap);
    return fig;
  }
  function grid(sectionId, items, kind) {
    var section = document.getElementById(sectionId);
    var bar = section.querySelector(".bar"), box = section.querySelector(".grid");
    var size = data.pageSize, page = 0, shown = items;
    var filter = el("input"); filter.type = "search"; filter.placeholder = "filter by file name";
    var prev = el("button", "", "\\u2039 prev"), next = el("button", "", "next \\u203a"), info = el("span");
    bar.appendChild(filter); bar.appendChild(prev); bar.appendChild(info); bar.appendChild(next);
    function render() {
      var pages = Math.max(1, Math.ceil(shown.length / size));
      page = Math.min(Math.max(page, 0), pages - 1);
      box.textContent = "";
      var start = page * size, end = Math.min(shown.length, start + size);
      for (var i = start; i < end; i++) box.appendChild(card(shown[i], kind));
      info.textContent = shown.length ? ("page " + (page + 1) + " / " + pages + " (" + (start + 1) + "\\u2013" + end +
        " of " + shown.length + ")") : "nothing to show";
      prev.disabled = page === 0; next.disabled = page >= pages - 1;
      recount();
    }
    prev.addEventListener("click", function () { page--; render(); });
    next.addEventListener("click", function () { page++; render(); });
    filter.addEventListener("input", function () {
      var q = filter.value.toLowerCase();
      shown = q ? items.filter(function (it) { return it.f.toLowerCase().indexOf(q) >= 0; }) : items;
      page = 0; render();
    });
    render();
  }
  grid("flagged", data.flagged, "flag");
  grid("uncertain", data.uncertain, "unsure");
  body.setAttribute("data-ready", "1");
  window.addEventListener("load", recount);
})();
</script>
</body>
</html>
"""
