"""`pretrain data ...`: write and inspect shards. Argument parsing, progress and error reporting only.

Bad input ends with one line on stderr (`error: ...`, via `pretrain.cli.common.fail`) and exit code 2; outputs
appear only when complete.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Optional

import typer

from pretrain.cli.common import fail
from pretrain.errors import DataError

app = typer.Typer(help="Write and inspect webdataset shards.", no_args_is_help=True, add_completion=False,
                  pretty_exceptions_enable=False)

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmg]?i?b?)?\s*$", re.I)


def parse_size(text: str) -> int:
    """'64MB', '512k', '1GiB', '4096' -> bytes (binary multiples)."""
    m = _SIZE.match(text)
    if not m:
        raise DataError(f"--shard-size: cannot read {text!r} (e.g. 64MB)")
    mult = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}[(m.group(2) or "")[:1].lower()]
    return int(float(m.group(1)) * mult)


def _progress(description: str):
    """A rich progress bar over bytes, as a callback(done, total) and the bar to close."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn, TransferSpeedColumn

    bar = Progress("[progress.description]{task.description}", BarColumn(), DownloadColumn(),
                   TransferSpeedColumn(), TimeRemainingColumn(), transient=False)
    task = bar.add_task(description, total=None)

    def update(done: int, total: int) -> None:
        bar.update(task, completed=done, total=total)

    return bar, update


@app.command()
def text(
    files: list[Path] = typer.Argument(..., help="text files (one document each), .jsonl files ({'text': ...} per line) or directories"),
    tokenizer: str = typer.Option(..., "--tokenizer", help="'gpt2' or a tokenizer.json path"),
    out: Path = typer.Option(..., "--out", help="output directory: train/ (and val/) shard directories"),
    seq_len: int = typer.Option(..., "--seq-len", help="tokens per training sequence (samples hold seq_len + 1)"),
    val_fraction: float = typer.Option(0.0, "--val-fraction", help="the last fraction of the corpus goes to val/"),
    shard_size: str = typer.Option("64MB", "--shard-size", help="target shard size"),
    workers: Optional[int] = typer.Option(None, "--workers", help="tokenizer processes (default: all cores)"),
) -> None:
    """Tokenize text into packed token sequences in webdataset shards with an index.json manifest."""
    from pretrain.data.write_text import write_text

    try:
        size = parse_size(shard_size)
        bar, update = _progress("tokenizing")
        with bar:
            manifests = write_text([str(f) for f in files], tokenizer=tokenizer, out=out, seq_len=seq_len,
                                   val_fraction=val_fraction, shard_bytes=size, workers=workers, progress=update)
    except DataError as e:
        raise fail(str(e)) from None
    except OSError as e:  # an unwritable --out, a full disk: still one line
        raise fail(f"{e.filename or ''}: {e.strerror or e}") from None
    for split, m in manifests.items():
        typer.echo(f"{out / split}: {len(m['shards'])} shards, {m['samples']:,} samples of {seq_len + 1} tokens, "
                   f"{m['tokens']:,} tokens")


@app.command()
def tokenizer(
    files: list[Path] = typer.Argument(..., help="text files (one document each), .jsonl files ({'text': ...} per "
                                               "line) or directories, as for `pretrain data text`"),
    vocab_size: int = typer.Option(..., "--vocab-size", help="tokens at most, <|endoftext|> included (>= 257)"),
    out: Path = typer.Option(..., "--out", help="the tokenizer.json to write"),
    min_frequency: int = typer.Option(2, "--min-frequency", help="merge only pairs seen at least this often"),
) -> None:
    """Train a byte-level BPE tokenizer (GPT-2's pre-tokenization, <|endoftext|> separator) on a corpus; use
    it with `pretrain data text --tokenizer tokenizer.json`."""
    from pretrain.data.train_tokenizer import train_tokenizer

    try:
        bar, update = _progress("training")
        with bar:
            tok = train_tokenizer([str(f) for f in files], vocab_size=vocab_size, out=out,
                                  min_frequency=min_frequency, progress=update)
    except DataError as e:
        raise fail(str(e)) from None
    except OSError as e:  # an unwritable --out, a full disk: still one line
        raise fail(f"{e.filename or ''}: {e.strerror or e}") from None
    typer.echo(f"{out}: byte-level BPE, {tok.get_vocab_size(with_added_tokens=True):,} tokens")


@app.command()
def sft(
    files: list[Path] = typer.Argument(..., help="chat records, one JSON object a line: {'messages': [{'role', "
                                               "'content'}, ...]} or {'prompt', 'response'}"),
    tokenizer: str = typer.Option(..., "--tokenizer", help="a checkpoint directory (tokenizer.json and a chat "
                                                           "template) or a .gguf file"),
    out: Path = typer.Option(..., "--out", help="output directory: train/ (and val/) shard directories"),
    seq_len: int = typer.Option(..., "--seq-len", help="tokens per row; examples are packed whole into rows"),
    val_fraction: float = typer.Option(0.0, "--val-fraction", help="every n-th record goes to val/"),
    truncate: bool = typer.Option(False, "--truncate/--refuse-long", help="cut an example longer than "
                                  "--seq-len to its first seq_len tokens (default: refuse it, naming the record)"),
    shard_size: str = typer.Option("64MB", "--shard-size", help="target shard size"),
) -> None:
    """Render chat records with the checkpoint's chat template into packed rows, with the loss on assistant
    turns only (input_ids, targets, segment_ids per row), in webdataset shards with an index.json manifest."""
    from pretrain.data.write_sft import write_sft

    try:
        size = parse_size(shard_size)
        bar, update = _progress("rendering")
        bar.columns = bar.columns[:2] + bar.columns[-1:]  # counts records, not bytes
        with bar:
            manifests = write_sft([str(f) for f in files], tokenizer=tokenizer, out=out, seq_len=seq_len,
                                  val_fraction=val_fraction, truncate=truncate, shard_bytes=size, progress=update)
    except DataError as e:
        raise fail(str(e)) from None
    except OSError as e:  # an unwritable --out, a full disk: still one line
        raise fail(f"{e.filename or ''}: {e.strerror or e}") from None
    for split, m in manifests.items():
        extra = "".join(f", {m[k]:,} {k.split('_')[0]}" for k in ("truncated_examples", "skipped_examples") if m[k])
        typer.echo(f"{out / split}: {len(m['shards'])} shards, {m['samples']:,} rows of {seq_len} tokens, "
                   f"{m['examples']:,} examples, {m['supervised_tokens']:,} supervised tokens{extra}")


@app.command()
def images(
    source: str = typer.Argument(..., help="an image folder root/<class>/<image> (a <image>.txt is its caption), "
                                           "or 'fashion-mnist' (Debian's dataset-fashion-mnist files)"),
    out: Path = typer.Option(..., "--out", help="output directory: train/ (and val/) shard directories"),
    shard_samples: int = typer.Option(10_000, "--shard-samples", help="images per shard"),
    val_fraction: float = typer.Option(0.0, "--val-fraction", help="image folders: every n-th image to val/ "
                                                                  "(fashion-mnist: its t10k set is val/)"),
) -> None:
    """Write image shards (uint8 image .npy, label .cls, optional caption .txt) with an index.json manifest."""
    from pretrain.data.write_images import write_images

    try:
        bar, update = _progress("writing")
        bar.columns = bar.columns[:2] + bar.columns[-1:]  # counts images, not bytes
        with bar:
            manifests = write_images(source, out=out, shard_samples=shard_samples, val_fraction=val_fraction,
                                     progress=update)
    except DataError as e:
        raise fail(str(e)) from None
    except OSError as e:  # an unwritable --out, a full disk: still one line
        raise fail(f"{e.filename or ''}: {e.strerror or e}") from None
    for split, m in manifests.items():
        shape = "x".join(map(str, m["image_shape"])) if m["image_shape"] else "mixed sizes"
        typer.echo(f"{out / split}: {len(m['shards'])} shards, {m['samples']:,} images ({shape}), "
                   f"{len(m['classes'])} classes")


@app.command()
def latents(
    source: str = typer.Argument(..., help="image shards: a shard directory, or one holding train/ "
                                           "and/or val/"),
    vae: Path = typer.Option(..., "--vae", help="a local diffusers AutoencoderKL directory (never "
                                                "downloaded)"),
    out: Path = typer.Option(..., "--out", help="output directory: one latent shard directory per split"),
    size: int = typer.Option(256, "--size", help="image side before encoding (shorter side resized, "
                                                 "centre crop)"),
    batch_size: int = typer.Option(32, "--batch-size", help="images per VAE forward"),
    shard_samples: int = typer.Option(10_000, "--shard-samples", help="latents per shard"),
) -> None:
    """Encode image shards with a VAE into latent shards (float16 latent .npy, label .cls) for latent
    diffusion."""
    from pretrain.data.write_latents import write_latents

    try:
        bar, update = _progress("encoding")
        bar.columns = bar.columns[:2] + bar.columns[-1:]  # counts images, not bytes
        with bar:
            manifests = write_latents(source, vae=vae, out=out, size=size, batch_size=batch_size,
                                      shard_samples=shard_samples, progress=update)
    except DataError as e:
        raise fail(str(e)) from None
    except OSError as e:  # an unwritable --out, a full disk: still one line
        raise fail(f"{e.filename or ''}: {e.strerror or e}") from None
    for split, m in manifests.items():
        shape = "x".join(map(str, m["image_shape"]))
        typer.echo(f"{out / split}: {len(m['shards'])} shards, {m['samples']:,} latents ({shape}, scale "
                   f"{m['latent_scale']:g}), {len(m['classes'])} classes")


@app.command()
def inspect(directory: str = typer.Argument(..., help="shard directory (holding index.json) or URL"),
            verify: bool = typer.Option(False, "--verify", help="also read every shard and check its sha256"),
            as_json: bool = typer.Option(False, "--json", help="print the summary as JSON")) -> None:
    """Print a manifest's summary (and with --verify, check every shard)."""
    from pretrain.data.inspect import summarize, verify_source
    from pretrain.data.manifest import resolve

    try:
        src = resolve(directory, None, "directory")
        summary = summarize(src)
        if verify:
            summary["verified_shards"] = verify_source(src)
    except DataError as e:
        raise fail(str(e)) from None
    except OSError as e:  # an unwritable --out, a full disk: still one line
        raise fail(f"{e.filename or ''}: {e.strerror or e}") from None
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
        return
    for k, v in summary.items():
        typer.echo(f"{k:>18}: {v:,}" if isinstance(v, int) else f"{k:>18}: {v}")
