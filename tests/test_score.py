"""Ray Data scoring: one row per file, error rows for broken files, resume, agreement with the model."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from PIL import Image

from artifact_core.export_onnx import export_onnx
from artifact_core.predict import ArtifactPredictor, predict_paths
from artifact_core.score_output import OutputConflictError
from artifact_core.scoring import ScoreConfig, run_scoring
from conftest import REPO, write_image

pytestmark = pytest.mark.ray

BROKEN = {"empty.png", "truncated.jpg", "text.png", "bomb.png"}


def hostile_folder(root) -> set[str]:
    """Good, odd-but-valid and broken files; returns the relative names that must get rows."""
    names = []
    for i, color in enumerate([(200, 30, 30), (30, 200, 30), (30, 30, 200), (120, 120, 120)]):
        names.append(write_image(root / f"good_{i}.png", color=color).name)
    names.append(write_image(root / "UPPER.PNG").relative_to(root).as_posix())
    names.append(write_image(root / "sub" / "deep" / "photo.JPG", fmt="JPEG").relative_to(root).as_posix())
    names.append(write_image(root / "rgba.png", mode="RGBA").name)
    names.append(write_image(root / "grey.png", mode="L").name)
    names.append(write_image(root / "palette.png", mode="P").name)
    names.append(write_image(root / "cmyk.jpg", mode="CMYK", fmt="JPEG").name)
    Image.fromarray(np.arange(48 * 48, dtype=np.uint16).reshape(48, 48) * 20).save(root / "deep16.png")
    names.append("deep16.png")
    (root / "empty.png").write_bytes(b"")
    jpg = write_image(root / "truncated.jpg", size=128, fmt="JPEG")
    jpg.write_bytes(jpg.read_bytes()[:300])
    (root / "text.png").write_text("not an image at all")
    Image.new("L", (8100, 8100)).save(root / "bomb.png")  # 65.6 MP > the 64 MP limit
    names += sorted(BROKEN)
    (root / "notes.txt").write_text("ignored: not an image extension")
    return set(names)


@pytest.mark.parametrize("pipeline", ["split", "fused"])
def test_score_hostile_folder_then_resume(ray_session, bundle_dir, tmp_path, pipeline):
    src = tmp_path / "in"
    expected = hostile_folder(src)
    out = tmp_path / "out"
    cfg = ScoreConfig(model=bundle_dir, input=str(src), output=str(out), batch_size=4, num_actors=1, pipeline=pipeline)
    summary = run_scoring(cfg)
    assert summary["pipeline"]["mode"] == pipeline

    csv = pd.read_csv(out / "predictions.csv", keep_default_na=False)
    assert list(csv.columns) == ["filename", "path", "predicted_class", "confidence", "prob_artifact_free", "error"]
    assert sorted(csv["filename"]) == sorted(expected) and csv["filename"].is_unique
    assert summary["files"] == len(expected) and summary["errors"] == len(BROKEN)
    errors = csv[csv["error"] != ""]
    assert set(errors["filename"]) == BROKEN
    assert (errors["predicted_class"] == -1).all()
    good = csv[csv["error"] == ""]
    assert set(good["predicted_class"]) <= {0, 1}
    prob = good["prob_artifact_free"].astype(float)
    conf = good["confidence"].astype(float)
    assert np.allclose(conf, np.where(good["predicted_class"] == 1, prob, 1 - prob))
    assert all(os.path.isabs(p) and os.path.exists(p) for p in csv["path"])

    # Parquet and CSV agree; types are right
    table = pq.read_table(out / "predictions.parquet")
    assert table.schema.field("predicted_class").type.bit_width == 64
    pq_df = table.to_pandas().sort_values("filename").reset_index(drop=True)
    assert len(pq_df) == len(csv)
    assert list(pq_df["filename"]) == list(csv["filename"])
    assert np.allclose(pq_df["prob_artifact_free"], csv["prob_artifact_free"].astype(float), equal_nan=True)

    # the actor's probabilities are the in-process model's
    predictor = ArtifactPredictor(bundle_dir)
    assert prob.std() > 1e-3, "scores do not vary: the comparison would prove nothing"
    assert np.allclose(predict_paths(predictor, list(good["path"])), prob, atol=1e-5)

    s = json.loads((out / "summary.json").read_text())
    assert s["files"] == len(expected) and s["threshold"] == 0.5 and s["images_per_second"] > 0
    assert s["engine"] == "torch" and s["precision"] == "fp32"  # auto: the bundle has no model.onnx
    assert (out / "confidence_hist.png").exists()

    # an existing output is refused without --resume/--overwrite
    with pytest.raises(OutputConflictError, match="--resume"):
        run_scoring(ScoreConfig(model=bundle_dir, input=str(src), output=str(out)))

    if pipeline == "split":
        return  # --resume picks the missing files before the pipeline is built: checked once, fused
    # a crash left a corrupt part and new files arrived: --resume scores only what is missing,
    # and tries the error rows again (a read may have failed for a passing reason)
    run_id = json.loads((out / "scoring_manifest.json").read_text())["run_id"]
    (out / "predictions.parquet" / f"{run_id}_zz_partial.parquet").write_bytes(b"PAR1 truncated")
    new = {write_image(src / f"new_{i}.png", color=(10 * i, 90, 90)).name for i in range(3)}
    cfg = ScoreConfig(model=bundle_dir, input=str(src), output=str(out), batch_size=4, num_actors=1, resume=True,
                      pipeline=pipeline)
    resumed = run_scoring(cfg)
    assert resumed["scored_this_run"] == 3 + len(BROKEN) and resumed["errors"] == len(BROKEN)
    csv2 = pd.read_csv(out / "predictions.csv", keep_default_na=False)
    assert sorted(csv2["filename"]) == sorted(expected | new) and csv2["filename"].is_unique
    old = csv2[csv2["filename"].isin(good["filename"])].set_index("filename")["prob_artifact_free"].astype(float)
    assert np.allclose(old.sort_index(), good.set_index("filename")["prob_artifact_free"].astype(float).sort_index())


def test_threshold_override_and_overwrite(ray_session, bundle_dir, tmp_path):
    src = tmp_path / "in"
    for i in range(5):
        write_image(src / f"x{i}.png", color=(40 * i, 100, 60))
    out = tmp_path / "out"
    # a pyarrow filesystem URI works as --input as well as a plain path
    s = run_scoring(ScoreConfig(model=bundle_dir, input=f"file://{src}", output=str(out), threshold=0.0, num_actors=1))
    assert s["predicted"]["1 (artifact-free)"] == 5 and s["threshold"] == 0.0
    assert sorted(pd.read_csv(out / "predictions.csv")["filename"]) == [f"x{i}.png" for i in range(5)]
    s = run_scoring(ScoreConfig(model=bundle_dir, input=str(src), output=str(out), threshold=1.01,
                                num_actors=1, overwrite=True))
    assert s["predicted"]["0 (artifact)"] == 5


def test_bad_inputs(ray_session, bundle_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        run_scoring(ScoreConfig(model=bundle_dir, input=str(tmp_path / "missing"), output=str(tmp_path / "o")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no image files"):
        run_scoring(ScoreConfig(model=bundle_dir, input=str(tmp_path / "empty"), output=str(tmp_path / "o")))
    with pytest.raises(FileNotFoundError, match="model bundle"):
        run_scoring(ScoreConfig(model=str(tmp_path / "nobundle"), input=str(tmp_path / "empty"), output=str(tmp_path / "o")))
    shutil.rmtree(tmp_path / "empty")
    # an engine the bundle cannot run fails before any output exists
    with pytest.raises(FileNotFoundError, match="model.onnx"):
        run_scoring(ScoreConfig(model=bundle_dir, input=str(tmp_path), output=str(tmp_path / "o2"), engine="onnx"))
    with pytest.raises(ValueError, match="int8"):
        run_scoring(ScoreConfig(model=bundle_dir, input=str(tmp_path), output=str(tmp_path / "o2"),
                                precision="int8", use_gpu=True))
    assert not (tmp_path / "o2").exists()


def test_onnx_scoring_job_equals_torch_and_its_driver_never_imports_torch(ray_session, bundle_dir, tmp_path):
    """jobs/score.py as a user runs it (a fresh driver on the cluster, review page on): the fused
    ONNX lanes score what the torch model scores, and the driver never imports torch."""
    onnx_bundle = str(tmp_path / "bundle")
    shutil.copytree(bundle_dir, onnx_bundle)
    export_onnx(onnx_bundle)
    src = tmp_path / "in"
    for i, color in enumerate([(200, 30, 30), (30, 200, 30), (30, 30, 200), (120, 120, 120)]):
        write_image(src / f"p{i}.png", color=color)
    rng = np.random.default_rng(0)
    for i in range(3):  # large JPEGs: decoded at reduced scale by the actor's decode tasks
        Image.fromarray(rng.normal(120, 50, (200 + 30 * i, 180, 3)).clip(0, 255).astype(np.uint8)).save(src / f"j{i}.jpg")
    (src / "broken.jpg").write_bytes(b"nope")
    out = tmp_path / "out"
    args = ["--model", onnx_bundle, "--input", str(src), "--output", str(out), "--batch-size", "4", "--report"]
    code = ("import runpy, sys\n"
            f"sys.argv = ['jobs/score.py', *{args!r}]\n"
            "try:\n"
            "    runpy.run_path('jobs/score.py', run_name='__main__')\n"
            "except SystemExit as e:\n"
            "    assert not e.code, e.code\n"
            "print('TORCH_IMPORTED', sorted(m for m in ('torch', 'torchvision') if m in sys.modules))\n")
    env = {**ray_session["env"], "RAY_ADDRESS": ray_session["address"]}
    job = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
    assert "TORCH_IMPORTED []" in job.stdout, job.stdout[-2000:]
    s = json.loads((out / "summary.json").read_text())
    assert s["engine"] == "onnx" and s["precision"] == "fp32" and s["errors"] == 1  # auto on CPU
    plan = s["pipeline"]  # auto: chosen from the costs measured on the driver, recorded
    assert plan["mode"] in ("fused", "split") and plan["decode_ms"] > 0 and plan["inference_ms"] > 0
    assert plan["estimate_fused"] >= plan["estimate_split"] > 0
    if plan["mode"] == "fused":  # the session cluster's node has 2 CPUs: a lane per core
        assert plan["lanes"] == 2 and plan["engine_threads"] == 1
    assert s["report"]["path"] and (out / "report" / "index.html").exists()  # Grad-CAM ran in its actors
    csv = pd.read_csv(out / "predictions.csv", keep_default_na=False)
    good = csv[csv["error"] == ""]
    prob = good["prob_artifact_free"].astype(float).to_numpy()
    assert prob.std() > 1e-3
    torch_prob = predict_paths(ArtifactPredictor(onnx_bundle, engine="torch"), list(good["path"]))
    np.testing.assert_allclose(prob, torch_prob, atol=1e-4, rtol=0)


def test_fused_plan_gives_onnx_a_lane_per_core_up_to_a_cap(monkeypatch):
    import artifact_core.scoring as scoring

    monkeypatch.setattr(scoring, "resolve_engine", lambda *a, **k: "onnx")
    cfg = ScoreConfig(model="m", input="i", output="o", pipeline="fused")
    for cpus, lanes, threads in ((2, 2, 1), (3, 3, 1), (16, scoring.MAX_LANES, 16 // scoring.MAX_LANES)):
        monkeypatch.setattr(scoring, "_node_cpus", lambda cpus=cpus: [cpus])
        plan = scoring.plan_pipeline(cfg, ["a.png"], None, 224)
        assert (plan.mode, plan.num_actors, plan.actor_cpus) == ("fused", 1, cpus - 1)
        assert (plan.lanes, plan.engine_threads) == (lanes, threads)
    monkeypatch.setattr(scoring, "resolve_engine", lambda *a, **k: "torch")  # one engine, every core
    plan = scoring.plan_pipeline(cfg, ["a.png"], None, 224)
    assert (plan.lanes, plan.engine_threads) == (1, 16)
    # each lane beyond the first reserves its session's memory, by the input's pixels
    assert scoring.lane_memory_mb(448) > scoring.LANE_MIB_AT_448 >= 4 * (scoring.lane_memory_mb(224) - 1)


def test_fused_gpu_plan_gives_each_gpu_an_actor_and_a_share_of_its_node(monkeypatch):
    import artifact_core.scoring as scoring

    cfg = ScoreConfig(model="m", input="i", output="o", pipeline="fused", use_gpu=True)
    # a small CPU-only head node beside two GPU nodes: the GPU nodes' cores set the threads
    monkeypatch.setattr(scoring, "_node_cpus", lambda: [4, 32, 32])
    monkeypatch.setattr(scoring, "_gpu_nodes", lambda: [(32, 4), (32, 4)])
    plan = scoring.plan_pipeline(cfg, ["a.png"], None, 224)
    # 8 actors, 4 on a node: 31 cores (one left to the writes) shared, each reserving its threads
    assert (plan.num_actors, plan.decode_threads, plan.actor_cpus) == (8, 7, 7.0)
    monkeypatch.setattr(scoring, "_gpu_nodes", lambda: [(8, 1)])
    monkeypatch.setattr(scoring, "_node_cpus", lambda: [8])
    plan = scoring.plan_pipeline(cfg, ["a.png"], None, 224)
    assert (plan.num_actors, plan.decode_threads, plan.actor_cpus) == (1, 7, 7.0)


def test_pipeline_estimates():
    from artifact_core.scoring import _estimates
    # inference-bound (ONNX at 224 px, 512² JPEG): one decode core would idle half the time
    fused, split, actors = _estimates(2, 2.0, 10.0)
    assert (round(fused), round(split), actors) == (167, 100, 1)
    # 16 cores, decode-heavy: a 13/3 split is balanced, within 2 % of fused
    fused, split, actors = _estimates(16, 23.0, 5.0)
    assert actors == 3 and split / fused > 0.98
    assert _estimates(1, 5.0, 5.0)[1] == 0.0  # one core cannot be split
