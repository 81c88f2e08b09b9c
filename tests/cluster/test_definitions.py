"""The files under cluster/: Ray's own schema for the `ray up` YAMLs, structure of the KubeRay
manifests, syntax of the Slurm script, and that every `pretrain train` they run loads its config."""

from __future__ import annotations

import copy
import os
import pwd
import re
import shlex
import signal
import subprocess
import time
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
    assert 'bash -c "$RAY_NODE" ray-node --head --block' in text
    assert 'bash -c "$RAY_NODE" ray-node --block --address' in text
    assert "export RAY_AUTH_MODE=token" in text and "disabled" not in text
    (train,) = [ln for ln in text.splitlines() if ln.startswith("pretrain train")]
    assert '"$CONFIG"' in train and '"$@"' in train


def test_dockerfile_pins_the_projects_ray_and_installs_the_project():
    text = (CLUSTER / "Dockerfile").read_text()
    base = re.search(r"^FROM rayproject/ray:(\S+)", text, re.M)
    assert base and base.group(1).startswith(ray.__version__ + "-")
    assert "pip install --no-cache-dir -c constraints.txt -e ." in text
    assert f"WORKDIR {IMAGE_ROOT}" in text


def test_dockerfile_installs_with_the_lock():
    """Every pip install in the image is held to the repository's constraints.txt (as `make setup` is), which
    is copied in before the first one; the versions the Dockerfile names are the lock's."""
    text = (CLUSTER / "Dockerfile").read_text()
    lock = dict(re.findall(r"^([\w.-]+)==(\S+)$", (ROOT / "constraints.txt").read_text(), re.M))
    assert "-c constraints.txt" in (ROOT / "Makefile").read_text()
    installs = [m.start() for m in re.finditer(r"pip install", text)]
    assert len(installs) == 3
    for start in installs:
        command = text[start:].split("&&")[0].split("\nRUN")[0].split("\nCOPY")[0]
        assert " -c constraints.txt " in command, command
    copy = re.search(r"^COPY (?:--\S+ )*constraints\.txt \./$", text, re.M)
    assert copy and copy.start() < installs[0]
    code = "\n".join(ln for ln in text.splitlines() if not ln.startswith("#"))
    pinned = re.findall(r"\b(torch|deepspeed)==([\w.]+)", code)
    assert sorted(name for name, _ in pinned) == ["deepspeed", "torch"]
    assert all(lock[name] == version for name, version in pinned), pinned


def test_readme_covers_every_file():
    readme = (CLUSTER / "README.md").read_text()
    files = [p.relative_to(CLUSTER).as_posix() for p in CLUSTER.rglob("*") if p.is_file() and p.name != "README.md"]
    assert files
    assert [f for f in files if f"`{f}`" not in readme] == []


def _ray_node_wrapper() -> str:
    text = (CLUSTER / "slurm.sbatch").read_text()
    m = re.search(r"^RAY_NODE=\$\(cat <<'NODE'\n(.*?)\nNODE\n\)$", text, re.S | re.M)
    assert m, "slurm.sbatch defines RAY_NODE with a quoted heredoc"
    return m.group(1)


def test_slurm_ray_temp_dir_is_private_and_unpredictable():
    """No /tmp path built from a variable (another user can create /tmp/ray-<jobid> first); every `ray start`
    goes through RAY_NODE, whose temp dir is new, mode 700 and removed when Ray ends."""
    text = (CLUSTER / "slurm.sbatch").read_text()
    code = [ln for ln in text.splitlines() if not ln.lstrip().startswith("#")]
    assert not [ln for ln in code if re.search(r"/tmp/[\w.-]*\$", ln)]
    assert "--temp-dir" not in "\n".join(ln for ln in code if "ray-node" in ln)  # the wrapper sets it
    assert [ln for ln in code if "ray start" in ln] == ['ray start --temp-dir="$tmp" "$@" &']


@pytest.mark.parametrize("ending", ["exits", "terminated"])
def test_slurm_ray_node_wrapper_runs_ray_in_a_private_dir(tmp_path, ending):
    """RAY_NODE run by bash as srun runs it, with a stand-in `ray` that reports its --temp-dir: the dir
    exists while Ray runs, is mode 700 under /tmp with a random name, and is gone when Ray exits or when
    the step is signalled (SIGTERM, as srun forwards it), Ray itself stopped then."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    report = tmp_path / "report"
    fake = bindir / "ray"
    fake.write_text(f"""#!/bin/bash
for a in "$@"; do case $a in --temp-dir=*) d=${{a#--temp-dir=}};; esac; done
stat -c '%a %U' "$d" > {report}.tmp && echo "$d" >> {report}.tmp && echo "$*" >> {report}.tmp
mv {report}.tmp {report}
[[ $RAY_FAKE == exit ]] && exit 3
trap 'echo stopped > {tmp_path}/stopped; exit 0' TERM
while :; do sleep 0.1; done
""")
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}",
           "RAY_FAKE": "exit" if ending == "exits" else "block"}
    proc = subprocess.Popen(["bash", "-c", _ray_node_wrapper(), "ray-node", "--head", "--block", "--port=1"],
                            env=env)
    try:
        deadline = time.monotonic() + 20
        while not report.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        mode, owner, d, args = report.read_text().split(maxsplit=3)
        if ending == "terminated":
            assert Path(d).is_dir() and proc.poll() is None
            proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert mode == "700" and owner == pwd.getpwuid(os.getuid()).pw_name
    assert re.fullmatch(r"/tmp/ray-[A-Za-z0-9]{10}", d), d
    assert args.split() == ["start", f"--temp-dir={d}", "--head", "--block", "--port=1"]
    assert not Path(d).exists()
    if ending == "exits":
        assert rc == 3  # Ray's own status
    else:
        assert rc == 143 and (tmp_path / "stopped").read_text().strip() == "stopped"


def test_kuberay_network_policy_admits_only_the_cluster_and_labelled_clients():
    """Per Ray cluster: one policy lets its pods reach each other on every port; one opens only the head's
    GCS, job API and client ports, to namespaces carrying the documented label. The selectors match the
    labels the manifests' pods carry."""
    docs = list(yaml.safe_load_all((CLUSTER / "kuberay" / "networkpolicy.yaml").read_text()))
    assert docs and all((d["apiVersion"], d["kind"]) == ("networking.k8s.io/v1", "NetworkPolicy") for d in docs)
    (cluster,) = yaml.safe_load_all((CLUSTER / "kuberay" / "raycluster.yaml").read_text())
    (job,) = yaml.safe_load_all((CLUSTER / "kuberay" / "rayjob.yaml").read_text())
    spec = job["spec"]["rayClusterSpec"]
    job_pods = [spec["headGroupSpec"]["template"], job["spec"]["submitterPodTemplate"],
                *(g["template"] for g in spec["workerGroupSpecs"])]
    job_labels = [t["metadata"]["labels"] for t in job_pods]
    assert all(labels == job_labels[0] for labels in job_labels)
    # KubeRay labels every pod of a RayCluster ray.io/cluster=<name>; a RayJob's cluster name is generated,
    # so its pods carry a label of their own (the submitter too: it must reach the job API).
    clusters = [{"ray.io/cluster": cluster["metadata"]["name"]}, job_labels[0]]
    by_name = {d["metadata"]["name"]: d["spec"] for d in docs}
    assert len(by_name) == len(docs) == 2 * len(clusters)
    head_ports = {p["containerPort"] for p in _containers(cluster["spec"]["headGroupSpec"]["template"])[0]["ports"]}
    assert head_ports == {6379, 8265, 10001}
    for pods in clusters:
        peers = [s for s in by_name.values() if s["podSelector"]["matchLabels"] == pods]
        heads = [s for s in by_name.values() if s["podSelector"]["matchLabels"] == {**pods, "ray.io/node-type": "head"}]
        assert len(peers) == 1 and len(heads) == 1, pods
        (rule,) = peers[0]["ingress"]
        assert peers[0]["policyTypes"] == ["Ingress"] and "ports" not in rule  # every port, among themselves
        assert rule["from"] == [{"podSelector": {"matchLabels": pods}}]
        (rule,) = heads[0]["ingress"]
        assert heads[0]["policyTypes"] == ["Ingress"]
        assert rule["from"] == [{"namespaceSelector": {"matchLabels": {"pretrain.io/ray-client": "true"}}}]
        assert {(p["protocol"], p["port"]) for p in rule["ports"]} == {("TCP", p) for p in head_ports}
    readme = (CLUSTER / "README.md").read_text()
    assert "pretrain.io/ray-client=true" in readme and "networkpolicy.yaml" in readme
