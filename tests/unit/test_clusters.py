"""The cluster configs in clusters/: each valid for the tool that reads it, and all of them alike.

Cluster-launcher files (aws, gcp, local) go through what `ray up` does before it first calls a
cloud: Ray's defaults fill-out (prepare_config) and Ray's own schema (validate_config, which reads
ray/autoscaler/ray-schema.json). The KubeRay manifests are checked against
tests/data/kuberay_v1.7.0_subset.yaml, closed so that a misspelt field fails instead of being pruned.
Then every file must agree: the installed Ray version and one image, token auth, checkpoint
storage in $SQUEEZELAB_STORAGE, the team's MLflow server, the dashboard kept private, and the
project installed at one pinned tag. Offline, in about a second.
"""
from __future__ import annotations

import copy
import re
import tomllib
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml
from packaging.requirements import Requirement
from packaging.version import Version
from ray.autoscaler._private.util import prepare_config, validate_config
from ray.runtime_env import RuntimeEnv

ROOT = Path(__file__).resolve().parents[2]
CLUSTERS = ROOT / "clusters"
LAUNCHER = {name: CLUSTERS / f"{name}.yaml" for name in ("aws", "gcp", "local")}
KUBERAY = {"RayCluster": CLUSTERS / "kuberay/raycluster.yaml", "RayJob": CLUSTERS / "kuberay/rayjob.yaml"}
PVC = CLUSTERS / "kuberay/pvc.yaml"
RUNTIME_ENV = CLUSTERS / "runtime_env.yaml"
SUBSET = ROOT / "tests/data/kuberay_v1.7.0_subset.yaml"

PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
PY = "py" + "".join(re.search(r"(\d+)\.(\d+)", PROJECT["requires-python"]).groups())  # py311
# One image per kind of node: the installed Ray, the Python pyproject.toml requires.
CPU_IMAGE = f"rayproject/ray:{ray.__version__}-{PY}-cpu"
GPU_IMAGE = f"rayproject/ray:{ray.__version__}-{PY}-cu128"
TAG = f"v{PROJECT['version']}"  # the release tag every node installs
STORAGE_PREFIX = {"aws": "s3://", "gcp": "gs://", "local": "/mnt/squeezelab/"}


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def launched(name: str) -> dict:
    """The config as `ray up` holds it after its offline preparation, before any cloud call."""
    return prepare_config(copy.deepcopy(load(LAUNCHER[name])))


def docker_env(cfg: dict) -> dict[str, str]:
    """The environment every container of a launcher cluster gets (`docker run --env K=V`)."""
    pairs = (re.fullmatch(r"--env (\w+)=(\S+)", opt) for opt in cfg["docker"]["run_options"])
    return dict(m.groups() for m in pairs if m)


def containers(manifest: dict) -> list[tuple[str, dict, dict]]:
    """(group, Ray container, pod spec) for the head and every worker group of a KubeRay manifest."""
    spec = manifest["spec"].get("rayClusterSpec", manifest["spec"])
    groups = [("head", spec["headGroupSpec"])] + [(g["groupName"], g) for g in spec["workerGroupSpecs"]]
    return [(name, g["template"]["spec"]["containers"][0], g["template"]["spec"]) for name, g in groups]


def container_env(container: dict) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container.get("env", [])}


def cluster_spec(kind: str) -> dict:
    manifest = load(KUBERAY[kind])
    return manifest["spec"].get("rayClusterSpec", manifest["spec"])


# --- Ray's cluster launcher ---------------------------------------------------------------------

@pytest.mark.parametrize("name", LAUNCHER)
def test_launcher_config_passes_rays_own_checks(name):
    cfg = launched(name)
    validate_config(cfg)  # raises on any schema error
    raw = load(LAUNCHER[name])
    # every command list is ours: one left out would be filled from Ray's defaults, which install
    # a nightly Ray wheel over the pinned one and bind the dashboard to 0.0.0.0
    for key in ("initialization_commands", "setup_commands", "head_setup_commands",
                "worker_setup_commands", "head_start_ray_commands", "worker_start_ray_commands"):
        assert key in raw, f"{name}.yaml leaves {key} to Ray's defaults"
    assert "ray-wheels" not in str(cfg) and "0.0.0.0" not in str(cfg)


BREAKAGES = {  # what a careless edit does, and the word Ray's error must name
    "unknown key": (lambda c: c.update(max_worker=4), "max_worker"),
    "wrong type": (lambda c: c.update(idle_timeout_minutes="ten"), "ten"),
    "unknown docker key": (lambda c: c["docker"].update(imagee=CPU_IMAGE), "imagee"),
    "run_options not a list": (lambda c: c["docker"].update(run_options="--env RAY_AUTH_MODE=token"),
                               "run_options"),
}


@pytest.mark.parametrize("breakage", BREAKAGES)
@pytest.mark.parametrize("name", LAUNCHER)
def test_launcher_schema_rejects_a_broken_copy(name, breakage):
    broken, word = load(LAUNCHER[name]), BREAKAGES[breakage][1]
    BREAKAGES[breakage][0](broken)
    with pytest.raises(jsonschema.ValidationError, match=word):
        validate_config(prepare_config(broken))


@pytest.mark.parametrize("edit,word", [
    (lambda t: t["cpu.worker"].update(min_worker=1), "min_worker"),
    (lambda t: t["gpu.worker"].update(resources={"CPU": 4, "GPU": "1"}), "'1'"),
    (lambda t: t["gpu.worker"]["docker"].update(image=GPU_IMAGE), "image"),  # per-type images are worker_image
])
def test_launcher_schema_rejects_a_broken_node_type(edit, word):
    broken = load(LAUNCHER["aws"])
    edit(broken["available_node_types"])
    with pytest.raises(jsonschema.ValidationError, match=word):
        validate_config(prepare_config(broken))


def test_local_cluster_is_a_fixed_fleet():
    raw = load(LAUNCHER["local"])
    assert raw["min_workers"] == raw["max_workers"] == len(raw["provider"]["worker_ips"])
    (node_type,) = launched("local")["available_node_types"].values()
    assert node_type["min_workers"] == node_type["max_workers"] == raw["max_workers"]


# --- KubeRay ------------------------------------------------------------------------------------

def closed(node):
    """The schema with every object that lists its properties closed to any other: the CRDs prune
    unknown fields silently, so without this a misspelt key would pass."""
    if isinstance(node, list):
        return [closed(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: closed(v) for k, v in node.items()}
    if "properties" in out and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out


def validator(kind: str, strict: bool = True) -> jsonschema.Draft202012Validator:
    subset = load(SUBSET)
    schema = {**subset["kinds"][kind], "$defs": subset["$defs"]}
    return jsonschema.Draft202012Validator(closed(schema) if strict else schema)


@pytest.mark.parametrize("kind", KUBERAY)
def test_kuberay_manifest_matches_the_crd(kind):
    manifest = load(KUBERAY[kind])
    assert (manifest["apiVersion"], manifest["kind"]) == ("ray.io/v1", kind)
    errors = [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator(kind).iter_errors(manifest)]
    assert not errors, errors


def test_rayjob_runtime_env_is_one_ray_accepts():
    env = yaml.safe_load(load(KUBERAY["RayJob"])["spec"]["runtimeEnvYAML"])
    assert set(env) <= set(RuntimeEnv.known_fields)
    RuntimeEnv(**env)  # raises on wrong types
    # a RayJob has no local folder: its working dir is a remote zip, the release archive
    assert re.fullmatch(rf"https://\S+/archive/refs/tags/{re.escape(TAG)}\.zip", env["working_dir"])


def head(m):  # the head's Ray container, in a RayCluster or a RayJob
    return m["spec"].get("rayClusterSpec", m["spec"])["headGroupSpec"]["template"]["spec"]["containers"][0]


def group(m):  # the first worker group
    return m["spec"].get("rayClusterSpec", m["spec"])["workerGroupSpecs"][0]


MISTAKES = {  # kind, edit of the manifest, the word the error must name
    "misspelt spec field": ("RayCluster", lambda m: m["spec"].update(enableInTreeAutoscalling=True),
                            "enableInTreeAutoscalling"),
    "misspelt container field": ("RayCluster", lambda m: head(m).update(volumeMount=[]), "volumeMount"),
    "misspelt group field": ("RayJob", lambda m: group(m).update(replica=2), "replica"),
    "misspelt job field": ("RayJob", lambda m: m["spec"].update(shutdownAfterJobFinished=True),
                           "shutdownAfterJobFinished"),
    "wrong enum": ("RayCluster", lambda m: m["spec"]["authOptions"].update(mode="tokens"), "tokens"),
    "wrong type": ("RayCluster", lambda m: group(m).update(maxReplicas="4"), "'4'"),
    "bad quantity": ("RayJob", lambda m: head(m)["resources"]["limits"].update(memory="8 GB"), "8 GB"),
    "missing required": ("RayCluster", lambda m: group(m).pop("minReplicas"), "minReplicas"),
}


@pytest.mark.parametrize("mistake", MISTAKES)
def test_kuberay_check_catches_a_mistake(mistake):
    kind, edit, word = MISTAKES[mistake]
    broken = load(KUBERAY[kind])
    edit(broken)
    messages = " ".join(e.message for e in validator(kind).iter_errors(broken))
    assert word in messages
    if "misspelt" in mistake:  # the CRD's own (open) schema lets these through: closing is what bites
        assert validator(kind, strict=False).is_valid(broken)


def test_pvc_is_shared_read_write_by_every_pod():
    pvc = load(PVC)
    assert pvc["kind"] == "PersistentVolumeClaim" and pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    for kind, path in KUBERAY.items():
        for group, _, pod in containers(load(path)):
            claims = {v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"]}
            assert claims == {pvc["metadata"]["name"]}, f"{kind} {group}"


# --- the same choices in every file -------------------------------------------------------------

def test_one_ray_version_and_one_image_everywhere():
    (ray_pin,) = [r.specifier for r in map(Requirement, PROJECT["dependencies"]) if r.name == "ray"]
    assert Version(ray.__version__) in ray_pin  # installed Ray == pyproject.toml's pin
    seen = {}
    for path in sorted(CLUSTERS.rglob("*")):
        if path.is_file():
            for image in re.findall(r"rayproject/ray:[\w.\-]+", path.read_text()):
                seen.setdefault(image, set()).add(path.relative_to(ROOT).as_posix())
    assert set(seen) == {CPU_IMAGE, GPU_IMAGE}, seen
    for name in LAUNCHER:
        cfg = launched(name)
        assert cfg["docker"]["image"] == CPU_IMAGE
        for node_type in cfg["available_node_types"].values():
            # only GPU node types replace the image, and every GPU type does, with the CUDA build
            assert node_type.get("docker", {}).get("worker_image", GPU_IMAGE) == GPU_IMAGE
            if node_type["resources"].get("GPU"):
                assert node_type["docker"]["worker_image"] == GPU_IMAGE
    for kind in KUBERAY:
        assert cluster_spec(kind)["rayVersion"] == ray.__version__
        for group, container, _ in containers(load(KUBERAY[kind])):
            gpu = "nvidia.com/gpu" in container["resources"]["limits"]
            assert container["image"] == (GPU_IMAGE if gpu else CPU_IMAGE), f"{kind} {group}"


def test_token_auth_on_every_node():
    for name in LAUNCHER:
        cfg = launched(name)
        assert docker_env(cfg)["RAY_AUTH_MODE"] == "token", name  # the container env: head and workers
        assert cfg["file_mounts"].get("~/.ray/auth_token") == "~/.ray/auth_token", name
        for node_type in cfg["available_node_types"].values():  # nothing switches it off per type
            assert "RAY_AUTH_MODE" not in str(node_type)
        assert "RAY_AUTH_MODE" not in str(cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"])
    for kind in KUBERAY:
        spec = cluster_spec(kind)
        assert spec["authOptions"]["mode"] == "token"
        assert Version(spec["rayVersion"]) >= Version("2.52.0")  # KubeRay refuses token auth below


def test_checkpoint_storage_every_node_can_write():
    for name in LAUNCHER:
        cfg = launched(name)
        storage = docker_env(cfg)["SQUEEZELAB_STORAGE"]
        assert storage.startswith(STORAGE_PREFIX[name]), (name, storage)
    local = launched("local")
    mounts = [opt.split()[1].split(":") for opt in local["docker"]["run_options"] if opt.startswith("--volume")]
    assert any(docker_env(local)["SQUEEZELAB_STORAGE"].startswith(inside + "/") and host == inside
               for host, inside in mounts)
    assert any("mount -t nfs" in c and c.endswith(" /mnt/squeezelab") for c in local["initialization_commands"])
    for kind in KUBERAY:
        for group, container, _ in containers(load(KUBERAY[kind])):
            storage = container_env(container)["SQUEEZELAB_STORAGE"]
            assert any(storage.startswith(m["mountPath"] + "/") for m in container["volumeMounts"]), (kind, group)


def test_autoscaling_clusters_declare_their_cpu_ceiling():
    """A job's pre-flight CPU check (pipelines/core/ray_session.require_cpus) sees an autoscaling
    cluster's ceiling in SQUEEZELAB_MAX_CPUS, so it waits for workers instead of failing on a head
    with 0 CPUs; the declared ceiling must be what the node types can add up to."""
    for name in ("aws", "gcp"):
        cfg = launched(name)
        types = cfg["available_node_types"]
        ceiling = sum(t["resources"].get("CPU", 0) * (t.get("max_workers", 0) if n != cfg["head_node_type"] else 1)
                      for n, t in types.items())
        assert docker_env(cfg)["SQUEEZELAB_MAX_CPUS"] == str(ceiling), name
    spec = cluster_spec("RayCluster")
    assert spec["enableInTreeAutoscaling"]
    ceiling = sum(int(g["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"]) * g["maxReplicas"]
                  for g in spec["workerGroupSpecs"]) + int(spec["headGroupSpec"]["rayStartParams"]["num-cpus"])
    head_env = container_env(containers(load(KUBERAY["RayCluster"]))[0][1])
    assert head_env["SQUEEZELAB_MAX_CPUS"] == str(ceiling)


def test_one_mlflow_server_everywhere():
    uris = {f"{name}.yaml": docker_env(launched(name))["MLFLOW_TRACKING_URI"] for name in LAUNCHER}
    for kind in KUBERAY:
        for group, container, _ in containers(load(KUBERAY[kind])):
            uris[f"{kind} {group}"] = container_env(container)["MLFLOW_TRACKING_URI"]
    uris["runtime_env.yaml"] = load(RUNTIME_ENV)["env_vars"]["MLFLOW_TRACKING_URI"]
    assert len(set(uris.values())) == 1, uris
    assert re.fullmatch(r"http://[\w.\-]+:5000", uris["runtime_env.yaml"])


def test_runtime_env_is_one_ray_accepts():
    env = load(RUNTIME_ENV)
    assert set(env) <= set(RuntimeEnv.known_fields)
    RuntimeEnv(**env)
    assert "mlflow/" in env["excludes"]  # the local store: hundreds of MB, and a job logs to the server
    # each cluster sets its own store on its nodes; a value here would override all of them
    assert "SQUEEZELAB_STORAGE" not in env["env_vars"]


def test_dashboard_only_through_a_tunnel():
    for name in LAUNCHER:
        (start,) = [c for c in launched(name)["head_start_ray_commands"] if "ray start" in c]
        assert "--dashboard-host=127.0.0.1" in start, name
    for kind in KUBERAY:
        head = cluster_spec(kind)["headGroupSpec"]
        assert head["serviceType"] == "ClusterIP" and not head.get("enableIngress"), kind


def test_project_installed_at_one_pinned_tag_on_every_node():
    install = re.compile(r'pip install -q --no-cache-dir "squeezelab @ git\+(\S+?)@([\w.\-]+)"')
    refs = {m for path in CLUSTERS.rglob("*.yaml") for m in install.findall(path.read_text())}
    assert len(refs) == 1 and next(iter(refs))[1] == TAG, refs
    for name in LAUNCHER:
        cfg = launched(name)  # setup_commands merged into the head's and the workers' lists
        setups = [cfg["head_setup_commands"], cfg["worker_setup_commands"]]
        setups += [t["worker_setup_commands"] for t in cfg["available_node_types"].values()
                   if "worker_setup_commands" in t]  # a node type's own list replaces the workers' one
        assert all(install.search(" ".join(s)) for s in setups), name
    for kind in KUBERAY:
        for group, container, _ in containers(load(KUBERAY[kind])):
            assert install.search(" ".join(container["args"])), (kind, group)
            assert "ray start" not in " ".join(container["args"])  # KubeRay appends its own start


def test_readme_installs_the_kuberay_version_the_manifests_are_checked_against():
    tag = load(SUBSET)["x-source"]["tag"]
    assert Version(tag.lstrip("v")) >= Version("1.5.1")  # authOptions arrived in KubeRay 1.5.1
    assert f"--version {tag.lstrip('v')}" in (CLUSTERS / "README.md").read_text()
