"""`pretrain submit | status | logs | stop | jobs` against a real `ray start --head` with token auth."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

from pretrain.launch import jobs
from tests.helpers import free_port

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "gpt-tiny.yaml"


def cli(*args: str, env: dict[str, str] | None = None, timeout: float = 180) -> subprocess.CompletedProcess:
    """The real `pretrain` command line, in a fresh process (Ray caches the auth token per process)."""
    return _run([sys.executable, "-m", "pretrain.cli", *args], env, timeout)


def jobs_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 180) -> subprocess.CompletedProcess:
    """The same five commands without the rest of the CLI, whose imports (torch, triton) cost seconds."""
    return _run([sys.executable, "-m", "pretrain.cli.jobs", *args], env, timeout)


def _run(cmd: list[str], env: dict[str, str] | None, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def one_line(result: subprocess.CompletedProcess) -> str:
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, result.stderr
    return lines[0]


def bare_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(extra)
    return env


# ----------------------------------------------------------------------------- without a cluster


def test_job_spec_runs_pretrain_train_in_the_project(monkeypatch):
    for name in [k for k in os.environ if k.startswith("WANDB_")]:  # e.g. WANDB_MODE set by `make test`
        monkeypatch.delenv(name)
    monkeypatch.setenv("WANDB_API_KEY", "k-123")
    monkeypatch.setenv("WANDB_PROJECT", "p")
    monkeypatch.setenv("MY_SETTING", "7")
    spec = jobs.build_job(TINY, ["train.steps=10", "run.name=a b"], env=["MY_SETTING"])
    assert spec["entrypoint"] == "pretrain train configs/gpt-tiny.yaml train.steps=10 'run.name=a b'"
    renv = spec["runtime_env"]
    assert renv["working_dir"] == str(ROOT)
    # Settings travel, the secret does not; what --env asks for does, with a warning.
    assert renv["env_vars"] == {"WANDB_PROJECT": "p", "MY_SETTING": "7"}
    assert spec["warnings"][:2] == [
        "sending MY_SETTING to the cluster in the job's runtime_env: readable by anyone with the cluster token",
        'WANDB_API_KEY is set here but not sent: the job has it only where the cluster provides it '
        '(cluster/README.md, "Secrets for the run")',
    ]
    assert not {"pip", "uv", "conda"} & set(renv)  # the image has torch; a job never reinstalls it
    assert {"/.venv/", "/.git/", "/runs/", "/data/", ".env", "*.env"} <= set(renv["excludes"])
    assert spec["metadata"] == {"run": "a b", "config": "configs/gpt-tiny.yaml"}
    with pytest.raises(jobs.JobCommandError, match="NOT_SET_ANYWHERE"):
        jobs.build_job(TINY, [], env=["NOT_SET_ANYWHERE"])
    # gpt-tiny reads data/shakespeare-bpe, which is not uploaded: submit says so.
    assert any("data/shakespeare-bpe/train" in w for w in spec["warnings"])


def test_job_spec_rejects_a_config_outside_the_working_dir(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(TINY.read_text())
    with pytest.raises(jobs.JobCommandError, match="pyproject.toml") as e:
        jobs.build_job(cfg, [])
    assert e.value.code == 2
    with pytest.raises(jobs.JobCommandError, match="outside the working directory"):
        jobs.build_job(cfg, [], working_dir=ROOT)


def test_no_warning_for_shared_paths(tmp_path):
    spec = jobs.build_job(TINY, [f"data.train={tmp_path}/t", "data.val=s3://b/v", f"run.dir={tmp_path}"])
    assert spec["warnings"] == []


SECRET_FILES = [".env.local", ".env", "prod.env", ".envrc", ".netrc", ".aws/credentials", ".ssh/id_ed25519",
                "key.json", "gcp-service-key.json", "secrets.yaml", "configs/secrets.yaml", "credentials.json",
                "tls/server.pem", ".git-credentials", ".npmrc", ".pypirc", ".ray/auth_token", "nested/.env.prod",
                ".config/gcloud/application_default_credentials.json", "secrets.toml"]
LEFT_OUT = [".venv/lib/site.py", "runs/r/config.yaml", ".git/config"]  # not secrets, never uploaded either
NORMAL_FILES = ["configs/x.yaml", "train_extra.py", "mypkg/__init__.py", "mypkg/keys.py", "mypkg/credentials.py", "secrets.py", "pyproject.toml",
                "constraints.txt", "tokenizer/tokenizer.json", "README.md"]


def _uploaded(tmp_path: Path) -> tuple[set[str], dict]:
    """A project holding secret files beside normal ones; the names in the package Ray would upload for the
    runtime_env submit builds (Ray's own packaging function, offline)."""
    from ray._private.runtime_env.packaging import create_package

    proj = tmp_path / "proj"
    for name in SECRET_FILES + LEFT_OUT + NORMAL_FILES:
        (proj / name).parent.mkdir(parents=True, exist_ok=True)
        (proj / name).write_text("SECRET\n" if name in SECRET_FILES else "x: 1\n")
    (proj / "configs" / "x.yaml").write_text(TINY.read_text())
    spec = jobs.build_job(proj / "configs" / "x.yaml", [f"data.train={tmp_path}/t", "data.val=null",
                                                        f"run.dir={tmp_path}"])
    renv = spec["runtime_env"]
    assert renv["working_dir"] == str(proj)
    pkg = tmp_path / "pkg.zip"
    create_package(renv["working_dir"], pkg, include_gitignore=True, excludes=renv["excludes"])
    return {n.rstrip("/") for n in zipfile.ZipFile(pkg).namelist()}, spec


def test_upload_leaves_out_secret_files(tmp_path):
    names, spec = _uploaded(tmp_path)
    assert not set(SECRET_FILES + LEFT_OUT) & names, sorted(set(SECRET_FILES + LEFT_OUT) & names)
    assert set(NORMAL_FILES) <= names, sorted(set(NORMAL_FILES) - names)
    assert spec["warnings"] == []


def test_upload_keeps_every_file_of_this_project(tmp_path):
    """The secret patterns leave out no code or config of the project itself (Ray's matcher, per path and per
    directory above it, as Ray walks the tree)."""
    from ray._private.runtime_env.packaging import _get_excludes

    match = _get_excludes(ROOT, [*jobs.UPLOAD_EXCLUDES, *jobs.SECRET_EXCLUDES])
    files = [p for d in ("pretrain", "configs", "cluster", "tools", "tests") for p in (ROOT / d).rglob("*")
             if p.is_file() and "__pycache__" not in p.parts]
    files += [ROOT / "pyproject.toml", ROOT / "constraints.txt"]
    rels = [p.relative_to(ROOT) for p in files]
    dropped = [str(r) for r in rels if any(match(ROOT / q) for q in [r, *r.parents[:-1]])]
    assert not dropped, dropped[:10]


def test_a_credential_in_the_config_travels_with_a_redacted_warning():
    signed = "s3://b/v?X-Amz-Signature=SECRET"
    spec = jobs.build_job(TINY, ["data.train=/shared/t", f"data.val={signed}", "run.dir=/shared/runs"])
    assert signed in spec["entrypoint"]  # the job needs it as written
    assert spec["warnings"] == [
        "data.val.path carries a credential (s3://b/v?X-Amz-Signature=***): the job's entrypoint and uploaded "
        "config are readable by anyone with the cluster token; let the cluster provide it (cluster/README.md, "
        '"Secrets for the run")'
    ]


def test_bad_config_fails_before_contacting_a_cluster():
    r = cli("submit", str(TINY), "train.steps=-3", "--address", "http://127.0.0.1:1", env=bare_env())
    assert r.returncode == 2
    assert "train.steps" in one_line(r)


def test_unreachable_cluster_is_one_line():
    port = free_port()  # bound then released: nothing listens there
    for args in (("status", "raysubmit_x"), ("jobs",), ("submit", str(TINY))):
        r = cli(*args, "--address", f"http://127.0.0.1:{port}", env=bare_env())
        assert r.returncode == 1, (args, r.stderr)
        assert f"cannot reach the Ray job API at http://127.0.0.1:{port}" in one_line(r)


def test_address_defaults_to_ray_address():
    port = free_port()
    r = jobs_cli("jobs", env=bare_env(RAY_ADDRESS=f"http://127.0.0.1:{port}"))
    assert r.returncode == 1 and f"127.0.0.1:{port}" in one_line(r)
    r = jobs_cli("jobs", env=bare_env())
    assert r.returncode == 2 and "RAY_ADDRESS" in one_line(r)


def test_watching_commands_import_no_torch():
    """`pretrain status`, `logs` and `jobs` import Ray's job client, never torch, triton or deepspeed (the CLI
    mounts only the command group a command line names)."""
    port = free_port()
    for args in (("status", "raysubmit_x"), ("logs", "raysubmit_x"), ("jobs",)):
        r = _run([sys.executable, "-X", "importtime", "-m", "pretrain.cli", *args,
                  "--address", f"http://127.0.0.1:{port}"], bare_env(), 60)
        assert r.returncode == 1, (args, r.stderr[-2000:])
        heavy = {m for m in re.findall(r"\|\s+([\w.]+)\s*$", r.stderr, re.M)
                 if m.split(".")[0] in ("torch", "triton", "deepspeed")}
        assert not heavy, (args, sorted(heavy)[:5])
        errors = [ln for ln in r.stderr.splitlines() if not ln.startswith("import time:") and ln.strip()]
        assert errors == [f"error: cannot reach the Ray job API at http://127.0.0.1:{port} "
                          "(is the head node up and its dashboard port open?)"], args


# ----------------------------------------------------------------------------- against a Ray head


@pytest.mark.ray
def test_missing_or_wrong_token_is_named(ray_head):
    r = jobs_cli("jobs", "--address", ray_head.address, env=ray_head.env(token=False))
    assert r.returncode == 1
    line = one_line(r)
    assert "requires an auth token and none was found" in line and "RAY_AUTH_TOKEN" in line
    # RAY_AUTH_MODE=disabled on the client switches nothing off: the head still refuses.
    r = jobs_cli("jobs", "--address", ray_head.address, env=ray_head.env(token=False, RAY_AUTH_MODE="disabled"))
    assert r.returncode == 1 and "none was found" in one_line(r)
    # With RAY_AUTH_MODE=token locally, Ray itself refuses before asking: still the same line.
    r = jobs_cli("jobs", "--address", ray_head.address, env=ray_head.env(token=False, RAY_AUTH_MODE="token"))
    assert r.returncode == 1 and "none was found" in one_line(r)
    r = jobs_cli("jobs", "--address", ray_head.address, env=ray_head.env(token=False, RAY_AUTH_TOKEN_PATH="/nonexistent"))
    assert r.returncode == 1 and "RAY_AUTH_TOKEN_PATH" in one_line(r) and "/nonexistent" in one_line(r)
    r = jobs_cli("jobs", "--address", ray_head.address, env=ray_head.env(RAY_AUTH_TOKEN="0" * 32))
    assert r.returncode == 1 and "rejected the auth token" in one_line(r)
    # The token file Ray documents works as well as the variable.
    tok = ray_head.tmp / "token-file"
    tok.write_text(ray_head.token + "\n")
    r = jobs_cli("jobs", "--address", ray_head.address, env=ray_head.env(token=False, RAY_AUTH_TOKEN_PATH=str(tok)))
    assert r.returncode == 0, r.stderr


@pytest.mark.ray
def test_unknown_job_is_one_line(ray_head):
    for cmd in (("status",), ("logs",), ("logs", "--follow"), ("stop",)):
        r = jobs_cli(*cmd, "raysubmit_nosuchjob", "--address", ray_head.address, env=ray_head.env())
        assert r.returncode == 1, (cmd, r.stdout, r.stderr)
        assert one_line(r) == f"error: no job 'raysubmit_nosuchjob' on the Ray cluster at {ray_head.address}"


@pytest.mark.ray
def test_upload_leaves_out_venv_and_git_and_passes_env(ray_head, monkeypatch):
    """The runtime_env submit builds, run for real: what the job sees in its working directory."""
    from ray.job_submission import JobSubmissionClient

    assert (ROOT / ".venv").is_dir() and (ROOT / ".git").exists()
    monkeypatch.setenv("PROBE_VALUE", "42")
    spec = jobs.build_job(TINY, ["train.steps=10"], env=["PROBE_VALUE"])
    probe = (
        "import json, os; print(json.dumps({p: os.path.exists(p) for p in "
        "['pretrain/launch/jobs.py', 'pretrain/data', 'configs/gpt-tiny.yaml', '.venv', '.git']} | "
        "{'env': os.environ.get('PROBE_VALUE'), 'ray_address': bool(os.environ.get('RAY_ADDRESS'))}))"
    )
    client = JobSubmissionClient(ray_head.address, headers={"Authorization": f"Bearer {ray_head.token}"})
    jid = client.submit_job(entrypoint=f"python -c {json.dumps(probe)}", runtime_env=spec["runtime_env"])
    deadline = time.monotonic() + 90
    while str(client.get_job_status(jid)) not in jobs.TERMINAL and time.monotonic() < deadline:
        time.sleep(0.5)
    out = client.get_job_logs(jid)
    assert str(client.get_job_status(jid)) == "SUCCEEDED", out
    seen = json.loads([ln for ln in out.splitlines() if ln.startswith("{")][-1])
    assert seen == {
        "pretrain/launch/jobs.py": True, "pretrain/data": (ROOT / "pretrain" / "data").exists(),
        "configs/gpt-tiny.yaml": True, ".venv": False, ".git": False, "env": "42", "ray_address": True,
    }


def _last_line(result: subprocess.CompletedProcess) -> str:
    return result.stdout.strip().splitlines()[-1]


@pytest.mark.ray
@pytest.mark.slow
def test_submit_gpt_tiny_follow_status_and_stop(ray_head, tiny_shards, tmp_path):
    """gpt-tiny trains 10 steps as a Ray job; a second run is stopped while it runs."""
    addr = ["--address", ray_head.address]
    env = ray_head.env(WANDB_MODE="offline")  # a setting: passed through to the job
    common = [
        f"data.train={tiny_shards}/train", f"data.val={tiny_shards}/val", f"run.dir={tmp_path}", "model.vocab_size=50304",
        "cluster.workers=1", "train.log_every=1", "eval.every=0", "objective.sample_tokens=0",
    ]
    r = cli("submit", "configs/gpt-tiny.yaml", "train.steps=10", "run.name=tiny10", *common, *addr, env=env)
    assert r.returncode == 0, r.stderr
    first = r.stdout.strip()
    assert re.fullmatch(r"raysubmit_\w+", first), r.stdout

    # --follow returns when the job ends, having streamed the driver's output.
    followed = cli("logs", first, "--follow", *addr, env=env, timeout=600)
    assert followed.returncode == 0, followed.stderr
    r = cli("status", first, *addr, env=env)
    assert r.returncode == 0 and _last_line(r) == "SUCCEEDED", followed.stdout[-3000:]
    assert re.search(r"^goodput \d+% of [\d.]+ s over 1 attempt", r.stdout, re.M), r.stdout  # where the time went
    logged = cli("logs", first, *addr, env=env).stdout
    for text in (followed.stdout, logged):
        steps = {int(s) for s in re.findall(r"step\s+(\d+)/10\s+loss", text)}
        assert steps == set(range(1, 11)), text[-3000:]
    # The run directory was on "shared storage": the job wrote it where the config said.
    rows = [json.loads(ln) for ln in (tmp_path / "tiny10" / "metrics.jsonl").read_text().splitlines()]
    assert max(row["step"] for row in rows) == 10

    r = cli("submit", "configs/gpt-tiny.yaml", "train.steps=100000", "run.name=long", *common, *addr, env=env)
    assert r.returncode == 0, r.stderr
    second = r.stdout.strip()
    deadline = time.monotonic() + 180
    state = "PENDING"
    while state == "PENDING" and time.monotonic() < deadline:
        state = _last_line(jobs_cli("status", second, *addr, env=env))
    assert state == "RUNNING"
    r = cli("stop", second, *addr, env=env)
    assert r.returncode == 0 and _last_line(r) == "STOPPED", r.stdout + r.stderr
    assert _last_line(cli("status", second, *addr, env=env)) == "STOPPED"

    listed = cli("jobs", *addr, env=env)
    assert listed.returncode == 0
    rows = {ln.split()[0]: ln.split() for ln in listed.stdout.splitlines()[1:]}
    assert rows[first][1:2] == ["SUCCEEDED"] and rows[second][1:2] == ["STOPPED"]
    assert "tiny10" in rows[first] and "long" in rows[second]


@pytest.mark.ray
def test_submit_sends_no_secret_unless_asked(ray_head, tmp_path):
    """`pretrain submit` with WANDB_API_KEY and HF_TOKEN in the shell: neither is in what the job API gives
    anyone with the cluster token; with `--env WANDB_API_KEY` that one is, and submit warned."""
    import secrets

    from ray.job_submission import JobSubmissionClient

    key, hf = f"wandb-{secrets.token_hex(8)}", f"hf-{secrets.token_hex(8)}"
    env = ray_head.env(WANDB_API_KEY=key, HF_TOKEN=hf, WANDB_MODE="offline")
    # Absolute paths (no locality warnings); the job, if it got as far, would fail on the missing data.
    args = ["submit", str(TINY), "data.train=/nonexistent/train", "data.val=null", f"run.dir={tmp_path}",
            "--address", ray_head.address]
    client = JobSubmissionClient(ray_head.address, headers={"Authorization": f"Bearer {ray_head.token}"})

    def submitted(*extra: str) -> tuple[str, str]:
        r = cli(*args, *extra, env=env)
        assert r.returncode == 0, r.stderr
        jid = r.stdout.strip()
        info = client.get_job_info(jid)
        client.stop_job(jid)  # only its metadata matters here
        return repr(info) + json.dumps(info.runtime_env) + json.dumps(info.metadata), r.stderr

    seen, stderr = submitted()
    assert key not in seen and hf not in seen and "WANDB_API_KEY" not in seen and "HF_TOKEN" not in seen
    assert "offline" in seen  # the settings still travel
    assert "sending" not in stderr and "WANDB_API_KEY is set here but not sent" in stderr

    seen, stderr = submitted("--env", "WANDB_API_KEY")
    assert key in seen and hf not in seen
    warning = ("warning: sending WANDB_API_KEY to the cluster in the job's runtime_env: readable by anyone "
               "with the cluster token")
    assert warning in stderr.splitlines(), stderr
