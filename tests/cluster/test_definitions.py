"""The files under cluster/: Ray's own schema for the `ray up` YAMLs, structure of the KubeRay
manifests, syntax of the Slurm script, and that every `pretrain train` they run loads its config."""

from __future__ import annotations

import copy
import re
import shlex
import subprocess
from pathlib import Path

import pytest
import ray
import yaml

from pretrain.load import load_config

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "cluster"
IMAGE_ROOT = "/home/ray/pretrain"  # where cluster/Dockerfile puts the project


def _ray_up(name: str) -> dict:
    return yaml.safe_load((CLUSTER / name).read_text())


def _validate(cfg: dict) -> dict:
    # What `ray up` does before it touches a cloud: merge the provider's defaults, then validate
    # against ray/autoscaler/ray-schema.json plus Ray's cross-field checks.
    from ray.autoscaler._private.util import prepare_config, validate_config

    full = prepare_config(copy.deepcopy(cfg))
    validate_config(full)
    return full


@pytest.mark.parametrize("name,provider", [("aws.yaml", "aws"), ("gcp.yaml", "gcp")])
def test_ray_up_yaml_passes_rays_schema(name, provider):
    cfg = _ray_up(name)
    full = _validate(cfg)
    assert full["provider"]["type"] == provider
    workers = {k: v for k, v in full["available_node_types"].items() if k != full["head_node_type"]}
    assert workers and all(t["resources"].get("GPU") == 8 for t in workers.values())
    assert sum(t["max_workers"] for t in workers.values()) >= full["max_workers"]
    # The image carries the dependencies: no per-node installs beyond the autoscaler's cloud SDK.
    assert full["setup_commands"] == [] and full["worker_setup_commands"] == []
    assert full["docker"]["image"]


@pytest.mark.parametrize("name", ["aws.yaml", "gcp.yaml"])
def test_ray_up_yaml_keeps_token_auth_on(name):
    cfg = _ray_up(name)
    starts = cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"]
    ray_starts = [c for c in starts if "ray start" in c]
    assert len(ray_starts) == 2 and all("RAY_AUTH_MODE=token" in c for c in ray_starts)
    assert "~/.ray/auth_token" in cfg["file_mounts"]
    assert "disabled" not in (CLUSTER / name).read_text()


def test_schema_check_is_real():
    cfg = _ray_up("aws.yaml")
    cfg["max_worker"] = 4  # a typo of max_workers
    with pytest.raises(Exception, match="max_worker"):
        _validate(cfg)
    cfg = _ray_up("gcp.yaml")
    cfg["head_node_type"] = "nope"
    with pytest.raises(ValueError, match="head_node_type"):
        _validate(cfg)


def _containers(pod_template: dict) -> list[dict]:
    return pod_template["spec"]["containers"]


def _env(container: dict) -> dict:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


def _check_ray_cluster_spec(spec: dict) -> None:
    assert spec["rayVersion"] == ray.__version__
    head = _containers(spec["headGroupSpec"]["template"])
    groups = spec["workerGroupSpecs"]
    assert groups
    for group in groups:
        (worker,) = _containers(group["template"])
        assert worker["resources"]["limits"]["nvidia.com/gpu"] == 8
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    for c in head + [_containers(g["template"])[0] for g in groups]:
        env = _env(c)
        assert env["RAY_AUTH_MODE"] == "token"
        assert env["RAY_AUTH_TOKEN"]["secretKeyRef"]["name"] == "ray-auth-token"


def _check_train_command(command: str) -> None:
    """`pretrain train CONFIG overrides...` whose config, read from this checkout, validates."""
    argv = shlex.split(command)
    assert argv[:2] == ["pretrain", "train"]
    config = argv[2].replace(IMAGE_ROOT, str(ROOT), 1)
    load_config(config, argv[3:])


def test_kuberay_raycluster():
    docs = list(yaml.safe_load_all((CLUSTER / "kuberay" / "raycluster.yaml").read_text()))
    assert [(d["apiVersion"], d["kind"]) for d in docs] == [("ray.io/v1", "RayCluster")]
    _check_ray_cluster_spec(docs[0]["spec"])


def test_kuberay_rayjob_runs_pretrain_train():
    docs = list(yaml.safe_load_all((CLUSTER / "kuberay" / "rayjob.yaml").read_text()))
    assert [(d["apiVersion"], d["kind"]) for d in docs] == [("ray.io/v1", "RayJob")]
    spec = docs[0]["spec"]
    _check_train_command(spec["entrypoint"])
    _check_ray_cluster_spec(spec["rayClusterSpec"])
    # The submitter talks to the job API too, so it needs the token as well.
    (submitter,) = _containers(spec["submitterPodTemplate"])
    assert _env(submitter)["RAY_AUTH_MODE"] == "token" and "RAY_AUTH_TOKEN" in _env(submitter)
    # cluster.workers matches the GPUs the cluster spec brings.
    gpus = sum(g["replicas"] * _containers(g["template"])[0]["resources"]["limits"]["nvidia.com/gpu"]
               for g in spec["rayClusterSpec"]["workerGroupSpecs"])
    assert f"cluster.workers={gpus}" in spec["entrypoint"]


def test_kuberay_volume_claim_is_the_one_mounted():
    (pvc,) = yaml.safe_load_all((CLUSTER / "kuberay" / "shared-storage.yaml").read_text())
    assert pvc["kind"] == "PersistentVolumeClaim" and "ReadWriteMany" in pvc["spec"]["accessModes"]
    for name in ("raycluster.yaml", "rayjob.yaml"):
        assert f"claimName: {pvc['metadata']['name']}" in (CLUSTER / "kuberay" / name).read_text()


def test_slurm_script():
    script = CLUSTER / "slurm.sbatch"
    r = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    text = script.read_text()
    directives = dict(re.findall(r"^#SBATCH --([\w-]+)=?(\S*)", text, re.M))
    assert directives["gpus-per-node"] == "8" and int(directives["nodes"]) >= 2
    assert "ray start --head" in text and "ray start --block --address" in text
    assert "export RAY_AUTH_MODE=token" in text and "disabled" not in text
    (train,) = [ln for ln in text.splitlines() if ln.startswith("pretrain train")]
    assert '"$CONFIG"' in train and '"$@"' in train


def test_dockerfile_pins_the_projects_ray_and_installs_the_project():
    text = (CLUSTER / "Dockerfile").read_text()
    base = re.search(r"^FROM rayproject/ray:(\S+)", text, re.M)
    assert base and base.group(1).startswith(ray.__version__ + "-")
    assert "pip install --no-cache-dir -e ." in text
    assert f"WORKDIR {IMAGE_ROOT}" in text


def test_readme_covers_every_file():
    readme = (CLUSTER / "README.md").read_text()
    files = [p.relative_to(CLUSTER).as_posix() for p in CLUSTER.rglob("*") if p.is_file() and p.name != "README.md"]
    assert files
    assert [f for f in files if f"`{f}`" not in readme] == []
