"""The scoring output's claim without Ray: run ids against a second job on one folder, one
Parquet row per file after a resume, parts that fail to read, leftovers of killed writes,
and flags checked before any work."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from artifact_core.config import DEMO_RUN_NAME, DEMO_STORAGE, score_from_args
from artifact_core.score_output import MANIFEST_FILE, OutputConflictError, prepare_output, read_manifest
from artifact_core.scoring import (OWNED_ENTRIES, PARQUET_DIR, MissingRowsError, ScoreConfig, _existing_rows, _parts,
                                   _prepare_output, finalize)
from artifact_core.storage import resolve
from conftest import load_job, write_image


def rows(names: list[str], prob: float = 0.9) -> pa.Table:
    """Prediction rows as the pipeline writes them."""
    n = len(names)
    return pa.table({"filename": names, "path": names, "predicted_class": pa.array([1] * n, pa.int64()),
                     "confidence": [prob] * n, "prob_artifact_free": [prob] * n,
                     "error": pa.array([None] * n, pa.string())})


def claim(cfg: ScoreConfig, **flags):
    """The run's claim as run_scoring makes it: (Parquet folder, manifest)."""
    for k, v in flags.items():
        setattr(cfg, k, v)
    return _prepare_output(cfg, 0.5, 32)


def write_part(parquet_dir, run_id: str, names: list[str], tag: str = "0") -> None:
    pq.write_table(rows(names), str(Path(parquet_dir.path) / f"{run_id}_{tag}_000000.parquet"))


def done(cfg: ScoreConfig, run_id: str, expected: list[str]) -> dict:
    return finalize(cfg, expected, threshold=0.5, wall_seconds=1.0, scored_now=len(expected), run_id=run_id)


@pytest.fixture
def cfg(bundle_dir, tmp_path) -> ScoreConfig:
    for name in ("a.png", "b.png"):
        write_image(tmp_path / "in" / name)
    return ScoreConfig(model=bundle_dir, input=str(tmp_path / "in"), output=str(tmp_path / "out"))


def test_a_second_job_on_the_same_output_is_found_out_by_both(cfg, tmp_path):
    parquet_a, man_a = claim(cfg)
    write_part(parquet_a, man_a.run_id, ["a.png"])
    # B claims the folder while A still runs (both saw it free, or B passed --overwrite)
    parquet_b, man_b = claim(ScoreConfig(**{**cfg.__dict__}), overwrite=True)
    assert man_b.run_id != man_a.run_id
    write_part(parquet_a, man_a.run_id, ["b.png"], tag="1")  # A goes on writing
    write_part(parquet_b, man_b.run_id, ["a.png", "b.png"])
    with pytest.raises(OutputConflictError, match=f"run {man_a.run_id}.*run {man_b.run_id} holds it now"):
        done(cfg, man_a.run_id, ["a.png", "b.png"])
    with pytest.raises(OutputConflictError, match="written by another scoring job"):
        done(cfg, man_b.run_id, ["a.png", "b.png"])
    out = tmp_path / "out"
    assert not (out / "predictions.csv").exists() and not read_manifest(resolve(str(out))).complete


def test_resume_keeps_the_parts_of_earlier_runs_and_leaves_one_parquet_row_per_file(cfg, tmp_path):
    parquet, first = claim(cfg)
    write_part(parquet, first.run_id, ["a.png", "b.png"])
    (tmp_path / "in" / "b.png").unlink()  # gone before the rerun
    parquet, second = claim(cfg, resume=True)
    assert second.runs == [first.run_id, second.run_id]
    assert _existing_rows(_parts(parquet, second)) == {"a.png", "b.png"}
    write_part(parquet, second.run_id, ["a.png"])  # a crash between write and record: scored twice
    summary = done(cfg, second.run_id, ["a.png"])
    assert summary["files"] == 1
    table = pq.read_table(parquet.path)
    assert table.column("path").to_pylist() == ["a.png"], "the Parquet output keeps one row per listed file"
    assert pacsv.read_csv(tmp_path / "out" / "predictions.csv").column("path").to_pylist() == ["a.png"]
    assert read_manifest(resolve(str(tmp_path / "out"))).complete


def test_resume_scores_error_rows_again_and_keeps_the_new_score(cfg, tmp_path):
    parquet, first = claim(cfg)
    failed = rows(["a.png"]).set_column(2, "predicted_class", pa.array([-1], pa.int64())) \
        .set_column(5, "error", pa.array(["read failed: timed out"]))
    pq.write_table(pa.concat_tables([failed, rows(["b.png"])]), str(Path(parquet.path) / f"{first.run_id}_0_000000.parquet"))
    parquet, second = claim(cfg, resume=True)
    assert _existing_rows(_parts(parquet, second)) == {"b.png"}  # the error row is tried again
    write_part(parquet, second.run_id, ["a.png"], tag="1")
    summary = done(cfg, second.run_id, ["a.png", "b.png"])
    assert summary["errors"] == 0 and summary["scored"] == 2
    table = pq.read_table(parquet.path).sort_by("path")
    assert table.column("path").to_pylist() == ["a.png", "b.png"] and table.column("predicted_class").to_pylist() == [1, 1]


def test_a_lost_row_is_a_one_line_error_naming_the_output(cfg, tmp_path):
    parquet, man = claim(cfg)
    write_part(parquet, man.run_id, ["a.png"])
    with pytest.raises(MissingRowsError, match=f"1 file.*{tmp_path / 'out'}.*--resume"):
        done(cfg, man.run_id, ["a.png", "b.png"])


def test_only_a_part_that_is_not_parquet_is_removed_on_resume(cfg, monkeypatch):
    parquet, man = claim(cfg)
    write_part(parquet, man.run_id, ["a.png"])
    cut = Path(parquet.path) / f"{man.run_id}_cut_000000.parquet"
    cut.write_bytes(b"PAR1 half a file")
    write_part(parquet, man.run_id, ["b.png"], tag="footer")
    footer = Path(parquet.path) / f"{man.run_id}_footer_000000.parquet"
    data = bytearray(footer.read_bytes())
    for i in range(len(data) - 40, len(data) - 8):  # a corrupt footer: an OSError without errno
        data[i] ^= 0xFF
    footer.write_bytes(bytes(data))
    assert _existing_rows(_parts(parquet, man)) == {"a.png"}
    assert not cut.exists() and not footer.exists()
    # a read that fails for another reason (permissions, I/O) deletes nothing
    denied = PermissionError(13, "Permission denied")
    monkeypatch.setattr(pq, "read_table", lambda *a, **k: (_ for _ in ()).throw(denied))
    with pytest.raises(PermissionError):
        _existing_rows(_parts(parquet, man))
    assert len(_parts(parquet, man)) == 1


def test_leftovers_of_killed_writes_do_not_block_the_folder(cfg, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / f"{MANIFEST_FILE}.tmp4242").write_text('{"writer": "artifact-core scor')  # killed first claim
    _, man = claim(cfg)
    assert sorted(p.name for p in out.iterdir()) == sorted([MANIFEST_FILE, PARQUET_DIR])
    (out / "predictions.csv.tmp77").write_bytes(b"x" * 1000)  # killed CSV write
    (out / "notes.tmp1").write_text("not ours")
    claim(cfg, overwrite=True)
    names = sorted(p.name for p in out.iterdir())
    assert "predictions.csv.tmp77" not in names and "notes.tmp1" in names


@pytest.mark.parametrize("content", ["null", "[]", "3"])
def test_a_manifest_that_is_not_an_object_is_a_conflict_not_a_traceback(tmp_path, content):
    out = tmp_path / "out"
    out.mkdir()
    (out / MANIFEST_FILE).write_text(content)
    with pytest.raises(OutputConflictError, match="not a scoring manifest"):
        read_manifest(resolve(str(out)))


def test_owned_entries_are_what_a_run_writes_in_the_order_it_writes_them():
    from artifact_core.scoring import CSV_FILE, HIST_FILE, REPORT_DIR, SUMMARY_FILE

    # --overwrite deletes them in reverse: the page, summary and CSV before the rows they came from
    assert OWNED_ENTRIES == (PARQUET_DIR, CSV_FILE, SUMMARY_FILE, HIST_FILE, REPORT_DIR, f"{REPORT_DIR}.tmp")


def test_an_overwrite_cut_short_leaves_an_unfinished_claim_not_the_old_complete_one(cfg, tmp_path, monkeypatch):
    from artifact_core.storage import Location

    parquet, man = claim(cfg)
    write_part(parquet, man.run_id, ["a.png", "b.png"])
    done(cfg, man.run_id, ["a.png", "b.png"])
    out = tmp_path / "out"
    (out / "report").mkdir()
    (out / "report" / "index.html").write_text("the old run's page")
    assert read_manifest(resolve(str(out))).complete
    removed = []
    real_remove = Location.remove

    def remove(self, first=()):
        if self.path.endswith(PARQUET_DIR):
            raise OSError("throttled")  # an object store gives up on the rows half-way
        removed.append(self.path.rsplit("/", 1)[-1])
        real_remove(self, first)

    monkeypatch.setattr(Location, "remove", remove)
    with pytest.raises(OSError, match="throttled"):
        claim(ScoreConfig(**{**cfg.__dict__}), overwrite=True)
    after = read_manifest(resolve(str(out)))
    assert not after.complete and after.run_id != man.run_id and after.runs == [after.run_id]
    # what described the old run went first; its rows are no longer this output's (another run id)
    assert removed == ["report", "index.html", "confidence_hist.png", "summary.json", "predictions.csv"]  # (the page first)
    assert sorted(p.name for p in out.iterdir()) == sorted([MANIFEST_FILE, PARQUET_DIR])


def score_config(*argv: str) -> ScoreConfig:
    job = load_job("score")
    return score_from_args(job.get_args_parser().parse_args(list(argv)))[0]


@pytest.mark.parametrize("flag", ["--model", "--input", "--output"])
def test_an_empty_path_is_refused_not_replaced_by_the_demos(flag, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=f"{flag} must be a folder path or URI, got ''"):
        score_config(flag, "")


def test_the_demo_does_not_replace_the_scores_of_another_input(cfg, bundle_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    demo_out = tmp_path / DEMO_STORAGE / DEMO_RUN_NAME / "predictions"
    claim(cfg, output=str(demo_out))  # `score.py --input in` without --output: the demo's folder
    with pytest.raises(OutputConflictError, match="holds the scores of another input"):
        score_config()
    assert score_config("--overwrite").overwrite
    manifest = json.loads((demo_out / MANIFEST_FILE).read_text())
    manifest["identity"]["input"] = str(tmp_path / DEMO_STORAGE / "demo_data" / "test")
    (demo_out / MANIFEST_FILE).write_text(json.dumps(manifest))
    assert score_config().overwrite  # its own earlier output


def test_a_bad_labels_file_stops_the_job_before_ray_starts(tmp_path, monkeypatch):
    job = load_job("score")
    import artifact_core.raycluster as rc

    monkeypatch.setattr(rc, "ensure_ray", lambda: pytest.fail("Ray started before the labels were checked"))
    args = job.get_args_parser().parse_args(["--model", "m", "--input", str(tmp_path), "--output",
                                             str(tmp_path / "o"), "--labels", str(tmp_path / "missing.csv")])
    with pytest.raises(FileNotFoundError, match="missing.csv"):
        job.main(args)


def test_unclaimed_output_is_refused_by_prepare_output_without_a_manifest(tmp_path):
    """(unchanged contract) a folder with user files and no manifest is never claimed."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("x")
    with pytest.raises(OutputConflictError, match="not empty"):
        prepare_output(resolve(str(out)), None, owned=list(OWNED_ENTRIES), resume=False, overwrite=True)


def test_after_a_conflict_resume_drops_the_parts_of_the_run_that_lost_the_folder(cfg, tmp_path):
    parquet, lost = claim(cfg)
    parquet, winner = claim(ScoreConfig(**{**cfg.__dict__}), overwrite=True)
    write_part(parquet, lost.run_id, ["a.png"])  # the first job went on writing after losing the claim
    write_part(parquet, winner.run_id, ["a.png", "b.png"])
    with pytest.raises(OutputConflictError):
        done(cfg, winner.run_id, ["a.png", "b.png"])
    (Path(parquet.path) / f"_{winner.run_id}_compacted.parquet").write_bytes(b"killed mid-write")
    parquet, resumed = claim(cfg, resume=True)
    assert _existing_rows(_parts(parquet, resumed, drop_foreign=True)) == {"a.png", "b.png"}
    assert sorted(p.name.split("_")[0] for p in Path(parquet.path).iterdir()) == [winner.run_id]
    assert done(cfg, resumed.run_id, ["a.png", "b.png"])["files"] == 2
    assert pq.read_table(parquet.path).num_rows == 2  # the folder reads as Parquet


def test_labels_as_a_float_column_writes_them_are_read_and_an_empty_file_is_refused(tmp_path):
    from artifact_core.scoring import read_labels

    labels = tmp_path / "l.csv"
    labels.write_text("filename,label\na.png,1.0\nb.png,0.0\nc.png, 1\n")
    assert read_labels(str(labels)) == [("a.png", 1), ("b.png", 0), ("c.png", 1)]
    labels.write_text("filename,label\n")
    with pytest.raises(ValueError, match="no data rows"):
        read_labels(str(labels))


def test_an_older_manifest_with_credentials_in_its_input_still_resumes(tmp_path):
    from artifact_core.score_output import ScoringIdentity, _differences
    from artifact_core.storage import redact_uri

    old = ScoringIdentity(input="s3://AK:SECRET@bucket/in?endpoint_override=localhost%3A9000", model="m",
                          model_sha256="x", threshold=0.5, image_size=32)
    new = ScoringIdentity(**{**old.__dict__, "input": redact_uri(old.input)})
    assert _differences(old, new) == []
    assert new.input == "s3://***@bucket/in?endpoint_override=localhost%3A9000"


def test_one_input_folder_however_its_uri_is_spelled_and_keyed(tmp_path):
    from artifact_core.score_output import ScoringIdentity, _differences
    from artifact_core.storage import redact_uri

    old = ScoringIdentity(input=redact_uri("s3://AK:SECRET@bucket/in/?scheme=http&endpoint_override=m%3A9000"),
                          model="m", model_sha256="x", threshold=0.5, image_size=32)
    # the key now in the environment, no trailing '/', the options in another order
    new = ScoringIdentity(**{**old.__dict__, "input": "s3://bucket/in?endpoint_override=m%3A9000&scheme=http"})
    assert _differences(old, new) == []
    other = ScoringIdentity(**{**old.__dict__, "input": "s3://bucket/in2?endpoint_override=m%3A9000&scheme=http"})
    assert len(_differences(old, other)) == 1


def test_resume_clears_what_a_killed_compaction_staged(cfg):
    parquet, first = claim(cfg)
    write_part(parquet, first.run_id, ["a.png", "b.png"])
    (Path(parquet.path) / f"_{first.run_id}_compacted.parquet").write_bytes(b"killed before its rename")
    parquet, resumed = claim(cfg, resume=True)
    _parts(parquet, resumed, drop_foreign=True)
    assert [p.name for p in Path(parquet.path).iterdir()] == [f"{first.run_id}_0_000000.parquet"]


def test_an_overwrite_that_does_not_fit_the_cluster_deletes_nothing(cfg, tmp_path, monkeypatch):
    from artifact_core import scoring
    from artifact_core.raycluster import ClusterTooSmallError

    parquet, man = claim(cfg)
    write_part(parquet, man.run_id, ["a.png", "b.png"])
    done(cfg, man.run_id, ["a.png", "b.png"])
    out = tmp_path / "out"
    before = sorted(p.name for p in out.iterdir())
    monkeypatch.setattr(scoring, "plan_pipeline", lambda *a, **k: scoring.PipelinePlan(
        mode="fused", num_actors=64, actor_cpus=1.0, engine_threads=1))

    def too_small(**kw):
        raise ClusterTooSmallError(f"scoring needs {kw['num_workers']} actors")

    monkeypatch.setattr(scoring, "check_fits", too_small)
    with pytest.raises(ClusterTooSmallError):
        scoring.run_scoring(ScoreConfig(**{**cfg.__dict__, "overwrite": True, "num_actors": 64}))
    assert sorted(p.name for p in out.iterdir()) == before
    kept = read_manifest(resolve(str(out)))
    assert kept.complete and kept.run_id == man.run_id


def test_the_review_page_is_written_only_while_the_run_holds_the_output(cfg, tmp_path):
    from artifact_core.report import report_after_scoring

    parquet, man = claim(cfg)
    write_part(parquet, man.run_id, ["a.png", "b.png"])
    summary = done(cfg, man.run_id, ["a.png", "b.png"])
    # another job takes the folder (--overwrite) while this one would build its page
    _, other = claim(ScoreConfig(**{**cfg.__dict__}), overwrite=True)
    out = tmp_path / "out"
    before = sorted(p.name for p in out.iterdir())
    with pytest.raises(OutputConflictError, match=f"run {other.run_id} holds it now"):
        report_after_scoring(ScoreConfig(**{**cfg.__dict__, "report": True}), dict(summary), run_id=man.run_id)
    assert sorted(p.name for p in out.iterdir()) == before and "summary.json" not in before


def test_a_resume_that_does_not_fit_the_cluster_unpublishes_nothing(cfg, tmp_path, monkeypatch):
    from artifact_core import scoring
    from artifact_core.raycluster import ClusterTooSmallError

    parquet, man = claim(cfg)
    a = str(tmp_path / "in" / "a.png")  # (rows carry the listed file's path)
    write_part(parquet, man.run_id, [a])
    (tmp_path / "in" / "b.png").unlink()
    done(cfg, man.run_id, [a])  # complete, then a new file arrives
    write_image(tmp_path / "in" / "c.png")
    out = tmp_path / "out"
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    planned = []

    def plan(cfg, todo, *a, **k):
        planned.append(sorted(os.path.basename(p) for p in todo))
        return scoring.PipelinePlan(mode="fused", num_actors=64, actor_cpus=1.0, engine_threads=1)

    monkeypatch.setattr(scoring, "plan_pipeline", plan)
    monkeypatch.setattr(scoring, "check_fits", lambda **kw: (_ for _ in ()).throw(ClusterTooSmallError("too small")))
    with pytest.raises(ClusterTooSmallError):
        scoring.run_scoring(ScoreConfig(**{**cfg.__dict__, "resume": True, "num_actors": 64}))
    assert planned == [["c.png"]]  # only what is missing, counted before the claim
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    assert read_manifest(resolve(str(out))).complete


@pytest.mark.parametrize("flag", ["resume", "overwrite"])
def test_a_claim_deletes_the_old_review_page_before_its_images(cfg, tmp_path, flag, monkeypatch):
    """An object store deletes a folder in batches: a kill between them must leave no page,
    never a page whose images are gone. (Order recorded on a store that is not local.)"""
    import pyarrow.fs as pafs

    from artifact_core.storage import Location

    parquet, man = claim(cfg)
    write_part(parquet, man.run_id, ["a.png", "b.png"])
    done(cfg, man.run_id, ["a.png", "b.png"])
    page = tmp_path / "out" / "report"
    (page / "img").mkdir(parents=True, exist_ok=True)
    (page / "img" / "0.jpg").write_bytes(b"x")
    (page / "index.html").write_text("<html>")
    deleted: list[str] = []

    class Recording:  # the local disk seen as a store: deletes recorded in their order
        def __init__(self):
            self.inner = pafs.LocalFileSystem()

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def delete_file(self, path):
            deleted.append(path)
            self.inner.delete_file(path)

        def delete_dir(self, path):
            deleted.extend(sorted(str(p) for p in Path(path).rglob("*") if p.is_file()))
            self.inner.delete_dir(path)

    from artifact_core import scoring

    real_resolve = scoring.resolve

    def resolve_on_store(path):
        loc = real_resolve(path)
        return Location(Recording(), loc.path, loc.uri) if loc.path == str(tmp_path / "out") else loc

    monkeypatch.setattr(scoring, "resolve", resolve_on_store)
    claim(cfg, **{flag: True})
    page_files = [p for p in deleted if "/report/" in p]
    assert page_files and page_files[0].endswith("/report/index.html"), page_files
    assert not page.exists()


@pytest.mark.parametrize("ids", [("0" * 32, "f" * 32), ("f" * 32, "0" * 32)])
def test_a_file_that_still_fails_on_resume_shows_its_latest_reason(cfg, tmp_path, monkeypatch, ids):
    """Of two error rows of one file, the one shown is the later read's: its reason is the
    one that holds now (run ids are random, so rows are ordered by the manifest's runs)."""
    from types import SimpleNamespace

    from artifact_core import score_output

    # (the resume's parts sort after the first run's by name, then before them)
    fresh = iter(ids)
    monkeypatch.setattr(score_output.uuid, "uuid4", lambda: SimpleNamespace(hex=next(fresh)))

    def failed(reason: str) -> pa.Table:
        return rows(["a.png"]).set_column(2, "predicted_class", pa.array([-1], pa.int64())) \
            .set_column(5, "error", pa.array([reason]))

    parquet, first = claim(cfg)
    pq.write_table(pa.concat_tables([failed("read failed: timed out"), rows(["b.png"])]),
                   str(Path(parquet.path) / f"{first.run_id}_0_000000.parquet"))
    parquet, second = claim(cfg, resume=True)
    assert (first.run_id, second.run_id) == (ids[0][:12], ids[1][:12])
    pq.write_table(failed("truncated PNG"), str(Path(parquet.path) / f"{second.run_id}_0_000000.parquet"))
    summary = done(cfg, second.run_id, ["a.png", "b.png"])
    assert summary["errors"] == 1 and summary["error_examples"][0]["error"] == "truncated PNG"


def test_a_run_that_loses_the_folder_while_it_finalizes_publishes_nothing(cfg, tmp_path, monkeypatch):
    """Another job claims the folder (--overwrite deletes the derived files) while this one
    reads its rows: this run's CSV must not appear beside the new claim."""
    from artifact_core import scoring

    parquet, man = claim(cfg)
    write_part(parquet, man.run_id, ["a.png", "b.png"])
    real_write_csv = scoring.pacsv.write_csv

    def write_csv_while_another_job_claims(table, sink):
        real_write_csv(table, sink)
        claim(ScoreConfig(**{**cfg.__dict__}), overwrite=True)

    monkeypatch.setattr(scoring.pacsv, "write_csv", write_csv_while_another_job_claims)
    with pytest.raises(OutputConflictError, match="nothing was published"):
        done(cfg, man.run_id, ["a.png", "b.png"])
    assert not (tmp_path / "out" / "predictions.csv").exists()
    assert not (tmp_path / "out" / "summary.json").exists()


def test_a_summary_and_page_name_an_input_folder_that_is_not_utf8(bundle_dir, tmp_path):
    """summary.json keeps the folder's real name (it is read back to find the bundle); the page,
    which is UTF-8, shows undecodable bytes as \\xNN as the rows show file names (lone
    surrogates used to make writing the page fail)."""
    import os

    from artifact_core.report import render_page

    folder = os.fsdecode(os.fsencode(str(tmp_path)) + b"/caf\xe9")
    for name in ("a.png", "b.png"):
        write_image(Path(folder) / name)
    cfg = ScoreConfig(model=bundle_dir, input=folder, output=str(tmp_path / "out"))
    parquet, man = claim(cfg)
    write_part(parquet, man.run_id, ["a.png", "b.png"])
    done(cfg, man.run_id, ["a.png", "b.png"])
    summary = json.loads((tmp_path / "out" / "summary.json").read_text(encoding="utf-8"))
    assert summary["input"] == folder
    page = render_page(summary, [], [], n_flagged=0, errors=[], n_errors=0, has_hist=False)
    assert "caf\\xe9" in page
    page.encode("utf-8")
