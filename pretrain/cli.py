"""The `pretrain` command line. Argument parsing and error reporting only; the work is in the modules.

Every expected failure (bad config, missing data, failed run) ends with one line on stderr and a
non-zero exit code: 2 for bad input, 1 for a run that failed.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Optional

import typer

from pretrain.config import ConfigError, dump_config, load_config, run_dir

app = typer.Typer(
    help="Distributed pretraining of Transformers: Ray + DeepSpeed ZeRO + Triton + webdataset + W&B.",
    no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
)
bench_app = typer.Typer(help="Benchmarks (kernels).", no_args_is_help=True)


def fail(message: str, code: int = 2) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code)


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def train(
    config: Path = typer.Argument(..., help="run config YAML, e.g. configs/gpt-tiny.yaml"),
    overrides: Optional[list[str]] = typer.Argument(None, help="section.key=value overrides, e.g. train.steps=12"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress lines"),
) -> None:
    """Pretrain (or resume) the run a config describes, on an embedded local Ray unless cluster.address or RAY_ADDRESS names a cluster. A run with an existing checkpoint resumes."""
    started = time.time()
    try:
        cfg = load_config(config, overrides or [])
    except ConfigError as e:
        raise fail(str(e)) from None
    from pretrain.data import DataError, validate_data

    try:
        info = validate_data(cfg.data)
    except DataError as e:
        raise fail(str(e)) from None
    if info["vocab_size"] > cfg.model.vocab_size:
        raise fail(f"model.vocab_size ({cfg.model.vocab_size}) is smaller than the data's tokenizer "
                   f"vocabulary ({info['vocab_size']})")
    if info["seq_len"] > cfg.model.max_seq_len:
        raise fail(f"model.max_seq_len ({cfg.model.max_seq_len}) is shorter than the data's sequences "
                   f"({info['seq_len']})")

    # Only now, with the config and the data known good, does the run directory appear.
    rdir = run_dir(cfg)
    rdir.mkdir(parents=True, exist_ok=True)
    (rdir / "config.yaml").write_text(dump_config(cfg))
    typer.echo(f"run {cfg.run.name}: {rdir}  ({cfg.cluster.workers} workers, ZeRO-{cfg.zero.stage}, "
               f"{cfg.train.precision}, {cfg.train.steps} steps)")

    from pretrain.launch.local import launch

    try:
        launch(cfg, started_at=started, quiet=quiet)
    except Exception as e:  # Ray wraps worker failures; show the cause, keep the trace in a file
        import traceback

        (rdir / "error.log").write_text("".join(traceback.format_exception(e)))
        cause = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise fail(f"training failed: {cause} (full trace: {rdir / 'error.log'})", code=1) from None

    summary = json.loads((rdir / "summary.json").read_text())
    typer.echo(
        f"done: {summary['steps']} steps, {summary.get('tokens', 0):,} tokens, final loss "
        f"{summary.get('final_loss', float('nan')):.4f}, val loss {summary.get('initial_val_loss', float('nan')):.4f}"
        f" -> {summary.get('final_val_loss', float('nan')):.4f}, {summary['wall_time_s']:.0f}s "
        f"(first step after {summary['time_to_first_step_s'] or 0:.0f}s)"
    )
    if cfg.train.sample_tokens:
        from pretrain.data import tokenizer_for
        from pretrain.train.final import sample_text

        text = sample_text(rdir / "final", tokenizer_for(cfg.data), cfg.train.sample_prompt, cfg.train.sample_tokens)
        typer.echo("sample:\n" + text.strip() + "\n")


def _mount_optional() -> None:
    # Sub-commands live beside the code they drive.
    from pretrain.data.cli import app as data_app

    app.add_typer(data_app, name="data", help="Write and inspect webdataset shards.")
    from pretrain.bench.kernels import app as kernels_bench

    bench_app.add_typer(kernels_bench, name="kernels")
    app.add_typer(bench_app, name="bench")
    from pretrain.launch import jobs

    jobs.register(app)


def main() -> None:
    _mount_optional()
    try:
        app()
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
