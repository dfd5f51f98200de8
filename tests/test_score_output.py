"""Scoring never destroys data: the output manifest, nested folders, files that fail at their turn."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from artifact_core.config import DEMO_RUN_NAME, DEMO_STORAGE, score_from_args
from artifact_core.score_output import MANIFEST_FILE, OutputConflictError
from artifact_core.scoring import ScoreConfig, run_scoring
from artifact_core.storage import FileReadError, NestedLocationError, read_file_bytes
from conftest import load_job, write_image


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` with its content (links as their targets)."""
    out = {}
    for dirpath, _, files in os.walk(root):
        for f in files:
            p = Path(dirpath) / f
            out[str(p.relative_to(root))] = os.readlink(p).encode() if p.is_symlink() else p.read_bytes()
    return out


def user_folder(root: Path) -> Path:
    """The issue's layout: X/photos/good_{0,1}.jpg and X/notes.txt."""
    for i in range(2):
        write_image(root / "photos" / f"good_{i}.jpg", fmt="JPEG")
    (root / "notes.txt").write_text("my notes")
    return root


@pytest.mark.parametrize("output", ["parent", "same", "inside", "link_to_input", "home_like"])
def test_overwrite_never_touches_user_data(bundle_dir, tmp_path, output):
    x = user_folder(tmp_path / "X")
    photos = x / "photos"
    target = {"parent": x, "same": photos, "inside": photos / "scores", "home_like": tmp_path / "home"}.get(output)
    if output == "link_to_input":
        target = tmp_path / "link"
        target.symlink_to(photos)
    if output == "home_like":
        (target / "Documents").mkdir(parents=True)
        (target / "Documents" / "thesis.tex").write_text("years of work")
        (target / ".bashrc").write_text("alias ll='ls -l'")
    before = snapshot(tmp_path)
    expected = NestedLocationError if output != "home_like" else OutputConflictError
    with pytest.raises(expected) as err:
        run_scoring(ScoreConfig(model=bundle_dir, input=str(photos), output=str(target), overwrite=True))
    msg = str(err.value)
    assert "\n" not in msg
    if output == "home_like":
        assert MANIFEST_FILE in msg and "nothing was deleted" in msg
    else:
        assert "the input" in msg and str(target.resolve() if output != "link_to_input" else target) in msg
    assert snapshot(tmp_path) == before, "a refused run changed files"


def test_resume_and_overwrite_also_refuse_a_foreign_folder(bundle_dir, tmp_path):
    x = user_folder(tmp_path / "X")
    other = tmp_path / "out"
    other.mkdir()
    (other / "predictions.csv").write_text("someone else's file with a scoring-like name")
    before = snapshot(tmp_path)
    for flags in ({"overwrite": True}, {"resume": True}, {}):
        with pytest.raises(OutputConflictError, match="not empty"):
            run_scoring(ScoreConfig(model=bundle_dir, input=str(x / "photos"), output=str(other), **flags))
    assert snapshot(tmp_path) == before


def test_only_the_whole_demo_replaces_its_output(monkeypatch, tmp_path):
    """``python jobs/score.py`` alone reruns the demo over its own output; scoring another folder
    without ``--output`` lands in the same default folder, and must not delete what is there."""
    job = load_job("score")
    monkeypatch.chdir(tmp_path)

    def config(*argv: str) -> ScoreConfig:
        return score_from_args(job.get_args_parser().parse_args(list(argv)))[0]

    demo_output = str(tmp_path / DEMO_STORAGE / DEMO_RUN_NAME / "predictions")
    assert config().overwrite and config().output == demo_output
    assert config("--model", "m").overwrite  # the demo's folder scored again, with another bundle
    other = config("--input", "/data/B")
    assert other.output == demo_output and not other.overwrite and not other.resume
    assert not config("--output", "out").overwrite
    assert not config("--resume").overwrite and config("--resume").resume
    assert config("--input", "/data/B", "--overwrite").overwrite


def test_resume_refuses_another_precision_int8_model_or_bundle_config(tmp_path):
    """One output never mixes two models: int8 is another model, and config.json holds the
    preprocessing and the test-time flip. Manifests from before these were recorded still resume."""
    import dataclasses

    from artifact_core.score_output import ScoringIdentity, prepare_output
    from artifact_core.storage import resolve

    base = ScoringIdentity(input="/in", model="/m", model_sha256="w1", threshold=0.5, image_size=32,
                           precision="fp32", int8_sha256="not used", config_sha256="c1")
    out = resolve(str(tmp_path / "out"))
    prepare_output(out, base, owned=["predictions.csv"], resume=False, overwrite=False)
    prepare_output(out, base, owned=["predictions.csv"], resume=True, overwrite=False)
    for change, named in [({"precision": "int8", "int8_sha256": "q1"}, "--precision: 'fp32' before, 'int8' now"),
                          ({"config_sha256": "c2"}, "sha256 of config.json"),
                          ({"model_sha256": "w2"}, "sha256 of model.pt")]:
        with pytest.raises(OutputConflictError, match="cannot --resume") as err:
            prepare_output(out, dataclasses.replace(base, **change), owned=["predictions.csv"], resume=True,
                           overwrite=False)
        assert named in str(err.value)
    int8 = resolve(str(tmp_path / "int8"))
    prepare_output(int8, dataclasses.replace(base, precision="int8", int8_sha256="q1"), owned=[], resume=False,
                   overwrite=False)
    with pytest.raises(OutputConflictError, match="sha256 of model.int8.onnx"):  # re-calibrated in between
        prepare_output(int8, dataclasses.replace(base, precision="int8", int8_sha256="q2"), owned=[], resume=True,
                       overwrite=False)
    # a manifest written before precision and the config were recorded
    old = resolve(str(tmp_path / "old"))
    legacy = ScoringIdentity(input="/in", model="/m", model_sha256="w1", threshold=0.5, image_size=32)
    prepare_output(old, legacy, owned=[], resume=False, overwrite=False)
    raw = json.loads((tmp_path / "old" / MANIFEST_FILE).read_text())
    for key in ("precision", "int8_sha256", "config_sha256"):
        del raw["identity"][key]
    (tmp_path / "old" / MANIFEST_FILE).write_text(json.dumps(raw))
    prepare_output(old, base, owned=[], resume=True, overwrite=False)
    # ... and records them then, so the next resume checks them
    assert json.loads((tmp_path / "old" / MANIFEST_FILE).read_text())["identity"]["precision"] == "fp32"
    with pytest.raises(OutputConflictError, match="--precision: 'fp32' before, 'int8' now"):
        prepare_output(old, dataclasses.replace(base, precision="int8", int8_sha256="q1"), owned=[], resume=True,
                       overwrite=False)


def _evaluate(tmp_path, predictions: str, labels: str) -> dict:
    """``evaluate_against_labels`` on an output holding ``predictions`` (CSV rows after the
    header) and a labels file holding ``labels``."""
    from artifact_core.scoring import evaluate_against_labels

    (tmp_path / "out").mkdir(exist_ok=True)
    (tmp_path / "out" / "predictions.csv").write_text("filename,predicted_class\n" + predictions)
    (tmp_path / "labels.csv").write_text("filename,label\n" + labels)
    return evaluate_against_labels(str(tmp_path / "out"), str(tmp_path / "labels.csv"))


def test_labels_csv_is_checked_and_error_rows_count_as_misses(tmp_path):
    from artifact_core.scoring import evaluate_against_labels

    m = _evaluate(tmp_path, "a.png,0\nb.png,1\nc.png,-1\nd.png,1\n007,0\n",
                  "a.png,0\nb.png,1\nc.png,1\nd.png,0\nunscored.png,1\n007,0\n")
    # c's error row is a miss whatever its label; 007 stays a name, not the number 7
    assert m["confusion_matrix"] == [[2, 1], [1, 1]]
    assert (m["labels_matched"], m["labels_unmatched"], m["unmatched_examples"], m["scored_without_label"]) == \
        (5, 1, ["unscored.png"], 0)
    for bad, shown in [("-1", "'-1'"), ("2", "'2'"), ("", "''"), ("yes", "'yes'")]:
        labels = tmp_path / "bad.csv"
        labels.write_text(f"filename,label\na.png,0\nb.png,{bad}\n")
        with pytest.raises(ValueError) as err:
            evaluate_against_labels(str(tmp_path / "out"), str(labels))
        assert f"data row 2 ('b.png'): label {shown} is not 0" in str(err.value)


def test_labels_of_bare_names_match_a_nested_folder_and_the_metrics_say_what_they_cover(tmp_path):
    """A CSV of base names for an input with sub-folders: each name that is one scored file's
    matches it; an ambiguous or unknown name, and scored files without a label, are counted."""
    from artifact_core.scoring import evaluate_against_labels

    m = _evaluate(tmp_path, "sub/a.png,0\nsub/b.png,0\nc.png,1\nx/dup.png,1\ny/dup.png,0\nz/e.png,1\n",
                  "a.png,0\nb.png,0\nc.png,1\ndup.png,1\nmissing.png,0\n")
    labels = tmp_path / "labels.csv"
    assert m["confusion_matrix"] == [[2, 0], [0, 1]]  # a, b (found by base name) and c
    assert (m["labels_matched"], m["labels_unmatched"], m["scored_without_label"]) == (3, 2, 3)
    assert m["unmatched_examples"] == ["dup.png", "missing.png"]  # dup.png names two files: no guess
    labels.write_text("filename,label\nnowhere.png,0\n")
    with pytest.raises(ValueError, match="no file in .* matches a scored filename .*e.g. 'nowhere.png'"):
        evaluate_against_labels(str(tmp_path / "out"), str(labels))


def test_two_files_that_would_share_a_row_are_refused_before_anything_is_written(bundle_dir, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    png = write_image(tmp_path / "x.png").read_bytes()
    for name in (b"a\xff.png", b"a\\xff.png"):  # a byte that is not UTF-8, and the same spelt out
        with open(os.path.join(os.fsencode(folder), name), "wb") as f:
            f.write(png)
    with pytest.raises(ValueError, match=r"two input files would share the output row '.*/a\\\\xff\.png'"):
        run_scoring(ScoreConfig(model=bundle_dir, input=str(folder), output=str(tmp_path / "out")))
    assert not (tmp_path / "out").exists()


def test_read_file_bytes_reasons(tmp_path):
    ok = write_image(tmp_path / "ok.png")
    assert read_file_bytes(str(ok)) == ok.read_bytes()
    os.mkfifo(tmp_path / "fifo.png")
    (tmp_path / "dangling.png").symlink_to(tmp_path / "nowhere.png")
    (tmp_path / "loop.png").symlink_to(tmp_path / "loop.png")
    (tmp_path / "dir.png").mkdir()
    cases = {"fifo.png": "not a regular file", "dangling.png": "vanished", "nowhere.png": "vanished",
             "loop.png": "ELOOP|Too many levels|OSError", "dir.png": "not a regular file|IsADirectory"}
    for name, reason in cases.items():
        with pytest.raises(FileReadError) as err:
            read_file_bytes(str(tmp_path / name))
        assert __import__("re").search(reason, err.value.reason), (name, err.value.reason)
    with pytest.raises(FileReadError, match="exceeds the limit"):
        read_file_bytes(str(ok), max_bytes=10)
    # permission denied, also where the tests run as root (who reads any file whatever its mode)
    import artifact_core.storage as storage

    locked = write_image(tmp_path / "locked.png")
    real_open = os.open

    def denied(path, *args, **kwargs):
        if os.fsdecode(path) == str(locked):
            raise PermissionError(13, "Permission denied", str(locked))
        return real_open(path, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(storage.os, "open", denied)
        with pytest.raises(FileReadError) as err:
            read_file_bytes(str(locked))
    assert err.value.reason == "permission denied"


@pytest.mark.ray
def test_every_listed_file_gets_one_row_and_overwrite_keeps_user_files(ray_session, bundle_dir, tmp_path, monkeypatch):
    src = tmp_path / "in"
    good = [write_image(src / f"good_{i}.png", color=(60 * i, 90, 120)).name for i in range(3)]
    odd = ["with space, comma and \"quote\".png", "új képek ✓.png", "line\nbreak.png"]
    for name in odd:
        write_image(src / name)
    os.mkfifo(src / "pipe.png")
    (src / "dangling.png").symlink_to(src / "missing-target.png")
    (src / "loop.png").symlink_to(src / "loop.png")
    bad_utf8 = os.path.join(os.fsencode(src), b"caf\xe9.png")
    with open(bad_utf8, "wb") as f:
        f.write(write_image(tmp_path / "tmp.png").read_bytes())
    vanishing = write_image(src / "vanishing.png")

    import artifact_core.scoring as scoring
    real_list = scoring.list_input

    def list_then_delete(uri, output=None):  # the file disappears between listing and reading
        listed = real_list(uri, output)
        vanishing.unlink()
        return listed

    monkeypatch.setattr(scoring, "list_input", list_then_delete)
    out = tmp_path / "out"
    summary = run_scoring(ScoreConfig(model=bundle_dir, input=str(src), output=str(out), batch_size=4, num_actors=1))
    monkeypatch.setattr(scoring, "list_input", real_list)

    csv = pd.read_csv(out / "predictions.csv", keep_default_na=False)
    expected_names = set(good) | set(odd) | {"pipe.png", "dangling.png", "loop.png", "caf\\xe9.png", "vanishing.png"}
    assert sorted(csv["filename"]) == sorted(expected_names) and csv["filename"].is_unique
    errors = dict(zip(csv["filename"], csv["error"]))
    assert errors["pipe.png"] == "not a regular file"
    assert "vanished" in errors["vanishing.png"] and "vanished" in errors["dangling.png"]
    assert errors["loop.png"] != ""
    for name in good + odd + ["caf\\xe9.png"]:
        assert errors[name] == "", (name, errors[name])
    assert summary["errors"] == 4 and summary["files"] == len(expected_names)
    assert (csv[csv["error"] != ""]["predicted_class"] == -1).all()
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    assert manifest["complete"] and manifest["identity"]["threshold"] == 0.5
    assert "predictions.parquet" in manifest["entries"]

    # a user's file next to a real scoring output survives --overwrite; scoring's own files are replaced
    (out / "my_review_notes.txt").write_text("keep me")
    old_parts = set(os.listdir(out / "predictions.parquet"))
    s2 = run_scoring(ScoreConfig(model=bundle_dir, input=str(src), output=str(out), batch_size=4,
                                 num_actors=1, overwrite=True, threshold=1.01))
    assert (out / "my_review_notes.txt").read_text() == "keep me"
    assert not old_parts & set(os.listdir(out / "predictions.parquet")), "old Parquet parts survived --overwrite"
    assert s2["files"] == len(expected_names) - 1  # vanishing.png is gone
    assert s2["predicted"]["0 (artifact)"] == s2["files"] - s2["errors"]

    # --resume with another threshold (or model) would mix two runs in one CSV: refused, named
    with pytest.raises(OutputConflictError, match="threshold: 1.01 before, 0.5 now"):
        run_scoring(ScoreConfig(model=bundle_dir, input=str(src), output=str(out), num_actors=1, resume=True))
    assert np.isclose(json.loads((out / "summary.json").read_text())["threshold"], 1.01)
