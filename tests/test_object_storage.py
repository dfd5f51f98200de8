"""Every input and output in a bucket: train -> tune -> score against a real S3-protocol server.

The server is moto's standalone server on 127.0.0.1 (``moto[server]``), reached through
``AWS_ENDPOINT_URL`` the way a user points the jobs at MinIO or another S3-compatible
store. The variables reach Ray's workers, trial drivers and Data tasks through the job's
``runtime_env``, as ``ray job submit --runtime-env-json`` passes them on a cluster.
"""

from __future__ import annotations

import io
import json

import pyarrow.csv as pacsv
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from conftest import make_easy_folder, write_image

pytestmark = pytest.mark.ray

BUCKET = "artifact-core-test"
URI_SECRET = "secret-only-in-the-uri"


def _listing(fs: pafs.FileSystem, prefix: str) -> set[str]:
    infos = fs.get_file_info(pafs.FileSelector(prefix, recursive=True, allow_not_found=True))
    return {i.path[len(prefix) + 1:] for i in infos if i.type == pafs.FileType.File}


def test_train_tune_score_with_everything_in_a_bucket(ray_session, s3_server, tmp_path, monkeypatch,
                                                      backbone_weights):
    import ray

    from artifact_core.config import TrainConfig
    from artifact_core.scoring import ScoreConfig, run_scoring
    from artifact_core.storage import redact_uri
    from artifact_core.trainer import run_training
    from artifact_core.tuning import SweepConfig, run_sweep

    env = {"AWS_ENDPOINT_URL": s3_server, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.chdir(tmp_path)  # a URI mistaken for a local path would show up here as ./s3:
    fs = pafs.S3FileSystem(endpoint_override=s3_server, scheme="http", access_key="testing", secret_key="testing",
                           region="us-east-1", allow_bucket_creation=True)
    fs.create_dir(BUCKET)
    make_easy_folder(tmp_path / "local" / "train", n=24)
    test_dir = tmp_path / "local" / "test"
    for i in range(5):
        write_image(test_dir / f"face_{i}.png", color=(40 * i, 100, 90))
    (test_dir / "broken.png").write_text("not an image")
    pafs.copy_files(str(tmp_path / "local"), f"{BUCKET}/data", destination_filesystem=fs)

    data = f"s3://{BUCKET}/data/train"
    # The runs' URI also names the store in its options and carries credentials (as users of
    # MinIO write it): every path the jobs join onto it (run folder, bundle, trials) must keep
    # both, and the secret must stay out of every file the jobs write for others.
    options = f"endpoint_override={s3_server.removeprefix('http://')}&scheme=http"
    runs = f"s3://testing:{URI_SECRET}@{BUCKET}/runs?{options}"
    ray.shutdown()  # reconnect as a job whose workers, actors and tasks get the S3 variables
    ray.init(address=ray_session["address"], runtime_env={"env_vars": env})
    try:
        small = dict(data_dir=data, storage_path=runs, num_workers=2, cpus_per_worker=1, batch_size=8,
                     image_size=32, head_epochs=1, finetune_epochs=1, weights=backbone_weights, patience=0,
                     max_failures=0, val_fraction=0.25)
        summary = run_training(TrainConfig(name="exp", **small))
        assert summary.bundle_dir == f"s3://testing:{URI_SECRET}@{BUCKET}/runs/exp/model?{options}"
        in_run = _listing(fs, f"{BUCKET}/runs/exp")
        assert {"run_config.json", "split.json", "model/model.pt", "model/config.json", "model/metrics.json",
                "model/learning_curves.png", "model/model.onnx", "model/model.int8.onnx"} <= in_run
        # int8 calibrated on the validation images, read from the bucket
        assert summary.metrics["onnx"]["int8"]["calibration_images"] > 0, summary.metrics["onnx"]
        assert any(p.startswith("checkpoint_") and p.endswith("/model.pt") for p in in_run), sorted(in_run)
        assert [h["epoch"] for h in summary.metrics["history"]] == [1, 2]

        sweep = run_sweep(SweepConfig(base=TrainConfig(name="sweep", **small), num_samples=1, lrs=[1e-2],
                                      unfreeze_depths=[1], scheduler="none", max_concurrent_trials=1))
        in_sweep = _listing(fs, f"{BUCKET}/runs/sweep")
        assert {"results.csv", "best_config.json", "tune_results.png", "model/model.pt", "run_config.json"} <= in_sweep
        with fs.open_input_stream(f"{BUCKET}/runs/sweep/results.csv") as f:
            table = pacsv.read_csv(io.BytesIO(f.read())).to_pydict()
        assert table["status"] == ["completed"] and table["epochs"] == [2]
        with fs.open_input_stream(f"{BUCKET}/runs/sweep/best_config.json") as f:
            assert json.loads(f.read())["params"]["lr"] == pytest.approx(1e-2)
        assert sweep["bundle_dir"] == f"s3://testing:{URI_SECRET}@{BUCKET}/runs/sweep/model?{options}"

        out = f"s3://{BUCKET}/preds/exp"
        scored = run_scoring(ScoreConfig(model=summary.bundle_dir, input=f"s3://{BUCKET}/data/test", output=out,
                                         num_actors=1, batch_size=4))
        assert scored["files"] == 6 and scored["errors"] == 1 and scored["model"] == redact_uri(summary.bundle_dir)
        assert scored["engine"] == "onnx"  # auto: the bundle's ONNX model, on CPU
        in_out = _listing(fs, f"{BUCKET}/preds/exp")
        assert {"predictions.csv", "summary.json", "scoring_manifest.json"} <= in_out
        parts = [p for p in in_out if p.startswith("predictions.parquet/") and p.endswith(".parquet")]
        rows = sum(pq.read_table(f"{BUCKET}/preds/exp/{p}", filesystem=fs).num_rows for p in parts)
        assert rows == 6
        shared = ["runs/exp/model/config.json", "runs/exp/model/metrics.json", "runs/sweep/best_config.json",
                  "runs/sweep/model/config.json", "preds/exp/summary.json", "preds/exp/scoring_manifest.json"]
        for name in shared + [f"preds/exp/{p}" for p in in_out if p.endswith(".html")]:
            with fs.open_input_stream(f"{BUCKET}/{name}") as f:
                assert URI_SECRET not in f.read().decode(), f"the URI's secret key was written to {name}"
    finally:
        ray.shutdown()  # the next test reconnects without these variables
    assert not any(p.name.startswith("s3:") for p in tmp_path.iterdir()), "a URI was written as a local path"
