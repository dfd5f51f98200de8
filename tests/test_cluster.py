"""A real two-node Ray cluster on this machine: train over both nodes and score, via `ray job submit`
(the job scripts end to end as a cluster user runs them).

Run alone with ``pytest -m cluster``. The cluster is stopped even when the test fails.
"""

from __future__ import annotations

import json
import subprocess
import tempfile

import pytest

from conftest import REPO, RAY_BIN, make_easy_folder, start_cluster, stop_cluster, write_image

pytestmark = [pytest.mark.ray, pytest.mark.cluster]


@pytest.fixture
def two_nodes():
    state = tempfile.mkdtemp(prefix="lc", dir="/tmp")
    cluster = start_cluster(state, port_base=6700, head_cpus=1, worker_cpus=1)
    try:
        yield cluster
    finally:
        stop_cluster(cluster["env"])
        left = subprocess.run(["pgrep", "-f", state], capture_output=True, text=True).stdout.split()
        assert not left, f"cluster processes left running: {left}"


def submit(cluster: dict, args: list[str]) -> subprocess.CompletedProcess:
    cmd = [RAY_BIN, "job", "submit", "--address", cluster["dashboard"], "--working-dir", str(REPO),
           "--runtime-env", str(REPO / "cluster" / "runtime_env.yaml"), "--", "python", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=cluster["env"], timeout=600, cwd=REPO)


def test_train_spreads_over_two_nodes_then_score(two_nodes, tmp_path):
    status = subprocess.run([RAY_BIN, "status", "--address", two_nodes["address"]], capture_output=True,
                            text=True, env=two_nodes["env"])
    assert status.stdout.count("node_") >= 2, status.stdout

    data = make_easy_folder(tmp_path / "train", n=24)
    runs = tmp_path / "runs"  # one machine: a local folder is the shared storage both nodes see
    train = submit(two_nodes, ["jobs/train.py", "--data-dir", str(data), "--storage-path", str(runs), "--name", "mn",
                               "--num-workers", "2", "--cpus-per-worker", "1", "--image-size", "32", "--batch-size", "8",
                               "--head-epochs", "1", "--finetune-epochs", "1", "--weights", "none",
                               "--head", "global"])  # the previous model, end to end through the CLI
    assert train.returncode == 0, train.stdout[-3000:] + train.stderr[-3000:]
    assert "model bundle:" in train.stdout and "succeeded" in train.stdout
    assert json.loads((runs / "mn" / "model" / "config.json").read_text())["head"] == "global"
    metrics = json.loads((runs / "mn" / "model" / "metrics.json").read_text())
    node_ids = metrics["history"][-1]["node_ids"]
    assert len(node_ids) == 2, f"workers ran on {node_ids}: not spread over both nodes"

    test = tmp_path / "test"
    for i in range(5):
        write_image(test / f"image_{i}.png", color=(40 * i, 90, 90))
    (test / "broken.png").write_bytes(b"not an image")
    score = submit(two_nodes, ["jobs/score.py", "--model", str(runs / "mn" / "model"), "--input", str(test),
                               "--output", str(tmp_path / "preds"), "--num-actors", "1", "--batch-size", "2"])
    assert score.returncode == 0, score.stdout[-3000:] + score.stderr[-3000:]
    assert "scored 6 file(s)" in score.stdout and "report:" in score.stdout
    rows = (tmp_path / "preds" / "predictions.csv").read_text().strip().splitlines()
    assert len(rows) == 7 and sum("broken.png" in r for r in rows) == 1
    assert (tmp_path / "preds" / "report" / "index.html").exists()
