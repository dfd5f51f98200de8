"""Jobs on a cluster that starts with no worker nodes: they wait, and run once a node joins.

Two ways a cluster grows: a worker node started by hand while the job waits
(``--wait-for-resources``), and a real Ray autoscaler (Ray's fake multi-node provider, the
one Ray's own autoscaler tests use) that launches a worker node because the job asked for
it. Each test starts its own cluster (own temp dir and ports) and stops exactly its processes,
also on failure; it never touches other Ray clusters on the machine.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from conftest import REPO, make_easy_folder, start_cluster, stop_cluster, wait_for, write_image

pytestmark = [pytest.mark.ray, pytest.mark.cluster]

# Port blocks (BASE..BASE+299) apart from the session cluster (6400) and test_cluster.py (6700).
MANUAL_PORT_BASE = 7000
AUTOSCALE_PORT_BASE = 7400


def fake_autoscaling_config(port_base: int) -> dict:
    """A cluster-launcher config for Ray's fake multi-node provider: a 0-CPU head and one 2-CPU
    worker type with 0..1 nodes, launched as real Ray nodes on this machine."""
    return {
        "cluster_name": "artifact-core-fake", "max_workers": 1, "upscaling_speed": 1.0,
        "idle_timeout_minutes": 5, "auth": {}, "docker": {},
        "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                     "disable_launch_config_check": True, "gcs_address": f"127.0.0.1:{port_base}"},
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0},
            "cpu_node": {"resources": {"CPU": 2}, "node_config": {}, "min_workers": 0, "max_workers": 1},
        },
        "head_node_type": "ray.head.default",
        **{k: [] for k in ("initialization_commands", "setup_commands", "head_setup_commands",
                           "worker_setup_commands", "head_start_ray_commands", "worker_start_ray_commands",
                           "cluster_synced_files", "rsync_exclude", "rsync_filter")},
        "file_mounts": {}, "file_mounts_sync_continuously": False,
    }


def _stop(cluster: dict, state: str) -> None:
    stop_cluster(cluster["env"])
    left = subprocess.run(["pgrep", "-f", state], capture_output=True, text=True).stdout.split()
    assert not left, f"cluster processes left running: {left}"
    shutil.rmtree(state, ignore_errors=True)


@pytest.fixture
def empty_cluster():
    """A head with 0 CPUs and no worker node; no autoscaler."""
    state = tempfile.mkdtemp(prefix="as", dir="/tmp")
    cluster = start_cluster(state, port_base=MANUAL_PORT_BASE, head_cpus=0, worker_cpus=0)
    try:
        yield cluster
    finally:
        _stop(cluster, state)


@pytest.fixture
def autoscaling_cluster():
    """A 0-CPU head whose autoscaler (fake multi-node provider) may add one 2-CPU node."""
    state = tempfile.mkdtemp(prefix="af", dir="/tmp")
    config = Path(state) / "autoscaler.json"
    config.write_text(json.dumps(fake_autoscaling_config(AUTOSCALE_PORT_BASE)))
    extra = {"LC_AUTOSCALING_CONFIG": str(config), "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1"}
    old = {k: os.environ.get(k) for k in extra}
    os.environ.update(extra)  # start_cluster passes the environment on to `ray start`
    try:
        cluster = start_cluster(state, port_base=AUTOSCALE_PORT_BASE, head_cpus=0, worker_cpus=0)
    finally:
        for k, v in old.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    try:
        yield cluster
    finally:
        _stop(cluster, state)


def launch(cluster: dict, args: list[str], log: Path) -> subprocess.Popen:
    """A job driver attached to ``cluster`` (RAY_ADDRESS explicit), in its own process group."""
    env = {**cluster["env"], "RAY_ADDRESS": cluster["address"], "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO)}
    env.pop("RAY_FAKE_CLUSTER", None)
    return subprocess.Popen([sys.executable, *args], env=env, cwd=REPO, stdout=log.open("w"),
                            stderr=subprocess.STDOUT, start_new_session=True)


def finish(job: subprocess.Popen, log: Path, timeout: float) -> str:
    try:
        job.wait(timeout=timeout)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
            job.wait()
    out = log.read_text()
    assert job.returncode == 0, out[-4000:]
    return out


def test_job_waits_until_a_worker_node_is_started_by_hand(empty_cluster, tmp_path):
    from artifact_core.bundle import BundleConfig, save_bundle
    from artifact_core.model import build_model

    bundle = save_bundle(str(tmp_path / "model"), build_model(weights="none"), BundleConfig(image_size=32))
    for i in range(6):
        write_image(tmp_path / "in" / f"image_{i}.png", color=(30 * i, 90, 90))
    log = tmp_path / "score.log"
    job = launch(empty_cluster, ["jobs/score.py", "--model", bundle, "--input", str(tmp_path / "in"),
                                 "--output", str(tmp_path / "out"), "--batch-size", "4",
                                 "--wait-for-resources", "120"], log)
    try:
        # the job found the cluster too small (0 CPUs) and waits instead of failing
        assert wait_for(lambda: "waiting up to 120s" in log.read_text() or job.poll() is not None, timeout=60), \
            log.read_text()[-3000:]
        assert job.poll() is None, log.read_text()[-3000:]
        env = {**empty_cluster["env"], "LC_WORKER_CPUS": "2"}
        added = subprocess.run(["bash", str(REPO / "cluster" / "local_cluster.sh"), "add-worker"], env=env,
                               capture_output=True, text=True, timeout=120)
        assert added.returncode == 0, added.stdout + added.stderr
    finally:
        out = finish(job, log, timeout=150)
    assert "resources arrived" in out
    rows = (tmp_path / "out" / "predictions.csv").read_text().strip().splitlines()
    assert len(rows) == 7  # header + one row per image


def test_autoscaler_launches_a_node_for_training(autoscaling_cluster, tmp_path, backbone_weights):
    data = make_easy_folder(tmp_path / "train", n=16, size=32)
    log = tmp_path / "train.log"
    # no --wait-for-resources: the job must find the autoscaler itself and wait by default
    job = launch(autoscaling_cluster, ["jobs/train.py", "--data-dir", str(data), "--storage-path", str(tmp_path / "runs"),
                                       "--name", "as", "--num-workers", "2", "--cpus-per-worker", "1",
                                       "--image-size", "32", "--batch-size", "8", "--head-epochs", "1",
                                       "--finetune-epochs", "0", "--weights", backbone_weights], log)
    out = finish(job, log, timeout=240)
    assert "asked the autoscaler" in out and "resources arrived" in out, out[-3000:]
    metrics = json.loads((tmp_path / "runs" / "as" / "model" / "metrics.json").read_text())
    assert metrics["history"][-1]["world_size"] == 2
    status = subprocess.run([str(Path(sys.executable).parent / "ray"), "status", "--address", autoscaling_cluster["address"]],
                            capture_output=True, text=True, env=autoscaling_cluster["env"], timeout=60).stdout
    assert "cpu_node" in status, status  # the node the autoscaler launched for the job
