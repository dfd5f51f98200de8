"""The review page: selection, escaping, heatmaps in Ray Data actors, and a real browser."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.fs as pafs
import pytest
import torch

from artifact_core.bundle import BundleConfig, save_bundle
from artifact_core import report as report_module
from artifact_core.predict import OUTPUT_COLUMNS, ArtifactPredictor, predict_paths
from artifact_core.report import (HeatmapActor, _json_for_script, fill_template, render_page, report_after_scoring,
                                  select_rows, write_report)
from artifact_core.storage import Location, resolve
from conftest import calibrated_model, make_easy_folder, write_image

# A file name that closes the data <script> and opens markup with an event handler, and one
# with both kinds of quotes: neither may run or break the page.
EVIL_DIR = "a<"
EVIL_FILE = "script><img src=x onerror=\"document.body.setAttribute('data-pwned','1')\">.png"
EVIL = f"{EVIL_DIR}/{EVIL_FILE}"
QUOTES = "it's \"quoted\" & <b>bold</b>.png"


@pytest.fixture(scope="module")
def bundle64(tmp_path_factory) -> str:
    model = calibrated_model()
    torch.manual_seed(1)
    torch.nn.init.normal_(model.classifier[1].weight, std=0.05)
    return save_bundle(str(tmp_path_factory.mktemp("bundle") / "model"), model, BundleConfig(image_size=64))


def image_folder(root: Path, n: int = 10) -> Path:
    make_easy_folder(root, n=n, size=56, artifact_every=3, seed=1)
    write_image(root / EVIL_DIR / EVIL_FILE, size=60, color=(220, 40, 40))
    write_image(root / QUOTES, size=60, color=(40, 40, 220))
    return root


def median_threshold(bundle: str, folder: Path) -> float:
    """A threshold that flags about half the folder (scores of a random head sit close together)."""
    paths = sorted(str(p) for p in folder.rglob("*.png"))
    return float(np.median(predict_paths(ArtifactPredictor(bundle), paths)))


def fake_scoring_output(out: Path, folder: Path, bundle: str, threshold: float) -> pd.DataFrame:
    """What ``run_scoring`` leaves before the report, made in process (no Ray)."""
    out.mkdir(parents=True)
    paths = sorted(str(p) for p in folder.rglob("*.png"))
    prob = predict_paths(ArtifactPredictor(bundle), paths)
    pred = (prob >= threshold).astype(int)
    df = pd.DataFrame({"filename": [os.path.relpath(p, folder) for p in paths], "path": paths,
                       "predicted_class": pred, "confidence": np.where(pred == 1, prob, 1 - prob),
                       "prob_artifact_free": prob, "error": ""})
    bad = pd.DataFrame([{"filename": "gone <i>.png", "path": str(folder / "gone <i>.png"), "predicted_class": -1,
                         "confidence": np.nan, "prob_artifact_free": np.nan, "error": "file is empty"}])
    df = pd.concat([df, bad]).sort_values("filename")
    df.to_csv(out / "predictions.csv", index=False)
    (out / "summary.json").write_text(json.dumps({
        "files": len(df), "scored": len(paths), "errors": 1,
        "predicted": {"0 (artifact)": int((pred == 0).sum()), "1 (artifact-free)": int((pred == 1).sum())},
        "mean_confidence": float(df["confidence"].mean()), "model": bundle, "threshold": threshold,
        "input": str(folder)}))
    return df


def test_select_rows_orders_flagged_and_uncertain():
    t = pa.table({"filename": list("abcdef"), "path": list("abcdef"), "predicted_class": [0, 0, 1, 1, 0, -1],
                  "confidence": [0.9, 0.99, 0.7, 0.55, 0.6, float("nan")],
                  "prob_artifact_free": [0.1, 0.01, 0.7, 0.55, 0.4, float("nan")], "error": ["", "", "", "", "", "x"]})
    flagged, unsure, n = select_rows(t, threshold=0.5, top=2, uncertain=2)
    assert n == 3 and [r["filename"] for r in flagged] == ["b", "a"]
    assert [r["filename"] for r in unsure] == ["d", "e"]  # |0.55-0.5|, |0.4-0.5|; never an error row
    assert select_rows(t, threshold=0.5, top=0, uncertain=10)[1][-1]["filename"] == "b"


def test_page_escapes_file_names():
    card = {"f": EVIL, "c": 0.9, "pa": 0.9, "p": 0, "t": "img/000000.jpg", "o": "img/000000_cam.jpg", "e": ""}
    page = render_page({"model": "<m>", "input": "in\"put", "predicted": {}}, [card], [dict(card, f=QUOTES)],
                       n_flagged=5, errors=[{"filename": "x</td><script>alert(1)</script>", "error": "e"}], n_errors=1,
                       has_hist=False)
    assert "<img src=x" not in page and "</script><" not in page.replace("</script>\n<script>", "")
    assert "<script>alert(1)" not in page and "&lt;m&gt;" in page
    data = re.search(r'<script type="application/json" id="report-data">(.*?)</script>', page, re.S).group(1)
    assert json.loads(data)["flagged"][0]["f"] == EVIL and json.loads(data)["uncertain"][0]["f"] == QUOTES
    assert "4 left out" in page
    assert "<" not in _json_for_script({"s": "</script><!--"})


def page_data(page: str) -> dict:
    """The JSON block the page's script reads."""
    block = re.search(r'<script type="application/json" id="report-data">(.*?)</script>', page, re.S)
    return json.loads(block.group(1))


def test_file_names_that_look_like_placeholders_stay_text():
    # The page used to be filled by chained replacements: a name holding %%DATA%% in the
    # error table got the whole data block, once per such name.
    names = ["%%DATA%%.png", "%%TABLE%%%%ERRORS%%.png", "%%NOPE%%.png"]
    cards = [{"f": n, "c": 0.9, "pa": 0.9, "p": 0, "t": "", "o": "", "e": "x"} for n in names]
    errors = [{"filename": n, "error": "%%HIST%%"} for n in names]
    page = render_page({"model": "%%DATA%%", "input": "%%NOTE%%", "predicted": {}}, cards, cards, n_flagged=3,
                       errors=errors, n_errors=3, has_hist=False)
    assert page.count('id="report-data"') == 1 and page.count("<table") == 2
    assert [c["f"] for c in page_data(page)["flagged"]] == names
    assert "<td>%%DATA%%</td>" in page and "<td>%%NOTE%%</td>" in page
    assert "<tr><td>%%DATA%%.png</td><td>%%HIST%%</td></tr>" in page
    assert len(page) < 20_000


def test_fill_template_names_a_placeholder_without_value():
    assert fill_template("a %%X%% b %%Y%%", {"X": "%%Y%%", "Y": "\\1"}) == "a %%Y%% b \\1"
    with pytest.raises(ValueError, match=r"missing \['Y'\]"):
        fill_template("a %%X%% b %%Y%%", {"X": "1"})
    with pytest.raises(ValueError, match=r"unused \['Z'\]"):
        fill_template("a %%X%%", {"X": "1", "Z": "2"})


def test_report_reads_a_large_csv_with_newlines_in_names(tmp_path):
    # Over pyarrow's 1 MiB CSV block, a quoted newline used to split a row between blocks
    # ("Expected 6 columns, got 5"): after the predictions were marked complete, on every --resume.
    n = 40_000
    names = [f"img_{i:05d}\nx.png" if i % 3 else f"img_{i:05d}\r\n\"q\",.png" for i in range(n)]
    prob = np.linspace(0.0, 1.0, n)
    table = pa.table({"filename": names, "path": [str(tmp_path / "gone" / x) for x in names],
                      "predicted_class": pa.array((prob >= 0.5).astype(np.int64)),
                      "confidence": np.where(prob >= 0.5, prob, 1 - prob), "prob_artifact_free": prob,
                      "error": [""] * n})
    assert table.column_names == list(OUTPUT_COLUMNS)
    out = tmp_path / "out"
    out.mkdir()
    pacsv.write_csv(table.sort_by("filename"), str(out / "predictions.csv"))  # as scoring.finalize writes it
    assert (out / "predictions.csv").stat().st_size > 1 << 20
    (out / "summary.json").write_text(json.dumps({"model": "unused: every file is gone", "threshold": 0.5,
                                                  "input": str(tmp_path), "predicted": {}}))
    rep = write_report(str(out), top=3, uncertain=2, use_ray=False)
    assert rep["flagged"] == int((prob < 0.5).sum()) and rep["flagged_shown"] == 3 and rep["uncertain_shown"] == 2
    data = page_data((out / "report" / "index.html").read_text())
    assert [c["f"] for c in data["flagged"]] == names[:3]  # the most confident: lowest P(artifact-free)
    assert all(c["e"] == "file no longer exists" for c in data["flagged"] + data["uncertain"])


class StopHere(Exception):
    """The drill's stand-in for a job killed between two requests."""


class DrillStore(pafs.FileSystemHandler):
    """An object store in a local folder that logs each change and can stop before the n-th.

    Like S3 it has no folder rename and deletes a folder object by object (in key order).
    """

    def __init__(self, root: Path, stop_at: int | None = None) -> None:
        self.fs = pafs.SubTreeFileSystem(str(root), pafs.LocalFileSystem())
        self.stop_at = stop_at
        self.changes: list[tuple[str, str]] = []
        self.lock = threading.Lock()  # pafs.copy_files uploads from several threads

    def _change(self, op: str, path: str) -> None:
        with self.lock:
            if self.stop_at is not None and len(self.changes) >= self.stop_at:
                raise StopHere(f"stopped before {op} {path}")
            self.changes.append((op, path))

    def get_type_name(self) -> str:
        return "drill"

    def normalize_path(self, path: str) -> str:
        return path

    def equals(self, other: object) -> bool:
        return self is other

    def get_file_info(self, paths):
        return self.fs.get_file_info(paths)

    def get_file_info_selector(self, selector):
        return self.fs.get_file_info(selector)

    def create_dir(self, path: str, recursive: bool) -> None:
        self.fs.create_dir(path, recursive=recursive)

    def delete_dir(self, path: str) -> None:
        files = self.fs.get_file_info(pafs.FileSelector(path, recursive=True))
        for info in sorted((i for i in files if i.type == pafs.FileType.File), key=lambda i: i.path):
            self.delete_file(info.path)
        self.fs.delete_dir(path)

    def delete_dir_contents(self, path: str, missing_dir_ok: bool = False) -> None:
        raise NotImplementedError

    def delete_root_dir_contents(self) -> None:
        raise NotImplementedError

    def delete_file(self, path: str) -> None:
        self._change("delete", path)
        self.fs.delete_file(path)

    def move(self, src: str, dest: str) -> None:
        raise NotImplementedError("an object store has no rename")

    def copy_file(self, src: str, dest: str) -> None:
        raise NotImplementedError

    def open_input_stream(self, path: str):
        return self.fs.open_input_stream(path)

    def open_input_file(self, path: str):
        return self.fs.open_input_file(path)

    def open_output_stream(self, path: str, metadata):
        self._change("write", path)
        return self.fs.open_output_stream(path)

    def open_append_stream(self, path: str, metadata):
        raise NotImplementedError


def test_report_upload_stopped_anywhere_leaves_no_page_without_its_images(bundle64, tmp_path, monkeypatch):
    folder = image_folder(tmp_path / "in", n=4)
    bucket = tmp_path / "bucket"
    fake_scoring_output(bucket / "out", folder, bundle64, median_threshold(bundle64, folder))
    write_image(bucket / "out" / "confidence_hist.png")
    store = DrillStore(bucket)

    def resolve_drill(uri: str) -> Location:
        if not uri.startswith("drill://"):
            return resolve(uri)
        return Location(pafs.PyFileSystem(store), uri[len("drill://"):], uri)

    monkeypatch.setattr(report_module, "resolve", resolve_drill)
    built = tmp_path / "built"

    def write_report_once(output_dir: str, **kwargs) -> dict:
        # The same page every time, its heatmaps computed once: the drill is about the upload.
        if not built.exists():
            entry = write_report(output_dir, use_ray=False, **kwargs)
            shutil.copytree(os.path.join(output_dir, "report"), built)
            (built / "entry.json").write_text(json.dumps(entry))
        else:
            shutil.copytree(built, os.path.join(output_dir, "report"), ignore=shutil.ignore_patterns("entry.json"))
        return json.loads((built / "entry.json").read_text())

    monkeypatch.setattr(report_module, "write_report", write_report_once)
    cfg = SimpleNamespace(report=True, report_top=2, report_uncertain=1, output="drill://out", cpus_per_actor=1.0,
                          use_gpu=False, model=bundle64, input=str(folder))
    summary = json.loads((bucket / "out" / "summary.json").read_text())
    report_after_scoring(cfg, dict(summary))  # the page of an earlier run
    page = bucket / "out" / "report" / "index.html"
    assert page.exists()

    def complete_or_absent(report: Path) -> None:
        if not (report / "index.html").exists():
            return
        html_text = (report / "index.html").read_text()
        data = page_data(html_text)
        files = [c[k] for c in data["flagged"] + data["uncertain"] for k in ("t", "o") if c[k]]
        assert len(files) == 6 and 'src="confidence_hist.png"' in html_text
        for rel in files + ["confidence_hist.png"]:
            assert (report / rel).is_file(), f"index.html without {rel}"

    store.changes = []
    report_after_scoring(cfg, dict(summary))  # again, over the old page: every step logged
    steps = [c for c in store.changes if c[1].startswith("out/report/")]
    assert len(steps) == 2 * 8  # index.html, histogram, 3 x (thumbnail, overlay): each deleted, then uploaded
    assert steps[0] == ("delete", "out/report/index.html") and steps[-1] == ("write", "out/report/index.html")
    complete_or_absent(bucket / "out" / "report")
    snapshot = tmp_path / "snapshot"
    shutil.copytree(bucket, snapshot)
    for stop_at in range(len(store.changes)):
        shutil.rmtree(bucket)
        shutil.copytree(snapshot, bucket)
        store.changes, store.stop_at = [], stop_at
        with pytest.raises(Exception, match="stopped before"):
            report_after_scoring(cfg, dict(summary))
        complete_or_absent(bucket / "out" / "report")


def test_heatmap_actor_turns_bad_files_into_error_rows(bundle64, tmp_path):
    write_image(tmp_path / "g.png", size=300)
    (tmp_path / "junk.png").write_bytes(b"junk")
    (tmp_path / "empty.png").write_bytes(b"")
    names = ["g.png", "junk.png", "empty.png", "gone.png"]
    out = HeatmapActor(bundle64, thumb_size=100)({"path": np.array([str(tmp_path / n) for n in names], dtype=object)})
    assert out["error"][0] == "" and all(out["error"][1:])
    assert "empty" in out["error"][2] and "vanished" in out["error"][3]
    from PIL import Image
    import io
    thumb, cam = Image.open(io.BytesIO(out["thumb"][0])), Image.open(io.BytesIO(out["overlay"][0]))
    assert thumb.size == cam.size == (100, 100) and thumb.format == "JPEG"
    assert out["thumb"][1] == b"" and np.isnan(out["prob_artifact_free"][1])


def test_report_switch_without_scoring(tmp_path):
    out = tmp_path / "o"
    (out / "report").mkdir(parents=True)  # a page left from an earlier run
    (out / "summary.json").write_text("{}")
    cfg = SimpleNamespace(report=None, report_top=3, report_uncertain=1, output=str(out), cpus_per_actor=1.0,
                          use_gpu=False)
    s = report_after_scoring(cfg, {"predicted": {"0 (artifact)": 4}})
    assert s["report"]["path"] is None and "--report-top 3" in s["report"]["reason"]
    assert not (out / "report").exists()  # stale page removed: it would disagree with the predictions
    assert json.loads((out / "summary.json").read_text())["report"] == s["report"]
    cfg.report = False
    assert "--no-report" in report_after_scoring(cfg, {"predicted": {"0 (artifact)": 0}})["report"]["reason"]


@pytest.mark.ray
def test_scoring_writes_report(ray_session, bundle64, tmp_path, monkeypatch):
    from artifact_core.scoring import ScoreConfig, run_scoring

    folder = image_folder(tmp_path / "in")
    threshold = median_threshold(bundle64, folder)
    (folder / "broken.png").write_bytes(b"not an image")
    out = tmp_path / "out"
    cfg = ScoreConfig(model=bundle64, input=str(folder), output=str(out), batch_size=8, num_actors=1,
                      threshold=threshold, report=True, report_top=3, report_uncertain=4)
    summary = run_scoring(cfg)
    csv = pd.read_csv(out / "predictions.csv", keep_default_na=False)
    n_flagged = int((csv["predicted_class"] == 0).sum())
    assert n_flagged > 3

    rep = summary["report"]
    assert rep == json.loads((out / "summary.json").read_text())["report"]
    assert rep["path"] == str(out / "report" / "index.html")
    assert rep["flagged"] == n_flagged and rep["flagged_shown"] == 3 and rep["flagged_left_out"] == n_flagged - 3
    assert rep["uncertain_shown"] == 4 and rep["images_shown"] == 7 and rep["heatmap_errors"] == 0
    page = (out / "report" / "index.html").read_text()
    data = json.loads(re.search(r'id="report-data">(.*?)</script>', page, re.S).group(1))
    flagged = csv[csv["predicted_class"] == 0].sort_values("confidence", ascending=False)
    assert [c["f"] for c in data["flagged"]] == list(flagged["filename"][:3])
    for c in data["flagged"] + data["uncertain"]:
        for rel in (c["t"], c["o"]):
            assert rel.startswith("img/") and (out / "report" / rel).stat().st_size > 0
    assert len(os.listdir(out / "report" / "img")) == 14
    assert (out / "report" / "confidence_hist.png").exists() and 'src="confidence_hist.png"' in page
    assert f"{n_flagged - 3} left out" in page and "broken.png" in page  # the error table
    assert not (out / "report.tmp").exists()

    # A page that fails after the predictions are complete does not fail the job: it says why.
    def broken(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(report_module, "_write_report_anywhere", broken)
    summary = run_scoring(ScoreConfig(**{**cfg.__dict__, "overwrite": True}))
    assert summary["report"] == {"path": None, "reason": "failed: OSError: disk full"}
    assert json.loads((out / "summary.json").read_text())["report"] == summary["report"]
    assert len(pd.read_csv(out / "predictions.csv")) == len(csv)


def test_report_in_process_with_a_vanished_file(bundle64, tmp_path):
    folder = image_folder(tmp_path / "in", n=6)
    out = tmp_path / "out"
    df = fake_scoring_output(out, folder, bundle64, median_threshold(bundle64, folder))
    gone = df[df["predicted_class"] == 0].sort_values("confidence").iloc[-1]  # the first card
    os.remove(gone["path"])
    rep = write_report(str(out), top=2, uncertain=1, use_ray=False)
    assert rep["heatmap_errors"] == 1 and rep["images_shown"] == 2 and rep["flagged_shown"] == 2
    page = (out / "report" / "index.html").read_text()
    data = json.loads(re.search(r'id="report-data">(.*?)</script>', page, re.S).group(1))
    first = data["flagged"][0]
    assert first["f"] == gone["filename"] and first["e"] == "file no longer exists" and first["t"] == ""
    names = os.listdir(out / "report" / "img")
    assert sorted(n.split("_", 1)[1] for n in names) == ["000001.jpg", "000001_cam.jpg", "000002.jpg", "000002_cam.jpg"]
    # named anew by every report: a page left open never shows another run's image beside a name
    write_report(str(out), top=2, uncertain=1, use_ray=False)
    assert not set(os.listdir(out / "report" / "img")) & set(names)


def test_report_shows_a_file_whose_name_is_not_utf8(bundle64, tmp_path):
    from artifact_core.storage import display_path

    folder = tmp_path / "in"
    raw = os.fsdecode(os.fsencode(str(folder)) + b"/bad\xff.png")
    write_image(Path(raw), size=60, color=(220, 40, 40))
    out = tmp_path / "out"
    out.mkdir()
    prob = float(predict_paths(ArtifactPredictor(bundle64), [raw])[0])
    shown = display_path(raw)
    pd.DataFrame([{"filename": "bad\\xff.png", "path": shown, "predicted_class": 0, "confidence": 1 - prob,
                   "prob_artifact_free": prob, "error": ""}]).to_csv(out / "predictions.csv", index=False)
    (out / "summary.json").write_text(json.dumps({"files": 1, "scored": 1, "errors": 0, "predicted": {},
                                                  "mean_confidence": 0.5, "model": bundle64, "threshold": 1.01,
                                                  "input": str(folder)}))
    rep = write_report(str(out), top=5, uncertain=0, use_ray=False)
    assert rep["heatmap_errors"] == 0 and rep["images_shown"] == 1


def test_credentials_in_a_uri_stay_out_of_what_is_shared():
    from artifact_core.storage import redact_uri

    uri = "s3://AKIAEXAMPLE:SECRETKEY@bucket/faces?endpoint_override=http://127.0.0.1:9000&secret_key=XYZ"
    clean = redact_uri(uri)
    assert "SECRETKEY" not in clean and "XYZ" not in clean and "AKIAEXAMPLE" not in clean
    assert "bucket/faces" in clean and "endpoint_override=http://127.0.0.1:9000" in clean
    assert redact_uri("/data/faces") == "/data/faces"


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if shutil.which(name):
            return shutil.which(name)
    return None


def chromium(page: Path, *, args: list[str], window: str = "1400,4000", timeout: int = 90) -> subprocess.CompletedProcess:
    """Headless Chromium on a file:// page, offline and without a profile of its own."""
    profile = tempfile.mkdtemp(prefix="chromium-profile-")
    try:
        cmd = [find_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               "--disable-dev-shm-usage", f"--user-data-dir={profile}", f"--window-size={window}",
               "--virtual-time-budget=5000", *args, page.as_uri()]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    finally:
        shutil.rmtree(profile, ignore_errors=True)


def body_attrs(dom: str) -> dict[str, str]:
    tag = re.search(r"<body([^>]*)>", dom).group(1)
    return dict(re.findall(r'([\w-]+)="([^"]*)"', tag))


@pytest.mark.skipif(find_chromium() is None,
                    reason="needs a headless Chromium (Debian: apt-get install chromium) to open the report page")
def test_report_in_a_real_browser(bundle64, tmp_path):
    folder = image_folder(tmp_path / "in", n=8)
    out = tmp_path / "out"
    fake_scoring_output(out, folder, bundle64, median_threshold(bundle64, folder))
    rep = write_report(str(out), top=100, uncertain=100, use_ray=False)
    assert rep["images_shown"] == 10  # every readable image, flagged or not
    page = Path(rep["path"])

    proc = chromium(page, args=["--dump-dom"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    dom = proc.stdout
    attrs = body_attrs(dom)
    assert attrs.get("data-ready") == "1", f"the page's script did not run: {attrs}"
    assert "data-pwned" not in attrs, "a file name ran as script"
    # 10 cards x (thumbnail + overlay), none pending in a tall window
    assert int(attrs["data-images"]) == 20
    assert attrs["data-broken"] == "0" and attrs["data-loaded"] == "20", attrs
    assert "&lt;/script&gt;&lt;img src=x" in dom or "&lt;script&gt;&lt;img src=x" in dom
    assert "&lt;b&gt;bold&lt;/b&gt;" in dom and "gone &lt;i&gt;.png" in dom

    # The check can fail: a missing overlay shows up as broken.
    os.remove(next((page.parent / "img").glob("*_000000_cam.jpg")))
    attrs = body_attrs(chromium(page, args=["--dump-dom"]).stdout)
    assert attrs["data-broken"] == "1" and attrs["data-loaded"] == "19", attrs


@pytest.mark.skipif(find_chromium() is None,
                    reason="needs a headless Chromium (Debian: apt-get install chromium) to open the report page")
def test_report_pages_ten_thousand_flagged(tmp_path):
    from PIL import Image

    report = tmp_path / "report"
    (report / "img").mkdir(parents=True)
    Image.new("RGB", (32, 32), (200, 60, 60)).save(report / "img" / "a.jpg")
    cards = [{"f": f"image_{i:05d}.png", "c": 0.99, "pa": 0.99, "p": 0, "t": "img/a.jpg", "o": "img/a.jpg", "e": ""}
             for i in range(10_000)]
    page = render_page({"predicted": {"0 (artifact)": 12_000}}, cards, [], n_flagged=12_000, errors=[], n_errors=0,
                       has_hist=False)
    (report / "index.html").write_text(page)
    proc = chromium(report / "index.html", args=["--dump-dom"])
    attrs = body_attrs(proc.stdout)
    assert attrs.get("data-ready") == "1" and attrs["data-images"] == "200", attrs  # one page: 100 cards x 2
    assert "page 1 / 100 (1–100 of 10000)" in proc.stdout and "2000 left out" in proc.stdout
    assert attrs["data-broken"] == "0"


def test_score_flags(capsys):
    import logging

    from artifact_core.jobs_common import run_job
    from conftest import load_job

    job = load_job("score")
    p = job.get_args_parser()
    assert (p.parse_args([]).report, p.parse_args([]).report_top, p.parse_args([]).report_uncertain) == (None, 500, 50)
    assert p.parse_args(["--report", "--report-top", "7"]).report is True
    assert p.parse_args(["--no-report"]).report is False
    with pytest.raises(SystemExit):
        p.parse_args(["--report", "--no-report"])
    assert run_job(job.main, p.parse_args(["--report-top", "-1"]), logging.getLogger("test")) == 2
    assert "--report-top must be 0 or more, got -1" in capsys.readouterr().err
    # every numeric flag is checked before Ray starts: one line, exit status 2, no traceback
    for flags, expected in ((["--cpus-per-actor", "0"], "--cpus-per-actor must be above 0, got 0.0"),
                            (["--threshold", "nan"], "--threshold must be a number, got nan"),
                            (["--wait-for-resources", "nan"], "--wait-for-resources must be 0 or more seconds"),
                            (["--batch-size", "0"], "--batch-size must be at least 1, got 0"),
                            (["--num-actors", "0"], "--num-actors must be at least 1, got 0")):
        assert run_job(job.main, p.parse_args(flags), logging.getLogger("test")) == 2, flags
        err = capsys.readouterr().err
        assert expected in err and "Traceback" not in err, (flags, err)


def test_a_card_says_when_its_heatmap_model_disagrees_with_the_row(bundle64, tmp_path):
    """A file replaced since scoring, or a run scored by int8: the card names both probabilities."""
    folder = image_folder(tmp_path / "in", n=6)
    out = tmp_path / "out"
    df = fake_scoring_output(out, folder, bundle64, median_threshold(bundle64, folder))
    first = df[df["predicted_class"] == 0].sort_values("confidence").iloc[-1]  # the first card
    df.loc[df["path"] == first["path"], "prob_artifact_free"] = 0.0  # what another model said
    df.loc[df["path"] == first["path"], "confidence"] = 1.0
    df.to_csv(out / "predictions.csv", index=False)
    write_report(str(out), top=2, uncertain=1, use_ray=False)
    data = page_data((out / "report" / "index.html").read_text())
    cards = {c["f"]: c for c in data["flagged"] + data["uncertain"]}
    assert "P(artifact)" in cards[first["filename"]]["d"] and "the row 1.000" in cards[first["filename"]]["d"]
    assert all("d" not in c for name, c in cards.items() if name != first["filename"])


def test_a_card_says_when_its_heatmap_model_lands_on_the_other_side_of_the_threshold():
    """Within the 0.02 tolerance, but across the threshold: the map (its middle is the threshold)
    reads the other way than the card's class, which the card must say."""
    from artifact_core.report import _drift

    across = _drift({"prob": 0.505, "error": ""}, 0.495, 0.5)
    assert "other side of the threshold" in across and "P(artifact) 0.495" in across and "the row 0.505" in across
    assert _drift({"prob": 0.51, "error": ""}, 0.52, 0.5) == ""  # same side, within tolerance
    far = _drift({"prob": 0.60, "error": ""}, 0.70, 0.5)  # same side, beyond tolerance
    assert far and "other side" not in far
    assert _drift({"prob": 0.49, "error": "cannot decode"}, 0.51, 0.5) == ""
    assert _drift({"prob": 0.5000004, "error": ""}, 0.4999998, 0.5) == ""  # the engines' rounding, not a change
