"""The Ray job client: run training on an existing Ray cluster and watch it from a laptop.

Thin helpers over Ray's job API (`ray.job_submission.JobSubmissionClient`, the dashboard's HTTP port,
usually 8265): `connect` to a head, `build_job` (validate the config locally, upload the project directory
as the job's working directory without .venv, runs/, data/, .git, caches and secret files, and start
`pretrain train CONFIG overrides...` on the head node; there `pretrain train` finds the cluster through
the RAY_ADDRESS Ray sets for every job), `job_state`. No secret of the submitting shell travels with a job
unless `--env NAME` asks for it, with a warning: a job's runtime_env is readable by anyone with the
cluster token. The cluster provides secrets itself. The commands `pretrain submit | status | logs | stop |
jobs` are pretrain.cli.jobs.

No secret file of the project directory travels either: the upload leaves out, at any depth, the files that
commonly hold credentials (SECRET_EXCLUDES: dotenv files, .netrc, .aws/, .ssh/, keys and certificates,
`*key*.json`, `secrets.*`, `credentials*`, .ray/ with the cluster token...), on top of the user's
.gitignore and .rayignore, which Ray also applies. A list of what to leave out, not one of what to send:
an allowlist (the package, configs/, pyproject.toml) would break every user whose config names a
tokenizer, a data list or a module of their own beside the project, and the working directory is the
user's to choose (`--working-dir`). The patterns spare code (`credentials.py`, `secrets.py` travel), so
no module the job imports goes missing; anything else private goes in .rayignore. A config value that carries a credential
(a presigned URL, `https://user:pw@host`) is sent as written, in the entrypoint and the uploaded config,
with a warning (pretrain.redact decides what is one); what submit prints is redacted.

Ray 2.60 heads run with token authentication by default. The token is read from the same places Ray reads
it (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token) and sent as a bearer header whatever
RAY_AUTH_MODE says locally; nothing here turns authentication off. Every failure (no address,
unreachable head, missing or wrong token, unknown job) is raised as JobCommandError (one line and an exit
code) wherever it is found, and printed at the command boundary: `error: ...` on stderr and a non-zero
exit. Importing this module loads nothing heavy; Ray's job client and `pretrain.load` (pydantic) are
imported inside the functions that need them.
"""

from __future__ import annotations

import logging
import os
import shlex
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from pretrain.errors import first_line
from pretrain.redact import leaked, redact
from pretrain.urls import is_url

if TYPE_CHECKING:
    from ray.job_submission import JobSubmissionClient

# Exit codes: 1 for a cluster-side problem, 2 for a usage mistake (bad config, no address), like click.
EXIT_CLUSTER, EXIT_USAGE = 1, 2

TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")

# Settings (no secrets) a job takes from the submitting shell when they are set there.
PASS_ENV = ("WANDB_ENTITY", "WANDB_PROJECT", "WANDB_MODE", "WANDB_BASE_URL")
# Secrets are never copied by default: a job's runtime_env and metadata are readable by anyone holding
# the cluster token (job API, dashboard, `ray job list`). The cluster definitions give them to the nodes
# (cluster/README.md, "Secrets for the run"); `--env NAME` sends one anyway, with a warning. These are
# the ones submit mentions when they are set here and therefore not sent.
KNOWN_SECRETS = ("WANDB_API_KEY", "HF_TOKEN")

# gitignore patterns relative to the working directory; a leading "/" anchors at its root so that
# pretrain/data/ (code) is uploaded while ./data/ (shards) is not. Ray caps a package at ~500 MB.
UPLOAD_EXCLUDES = [
    "/.venv/",
    "/venv/",
    "/.git/",
    "/runs/",
    "/data/",
    "/wandb/",
    "/shared/",
    "/build/",
    "/dist/",
    "*.egg-info/",
    "__pycache__/",
    "*.pyc",
    ".pytest_cache/",
    ".ruff_cache/",
    ".mypy_cache/",
    ".cache/",
]
# Files that commonly hold credentials, at any depth: never part of an upload, whatever the user's .gitignore
# says (module docstring: why a list of what to leave out rather than one of what to send).
SECRET_EXCLUDES = [
    ".env", ".env*", "*.env", ".envrc",  # dotenv and direnv
    ".netrc", "_netrc", ".git-credentials", ".npmrc", ".pypirc", ".yarnrc*", ".docker/", ".dockercfg",
    ".aws/", ".boto", ".s3cfg", ".config/gcloud/", ".azure/", ".kube/", ".terraformrc", "*.tfvars", "*.tfstate*",
    ".ssh/", ".gnupg/", ".ray/", ".huggingface/", ".wandb/",  # .ray/auth_token is the cluster's token itself
    "id_rsa*", "id_dsa*", "id_ecdsa*", "id_ed25519*",
    "*.pem", "*.key", "*.p12", "*.pfx", "*.jks", "*.keystore", "*.ppk", "*.kdbx",
    "*key*.json", "service-account*.json", "auth_token", "*.token", ".htpasswd",
    # Named like credentials or secrets: by extension, so that code (a module `credentials.py`) still travels.
    # No "!*.py" exception instead: Ray matches each file, not the directories above it, so a negation
    # would bring back every .py file under .venv/.
    "credentials", ".credentials*", "*credentials*.json", "credentials.csv", "*accessKeys.csv",
    "secrets", ".secrets*", "client_secret*.json", "*secret*.json",
    *(f"{stem}.{ext}" for stem in ("credentials", "secrets", "*secret*")
      for ext in ("y*ml", "toml", "ini", "txt", "env")),
]


class JobCommandError(Exception):
    """A failure the user can act on; the message is one line."""

    def __init__(self, message: str, code: int = EXIT_CLUSTER):
        super().__init__(message)
        self.code = code


def _fail(message: str, code: int = EXIT_CLUSTER) -> NoReturn:
    raise JobCommandError(message, code)


# ----------------------------------------------------------------------------- connection


def find_token() -> str | None:
    """The Ray auth token this shell would use, from Ray's own loader (env vars, then token file)."""
    from ray.exceptions import AuthenticationError

    from pretrain.compat import ray_auth_token_loader

    loader = ray_auth_token_loader()
    try:
        # ignore_auth_mode: look for a token even when RAY_AUTH_MODE is unset here, as it usually
        # is on a laptop; the head decides whether it is needed.
        if not loader.has_token(ignore_auth_mode=True):
            return None
        return loader.get_raw_token(ignore_auth_mode=True).strip() or None
    except AuthenticationError as e:  # e.g. RAY_AUTH_TOKEN_PATH names a missing file
        _fail((first_line(str(e)) or "unknown error").split(". Note:")[0])


def _token_hint() -> str:
    return (
        "set RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH, or put it in ~/.ray/auth_token "
        "(print it on the head node with `ray get-auth-token`)"
    )


@contextmanager
def _explicit_address() -> Iterator[None]:
    # Ray lets RAY_ADDRESS / RAY_API_SERVER_ADDRESS override the address argument; an explicit
    # --address must win, so hide them while the client resolves its address.
    saved = {k: os.environ.pop(k) for k in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS") if k in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


@contextmanager
def one_line_errors(address: str, job_id: str | None = None) -> Iterator[None]:
    """Turn Ray client exceptions into JobCommandError with one actionable line."""
    from ray.exceptions import AuthenticationError

    try:
        yield
    except JobCommandError:
        raise
    except AuthenticationError:
        # Decided by what we hold, not by parsing Ray's message: with RAY_AUTH_MODE=token set
        # locally Ray refuses before asking the head, with other words.
        if find_token() is None:
            _fail(f"the Ray cluster at {address} requires an auth token and none was found: {_token_hint()}")
        _fail(f"the Ray cluster at {address} rejected the auth token: {_token_hint()}")
    except ConnectionError:
        _fail(f"cannot reach the Ray job API at {address} (is the head node up and its dashboard port open?)")
    except RuntimeError as e:
        text = str(e)
        if job_id is not None and ("404" in text or "does not exist" in text):
            _fail(f"no job '{job_id}' on the Ray cluster at {address}")
        _fail(first_line(text) or "unknown error")
    except Exception as e:  # requests' InvalidURL, MissingSchema, timeouts...: still one line
        _fail(f"{type(e).__name__}: {first_line(str(e)) or 'unknown error'} (address {address})")


def connect(address: str | None) -> tuple[JobSubmissionClient, str]:
    """A job client for `address` (or RAY_ADDRESS), carrying the auth token when there is one."""
    if not address:
        _fail("no Ray cluster address: pass --address http://HEAD:8265 or set RAY_ADDRESS", EXIT_USAGE)
    from ray.job_submission import JobSubmissionClient

    token = find_token()
    headers = {"Authorization": f"Bearer {token}"} if token else None
    with one_line_errors(address), _explicit_address():
        # The constructor already calls the head (version check), so an unreachable or
        # unauthorised cluster fails here.
        return JobSubmissionClient(address, headers=headers), address


@contextmanager
def quiet_ray() -> Iterator[None]:
    # Ray's client logs INFO/WARNING lines (packaging, default excludes) that would bury our one
    # line of output; errors still surface as exceptions.
    log = logging.getLogger("ray")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


# ----------------------------------------------------------------------------- the job spec


def project_dir(config: Path) -> Path:
    """The nearest directory above the config holding a pyproject.toml: the code the job runs."""
    for d in config.resolve().parents:
        if (d / "pyproject.toml").is_file():
            return d
    _fail(f"no project directory (one with pyproject.toml) above {config}; pass --working-dir", EXIT_USAGE)


def _is_remote_or_absolute(path: str) -> bool:
    return is_url(path) or path.startswith("/") or Path(path).is_absolute()


def locality_warnings(cfg) -> list[str]:
    """Config paths that will not mean on the cluster what they mean here."""
    out = []
    sources = list(cfg.data.train) + ([cfg.data.val] if cfg.data.val else [])
    for src in sources:
        if not _is_remote_or_absolute(src.path):
            out.append(
                f"data path '{src.path}' is relative: the job resolves it in its working directory on "
                "the head, where data/ is not uploaded; use shared storage or an object-store URL"
            )
    if not _is_remote_or_absolute(cfg.run.dir):
        # Checkpoints follow cluster.storage when it is set, but metrics, the summary and the final weights
        # always live under run.dir: relative, they are lost with the head's temporary job directory.
        kept = "metrics, summary and final weights" if cfg.cluster.storage else "the run, checkpoints included,"
        out.append(
            f"run.dir '{cfg.run.dir}' is relative: {kept} land in the job's temporary working directory "
            "on the head; set run.dir to shared storage"
        )
    return out


def credential_warnings(cfg) -> list[str]:
    """Config values (from the file or an override) that carry a credential: they travel as written."""
    return [f"{key} carries a credential ({value}): the job's entrypoint and uploaded config are readable by "
            "anyone with the cluster token; let the cluster provide it (cluster/README.md, \"Secrets for the run\")"
            for key, value in leaked(cfg.model_dump(mode="json"))]


def build_job(
    config: Path,
    overrides: list[str],
    working_dir: Path | None = None,
    env: list[str] | tuple[str, ...] = (),
) -> dict:
    """Validate the config and return submit_job's keyword arguments (entrypoint, runtime_env, metadata).

    Raises pretrain.config.ConfigError for a bad config, JobCommandError for a bad layout.
    """
    from pretrain.load import load_config

    cfg = load_config(config, overrides)
    wd = (working_dir or project_dir(config)).resolve()
    try:
        rel = config.resolve().relative_to(wd)
    except ValueError:
        _fail(f"config {config} is outside the working directory {wd}; move it under it", EXIT_USAGE)
    env_vars = {name: os.environ[name] for name in PASS_ENV if name in os.environ}
    warnings = []
    for name in dict.fromkeys(env):
        if name not in os.environ:
            _fail(f"--env {name}: not set in this shell", EXIT_USAGE)
        env_vars[name] = os.environ[name]
        warnings.append(f"sending {name} to the cluster in the job's runtime_env: readable by anyone with the "
                        "cluster token")
    for name in KNOWN_SECRETS:
        if name in os.environ and name not in env_vars:
            warnings.append(f"{name} is set here but not sent: the job has it only where the cluster provides "
                            "it (cluster/README.md, \"Secrets for the run\")")
    # No pip/conda/uv here: the cluster image already has the project's dependencies
    # (torch included); reinstalling torch per job would take minutes and gigabytes.
    runtime_env: dict = {"working_dir": str(wd), "excludes": [*UPLOAD_EXCLUDES, *SECRET_EXCLUDES]}
    if env_vars:
        runtime_env["env_vars"] = env_vars
    return {
        "entrypoint": shlex.join(["pretrain", "train", rel.as_posix(), *overrides]),
        "runtime_env": runtime_env,
        "metadata": {"run": cfg.run.name, "config": rel.as_posix()},
        "warnings": [redact(w) for w in (*warnings, *credential_warnings(cfg), *locality_warnings(cfg))],
    }


def job_state(client, job_id: str, addr: str) -> str:
    """The job's state (PENDING, RUNNING, SUCCEEDED, FAILED, STOPPED); an unknown id is a JobCommandError."""
    with one_line_errors(addr, job_id):
        return str(client.get_job_status(job_id).value)

