"""`pretrain bench kernels`: speed of the Triton kernels on a GPU, their correctness sweep on a CPU.

On a GPU, per op over model-realistic shapes: the median time of `triton.testing.do_bench`, TFLOP/s or
GB/s, the fraction of the device's peak (the table in `pretrain.metrics.flops`), and the speed-up over torch eager (the plain-PyTorch
reference), `torch.compile` of that reference and, for attention, `scaled_dot_product_attention`.
Writes `kernels.csv` and `kernels.png` under --out; logs both to W&B with --wandb. On a CPU there is
nothing meaningful to time: it runs the correctness sweep under the Triton interpreter on small
shapes, prints the error table, writes `correctness.csv`, and says that timings need a GPU.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
import typer

from pretrain import kernels
from pretrain.kernels import checks
from pretrain.metrics.flops import device_spec, peak_for

app = typer.Typer(help="Benchmark the Triton kernels (GPU) or check them under the interpreter (CPU).",
                  add_completion=False)

# ------------------------------------------------------------------------------------------ GPU timing


def _attention_problems(dt):
    out = []
    for b, hq, hkv, s, d in ((4, 32, 8, 2048, 128), (8, 12, 12, 1024, 64), (1, 32, 8, 8192, 128)):
        def make(b=b, hq=hq, hkv=hkv, s=s, d=d):
            q = torch.randn(b, hq, s, d, device="cuda", dtype=dt, requires_grad=True)
            k = torch.randn(b, hkv, s, d, device="cuda", dtype=dt, requires_grad=True)
            v = torch.randn(b, hkv, s, d, device="cuda", dtype=dt, requires_grad=True)
            return (q, k, v)
        # 2 matmuls of 2*S*S*D flops per head, half of them masked when causal; backward = 2.5x forward.
        flops = 4 * b * hq * s * s * d / 2
        out.append((f"B{b} Hq{hq} Hkv{hkv} S{s} D{d} causal", make, flops, None))
    return out


def _rows_problems(dt, n_tensors_fwd: int, widths=(4096, 8192)):
    out = []
    for rows, d in ((8192, widths[0]), (16384, widths[1])):
        def make(rows=rows, d=d):
            return (torch.randn(rows, d, device="cuda", dtype=dt, requires_grad=True),)
        out.append((f"N{rows} D{d}", make, None, n_tensors_fwd * rows * d * dt.itemsize))
    return out


def _problems(op: str, dt: torch.dtype):
    """[(label, make_inputs, fwd FLOPs or None, fwd bytes or None)], and the op's triton/eager calls."""
    if op == "attention":
        return _attention_problems(dt)
    if op in ("rms_norm", "layer_norm"):
        return _rows_problems(dt, 2)  # read x, write y
    if op == "swiglu":
        return [(f"N{r} F{f}", lambda r=r, f=f: tuple(torch.randn(r, f, device="cuda", dtype=dt, requires_grad=True)
                                                      for _ in range(2)), None, 3 * r * f * dt.itemsize)
                for r, f in ((8192, 11008), (16384, 14336))]
    if op == "rope":
        return [(f"B{b} H{h} S{s} D{d}", lambda b=b, h=h, s=s, d=d: (torch.randn(b, h, s, d, device="cuda", dtype=dt,
                                                                                  requires_grad=True),),
                 None, 2 * b * h * s * d * dt.itemsize) for b, h, s, d in ((4, 32, 2048, 128), (8, 8, 4096, 128))]
    if op == "cross_entropy":
        return [(f"N{n} V{v}", lambda n=n, v=v: (torch.randn(n, v, device="cuda", dtype=dt, requires_grad=True),),
                 None, n * v * dt.itemsize) for n, v in ((8192, 50304), (4096, 128256))]
    if op == "linear_cross_entropy":
        return [(f"N{n} H{h} V{v}", lambda n=n, h=h, v=v: (
                    torch.randn(n, h, device="cuda", dtype=dt, requires_grad=True),
                    (torch.randn(v, h, device="cuda", dtype=dt) * h ** -0.5).requires_grad_()),
                 2 * n * h * v, None) for n, h, v in ((8192, 4096, 50304), (4096, 4096, 128256))]
    raise ValueError(op)


def _caller(op: str, inputs: tuple, backend: str) -> Callable:
    x = inputs[0]
    if op == "attention":
        return lambda: kernels.attention(*inputs, causal=True, backend=backend)
    if op == "rms_norm":
        w = torch.ones(x.shape[-1], device=x.device, dtype=x.dtype, requires_grad=True)
        return lambda: kernels.rms_norm(x, w, backend=backend)
    if op == "layer_norm":
        w = torch.ones(x.shape[-1], device=x.device, dtype=x.dtype, requires_grad=True)
        b = torch.zeros_like(w, requires_grad=True)
        return lambda: kernels.layer_norm(x, w, b, backend=backend)
    if op == "swiglu":
        return lambda: kernels.swiglu(*inputs, backend=backend)
    if op == "rope":
        pos = torch.arange(x.shape[2], device=x.device)
        return lambda: kernels.rope(x, pos, backend=backend)
    vocab = x.shape[1] if op == "cross_entropy" else inputs[1].shape[0]
    t = torch.randint(0, vocab, (x.shape[0],), device=x.device)
    if op == "cross_entropy":
        return lambda: kernels.cross_entropy(x, t, backend=backend)
    if backend == "reference":  # the eager baseline is the plain composition, full logits and all
        return lambda: kernels.linear_cross_entropy_unfused(x, inputs[1], t)
    return lambda: kernels.linear_cross_entropy(x, inputs[1], t, backend=backend)


def _timed(fn: Callable, inputs: tuple, backward: bool) -> float:
    import triton.testing

    if not backward:
        def run():
            with torch.no_grad():
                fn()
    else:
        def run():
            out = fn()
            out = out[0] if isinstance(out, tuple) else out
            out.backward(torch.ones_like(out))
            for t in inputs:
                t.grad = None
    return float(triton.testing.do_bench(run, warmup=25, rep=100, return_mode="median"))


def _bench_gpu(ops, dtypes) -> list[dict]:
    name = torch.cuda.get_device_name()
    spec = device_spec(name)
    if spec is None:
        typer.echo(f"{name}: not in the peak table (pretrain.metrics.flops), no % of peak")
    rows = []
    for op in ops:
        for dname in dtypes:
            dt = checks.DTYPES[dname]
            for label, make, flops, nbytes in _problems(op, dt):
                inputs = make()
                impls = {"triton": _caller(op, inputs, "auto"), "eager": _caller(op, inputs, "reference")}
                impls["compile"] = torch.compile(_caller(op, inputs, "reference"))
                if op == "attention":
                    group = inputs[0].shape[1] // inputs[1].shape[1]
                    impls["sdpa"] = lambda inputs=inputs, group=group: F.scaled_dot_product_attention(
                        *inputs, is_causal=True, enable_gqa=group > 1)
                for backward in (False, True):
                    ms = {}
                    for impl, fn in impls.items():
                        try:
                            ms[impl] = _timed(fn, inputs, backward)
                        except Exception as e:  # an out-of-memory eager baseline is a result, not a crash
                            typer.echo(f"  {op} {label} {impl}: {type(e).__name__}: {str(e)[:80]}")
                            ms[impl] = math.nan
                    work_mult = 3.5 if backward else 1.0  # backward ~2.5x the forward's FLOPs or bytes
                    row = {"device": name, "op": op, "shape": label, "dtype": dname,
                           "pass": "fwd+bwd" if backward else "fwd", "triton_ms": ms["triton"]}
                    if flops is not None:
                        row["tflops"] = flops * work_mult / (ms["triton"] * 1e-3) / 1e12
                        # fp32 attention runs IEEE tl.dot; the fused head's cuBLAS products follow allow_tf32.
                        tf32 = op != "attention" and torch.backends.cuda.matmul.allow_tf32
                        pk = peak_for(name, dname, tf32)
                        row["pct_peak"] = 100 * row["tflops"] * 1e12 / pk if pk else math.nan
                    else:
                        row["gbps"] = nbytes * work_mult / (ms["triton"] * 1e-3) / 1e9
                        row["pct_peak"] = 100 * row["gbps"] / (spec.tb_s * 1e3) if spec else math.nan
                    for impl in ("eager", "compile", "sdpa"):
                        if impl in ms:
                            row[f"{impl}_ms"] = ms[impl]
                            row[f"speedup_vs_{impl}"] = ms[impl] / ms["triton"]
                    rows.append(row)
                    typer.echo(_fmt_row(row))
                del inputs, impls
                torch.cuda.empty_cache()
    return rows


def _fmt_row(r: dict) -> str:
    rate = f"{r['tflops']:.1f} TFLOP/s" if "tflops" in r else f"{r['gbps']:.0f} GB/s"
    sp = " ".join(f"x{r[k]:.2f} vs {k[11:]}" for k in r if k.startswith("speedup_vs_"))
    return (f"{r['op']:<22}{r['shape']:<30}{r['dtype']:<6}{r['pass']:<9}{r['triton_ms']:9.3f} ms  {rate:>16}"
            f"  {r['pct_peak']:5.1f}% peak  {sp}")


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['op']} {r['shape']} {r['dtype']} {r['pass']}" for r in rows]
    fig, ax = plt.subplots(figsize=(10, 0.3 * len(rows) + 1.5))
    y = range(len(rows))
    for i, base in enumerate(("eager", "compile", "sdpa")):
        vals = [r.get(f"speedup_vs_{base}", math.nan) for r in rows]
        ax.barh([v + 0.27 * (i - 1) for v in y], vals, height=0.27, label=f"vs {base}")
    ax.axvline(1.0, color="k", lw=0.8)
    ax.set_yticks(list(y), labels, fontsize=7)
    ax.set_xlabel("speed-up of the Triton kernel (x)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _write_csv(rows: list[dict], path: Path) -> None:
    cols = list(dict.fromkeys(k for r in rows for k in r))
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)


def _log_wandb(rows: list[dict], files: list[Path], out: Path) -> None:
    import wandb

    mode = os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
    run = wandb.init(project="pretrain-bench", job_type="bench-kernels", dir=str(out), mode=mode,
                     settings=wandb.Settings(console="off", silent=True))
    cols = list(dict.fromkeys(k for r in rows for k in r))
    data = {"kernels": wandb.Table(columns=cols, data=[[r.get(c) for c in cols] for r in rows])}
    data.update({p.stem + "_plot": wandb.Image(str(p)) for p in files if p.suffix == ".png"})
    run.log(data)
    run.finish()


# ------------------------------------------------------------------------------------------- CPU sweep


def _check_cpu(ops, dtypes) -> list[dict]:
    # The kernels read TRITON_INTERPRET at every launch, so turning it on around the sweep is enough.
    before = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        results = checks.sweep(ops, dtypes, small=True)
    finally:
        if before is None:
            os.environ.pop("TRITON_INTERPRET")
        else:
            os.environ["TRITON_INTERPRET"] = before
    return [{"op": r.op, "case": r.case, "dtype": r.dtype, "tensor": r.tensor, "err": r.err, "ref_err": r.ref_err,
             "bound": r.bound, "ok": r.ok} for r in results]


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


@app.callback(invoke_without_command=True)
def kernels_cmd(
    op: str | None = typer.Option(None, "--op", help=f"one of {', '.join(checks.OPS)}; default all"),
    dtype: str | None = typer.Option(None, "--dtype", help="fp32, fp16 or bf16; default bf16 on GPU, all on CPU"),
    out: Path = typer.Option(Path("bench-out/kernels"), "--out", help="directory for the CSV and the plot"),
    wandb: bool = typer.Option(False, "--wandb/--no-wandb", help="log the table and plot to W&B (offline by default)"),
) -> None:
    """Time the kernels (GPU), or check them under the Triton interpreter (CPU)."""
    if op is not None and op not in checks.OPS:
        raise typer.BadParameter(f"unknown op {op!r}; choose from {', '.join(checks.OPS)}", param_hint="--op")
    if dtype is not None and dtype not in checks.DTYPES:
        raise typer.BadParameter(f"unknown dtype {dtype!r}; choose from fp32, fp16, bf16", param_hint="--dtype")
    ops = (op,) if op else checks.OPS
    out.mkdir(parents=True, exist_ok=True)
    if torch.cuda.is_available():
        rows = _bench_gpu(ops, (dtype,) if dtype else ("bf16",))
        files = [out / "kernels.csv", out / "kernels.png"]
        _write_csv(rows, files[0])
        _plot(rows, files[1])
    else:
        typer.echo("No GPU: running the correctness sweep under the Triton interpreter; timings need a GPU.")
        rows = _check_cpu(ops, (dtype,) if dtype else tuple(checks.DTYPES))
        _print_checks(rows)
        files = [out / "correctness.csv"]
        _write_csv(rows, files[0])
    typer.echo(f"wrote {', '.join(str(f) for f in files)}")
    if wandb:
        _log_wandb(rows, files, out)
    if not torch.cuda.is_available() and not all(r["ok"] for r in rows):
        typer.echo(f"{sum(not r['ok'] for r in rows)} checks failed")
        raise typer.Exit(1)
