"""Ray job commands: run training on an existing Ray cluster and watch it from a laptop.

Owns `pretrain submit | status | logs | stop | jobs`, thin wrappers over Ray's job API
(`ray.job_submission.JobSubmissionClient`, the dashboard's HTTP port, usually 8265). `submit`
validates the config locally, uploads the project directory as the job's working directory
(without .venv, runs/, data/, .git and caches) and starts `pretrain train CONFIG overrides...` on the
head node; there `pretrain train` finds the cluster through the RAY_ADDRESS Ray sets for every job.
No secret of the submitting shell travels with a job unless `--env NAME` asks for it, with a warning: a
job's runtime_env is readable by anyone with the cluster token. The cluster provides secrets itself.

Ray 2.60 heads run with token authentication by default. The token is read from the same places Ray reads
it (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token) and sent as a bearer header whatever
RAY_AUTH_MODE says locally; nothing here turns authentication off. Every failure (no address,
unreachable head, missing or wrong token, unknown job) is raised as JobCommandError wherever it is found
and printed at the command boundary by `pretrain.cli.common.fail`: one line `error: ...` on stderr and a
non-zero exit. Importing this module loads typer only; status, logs, stop and jobs add Ray's job client,
`submit` also `pretrain.config` (pydantic), inside the commands; none of them imports torch, triton or
deepspeed, except `submit --gpu`, whose memory check (`pretrain.plan`) builds the model on the meta device.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shlex
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, NoReturn

import typer

from pretrain.cli.common import fail
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
    ".env",  # dotenv files hold secrets: never part of an upload
    "*.env",
]

AddressOpt = Annotated[
    str | None,
    typer.Option(
        "--address",
        envvar="RAY_ADDRESS",
        show_envvar=True,
        help="Ray job API of the head node, e.g. http://HEAD:8265.",
    ),
]
JobArg = Annotated[str, typer.Argument(help="Job id, as printed by `pretrain submit`.")]


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
    from ray._raylet import AuthenticationTokenLoader
    from ray.exceptions import AuthenticationError

    loader = AuthenticationTokenLoader.instance()
    try:
        # ignore_auth_mode: look for a token even when RAY_AUTH_MODE is unset here, as it usually
        # is on a laptop; the head decides whether it is needed.
        if not loader.has_token(ignore_auth_mode=True):
            return None
        return loader.get_raw_token(ignore_auth_mode=True).strip() or None
    except AuthenticationError as e:  # e.g. RAY_AUTH_TOKEN_PATH names a missing file
        _fail(_first_line(str(e)).split(". Note:")[0])


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
def _one_line_errors(address: str, job_id: str | None = None) -> Iterator[None]:
    """Turn Ray client exceptions into JobCommandError with one actionable line."""
    from ray.exceptions import AuthenticationError

    try:
        yield
    except (JobCommandError, typer.Exit):  # typer.Exit (e.g. 130 on Ctrl-C) is a RuntimeError: not Ray's
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
        _fail(_first_line(text))
    except Exception as e:  # requests' InvalidURL, MissingSchema, timeouts...: still one line
        _fail(f"{type(e).__name__}: {_first_line(str(e))} (address {address})")


def _first_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[0] if lines else "unknown error"


def connect(address: str | None) -> tuple[JobSubmissionClient, str]:
    """A job client for `address` (or RAY_ADDRESS), carrying the auth token when there is one."""
    if not address:
        _fail("no Ray cluster address: pass --address http://HEAD:8265 or set RAY_ADDRESS", EXIT_USAGE)
    from ray.job_submission import JobSubmissionClient

    token = find_token()
    headers = {"Authorization": f"Bearer {token}"} if token else None
    with _one_line_errors(address), _explicit_address():
        # The constructor already calls the head (version check), so an unreachable or
        # unauthorised cluster fails here.
        return JobSubmissionClient(address, headers=headers), address


@contextmanager
def _quiet_ray() -> Iterator[None]:
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
    runtime_env: dict = {"working_dir": str(wd), "excludes": list(UPLOAD_EXCLUDES)}
    if env_vars:
        runtime_env["env_vars"] = env_vars
    return {
        "entrypoint": shlex.join(["pretrain", "train", rel.as_posix(), *overrides]),
        "runtime_env": runtime_env,
        "metadata": {"run": cfg.run.name, "config": rel.as_posix()},
        "warnings": [*warnings, *locality_warnings(cfg)],
    }


# ----------------------------------------------------------------------------- commands


def _run(fn) -> None:
    """Run a command body; print JobCommandError as one line (`error: ...`) and exit with its code."""
    try:
        fn()
    except JobCommandError as e:
        raise fail(str(e), e.code) from None


def submit(
    config: Annotated[Path, typer.Argument(help="Run config (YAML) inside the project directory.")],
    overrides: Annotated[list[str] | None, typer.Argument(help="section.key=value overrides.")] = None,
    address: AddressOpt = None,
    working_dir: Annotated[
        Path | None,
        typer.Option("--working-dir", help="Directory uploaded as the job's code; default: the project of CONFIG."),
    ] = None,
    env: Annotated[
        list[str] | None,
        typer.Option("--env", help="Send this variable of your shell to the job, visible to anyone with the "
                     "cluster token (repeatable); secrets belong in the cluster definition."),
    ] = None,
    job_id: Annotated[str | None, typer.Option("--job-id", help="Submission id; default: Ray picks one.")] = None,
    gpu: Annotated[
        str | None,
        typer.Option("--gpu", envvar="PRETRAIN_GPU", show_envvar=True,
                     help="The cluster's GPU model (e.g. h100-sxm): check first that the config fits it, as "
                     "`pretrain plan` does, one GPU per cluster.workers."),
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Submit even if the config does not fit --gpu.")] = False,
) -> None:
    """Submit `pretrain train CONFIG overrides...` to a Ray cluster; print the job id. With --gpu (or
    PRETRAIN_GPU) a config whose per-GPU memory exceeds that GPU is refused before anything is sent."""

    def body() -> None:
        from pretrain.config import ConfigError

        try:
            spec = build_job(config, list(overrides or []), working_dir, list(env or []))
        except ConfigError as e:
            _fail(str(e), EXIT_USAGE)
        _check_fits(config, list(overrides or []), gpu, force)  # before any connection: nothing is sent
        client, addr = connect(address)
        for w in spec.pop("warnings"):
            typer.echo(f"warning: {w}", err=True)
        with _one_line_errors(addr), _quiet_ray():
            jid = client.submit_job(submission_id=job_id, **spec)
        typer.echo(f"submitted to {addr}: {spec['entrypoint']}", err=True)
        typer.echo(f"follow it with: pretrain logs {jid} --follow --address {addr}", err=True)
        # The id alone on stdout, so that JOB=$(pretrain submit ...) works.
        typer.echo(jid)

    _run(body)


def _check_fits(config: Path, overrides: list[str], gpu: str | None, force: bool) -> None:
    """`pretrain plan`'s verdict for the job's GPUs: refuse (exit 2) a config that does not fit, unless forced.
    Imports torch and deepspeed (the model is built on the meta device), so only when --gpu is given."""
    if not gpu:  # nothing to check against; `pretrain plan` answers the same question on demand
        return
    from pretrain.config import ConfigError
    from pretrain.load import load_config
    from pretrain.plan import make_plan

    try:
        cfg = load_config(config, overrides)
        if cfg.train.init_from:
            from pretrain.hub.sources import resolve

            cfg = resolve(cfg)
        plan = make_plan(cfg, gpu)
    except ConfigError as e:
        _fail(str(e), EXIT_USAGE)
    if plan.fits:
        return
    if not force:
        _fail(f"{plan.verdict()} (`pretrain plan {config} --gpu {gpu}` for the terms; --force submits anyway)",
              EXIT_USAGE)
    typer.echo(f"warning: {plan.verdict()}; submitting anyway (--force)", err=True)


def _state(client, job_id: str, addr: str) -> str:
    with _one_line_errors(addr, job_id):
        return str(client.get_job_status(job_id).value)


def _stamp(ms: int | None) -> str:
    return datetime.fromtimestamp(ms / 1000).isoformat(sep=" ", timespec="seconds") if ms else "-"


def status(
    job_id: JobArg,
    address: AddressOpt = None,
    wait: Annotated[
        bool, typer.Option("--wait", help="Block until the job ends; exit 0 only if it SUCCEEDED.")
    ] = False,
) -> None:
    """Print a job's details; the last line is its state (PENDING, RUNNING, SUCCEEDED, FAILED, STOPPED)."""

    def body() -> None:
        client, addr = connect(address)
        with _one_line_errors(addr, job_id):
            info = client.get_job_info(job_id)
            while wait and str(info.status.value) not in TERMINAL:
                time.sleep(1.0)
                info = client.get_job_info(job_id)
        typer.echo(f"job:        {job_id}")
        typer.echo(f"entrypoint: {info.entrypoint}")
        typer.echo(f"started:    {_stamp(info.start_time)}")
        typer.echo(f"ended:      {_stamp(info.end_time)}")
        if info.message:
            typer.echo(f"message:    {_first_line(info.message)}")
        state = str(info.status.value)
        typer.echo(state)
        if wait and state != "SUCCEEDED":
            raise typer.Exit(EXIT_CLUSTER)

    _run(body)


def logs(
    job_id: JobArg,
    address: AddressOpt = None,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Stream new lines until the job ends.")] = False,
) -> None:
    """Print a job's driver output (stdout and stderr of `pretrain train` on the head)."""

    def body() -> None:
        client, addr = connect(address)
        if not follow:
            with _one_line_errors(addr, job_id):
                text = client.get_job_logs(job_id)
            typer.echo(text, nl=not text.endswith("\n"))
            return
        # tail_job_logs quietly yields nothing for an unknown id; ask first so that is an error.
        _state(client, job_id, addr)

        async def tail() -> None:
            async for chunk in client.tail_job_logs(job_id):
                typer.echo(chunk, nl=False)

        with _one_line_errors(addr, job_id):
            try:
                asyncio.run(tail())
            except KeyboardInterrupt:
                raise typer.Exit(130) from None

    _run(body)


def stop(
    job_id: JobArg,
    address: AddressOpt = None,
    timeout: Annotated[float, typer.Option("--timeout", help="Seconds to wait for the job to end.")] = 60.0,
) -> None:
    """Stop a job (SIGTERM, then SIGKILL after Ray's grace period); the last line is its final state."""

    def body() -> None:
        client, addr = connect(address)
        with _one_line_errors(addr, job_id):
            client.stop_job(job_id)
        deadline = time.monotonic() + timeout
        state = _state(client, job_id, addr)
        while state not in TERMINAL and time.monotonic() < deadline:
            time.sleep(0.5)
            state = _state(client, job_id, addr)
        typer.echo(state)
        if state not in TERMINAL:
            _fail(f"job {job_id} is still {state} after {timeout:.0f} s")

    _run(body)


def jobs(address: AddressOpt = None) -> None:
    """List the cluster's jobs, oldest first: id, state, start time, run name, entrypoint."""

    def body() -> None:
        client, addr = connect(address)
        with _one_line_errors(addr):
            found = sorted(client.list_jobs(), key=lambda j: j.start_time or 0)
        if not found:
            typer.echo(f"no jobs on {addr}")
            return
        rows = [("ID", "STATE", "STARTED", "RUN", "ENTRYPOINT")]
        for j in found:
            run = (j.metadata or {}).get("run", "-")
            rows.append((j.submission_id or j.job_id or "-", str(j.status.value), _stamp(j.start_time), run, j.entrypoint))
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        for r in rows:
            typer.echo("  ".join(c.ljust(w) for c, w in zip(r[:4], widths, strict=True)) + "  " + r[4])

    _run(body)


def register(app: typer.Typer) -> None:
    """Add submit, status, logs, stop and jobs to the root CLI."""
    for fn in (submit, status, logs, stop, jobs):
        app.command(fn.__name__)(fn)


if __name__ == "__main__":  # python -m pretrain.launch.jobs: the job commands without the rest of the CLI
    _app = typer.Typer(add_completion=False, no_args_is_help=True)
    register(_app)
    _app()
