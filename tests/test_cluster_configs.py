"""Every cluster config loads, has the keys its tool needs, and pins the project's Ray version."""

from __future__ import annotations

import copy
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
    assert {".git/", ".venv/", "runs/", "data/", "subtle/"} <= set(env["excludes"])


def test_every_job_submission_in_the_docs_uploads_the_project_without_its_data():
    """A `ray job submit ... -- python jobs/...` written in the docs names the runtime env file
    (the upload and its excludes), or a working dir with its own excludes: with neither,
    nothing is uploaded, or the whole folder (demo data, venv) against Ray's 512 MiB cap."""
    files = [REPO / "README.md", CLUSTER / "README.md", *sorted((REPO / "jobs").glob("*.py"))]
    found = 0
    for path in files:
        for cmd in re.findall(r"ray job submit[^`]*?-- (?:\\\n\s*)?python jobs/", path.read_text()):
            found += 1
            assert ("--runtime-env cluster/runtime_env.yaml" in cmd
                    or ("--working-dir" in cmd and '"excludes"' in cmd and "PYTHONPATH" in cmd)), (path.name, cmd)
    assert found >= 10


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
    for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
        # the CRD's rayStartParams is map[string]string: an unquoted number is refused by the API server
        assert all(isinstance(v, str) for v in group.get("rayStartParams", {}).values()), group["rayStartParams"]
        for c in group["template"]["spec"]["containers"]:
            res = c.get("resources", {})
            # Kubernetes requires GPU requests equal to limits; CPU and memory the same, so Ray's
            # --num-cpus/--memory (from the limits) match what the pod is guaranteed
            assert res.get("requests", {}) == res.get("limits", {}), c["name"]
    assert all(f":{ray_version()}-" in image for image in _pod_images(spec))
    mounts = [m["mountPath"] for c in spec["headGroupSpec"]["template"]["spec"]["containers"] for m in c["volumeMounts"]]
    assert "/mnt/runs" in mounts  # shared --storage-path


# The ray.io/v1 CRD fields (KubeRay v1.5/v1.6: ray-operator/apis/ray/v1/*_types.go and the
# generated API reference). The API server drops unknown fields of a CRD without an error,
# so a misspelt key (maxReplica, autoscalerOption) would silently do nothing.
RAY_V1_FIELDS = {
    "RayClusterSpec": {"suspend", "managedBy", "autoscalerOptions", "headServiceAnnotations",
                       "enableInTreeAutoscaling", "gcsFaultToleranceOptions", "headGroupSpec", "rayVersion",
                       "workerGroupSpecs", "authOptions", "upgradeStrategy"},
    "HeadGroupSpec": {"template", "headService", "enableIngress", "rayStartParams", "serviceType",
                      "labels", "resources"},
    "WorkerGroupSpec": {"suspend", "groupName", "replicas", "minReplicas", "maxReplicas", "idleTimeoutSeconds",
                        "rayStartParams", "template", "scaleStrategy", "numOfHosts", "labels", "resources"},
    "AutoscalerOptions": {"resources", "image", "imagePullPolicy", "securityContext", "idleTimeoutSeconds",
                          "upscalingMode", "version", "env", "envFrom", "volumeMounts"},
    "AuthOptions": {"mode", "secretName", "enableK8sTokenAuth"},
    "RayJobSpec": {"activeDeadlineSeconds", "backoffLimit", "rayClusterSpec", "submitterPodTemplate", "metadata",
                   "clusterSelector", "submitterConfig", "managedBy", "deletionPolicy", "deletionStrategy",
                   "entrypoint", "runtimeEnvYAML", "jobId", "submissionMode", "entrypointResources",
                   "entrypointNumCpus", "entrypointNumGpus", "ttlSecondsAfterFinished",
                   "shutdownAfterJobFinishes", "suspend"},
}
REQUIRED = {"HeadGroupSpec": {"template"}, "WorkerGroupSpec": {"groupName", "template"}}


def unknown_ray_fields(spec: dict, kind: str) -> list[str]:
    """Paths of keys in a RayCluster/RayJob spec that the ray.io/v1 CRD does not define (or required ones missing)."""
    bad = [f"{kind}.{k}" for k in spec if k not in RAY_V1_FIELDS[kind]]
    cluster = spec.get("rayClusterSpec") if kind == "RayJobSpec" else spec
    if kind == "RayJobSpec":
        return bad + (unknown_ray_fields(cluster, "RayClusterSpec") if cluster else [])
    groups = [("HeadGroupSpec", cluster.get("headGroupSpec", {}))]
    groups += [("WorkerGroupSpec", g) for g in cluster.get("workerGroupSpecs", [])]
    for sub, group in groups:
        bad += [f"{sub}.{k}" for k in group if k not in RAY_V1_FIELDS[sub]]
        bad += [f"{sub}.{k} (missing)" for k in REQUIRED[sub] - group.keys()]
    for sub, key in (("AutoscalerOptions", "autoscalerOptions"), ("AuthOptions", "authOptions")):
        bad += [f"{sub}.{k}" for k in cluster.get(key) or {} if k not in RAY_V1_FIELDS[sub]]
    return bad


@pytest.mark.parametrize("name", ["raycluster.yaml", "rayjob-train.yaml"])
def test_kuberay_manifests_use_only_crd_fields(name):
    obj = next(o for o in docs(CLUSTER / "kuberay" / name) if o["apiVersion"] == "ray.io/v1")
    assert set(obj) <= {"apiVersion", "kind", "metadata", "spec"}
    assert unknown_ray_fields(obj["spec"], f"{obj['kind']}Spec") == []
    spec = obj["spec"].get("rayClusterSpec", obj["spec"])
    # autoscaling: the operator adds the autoscaler only with enableInTreeAutoscaling
    assert spec["enableInTreeAutoscaling"] is True
    for g in spec["workerGroupSpecs"]:
        assert 0 <= g["minReplicas"] <= g.get("replicas", g["minReplicas"]) <= g["maxReplicas"]


def test_kuberay_field_check_catches_a_misspelt_key():
    obj = next(o for o in docs(CLUSTER / "kuberay" / "rayjob-train.yaml") if o["apiVersion"] == "ray.io/v1")
    spec = copy.deepcopy(obj["spec"])
    spec["rayClusterSpec"]["workerGroupSpecs"][0]["maxReplica"] = 8
    spec["shutdownAfterJobFinish"] = True
    assert unknown_ray_fields(spec, "RayJobSpec") == ["RayJobSpec.shutdownAfterJobFinish", "WorkerGroupSpec.maxReplica"]


@pytest.mark.parametrize("name", ["aws-gpu.yaml", "local-onprem.yaml"])
def test_cluster_launcher(name):
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = docs(CLUSTER / "launcher" / name)[0]
    # What `ray up` does before anything else: fill in defaults, then check against Ray's schema.
    cfg = prepare_config(copy.deepcopy(raw))
    validate_config(cfg)
    for key in ("cluster_name", "provider", "available_node_types", "head_node_type", "head_start_ray_commands",
                "worker_start_ray_commands"):
        assert key in cfg, key
    assert cfg["head_node_type"] in cfg["available_node_types"]
    assert cfg["docker"]["image"].startswith(f"rayproject/ray:{ray_version()}-")
    assert cfg["provider"]["type"] == ("aws" if name.startswith("aws") else "local")
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [c for c in cfg[key] if "ray start" in c]
        assert starts and all("RAY_AUTH_MODE=token" in c for c in starts), key
    workers = [t for n, t in cfg["available_node_types"].items() if n != cfg["head_node_type"]]
    if name.startswith("aws"):
        # the GPU workers name their AMI (Ray's default one's driver is too old for CUDA 13)
        # and an instance profile (Ray gives one to the head only)
        assert all(t["node_config"].get("ImageId", "").startswith("ami-") for t in workers)
        assert all(t["node_config"]["IamInstanceProfile"]["Arn"].startswith("arn:aws:iam::") for t in workers)
        # autoscaling from zero: a 0-CPU head and a worker type that can grow
        assert cfg["available_node_types"][cfg["head_node_type"]]["resources"] == {"CPU": 0}
        assert any(t["min_workers"] == 0 and t["max_workers"] > 0 for t in workers)
    else:
        node = cfg["available_node_types"][cfg["head_node_type"]]
        assert node["min_workers"] == node["max_workers"] == len(raw["provider"]["worker_ips"])


def test_launcher_validation_catches_a_bad_key():
    """The check above has teeth: a key Ray does not know fails validation."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = docs(CLUSTER / "launcher" / "aws-gpu.yaml")[0]
    cfg["available_node_types"]["gpu_worker"]["max_worker"] = 8
    from jsonschema import ValidationError

    with pytest.raises(ValidationError, match="max_worker"):
        validate_config(prepare_config(cfg))


def test_dockerfile_pins_ray_and_torch():
    lines = [ln.strip() for ln in (CLUSTER / "Dockerfile").read_text().splitlines()
             if ln.strip() and not ln.lstrip().startswith("#")]
    args = dict(ln[len("ARG "):].split("=", 1) for ln in lines if ln.startswith("ARG ") and "=" in ln)
    assert args["BASE"].startswith(f"rayproject/ray:{ray_version()}-")
    assert [ln for ln in lines if ln.startswith("FROM ")] == ["FROM ${BASE}"]
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    install = next(ln for ln in lines if ln.startswith("RUN pip install"))
    for name in ("torch", "torchvision"):  # the versions pyproject.toml allows at most
        top = re.search(r"<=([\d.]+)", next(d for d in deps if re.match(rf"{name}\b[<>=]", d))).group(1)
        assert f'"{name}=={top}"' in install
    assert all("--chown=ray:users" in ln for ln in lines if ln.startswith("COPY "))
    # WORKDIR made by the image's user first: other builders than BuildKit create it as root
    workdir = next(ln for ln in lines if ln.startswith("WORKDIR ")).split()[1]
    assert lines.index(f"RUN mkdir -p {workdir}") < lines.index(f"WORKDIR {workdir}")


def test_docker_build_context_leaves_out_venvs_and_data_but_not_what_the_image_copies():
    import fnmatch

    ignored = [ln.strip().rstrip("/") for ln in (REPO / ".dockerignore").read_text().splitlines()
               if ln.strip() and not ln.startswith("#")]
    assert {".git", ".venv", "runs", "data", "subtle"} <= set(ignored)
    copies = [ln.split()[2:-1] for ln in (CLUSTER / "Dockerfile").read_text().splitlines() if ln.startswith("COPY ")]
    sources = [src for srcs in copies for src in srcs]
    assert "artifact_core" in sources and "pyproject.toml" in sources
    for src in sources:
        assert not any(fnmatch.fnmatch(src, pat) for pat in ignored), src


def test_runtime_env_upload_keeps_the_package_and_its_weights(tmp_path):
    """What `ray job submit --runtime-env` uploads, packed by Ray's own packer: the package
    with its shipped weights (the uploaded copy is the one the jobs import), no venv or runs."""
    import zipfile

    from ray._private.runtime_env.packaging import create_package

    env = yaml.safe_load((CLUSTER / "runtime_env.yaml").read_text())
    target = tmp_path / "pkg.zip"
    create_package(str(REPO), target, include_gitignore=True, excludes=env["excludes"])
    names = zipfile.ZipFile(target).namelist()
    weights = [n for n in names if n.startswith("artifact_core/weights/") and n.endswith(".pth")]
    assert weights, "the shipped ImageNet weights are left out of the upload"
    assert "artifact_core/__init__.py" in names and "jobs/score.py" in names
    assert not [n for n in names if n.startswith((".venv/", ".git/", "runs/"))]
    assert target.stat().st_size < 256 * 2**20
