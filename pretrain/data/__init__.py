"""The data layer's public face: checks the driver runs before any worker starts, the training stream,
the fixed validation batches, and the tokenizer a run's data was written with.

Shards are webdataset tars with an `index.json` manifest: packed token sequences (`write_text`), or
labelled images as uint8 pixels (`write_images`) or VAE latents (`write_latents`). The sample order is a
pure function of (seed, epoch, position) (see `order` and `stream`), whatever the shards hold.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from pretrain.config import DataConfig
from pretrain.data.manifest import Source, resolve, shard_name
from pretrain.data.reader import ShardReader
from pretrain.data.sample_spec import common_spec, spec_of
from pretrain.data.stream import Layout, TrainStream
from pretrain.data.tokenizer import load_tokenizer, tokenizer_hash
from pretrain.errors import DataError
from pretrain.urls import ReadFailed, is_url, read_bytes

__all__ = [
    "DataError", "TrainStream", "build_train_stream", "build_val_batches", "load_tokenizer", "tokenizer_for",
    "validate_data",
]


def _train_sources(cfg: DataConfig) -> list[Source]:
    many = len(cfg.train) > 1
    return [resolve(s.path, s.name, f"data.train[{i}]" if many else "data.train") for i, s in enumerate(cfg.train)]


def _agree(sources: list[tuple[str, Source]]) -> Source:
    """All sources hold one kind of shard (tokens or sft rows of one length and tokenizer; images of one shape, class
    list and encoding); returns the first. Which kind an objective reads is the objective's check
    (`pretrain.objectives`)."""
    (_, first), *rest = sources
    for setting, src in rest:
        if src.manifest["kind"] != first.manifest["kind"]:
            raise DataError(f"{setting}: {src.path} holds {src.manifest['kind']} shards, {first.path} "
                            f"{first.manifest['kind']} shards")
    if first.manifest["kind"] == "images":
        _agree_images(sources)
    if first.manifest["kind"] not in ("tokens", "sft"):
        return first
    for setting, src in rest:
        for key in ("seq_len", "tokenizer_sha256"):
            if src.manifest.get(key) != first.manifest.get(key):
                what = "tokenizer" if key == "tokenizer_sha256" else key
                raise DataError(f"{setting}: {src.path} has another {what} than {first.path} "
                                f"({src.manifest.get('tokenizer') if what == 'tokenizer' else src.manifest[key]} vs "
                                f"{first.manifest.get('tokenizer') if what == 'tokenizer' else first.manifest[key]})")
    return first


def _agree_images(sources: list[tuple[str, Source]]) -> None:
    """Image sources: each of one size (`spec_of`), all of one shape (channels-first), class list,
    encoding and latent scale, since a model has one input shape and one label embedding."""
    specs = [spec_of(src, setting) for setting, src in sources]
    (_, first), *rest = sources
    for (setting, src), spec in zip(rest, specs[1:], strict=True):
        if spec.shape != specs[0].shape:
            raise DataError(f"{setting}: {src.path} has another image_shape than {first.path} "
                            f"({list(spec.shape)} vs {list(specs[0].shape)}, channels first)")
        for key in ("encoding", "latent_scale"):
            mine, theirs = _image_meta(src)[key], _image_meta(first)[key]
            if mine != theirs:
                raise DataError(f"{setting}: {src.path} has another {key} than {first.path} "
                                f"({mine} vs {theirs})")
        a, b = src.manifest["classes"], first.manifest["classes"]
        if a != b:
            i = next((i for i in range(min(len(a), len(b))) if a[i] != b[i]), None)
            what = f"{len(a)} vs {len(b)} classes" if i is None else f"class {i}: {a[i]!r} vs {b[i]!r}"
            raise DataError(f"{setting}: {src.path} has other classes than {first.path} ({what})")


def _image_meta(src: Source) -> dict:
    """Encoding and latent scale of an image source (pixel shards written before latents had neither)."""
    m = src.manifest
    scale = m.get("latent_scale")
    return {"encoding": m.get("encoding", "pixels"), "latent_scale": None if scale is None else float(scale)}


def _check_names(sources: list[Source]) -> None:
    names = [s.name for s in sources]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise DataError(f"data.train: two sources named {sorted(dup)[0]!r}; give each a distinct `name`")


def validate_data(cfg: DataConfig) -> dict:
    """Every source exists with a manifest and its shards (sizes checked for local ones), and all agree on
    their kind (and for tokens on seq_len and tokenizer, for images on shape, classes and encoding). Reads
    manifests only. Returns the kind and sample counts; for tokens seq_len, tokenizer and vocab_size (sft
    rows: the same, with seq_len the tokens of a row, plus tokenizer_name, tokenizer_sha256 and the
    supervised_fraction of the training tokens); for
    images image_shape [C, H, W], num_classes, classes, encoding ("pixels" or "latents") and latent_scale.
    `commands` holds one notice line per source whose reading runs a shell command (a `pipe:` path of the
    user's config), "data.train executes a command: <cmd>", for the caller to print before the run; empty
    otherwise."""
    train = _train_sources(cfg)
    _check_names(train)
    tagged = [(f"data.train[{i}]" if len(train) > 1 else "data.train", s) for i, s in enumerate(train)]
    val = resolve(cfg.val.path, cfg.val.name, "data.val") if cfg.val else None
    tagged_all = tagged + ([("data.val", val)] if val else [])
    first = _agree(tagged_all)
    m = first.manifest
    info = {"kind": m["kind"], "train_samples": sum(s.samples for s in train), "val_samples": val.samples if val else 0,
            "commands": [f"{setting} executes a command: {src.path.removeprefix('pipe:')}"
                         for setting, src in tagged_all if src.command]}
    if m["kind"] == "tokens":
        info.update(seq_len=int(m["seq_len"]), tokenizer=_tokenizer_spec(first), vocab_size=int(m["vocab_size"]))
    elif m["kind"] == "sft":  # seq_len: tokens per row, all of which the model sees
        spec_of(first, "data.train")
        rows = sum(src.manifest.get("tokens", 0) for src in train)
        sup = sum(src.manifest.get("supervised_tokens", 0) for src in train)
        info.update(seq_len=int(m["seq_len"]), tokenizer=_tokenizer_spec(first), vocab_size=int(m["vocab_size"]),
                    tokenizer_name=m.get("tokenizer_name", ""), tokenizer_sha256=m["tokenizer_sha256"],
                    supervised_fraction=sup / rows if rows else 1.0)
    elif m["kind"] == "images":
        spec = spec_of(first, "data.train")
        info.update(image_shape=list(spec.shape), num_classes=spec.num_classes, classes=list(m["classes"]),
                    **_image_meta(first))
    return info


def _tokenizer_spec(src: Source) -> str:
    """"gpt2", or where the data's tokenizer.json lies: beside the shards, the first shard's file name
    replaced (in a URL or `pipe:` command, so `pipe:aws s3 cp s3://b/t/shard-0.tar -` keeps its `-`)."""
    spec = src.manifest["tokenizer"]
    if spec == "gpt2":
        return spec
    first = src.urls[0]
    if is_url(first):
        head, _, tail = first.rpartition(shard_name(first))
        return head + spec + tail
    return f"{Path(first).parent}/{spec}"


def tokenizer_for(cfg: DataConfig):
    """The tokenizer the training data was written with, checked against the manifest's hash."""
    src = _train_sources(cfg)[0]
    spec = _tokenizer_spec(src)
    if is_url(spec):
        from tokenizers import Tokenizer

        try:
            tok = Tokenizer.from_str(read_bytes(spec).decode())
        except ReadFailed as e:
            raise DataError(f"data.train: tokenizer {spec}: {e}") from None
        except Exception as e:  # not UTF-8, not a tokenizer.json
            raise DataError(f"data.train: tokenizer {spec} is not a readable tokenizer.json ({e})") from None
    else:
        tok = load_tokenizer(spec)
    if tokenizer_hash(tok) != src.manifest.get("tokenizer_sha256"):
        raise DataError(f"data.train: tokenizer {spec} differs from the one the manifest of {src.path} records")
    return tok


def build_train_stream(cfg: DataConfig, *, seed: int, rank: int, world_size: int, micro_batch_size: int,
                       grad_accum: int) -> TrainStream:
    """This rank's stream of micro-batches (see `pretrain.data.stream`)."""
    if not 0 <= rank < world_size:
        raise DataError(f"rank {rank} outside world size {world_size}")
    sources = _train_sources(cfg)
    _check_names(sources)
    _agree([(f"data.train[{i}]", s) for i, s in enumerate(sources)])
    layout = Layout(seed, rank, world_size, micro_batch_size, grad_accum)
    return TrainStream(sources, [s.weight for s in cfg.train], common_spec(sources, "data.train"), layout,
                       cfg.num_workers, cfg.skip_corrupt)


def build_val_batches(cfg: DataConfig, *, rank: int, world_size: int, micro_batch_size: int,
                      max_batches: int) -> list[dict]:
    """This rank's fixed validation batches: the val source in file order, batch b of rank r holding
    positions [(b*W + r)*mb, (b*W + r + 1)*mb). Every rank gets the same number of batches."""
    if cfg.val is None:
        return []
    src = resolve(cfg.val.path, cfg.val.name, "data.val")
    spec = spec_of(src, "data.val")
    n = min(max_batches, src.samples // (micro_batch_size * world_size))
    if n == 0:
        raise DataError(f"data.val: {src.path} has {src.samples} samples, fewer than one micro-batch "
                        f"per rank ({micro_batch_size} x {world_size})")
    reader = ShardReader([src], spec, seed=0, skip_corrupt=False)
    ends = np.cumsum([s["samples"] for s in src.shards])
    out = []
    for b in range(n):
        start = (b * world_size + rank) * micro_batch_size
        keys: list[str] = []
        fields = {name: np.empty((micro_batch_size, *shape), dtype) for name, (shape, dtype)
                  in spec.fields.items()}
        for row, p in enumerate(range(start, start + micro_batch_size)):
            j = int(np.searchsorted(ends, p, side="right"))
            k, decoded = reader.shard(0, j)
            i = p - int(ends[j] - src.shards[j]["samples"])
            keys.append(k[i])
            for name, arr in fields.items():
                arr[row] = decoded[name][i]
        out.append({**{name: torch.from_numpy(arr) for name, arr in fields.items()}, "keys": keys,
                    "source": [src.name] * micro_batch_size,
                    "positions": torch.arange(start, start + micro_batch_size, dtype=torch.int64)})
    return out
