"""`pretrain bench kernels`: are the Triton kernels right, and how fast and lean are they against PyTorch?

Two parts, both on the device at hand. The correctness sweep (pretrain.kernels.checks: forward and every
input gradient against an fp64 reference, per shape and dtype, judged by FlashAttention's rule) runs on a
GPU with the compiled kernels, or on a CPU under the Triton interpreter with tiny shapes. The speed and
memory sweep (pretrain.bench.shapes) times every op over sequence length and width against PyTorch
eager, `torch.compile` and, for attention, SDPA, in forward, backward and full (forward + backward) mode,
and writes one long-format CSV in Liger-Kernel's columns (pretrain.bench.report), one plot per op and
x-axis, and a W&B run (offline by default) with both as tables and the plots as images.

On a CPU the sweep always uses `--quick`'s tiny shapes and the interpreter: it shows that everything
runs, not how fast a GPU would be; `torch_compile` is left out unless named in --providers (each compile
of a CPU graph takes seconds of C++ builds and its times say nothing about a GPU), and no memory rows are
written (see pretrain.bench.timing).
"""

from __future__ import annotations

import contextlib
import functools
import os
from datetime import datetime
from pathlib import Path

import torch
import typer

from pretrain.bench import report, shapes, timing
from pretrain.errors import RunError, first_line
from pretrain.kernels import checks
from pretrain.metrics.flops import device_spec, peak_for

app = typer.Typer(help="Check the Triton kernels against their references and benchmark them against "
                       "PyTorch.", add_completion=False)


class BenchFailed(Exception):
    """The sweep ran, but correctness checks failed or measurements errored (listed above the one-line
    message): exit code 1, where bad input (a `RunError`) is exit code 2."""


def _one_line_errors(command):
    """`error: <message>` on stderr and the project's exit codes (2: bad input, 1: a failed run), the same
    whether the command is mounted as `pretrain bench kernels` or run as `python -m pretrain.bench.kernels`
    (tools/gpu_check.sh); bench sits below pretrain.cli, so it cannot use the CLI's `fail`."""
    @functools.wraps(command)
    def run(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except (RunError, BenchFailed) as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(1 if isinstance(e, BenchFailed) else 2) from None
    return run


@contextlib.contextmanager
def interpreter(on: bool):
    """TRITON_INTERPRET=1 while the block runs (the kernels read it at every launch), restored after."""
    before = os.environ.get("TRITON_INTERPRET")
    if on:
        os.environ["TRITON_INTERPRET"] = "1"
    try:
        yield
    finally:
        if on and before is None:
            os.environ.pop("TRITON_INTERPRET", None)
        elif on:
            os.environ["TRITON_INTERPRET"] = before


def _names(value: str | None, allowed: tuple[str, ...], option: str) -> tuple[str, ...] | None:
    if value is None:
        return None
    names = tuple(n.strip() for n in value.split(",") if n.strip())
    bad = [n for n in names if n not in allowed]
    if bad or not names:
        raise RunError(f"{option}: unknown {option.strip('-').rstrip('s')} {bad[0] if bad else value!r}; "
                       f"choose from {', '.join(allowed)}")
    return names


# --------------------------------------------------------------------------------------- correctness


def correctness(ops, dtypes, small: bool, device: torch.device) -> list[dict]:
    """The checks sweep as CSV-ready rows (the interpreter must be on for a CPU device)."""
    return [{"op": r.op, "case": r.case, "dtype": r.dtype, "tensor": r.tensor, "err": r.err,
             "ref_err": r.ref_err, "bound": r.bound, "ok": r.ok, "device": device.type}
            for r in checks.sweep(ops, dtypes, small=small, device=device)]


def _print_checks(rows: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"kernels vs fp64 reference (rule: err <= {checks.FACTOR:g} x torch's own error + floor)")
    for c in ("op", "case", "dtype", "tensor", "err", "torch err", "bound", "ok"):
        t.add_column(c, justify="right" if c in ("err", "torch err", "bound") else "left")
    for r in rows:
        t.add_row(r["op"], r["case"], r["dtype"], r["tensor"], f"{r['err']:.2e}", f"{r['ref_err']:.2e}",
                  f"{r['bound']:.2e}", "ok" if r["ok"] else "[red]FAIL[/red]")
    Console(width=160).print(t)


# -------------------------------------------------------------------------------------- speed, memory


def sweep(ops, providers, dname: str, quick: bool, device: torch.device, reps: int = 5,
          csv_path: Path | None = None) -> tuple[list, list]:
    """Time (and on CUDA, measure the memory of) every op at every point for every provider and mode.
    Returns (CSV rows, one-line failures). An out-of-memory baseline is skipped with a note, not a failure.
    With `csv_path` the CSV is rewritten after each op, so a run cut short by a timeout keeps its rows."""
    dt = checks.DTYPES[dname]
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (Triton interpreter)"
    spec = device_spec(gpu) if device.type == "cuda" else None
    # The device's datasheet peaks (the project's one table), so a reader of the CSV can put a time in scale.
    peaks = {"device_model": spec.model, "peak_tflops": peak_for(gpu, dname) / 1e12, "peak_tb_s": spec.tb_s} \
        if spec else {"device_model": None}
    stamp = datetime.now().strftime("%Y-%m-%d %H:%M:%S")
    rows, failures = [], []
    for op in ops:
        bench = shapes.op_bench(op, quick)
        for axis in bench.axes:
            for dims in axis.points():
                x = dims[axis.name]
                extra = {**{k: v for k, v in dims.items() if k != axis.name}, "dtype": dname, "quick": quick,
                         **peaks}
                inputs = bench.make(dims, dt, device)
                for provider in (p for p in providers if p in bench.fns):
                    fn = bench.fns[provider]
                    for mode in timing.MODES:
                        ys = _attempt(f"{op} {provider} {mode} {axis.name}={x}", failures,
                                      timing.speed, fn, inputs, mode, reps=reps)
                        if ys is not None:
                            rows.append(report.row(op, provider, mode, "speed", axis, x, ys, extra, gpu,
                                                   stamp))
                    ys = _attempt(f"{op} {provider} memory {axis.name}={x}", failures,
                                  timing.memory, fn, inputs)
                    if ys is not None:
                        rows.append(report.row(op, provider, "full", "memory", axis, x, ys, extra, gpu,
                                               stamp))
                del inputs
                if device.type == "cuda":
                    torch.cuda.empty_cache()
        if csv_path is not None:
            report.write_csv(rows, csv_path)
    return rows, failures


def _attempt(what: str, failures: list[str], measure, *args, **kwargs):
    try:
        return measure(*args, **kwargs)
    except torch.OutOfMemoryError:
        typer.echo(f"  {what}: out of memory, skipped")
    except Exception as e:  # one provider's error must not lose the sweep's other rows
        line = f"{what}: {type(e).__name__}: {first_line(str(e))[:160]}"
        typer.echo(f"  {line}")
        failures.append(line)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return None


def _print_speed(rows: list[dict]) -> None:
    """Full-mode medians per point, with ours' speed-up over each other provider."""
    from rich.console import Console
    from rich.table import Table

    full = {}
    for r in rows:
        if (r["metric_name"], r["kernel_operation_mode"]) == ("speed", "full"):
            point = (r["kernel_name"], r["x_name"], r["x_value"])
            full.setdefault(point, {})[r["kernel_provider"]] = r["y_value_50"]
    providers = [p for p in shapes.PROVIDERS if any(p in v for v in full.values())]
    t = Table(title="forward + backward, median ms (x: triton's speed-up)")
    for c in ("op", "x", *providers):
        t.add_column(c, justify="left" if c == "op" else "right")
    for (op, x_name, x), ms in full.items():
        ours = ms.get("triton")
        cells = [(f"{ms[p]:.3f}" + (f" (x{ms[p] / ours:.2f})" if ours and p != "triton" else ""))
                 if p in ms else "-" for p in providers]
        t.add_row(op, f"{x_name}={x}", *cells)
    Console(width=160).print(t)


@app.callback(invoke_without_command=True)
@_one_line_errors
def kernels_cmd(
    ops: str | None = typer.Option(
        None, "--ops", "--op", help=f"comma-separated, of {', '.join(shapes.OPS)}; default all"),
    dtype: str | None = typer.Option(
        None, "--dtype", help="fp32, fp16 or bf16 for the timings (default bf16 on a GPU, fp32 on a CPU) and "
        "for the correctness sweep (default all three)"),
    providers: str | None = typer.Option(
        None, "--providers", help=f"comma-separated, of {', '.join(shapes.PROVIDERS)}; default all (on a CPU "
        "all but torch_compile)"),
    out: Path = typer.Option(Path("bench-out/kernels"), "--out", help="directory for the CSVs and plots/"),
    quick: bool = typer.Option(False, "--quick", help="tiny shapes: a smoke run (always so on a CPU)"),
    check: bool = typer.Option(True, "--check/--no-check", help="run the correctness sweep first"),
    wandb: bool = typer.Option(True, "--wandb/--no-wandb",
                               help="log tables and plots to W&B (offline by default)"),
) -> None:
    """Check the kernels against their references, then time them against PyTorch; CSV, plots, W&B."""
    op_list = _names(ops, shapes.OPS, "--ops") or shapes.OPS
    prov = _names(providers, shapes.PROVIDERS, "--providers")
    if dtype is not None and dtype not in checks.DTYPES:
        raise RunError(f"--dtype: unknown dtype {dtype!r}; choose from {', '.join(checks.DTYPES)}")
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    if not cuda:
        typer.echo("No GPU: the Triton kernels run under the interpreter on tiny shapes (--quick); timings "
                   "need a GPU, and CPU runs write no memory rows.")
        quick = True
        if prov is None:
            prov = tuple(p for p in shapes.PROVIDERS if p != "torch_compile")
    prov = prov or shapes.PROVIDERS
    out.mkdir(parents=True, exist_ok=True)
    check_rows = []
    with interpreter(not cuda):
        if check:
            check_rows = correctness(op_list, (dtype,) if dtype else tuple(checks.DTYPES),
                                     small=quick or not cuda, device=device)
            _print_checks(check_rows)
            report.write_csv(check_rows, out / "correctness.csv", columns=tuple(check_rows[0]))
        rows, failures = sweep(op_list, prov, dtype or ("bf16" if cuda else "fp32"), quick, device,
                               reps=3 if quick else 10, csv_path=out / "kernels.csv")
    report.write_csv(rows, out / "kernels.csv")
    plots = report.plot(rows, out / "plots")
    _print_speed(rows)
    typer.echo(f"wrote {len(rows)} rows to {out / 'kernels.csv'}, {len(plots)} plots under {out / 'plots'}")
    if wandb:
        typer.echo(f"W&B run in {report.log_wandb(rows, check_rows, plots, out)}")
    bad = [r for r in check_rows if not r["ok"]]
    if bad or failures:
        raise BenchFailed(f"{len(bad)} correctness checks failed, {len(failures)} measurements errored "
                          "(see above)")


# `python -m pretrain.bench.kernels` (tools/gpu_check.sh) needs only torch, triton, typer, rich, matplotlib.
if __name__ == "__main__":
    app()
