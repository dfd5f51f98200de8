"""Every cluster config loads, has the keys its tool needs, and pins the project's Ray version."""

from __future__ import annotations

import re
import tomllib

import pytest
import yaml

from conftest import REPO

CLUSTER = REPO / "cluster"


def ray_version() -> str:
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    pin = next(d for d in deps if d.startswith("ray["))
    return re.search(r"==([\d.]+)", pin).group(1)


def docs(path):
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def test_runtime_env():
    env = yaml.safe_load((CLUSTER / "runtime_env.yaml").read_text())
    assert env["working_dir"] == "."
    assert {".git/", ".venv/", "runs/", "data/"} <= set(env["excludes"])


def _pod_images(spec: dict) -> list[str]:
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    return [c["image"] for g in groups for c in g["template"]["spec"]["containers"]]


@pytest.mark.parametrize("name", ["raycluster.yaml", "rayjob-train.yaml"])
def test_kuberay_manifests(name):
    objs = docs(CLUSTER / "kuberay" / name)
    ray_objs = [o for o in objs if o["apiVersion"] == "ray.io/v1"]
    assert len(ray_objs) == 1
    obj = ray_objs[0]
    if obj["kind"] == "RayJob":
        assert "jobs/train.py" in obj["spec"]["entrypoint"] and "--storage-path /mnt/runs" in obj["spec"]["entrypoint"]
        assert obj["spec"]["shutdownAfterJobFinishes"] is True and obj["spec"]["ttlSecondsAfterFinished"] > 0
        spec = obj["spec"]["rayClusterSpec"]
    else:
        assert obj["kind"] == "RayCluster"
        spec = obj["spec"]
    assert spec["rayVersion"] == ray_version()
    assert spec["authOptions"]["mode"] == "token"
    gpu = spec["workerGroupSpecs"][0]
    assert gpu["minReplicas"] <= gpu["maxReplicas"]
    limits = gpu["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == "1"
    assert all(f":{ray_version()}-" in image for image in _pod_images(spec))
    mounts = [m["mountPath"] for c in spec["headGroupSpec"]["template"]["spec"]["containers"] for m in c["volumeMounts"]]
    assert "/mnt/runs" in mounts  # shared --storage-path


@pytest.mark.parametrize("name", ["aws-gpu.yaml", "local-onprem.yaml"])
def test_cluster_launcher(name):
    cfg = docs(CLUSTER / "launcher" / name)[0]
    for key in ("cluster_name", "provider", "available_node_types", "head_node_type", "head_start_ray_commands",
                "worker_start_ray_commands"):
        assert key in cfg, key
    assert cfg["head_node_type"] in cfg["available_node_types"]
    assert cfg["docker"]["image"].startswith(f"rayproject/ray:{ray_version()}-")
    assert cfg["provider"]["type"] == ("aws" if name.startswith("aws") else "local")
    assert all("RAY_AUTH_MODE=token" in c for c in cfg["head_start_ray_commands"] if "ray start" in c)


def test_dockerfile_pins_ray():
    assert f"rayproject/ray:{ray_version()}-" in (CLUSTER / "Dockerfile").read_text()
