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

from pretrain.cli.common import fail
from pretrain.config import ConfigError, dump_config, run_dir
from pretrain.errors import RunError
from pretrain.redact import redact, redact_yaml

# The config loader (pretrain.load) and the run length (pretrain.length) import the model and objective
# registries, and so torch: each command imports them when it reads a config, so that the job-watching
# commands start without torch.


app = typer.Typer(
    help="Distributed pretraining of Transformers: Ray + DeepSpeed ZeRO + Triton + webdataset + W&B.",
    no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
)
bench_app = typer.Typer(help="Benchmarks (kernels).", no_args_is_help=True)


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def train(
    config: Path = typer.Argument(..., help="run config YAML, e.g. configs/gpt-tiny.yaml"),
    overrides: Optional[list[str]] = typer.Argument(None, help="section.key=value overrides, e.g. train.steps=12"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress lines"),
) -> None:
    """Pretrain (or resume) the run a config describes, on an embedded local Ray unless cluster.address or RAY_ADDRESS names a cluster. A run with an existing checkpoint resumes."""
    started = time.time()
    try:
        from pretrain.load import load_config

        cfg = load_config(config, overrides or [])
        if cfg.init.path:  # the model section comes from the released checkpoint
            from pretrain.hub.sources import resolve

            cfg = resolve(cfg)
    except RunError as e:
        raise fail(str(e)) from None
    from pretrain.objectives.preflight import preflight

    try:
        objective = preflight(cfg)  # the data exists, and the objective accepts it and the model
        from pretrain.length import total_steps

        steps = total_steps(cfg, objective)  # derived once: launch and the workers receive it
        if cfg.cluster.storage:
            from pretrain.train.storage import Storage

            Storage(cfg.cluster.storage)  # the checkpoint location opens (StorageError), before anything is written
    except RunError as e:
        raise fail(str(e)) from None

    # Only now, with the config and the data known good, does the run directory appear; one writer per
    # run: its lock comes before anything in it is written or deleted, and is held to the end.
    from pretrain.launch.local import launch
    from pretrain.launch.storelock import run_locks

    rdir = run_dir(cfg)
    try:
        # The run directory's lock, and the checkpoint location's in cluster.storage; a lock lost while the run
        # trains ends it with its LockLostError.
        with run_locks(cfg) as owner:
            # Redacted: the run and its resume read the config of the command line, never this copy's secrets.
            (rdir / "config.yaml").write_text(redact_yaml(dump_config(cfg)))
            typer.echo(f"run {cfg.run.name}: {rdir}  ({cfg.cluster.workers} workers, ZeRO-{cfg.zero.stage}, "
                       f"{cfg.train.precision}, {steps} steps)")
            try:
                stopped = launch(cfg, started_at=started, quiet=quiet, steps=steps, owner=owner)
            except RunError:
                raise  # a deterministic error a worker found (data, config, shapes): not retried
            except Exception as e:  # Ray wraps worker failures; show the cause, keep the trace in a file
                import traceback

                (rdir / "error.log").write_text(redact("".join(traceback.format_exception(e))))
                cause = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
                raise fail(f"training failed: {cause} (full trace: {rdir / 'error.log'})", code=1) from None
    except RunError as e:
        raise fail(str(e)) from None

    if stopped is not None:  # SIGTERM to the driver: a complete checkpoint, the same command resumes from it
        from pretrain.train.pulse import PREEMPTED

        note = json.loads((rdir / PREEMPTED).read_text())
        typer.echo(f"stopped ({stopped}): checkpoint at step {note['step']}; the same command resumes at step "
                   f"{note['step'] + 1}", err=True)
        raise typer.Exit(143)
    summary = json.loads((rdir / "summary.json").read_text())
    unit = objective.unit
    typer.echo(
        f"done: {summary['steps']} steps, {summary.get(unit, 0):,} {unit}, final loss "
        f"{summary.get('final_loss', float('nan')):.4f}, val loss {summary.get('initial_val_loss', float('nan')):.4f}"
        f" -> {summary.get('final_val_loss', float('nan')):.4f}, {summary['wall_time_s']:.0f}s "
        f"(first step after {summary['time_to_first_step_s'] or 0:.0f}s)"
    )
    for k in objective.summary_keys:  # the objective's own figures (fd, class_agreement)
        if k in summary:
            typer.echo(f"{k}: {summary[f'initial_{k}']:.4g} at step 0 -> {summary[k]:.4g}")
    if summary.get("goodput"):  # where the wall time went (pretrain/train/goodput.py)
        from pretrain.train.goodput import describe

        typer.echo(describe(summary["goodput"]))
    for s in summary.get("stragglers", []):
        typer.echo(f"straggler: rank {s['rank']} on {s['host']} ({s['ratio']}x the median rank's compute time)")
    sample = rdir / "sample.txt"  # the objective's end-of-run artefact, when it makes one
    if sample.exists() and sample.stat().st_mtime >= started:
        typer.echo("sample:\n" + sample.read_text().strip() + "\n")


@app.command()
def sample(
    run: Path = typer.Argument(..., help="a finished run directory, e.g. runs/dit-fashion"),
    n: int = typer.Option(64, "--n", min=1, help="about this many images: one row per class, ceil(n / classes) columns"),
    cfg_scale: float = typer.Option(4.0, "--cfg", help="classifier-free guidance scale (1: none)"),
    steps: int = typer.Option(50, "--steps", min=1, help="sampler steps"),
    out: Path = typer.Option(Path("grid.png"), "--out", help="PNG file to write"),
    sampler: Optional[str] = typer.Option(None, "--sampler", help="euler|heun (rectified_flow), ddpm|ddim (ddpm); default the objective's"),
    weights: str = typer.Option("ema", "--weights", help="ema (the moving average) or model (the raw weights)"),
    seed: Optional[int] = typer.Option(None, "--seed", help="noise seed; default the run's, which gives its training grids' noise"),
) -> None:
    """Sample an image grid from a trained diffusion run (its EMA weights by default)."""
    if weights not in ("ema", "model"):
        raise fail(f"--weights must be ema or model (got {weights!r})")
    from rich.progress import Progress

    from pretrain.objectives import ObjectiveError
    from pretrain.objectives.image_eval import sample_run

    try:
        with Progress(transient=True) as bar:
            task = bar.add_task("sampling", total=None)
            info = sample_run(run, n=n, cfg_scale=cfg_scale, steps=steps, out=out, sampler=sampler, weights=weights,
                              seed=seed, progress=lambda d, t: bar.update(task, completed=d, total=t))
    except (FileNotFoundError, ValueError, ObjectiveError, ConfigError) as e:
        raise fail(str(e)) from None
    typer.echo(f"{out}: {info['images']} images ({info['rows']} classes x {info['cols']}), {info['weights']} weights, "
               f"{steps} steps, guidance {cfg_scale}")


@app.command()
def generate(
    source: Path = typer.Argument(..., help="a finished run directory, a Hugging Face model directory or a .gguf file"),
    prompt: Optional[str] = typer.Option(None, "--prompt", help="text to continue (or, with --chat, the user's message)"),
    chat: bool = typer.Option(False, "--chat", help="wrap the prompt in the checkpoint's chat template"),
    max_new_tokens: int = typer.Option(128, "--max-new-tokens", min=1, help="most tokens to generate"),
    temperature: float = typer.Option(0.0, "--temperature", min=0.0, help="0: greedy; above 0: sampling at this temperature"),
    top_k: Optional[int] = typer.Option(None, "--top-k", min=1, help="sample among the k likeliest tokens only"),
    seed: int = typer.Option(0, "--seed", help="sampling seed"),
    prompts: Optional[Path] = typer.Option(None, "--prompts", help="a .jsonl of chat or prompt/response records: answer "
                                           "each greedily and print the exact-match accuracy against its last assistant turn"),
    out: Optional[Path] = typer.Option(None, "--out", help="with --prompts: write the answers here (.jsonl)"),
    weights: str = typer.Option("model", "--weights", help="model or ema (runs only)"),
) -> None:
    """Generate text with a KV cache, stopping at the checkpoint's end-of-sequence token; prints the continuation alone."""
    if (prompt is None) == (prompts is None):
        raise fail("give --prompt TEXT or --prompts FILE.jsonl")
    from pretrain.trained import loaded as inference

    try:
        loaded = inference.load(source, weights)
        if prompt is not None:
            typer.echo(loaded.answer(loaded.encode(prompt, chat), max_new_tokens, temperature, top_k, seed))
            return
        records = _read_jsonl(prompts)
        from rich.progress import Progress

        with Progress(transient=True) as bar:
            task = bar.add_task("answering", total=len(records))
            res = inference.exact_match(loaded, records, max_new_tokens, where=str(prompts),
                                        progress=lambda d, t: bar.update(task, completed=d))
    except (FileNotFoundError, ValueError, ConfigError) as e:
        raise fail(str(e)) from None
    if out is not None:
        from pretrain.atomic import atomic_write

        atomic_write(out, "".join(json.dumps(r) + "\n" for r in res["answers"]))
    for r in res["answers"][:5]:
        typer.echo(f"{'ok ' if r['correct'] else 'no '} {r['prompt']!r} -> {r['answer']!r} (want {r['reference']!r})")
    typer.echo(f"exact match: {res['correct']}/{res['n']} = {100 * res['accuracy']:.1f}%")


def _read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    rows = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{i}: not JSON ({e.msg})") from None
    if not rows:
        raise ValueError(f"{path}: no records")
    return rows


@app.command()
def export(
    run: Path = typer.Argument(..., help="a finished run directory"),
    format: str = typer.Option("hf", "--format", help="hf (a Hugging Face model directory) or peft (a LoRA adapter)"),
    out: Path = typer.Option(..., "--out", help="directory to write (must not exist)"),
    merge: bool = typer.Option(False, "--merge", help="peft: fold the adapter into the base and write a whole hf model"),
    weights: str = typer.Option("model", "--weights", help="model or ema"),
) -> None:
    """Write a run's final weights as a Hugging Face model (transformers loads it) or as a PEFT LoRA adapter."""
    if format not in ("hf", "peft"):
        raise fail(f"--format must be hf or peft (got {format!r})")
    from pretrain.trained.export_run import export_run

    try:
        info = export_run(run, out, format=format, merge=merge, weights=weights)
    except (FileNotFoundError, FileExistsError, ValueError, ConfigError) as e:
        raise fail(str(e)) from None
    typer.echo(f"{out}: {info}")


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def plan(
    config: Path = typer.Argument(..., help="run config YAML, e.g. configs/llama-7b.yaml"),
    overrides: Optional[list[str]] = typer.Argument(None, help="section.key=value overrides, e.g. zero.stage=2"),
    gpu: str = typer.Option(..., "--gpu", help="GPU model from the peak table, e.g. h100-sxm, a100-sxm-40gb, mi300x"),
    gpus: Optional[int] = typer.Option(None, "--gpus", min=1, help="GPUs in the job (one per rank); default cluster.workers"),
    mfu: float = typer.Option(0.4, "--mfu", help="model FLOPs utilisation the step time assumes"),
    seq_len: Optional[int] = typer.Option(None, "--seq-len", min=1, help="tokens per sample; default model.max_seq_len"),
    as_json: bool = typer.Option(False, "--json", help="print the plan as one JSON object"),
) -> None:
    """Per-GPU memory (params, grads, optimizer, activations, buffers) for the config's ZeRO stage with a verdict,
    the largest micro-batch that fits, and step time, tokens/s and GPU-hours to the configured budget at an MFU."""
    from pretrain.plan import make_plan, render

    try:
        from pretrain.load import load_config

        cfg = load_config(config, overrides or [])
        if cfg.init.path:  # the model section comes from the released checkpoint
            from pretrain.hub.sources import resolve

            cfg = resolve(cfg)
        p = make_plan(cfg, gpu, gpus, mfu, seq_len)
    except ConfigError as e:
        raise fail(str(e)) from None
    typer.echo(json.dumps(p.as_dict(), indent=2) if as_json else render(p, cfg.train.activation_checkpointing))


def _mount(argv: list[str]) -> None:
    """Sub-commands live beside the code they drive. Only the group a command line names is imported
    (all of them for the top-level help), so `pretrain status` does not pay for torch and Triton."""
    command = next((a for a in argv[1:] if not a.startswith("-")), None)
    everything = command is None
    if everything or command == "data":
        from pretrain.cli.data import app as data_app

        app.add_typer(data_app, name="data", help="Write and inspect webdataset shards.")
    if everything or command == "scaling":
        from pretrain.cli import scaling_decide, scaling_sweep  # noqa: F401  (add hyperfit, recommend, check, sweep)
        from pretrain.cli.scaling import app as scaling_app

        app.add_typer(scaling_app, name="scaling", help="Scaling laws: run isoFLOP ladders, fit runs or published tables.")
    if everything or command == "bench":
        from pretrain.bench.kernels import app as kernels_bench

        bench_app.add_typer(kernels_bench, name="kernels")
        app.add_typer(bench_app, name="bench")
    from pretrain.cli import jobs

    jobs.register(app)


def main() -> None:
    _mount(sys.argv)
    try:
        app()
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)

