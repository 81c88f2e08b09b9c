"""`pretrain data sft`: chat records -> rows of exactly seq_len tokens, supervised on assistant turns only.

Records are read, rendered and their supervised tokens found by `pretrain.data.sft_render`, with the
checkpoint's tokenizer and chat template (`pretrain.data.chat_tokenizer`).

Every example becomes its own segment of a row: rows are filled first-fit in record order (deterministic),
padded at the end (segment 0). Members per row, little-endian int32: `input_ids`, `targets` (the next
token where it is supervised and in the same example, else -100) and `segment_ids` (1..k per example,
0 = padding), so the model masks attention across examples and restarts positions at each.

Everything is read, rendered and checked before anything is written, so a refused record leaves no
output. Shards go through the text writer's machinery: `ShardWriter` (renamed into place when complete),
a journal that lets an interrupted run keep the shards it finished, and an atomic manifest. The
tokenizer files are copied beside the shards (the split directory loads with `AutoTokenizer`, and
`tokenizer_for` finds `tokenizer.json` there as for token shards).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from pretrain.atomic import atomic_write
from pretrain.data.chat_tokenizer import ChatTokenizer, load_chat_tokenizer
from pretrain.data.manifest import FORMAT, MANIFEST, write_manifest
from pretrain.data.sft_render import IGNORE, encode_example, read_records, targets_of
from pretrain.data.shards import ShardWriter
from pretrain.data.tokenizer import tokenizer_hash
from pretrain.data.write_text import JOURNAL, journaled_shards, list_inputs, remove_stale_tmp
from pretrain.errors import DataError

FIELDS = ("input_ids", "targets", "segment_ids")  # members `<key>.<field>.i32` of every row
MEMBER_EXT = "i32"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")


# ---------------------------------------------------------------------------------------------- packing
def pack(lengths: list[int], seq_len: int) -> list[list[int]]:
    """First-fit: each example (in order) goes into the first row with room for it; returns the example
    indices of every row, rows in the order they were opened. Deterministic, and it keeps rows full to
    within the shortest examples' length."""
    free = np.zeros(len(lengths), dtype=np.int64)  # room left in each opened row
    rows: list[list[int]] = []
    for k, n in enumerate(lengths):
        if n > seq_len:
            raise ValueError(f"example {k} of {n} tokens does not fit a row of {seq_len}")
        fits = np.flatnonzero(free[: len(rows)] >= n)
        r = int(fits[0]) if len(fits) else len(rows)
        if r == len(rows):
            rows.append([])
            free[r] = seq_len
        rows[r].append(k)
        free[r] -= n
    return rows


def build_rows(examples: list[tuple[np.ndarray, np.ndarray]], seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
    """Packed rows {field: (R, seq_len) int32} of (ids, targets) examples."""
    rows = pack([len(ids) for ids, _ in examples], seq_len)
    out = {"input_ids": np.full((len(rows), seq_len), pad_id, dtype=np.int32),
           "targets": np.full((len(rows), seq_len), IGNORE, dtype=np.int32),
           "segment_ids": np.zeros((len(rows), seq_len), dtype=np.int32)}
    for r, members in enumerate(rows):
        at = 0
        for seg, k in enumerate(members, start=1):
            ids, tgt = examples[k]
            out["input_ids"][r, at : at + len(ids)] = ids
            out["targets"][r, at : at + len(ids)] = tgt
            out["segment_ids"][r, at : at + len(ids)] = seg
            at += len(ids)
    return out


# ----------------------------------------------------------------------------------------------- writing
def _write_split(out: Path, header: dict, rows: dict[str, np.ndarray], stats: dict) -> dict:
    """Shards of `samples_per_shard` rows; finished shards of an interrupted run with the same header
    (same inputs, tokenizer, template and settings, hence the same rows) are kept."""
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_tmp(out)
    (out / MANIFEST).unlink(missing_ok=True)  # never a manifest for shards being replaced
    sps, n = header["samples_per_shard"], len(rows["input_ids"])
    shards: list[dict] = []
    j = out / JOURNAL
    shards.extend(journaled_shards(out, header)[1])
    for start in range(sum(s["samples"] for s in shards), n, sps):
        writer = ShardWriter(out / f"shard-{len(shards):06d}.tar")
        for i in range(start, min(start + sps, n)):
            writer.add(f"{i:010d}", {f"{f}.{MEMBER_EXT}": rows[f][i].astype("<i4").tobytes() for f in FIELDS})
        entry = writer.close()
        entry.update(samples=writer.samples, tokens=writer.samples * header["seq_len"])
        shards.append(entry)
        atomic_write(j, json.dumps({"header": header, "shards": shards}, sort_keys=True))
    for stale in sorted(out.glob("shard-*.tar*")):
        if stale.name not in {s["name"] for s in shards}:
            stale.unlink()  # left from an earlier, larger write into the same directory
    m = dict(header, **stats, samples=n, tokens=n * header["seq_len"], shards=shards)
    write_manifest(out, m)  # the journal stays: a second run with the same inputs writes nothing
    return m


def samples_per_shard(shard_bytes: int, seq_len: int) -> int:
    """Rows that fit a target shard size: three int32 members each (512-byte header, padded data)."""
    member = 512 + -(-seq_len * 4 // 512) * 512
    return max(1, shard_bytes // (len(FIELDS) * member))


def _inputs_sha256(files: Iterable[Path]) -> str:
    h = hashlib.sha256()
    for f in files:
        data = f.read_bytes()
        h.update(len(data).to_bytes(8, "little") + data)  # length-prefixed: file boundaries count
    return h.hexdigest()


def write_sft(
    inputs: list[str], *, tokenizer: str, out: Path, seq_len: int, val_fraction: float = 0.0,
    truncate: bool = False, shard_bytes: int = 64 << 20, progress: Callable[[int, int], None] | None = None,
) -> dict[str, dict]:
    """Render, check and pack the chat records of `inputs` into `out/train/` (and `out/val/`: every n-th
    record when val_fraction > 0). An example longer than seq_len is refused unless `truncate` (then its
    first seq_len tokens are kept, and it is skipped if nothing supervised is left). Returns the
    manifests by split. `progress(done, total)` counts records rendered."""
    if seq_len < 2:
        raise DataError(f"--seq-len must be at least 2 (got {seq_len})")
    if not 0 <= val_fraction < 1:
        raise DataError(f"--val-fraction must be in [0, 1) (got {val_fraction})")
    files = list_inputs(inputs)
    ct = load_chat_tokenizer(tokenizer)
    records = read_records(files)
    is_val = np.zeros(len(records), dtype=bool)
    n_val = round(len(records) * val_fraction)
    if val_fraction > 0 and (n_val == 0 or n_val == len(records)):
        raise DataError(f"--val-fraction {val_fraction}: {len(records)} records cannot be split")
    if n_val:  # spread over the file, so every part of it (task, source) is represented in val
        is_val[np.linspace(0, len(records) - 1, n_val).round().astype(int)] = True

    splits: dict[str, tuple[list, dict]] = {}
    for k, (where, messages) in enumerate(records):
        if progress:
            progress(k, len(records))
        ids, sup, text = encode_example(ct, messages, where)
        split = "val" if is_val[k] else "train"
        examples, st = splits.setdefault(split, ([], dict.fromkeys(
            ("examples", "supervised_tokens", "text_bytes", "truncated_examples", "skipped_examples"), 0)))
        if len(ids) > seq_len:
            if not truncate:
                raise DataError(f"{where}: {len(ids)} tokens, longer than --seq-len {seq_len} (pass "
                                f"--truncate to keep its first {seq_len})")
            ids, sup = ids[:seq_len], sup[:seq_len]
            st["truncated_examples"] += 1
        tgt = targets_of(ids, sup)
        n_sup = int((tgt != IGNORE).sum())
        if n_sup == 0:
            if not truncate or len(ids) < seq_len:
                raise DataError(f"{where}: its assistant turns render to no tokens to learn from")
            st["skipped_examples"] += 1  # truncated before its first assistant token
            continue
        examples.append((ids, tgt))
        st["examples"] += 1
        st["supervised_tokens"] += n_sup
        st["text_bytes"] += len(text.encode())
    if progress:
        progress(len(records), len(records))
    for split, (examples, _) in splits.items():
        if not examples:
            raise DataError(f"input: every {split} example was truncated before its first assistant token")

    tok_json = (ct.dir / "tokenizer.json").read_bytes()
    header_common = {
        "format": FORMAT, "kind": "sft", "seq_len": seq_len, "members": [f"{f}.{MEMBER_EXT}" for f in FIELDS],
        "dtype": "int32", "tokenizer": "tokenizer.json", "tokenizer_name": ct.name,
        "tokenizer_sha256": tokenizer_hash(Tokenizer.from_str(tok_json.decode())),
        "chat_template_sha256": hashlib.sha256(ct.template.encode()).hexdigest(),
        "vocab_size": ct.vocab_size, "end_of_turn_ids": list(ct.end_ids), "pad_id": ct.pad_id,
        "inputs_sha256": _inputs_sha256(files), "files": len(files), "val_fraction": val_fraction,
        "truncate": truncate, "samples_per_shard": samples_per_shard(shard_bytes, seq_len),
    }
    manifests = {}
    for split in ("train", "val"):
        if split not in splits:
            continue
        examples, stats = splits[split]
        d = out / split
        d.mkdir(parents=True, exist_ok=True)
        _copy_tokenizer(ct, d)
        rows = build_rows(examples, seq_len, ct.pad_id)
        stats["padding_tokens"] = int((rows["segment_ids"] == 0).sum())
        manifests[split] = _write_split(d, {**header_common, "split": split}, rows, stats)
    return manifests


def _copy_tokenizer(ct: ChatTokenizer, d: Path) -> None:
    """The tokenizer files and the template used, beside the shards (byte for byte: the manifest's hash
    is of this tokenizer.json)."""
    for name in TOKENIZER_FILES:
        if (ct.dir / name).is_file():
            atomic_write(d / name, (ct.dir / name).read_bytes())
    atomic_write(d / "chat_template.jinja", ct.template)
