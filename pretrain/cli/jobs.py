"""`pretrain submit | status | logs | stop | jobs`: run training on an existing Ray cluster and watch it from
a laptop. Argument parsing and reporting only; the job client (connection, token, job spec, one-line
errors) is pretrain.launch.jobs.

`submit` validates the config locally, uploads the project directory as the job's working directory and
starts `pretrain train CONFIG overrides...` on the head node. Every failure the client raises
(JobCommandError: no address, unreachable head, missing or wrong token, unknown job) is printed here by
`pretrain.cli.common.fail`: one line `error: ...` on stderr and its exit code. Importing this module loads
typer only; status, logs, stop and jobs add Ray's job client, `submit` also `pretrain.config` (pydantic),
inside the commands; none of them imports torch, triton or deepspeed, except `submit --gpu`, whose memory
check (`pretrain.plan`) builds the model on the meta device.
"""

from __future__ import annotations

import asyncio
import time
from datetime import datetime
from pathlib import Path
from typing import Annotated

import typer

from pretrain.cli.common import fail
from pretrain.errors import first_line
from pretrain.launch.jobs import (
    EXIT_CLUSTER,
    EXIT_USAGE,
    TERMINAL,
    JobCommandError,
    build_job,
    connect,
    job_state,
    one_line_errors,
    quiet_ray,
)
from pretrain.redact import redact

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
            raise JobCommandError(str(e), EXIT_USAGE) from None
        _check_fits(config, list(overrides or []), gpu, force)  # before any connection: nothing is sent
        client, addr = connect(address)
        for w in spec.pop("warnings"):
            typer.echo(f"warning: {w}", err=True)
        with one_line_errors(addr), quiet_ray():
            jid = client.submit_job(submission_id=job_id, **spec)
        typer.echo(f"submitted to {addr}: {redact(spec['entrypoint'])}", err=True)
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
        if cfg.init.path:
            from pretrain.hub.sources import resolve

            cfg = resolve(cfg)
        plan = make_plan(cfg, gpu)
    except ConfigError as e:
        raise JobCommandError(str(e), EXIT_USAGE) from None
    if plan.fits:
        return
    if not force:
        raise JobCommandError(f"{plan.verdict()} (`pretrain plan {config} --gpu {gpu}` for the terms; --force "
                              "submits anyway)", EXIT_USAGE)
    typer.echo(f"warning: {plan.verdict()}; submitting anyway (--force)", err=True)


def _stamp(ms: int | None) -> str:
    return datetime.fromtimestamp(ms / 1000).isoformat(sep=" ", timespec="seconds") if ms else "-"


def _goodput_lines(client, job_id: str) -> list[str]:
    """From the job's driver output: its goodput line, hangs and stragglers (`pretrain train` prints them)."""
    try:
        text = client.get_job_logs(job_id)
    except Exception:  # noqa: BLE001 - the details above stand without them
        return []
    lines = [ln.strip() for ln in text.splitlines()]
    good = [ln for ln in lines if ln.startswith("goodput ")]
    return [ln for ln in lines if ln.startswith(("hang:", "straggler:"))] + good[-1:]


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
        with one_line_errors(addr, job_id):
            info = client.get_job_info(job_id)
            while wait and str(info.status.value) not in TERMINAL:
                time.sleep(1.0)
                info = client.get_job_info(job_id)
        typer.echo(f"job:        {job_id}")
        typer.echo(f"entrypoint: {info.entrypoint}")
        typer.echo(f"started:    {_stamp(info.start_time)}")
        typer.echo(f"ended:      {_stamp(info.end_time)}")
        if info.message:
            typer.echo(f"message:    {first_line(info.message) or 'unknown error'}")
        for line in _goodput_lines(client, job_id):  # hangs, stragglers, where the time went
            typer.echo(line)
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
            with one_line_errors(addr, job_id):
                text = client.get_job_logs(job_id)
            typer.echo(text, nl=not text.endswith("\n"))
            return
        # tail_job_logs quietly yields nothing for an unknown id; ask first so that is an error.
        job_state(client, job_id, addr)

        async def tail() -> None:
            async for chunk in client.tail_job_logs(job_id):
                typer.echo(chunk, nl=False)

        try:  # KeyboardInterrupt is no Exception: it passes one_line_errors untouched
            with one_line_errors(addr, job_id):
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
        with one_line_errors(addr, job_id):
            client.stop_job(job_id)
        deadline = time.monotonic() + timeout
        state = job_state(client, job_id, addr)
        while state not in TERMINAL and time.monotonic() < deadline:
            time.sleep(0.5)
            state = job_state(client, job_id, addr)
        typer.echo(state)
        if state not in TERMINAL:
            raise JobCommandError(f"job {job_id} is still {state} after {timeout:.0f} s", EXIT_CLUSTER)

    _run(body)


def jobs(address: AddressOpt = None) -> None:
    """List the cluster's jobs, oldest first: id, state, start time, run name, entrypoint."""

    def body() -> None:
        client, addr = connect(address)
        with one_line_errors(addr):
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


if __name__ == "__main__":  # python -m pretrain.cli.jobs: the job commands without the rest of the CLI
    _app = typer.Typer(add_completion=False, no_args_is_help=True)
    register(_app)
    _app()
