"""Summaries of a shard directory for `pretrain data inspect`, and full verification of every shard.

The source comes from `manifest.resolve`, so its shard names were checked (plain file names inside the
source) before anything is read; `--verify` reads through `shards.read_shard`, so a shard that cannot be
read says "unreadable" and one whose bytes are wrong says what differs."""

from __future__ import annotations

from pretrain.data.manifest import Source
from pretrain.data.shards import read_shard


def summarize(src: Source) -> dict:
    """The manifest's headline figures: kind, sizes, shards, tokenizer (sft: also examples and supervised
    tokens) or image shape."""
    m = src.manifest
    sizes = [s["samples"] for s in src.shards]
    out = {"path": src.path, "kind": m["kind"], "shards": len(src.shards), "samples": sum(sizes),
           "samples_per_shard": f"{min(sizes)}..{max(sizes)}", "bytes": sum(s["bytes"] for s in src.shards)}
    if m["kind"] == "tokens":
        out.update(tokens=m.get("tokens", 0), seq_len=m["seq_len"], dtype=m.get("dtype", ""),
                   tokenizer=m["tokenizer"], vocab_size=m["vocab_size"])
        if "text_bytes" in m:  # UTF-8 bytes the samples' targets cover (bits per byte); older shards lack it
            out["text_bytes"] = m["text_bytes"]
    elif m["kind"] == "sft":
        keys = ("examples", "supervised_tokens", "padding_tokens", "text_bytes", "truncated_examples",
                "skipped_examples")
        out.update(tokens=m.get("tokens", 0), seq_len=m["seq_len"], tokenizer=m.get("tokenizer_name", ""),
                   vocab_size=m["vocab_size"], **{k: m[k] for k in keys if k in m})
    else:
        keys = ("image_shape", "classes", "captions", "encoding", "latent_scale", "vae")
        out.update({k: m[k] for k in keys if k in m})
    return out


def verify_source(src: Source) -> int:
    """Read every shard and check size and sha256 against the manifest; returns the shards checked."""
    for entry, url in zip(src.shards, src.urls, strict=True):
        read_shard(url, sha256=entry.get("sha256"), nbytes=entry["bytes"], label=url)
    return len(src.shards)
