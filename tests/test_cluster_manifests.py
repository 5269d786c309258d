"""Static checks of the deployment files in cluster/ (no cluster, no network, no Docker).

Versions agree with pyproject.toml (Ray pin, Python, package version), the KubeRay manifests
have the shape a GPU run needs (CPU-only head with num-cpus "0", GPU worker group, shared /data
volume, RayJob entrypoint that runs `dmsae run` into the shared volume), the cluster-launcher
configs pass Ray's own validation, and every config path the files mention exists.
"""

from __future__ import annotations

import copy
import re
import shlex
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
CLUSTER = ROOT / "cluster"
SHARED_MOUNT = "/data"
# Where the repository lives on cluster nodes: in the image (/app) and on launcher nodes.
REPO_ON_NODES = ("/app/", "/home/ray/dmsae-ray/", "~/dmsae-ray/")
GPU = "nvidia.com/gpu"

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def _ray_pin() -> str:
    for dep in PYPROJECT["project"]["dependencies"]:
        m = re.fullmatch(r"ray(\[[^\]]*\])?==([0-9][\w.]*)", dep.replace(" ", ""))
        if m:
            return m.group(2)
    raise AssertionError("pyproject.toml does not pin ray with ==")


RAY_VERSION = _ray_pin()
PACKAGE_VERSION = PYPROJECT["project"]["version"]
PYTHON_MIN = tuple(
    int(x)
    for x in re.search(r">=\s*(\d+)\.(\d+)", PYPROJECT["project"]["requires-python"]).groups()
)


def _text_files() -> list[Path]:
    return sorted(p for p in CLUSTER.iterdir() if p.is_file())


def _docs() -> dict[Path, list[dict]]:
    out = {}
    for path in sorted(CLUSTER.glob("*.y*ml")):
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
        out[path] = docs
    return out


DOCS = _docs()


def _of_kind(kind: str) -> list[tuple[Path, dict]]:
    return [(p, d) for p, docs in DOCS.items() for d in docs if d.get("kind") == kind]


def _launcher_configs() -> list[tuple[Path, dict]]:
    return [
        (p, d)
        for p, docs in DOCS.items()
        for d in docs
        if "kind" not in d and isinstance(d.get("provider"), dict)
    ]


def _walk(node: Any) -> Iterator[tuple[str, Any]]:
    if isinstance(node, dict):
        for k, v in node.items():
            yield k, v
            yield from _walk(v)
    elif isinstance(node, list):
        for v in node:
            yield from _walk(v)


def _cluster_specs() -> list[tuple[str, dict]]:
    """Every RayCluster spec: the RayCluster's own and each RayJob's rayClusterSpec."""
    specs = [(f"{p.name}:RayCluster", d["spec"]) for p, d in _of_kind("RayCluster")]
    specs += [
        (f"{p.name}:RayJob", d["spec"]["rayClusterSpec"])
        for p, d in _of_kind("RayJob")
        if "rayClusterSpec" in d["spec"]
    ]
    return specs


CLUSTER_SPECS = _cluster_specs()
LAUNCHERS = _launcher_configs()


def _pods(spec: dict) -> list[tuple[str, dict]]:
    pods = [("head", spec["headGroupSpec"]["template"]["spec"])]
    pods += [(g["groupName"], g["template"]["spec"]) for g in spec.get("workerGroupSpecs", [])]
    return pods


def _limits(container: dict) -> dict:
    return container.get("resources", {}).get("limits", {})


def _pvcs() -> dict[str, dict]:
    return {d["metadata"]["name"]: d for _, d in _of_kind("PersistentVolumeClaim")}


def _repo_path(arg: str) -> Path:
    """A path as a cluster node sees it -> the same file in this checkout."""
    arg = arg.strip("'\"")
    for prefix in REPO_ON_NODES:
        if arg.startswith(prefix):
            return ROOT / arg[len(prefix) :]
    assert not arg.startswith(("/", "~")), f"{arg}: not a location of the repository on a node"
    return ROOT / arg


def _torch_pins(text: str) -> set[str]:
    return set(re.findall(r"torch==([0-9][\w.+]*)", text))


# --- files and versions ---------------------------------------------------------------------


def test_expected_files_exist_and_yaml_parses():
    names = {p.name for p in _text_files()}
    for name in (
        "Dockerfile",
        "README.md",
        "storage.yaml",
        "raycluster.yaml",
        "rayjob.yaml",
        "aws-gpu.yaml",
        "gcp-gpu.yaml",
    ):
        assert name in names, f"cluster/{name} is missing"
    assert all(DOCS[p] for p in DOCS), "an empty YAML file in cluster/"
    assert len(_of_kind("RayCluster")) == 1
    assert len(_of_kind("RayJob")) == 1
    assert len(_launcher_configs()) == 2


def test_every_ray_version_is_the_pyproject_pin():
    versions = [
        (p.name, v)
        for p, docs in DOCS.items()
        for d in docs
        for k, v in _walk(d)
        if k == "rayVersion"
    ]
    assert len(versions) >= 2  # the RayCluster and the RayJob's cluster
    for name, v in versions:
        # Unquoted 2.60 would parse as a float; KubeRay wants the exact string.
        assert v == RAY_VERSION, f"{name}: rayVersion {v!r} != ray=={RAY_VERSION} in pyproject"


def test_every_ray_image_and_pin_mentioned_uses_the_pyproject_version():
    tags, pins = [], []
    for path in _text_files():
        text = path.read_text()
        tags += [(path.name, t) for t in re.findall(r"rayproject/ray:([\w.\-]+)", text)]
        pins += [(path.name, v) for v in re.findall(r"\bray(?:\[[\w,]*\])?==([0-9][\w.]*)", text)]
    assert {n for n, _ in tags} >= {"Dockerfile", "aws-gpu.yaml", "gcp-gpu.yaml"}
    for name, tag in tags:
        m = re.fullmatch(r"([0-9][\w.]*)-py3(\d+)(-[\w\-]+)?", tag)
        assert m, f"{name}: rayproject/ray:{tag} does not name a Ray version and a Python"
        assert m.group(1) == RAY_VERSION, f"{name}: rayproject/ray:{tag} is not Ray {RAY_VERSION}"
        assert (3, int(m.group(2))) >= PYTHON_MIN, f"{name}: {tag} is older than requires-python"
    for name, v in pins:
        assert v == RAY_VERSION, f"{name}: ray=={v} != ray=={RAY_VERSION}"


def test_dockerfile_base_image_and_environment():
    text = (CLUSTER / "Dockerfile").read_text()
    froms = re.findall(r"^FROM\s+(\S+)", text, flags=re.M)
    assert len(froms) == 1
    assert re.fullmatch(rf"rayproject/ray:{re.escape(RAY_VERSION)}-py3\d+-gpu", froms[0])
    assert re.search(r"^RUN pip install .*/app\s*$", text, flags=re.M), "project not installed"
    env = dict(re.findall(r"\b(DMSAE_CACHE|HF_HOME)=(\S+)", text))
    assert env.get("DMSAE_CACHE", "").startswith(SHARED_MOUNT + "/")
    assert env.get("HF_HOME", "").startswith(SHARED_MOUNT + "/")
    for src in re.findall(r"^COPY\s+(?:--\S+\s+)*(.+?)\s+\S+$", text, flags=re.M):
        for item in src.split():
            assert (ROOT / item).exists(), f"Dockerfile copies {item}, which is not in the repo"


def test_project_image_tag_is_the_package_version():
    images = [
        c["image"]
        for _, spec in _cluster_specs()
        for _, pod in _pods(spec)
        for c in pod["containers"]
    ]
    assert images
    for image in images:
        assert re.fullmatch(rf"(.+/)?dmsae-ray:{re.escape(PACKAGE_VERSION)}", image), image
    for path in _text_files():
        for tag in re.findall(r"dmsae-ray:([0-9][\w.]*)", path.read_text()):
            assert tag == PACKAGE_VERSION, f"{path.name}: dmsae-ray:{tag} != {PACKAGE_VERSION}"


def test_torch_pin_is_the_same_everywhere():
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    m = re.search(r"^ARG TORCH_VERSION=(\S+)", dockerfile, flags=re.M)
    assert m, "Dockerfile has no ARG TORCH_VERSION"
    pins = {m.group(1)}
    for path in _text_files():
        pins |= _torch_pins(path.read_text())
    setup = ROOT / "scripts" / "setup.sh"
    if setup.is_file():  # the version CI tests with
        pins |= _torch_pins(setup.read_text())
    assert len(pins) == 1, f"different torch versions: {sorted(pins)}"


# --- KubeRay ------------------------------------------------------------------------------


@pytest.mark.parametrize("name,spec", CLUSTER_SPECS, ids=[n for n, _ in CLUSTER_SPECS])
def test_ray_cluster_spec_shape(name, spec):
    assert spec.get("enableInTreeAutoscaling") is True, name
    head = spec["headGroupSpec"]
    assert head["rayStartParams"].get("num-cpus") == "0", f"{name}: head must take no work"
    for group in [head, *spec["workerGroupSpecs"]]:
        for k, v in group["rayStartParams"].items():
            assert isinstance(v, str), f"{name}: rayStartParams.{k} must be a string for KubeRay"
    head_container = head["template"]["spec"]["containers"][0]
    ports = {p["containerPort"] for p in head_container["ports"]}
    assert {6379, 8265, 10001} <= ports, name
    assert GPU not in _limits(head_container), f"{name}: the head should not hold a GPU"

    gpu_groups = [
        g
        for g in spec["workerGroupSpecs"]
        if any(int(_limits(c).get(GPU, 0)) >= 1 for c in g["template"]["spec"]["containers"])
    ]
    assert gpu_groups, f"{name}: no worker group requests {GPU}"
    for g in gpu_groups:
        assert g["minReplicas"] == 0, f"{name}/{g['groupName']}: GPU group should scale to zero"
        assert g["maxReplicas"] >= 1
        tolerations = g["template"]["spec"].get("tolerations", [])
        assert any(t.get("key") == GPU for t in tolerations), f"{g['groupName']}: no GPU toleration"


@pytest.mark.parametrize("name,spec", CLUSTER_SPECS, ids=[n for n, _ in CLUSTER_SPECS])
def test_every_pod_mounts_shared_storage_and_shm(name, spec):
    pvcs = _pvcs()
    for group, pod in _pods(spec):
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        mounts = {m["mountPath"]: m["name"] for m in pod["containers"][0].get("volumeMounts", [])}
        where = f"{name}/{group}"
        assert SHARED_MOUNT in mounts, f"{where}: nothing mounted at {SHARED_MOUNT}"
        claim = volumes[mounts[SHARED_MOUNT]]["persistentVolumeClaim"]["claimName"]
        assert claim in pvcs, f"{where}: PVC {claim} is not defined in cluster/"
        assert "ReadWriteMany" in pvcs[claim]["spec"]["accessModes"], f"PVC {claim} must be RWX"
        assert "/dev/shm" in mounts, f"{where}: no /dev/shm volume for the object store"
        assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory", where
        env = {e["name"]: e for e in pod["containers"][0].get("env", [])}
        ref = env["HF_TOKEN"]["valueFrom"]["secretKeyRef"]
        assert ref["optional"] is True, f"{where}: the HF token Secret must stay optional"


def test_rayjob_runs_dmsae_into_the_shared_volume():
    from dmsae_ray.config import load_config

    ((path, job),) = _of_kind("RayJob")
    spec = job["spec"]
    assert spec["submissionMode"] == "K8sJobMode"
    assert spec["shutdownAfterJobFinishes"] is True
    assert isinstance(spec["ttlSecondsAfterFinished"], int) and spec["ttlSecondsAfterFinished"] >= 0
    assert "clusterSelector" not in spec, "clusterSelector and rayClusterSpec exclude each other"
    ((_, cluster),) = _of_kind("RayCluster")
    # The same cluster, except that the RayJob may start with GPU pods already up.
    own = copy.deepcopy(spec["rayClusterSpec"])
    for group in own["workerGroupSpecs"]:
        group["replicas"] = 0
    assert own == cluster["spec"], "rayjob.yaml's cluster differs from raycluster.yaml's"

    argv = shlex.split(spec["entrypoint"])
    assert argv[:2] == ["dmsae", "run"], argv
    config = argv[argv.index("--config") + 1]
    overrides = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
    run_dirs = [o.split("=", 1)[1] for o in overrides if o.startswith("run_dir=")]
    assert run_dirs and run_dirs[0].startswith(SHARED_MOUNT + "/runs/"), run_dirs
    # The entrypoint's config must pass the same validation `dmsae run` does.
    cfg = load_config(_repo_path(config), overrides)
    assert cfg.run_dir == run_dirs[0]
    assert cfg.ray.use_gpu is True


# --- cluster launcher ---------------------------------------------------------------------


def _is_gpu_node(provider: str, node_type: dict) -> bool:
    if node_type.get("resources", {}).get("GPU", 0) > 0:
        return True
    cfg = node_type["node_config"]
    if provider == "aws":
        return re.match(r"(g\d|p\d)", cfg.get("InstanceType", "")) is not None
    if provider == "gcp":
        return bool(cfg.get("guestAccelerators")) or cfg.get("machineType", "").startswith(
            ("a2-", "a3-", "g2-")
        )
    return False


@pytest.mark.parametrize("path,cfg", LAUNCHERS, ids=[p.name for p, _ in LAUNCHERS])
def test_launcher_node_types(path, cfg):
    provider = cfg["provider"]["type"]
    types = cfg["available_node_types"]
    assert cfg["head_node_type"] in types, path.name
    head = types[cfg["head_node_type"]]
    assert not _is_gpu_node(provider, head), f"{path.name}: the head node type has a GPU"
    assert head["resources"].get("CPU") == 0, f"{path.name}: the head should take no work"
    gpu_workers = [
        n for n, t in types.items() if n != cfg["head_node_type"] and _is_gpu_node(provider, t)
    ]
    assert gpu_workers, f"{path.name}: no GPU worker node type"
    assert all(types[n].get("max_workers", cfg["max_workers"]) > 0 for n in gpu_workers)
    assert cfg["docker"]["image"].startswith(f"rayproject/ray:{RAY_VERSION}-")
    machine_key = {"aws": "InstanceType", "gcp": "machineType"}[provider]
    for n, t in types.items():
        assert t["node_config"].get(machine_key), f"{path.name}/{n}: no {machine_key}"


@pytest.mark.parametrize("path,cfg", LAUNCHERS, ids=[p.name for p, _ in LAUNCHERS])
def test_launcher_installs_the_project(path, cfg):
    remote = [r for r, local in cfg["file_mounts"].items() if local in (".", "./")]
    assert remote, f"{path.name}: the repository is not in file_mounts"
    installs = [c for c in cfg["setup_commands"] if "pip install" in c and remote[0] in c]
    assert installs, f"{path.name}: setup_commands do not install {remote[0]}"


@pytest.mark.parametrize("path,cfg", LAUNCHERS, ids=[p.name for p, _ in LAUNCHERS])
def test_launcher_config_passes_ray_validation(path, cfg):
    util = pytest.importorskip("ray.autoscaler._private.util")
    # What `ray up` does first: fill in the provider defaults, then check against the schema.
    util.validate_config(util.prepare_config(copy.deepcopy(cfg)))


# --- paths and packages mentioned in prose ------------------------------------------------


def test_every_config_path_mentioned_exists():
    found = []
    for path in _text_files():
        for arg in re.findall(r"--config[ =]+([^\s`'\"]+\.(?:ya?ml|json))", path.read_text()):
            found.append(arg)
            assert _repo_path(arg).is_file(), f"{path.name}: --config {arg} is not in the repo"
    assert "/app/configs/gemma-2-2b.yaml" in found


def test_runtime_env_pip_packages_are_project_dependencies():
    deps = {
        re.match(r"[A-Za-z0-9_.\-]+", d).group(0).lower()
        for d in PYPROJECT["project"]["dependencies"]
    }
    readme = (CLUSTER / "README.md").read_text()
    lists = re.findall(r'"pip":\s*\[(.*?)\]', readme, flags=re.S)
    assert lists, "README has no runtime_env pip example"
    for body in lists:
        for req in re.findall(r'"([^"]+)"', body):
            name = re.match(r"[A-Za-z0-9_.\-]+", req).group(0).lower()
            assert name in deps, f"runtime_env pip installs {req}, not a dependency in pyproject"
