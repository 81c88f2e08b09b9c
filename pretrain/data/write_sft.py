"""`pretrain data sft`: chat records -> rows of exactly seq_len tokens, supervised on assistant turns only.

Records (one JSON object a line) are `{"messages": [{"role", "content"}, ...]}` or `{"prompt", "response"}`
(read as a user turn and an assistant turn). Each is rendered with the checkpoint's own chat template
(transformers' `apply_chat_template`, so the fine-tuned model sees exactly what it will be prompted with)
and tokenised once, with character offsets. The supervised tokens are found on the text, not by
tokenising prefixes: the rendering of `messages[:i+1]` must be a prefix of the whole rendering (the
template renders turn by turn; checked), the turn's content is located after the rendering of
`messages[:i]` with the generation prompt, and the tokens that overlap it plus the template's end-of-turn
token after it are supervised. Role headers, system and user turns, and whatever follows the end-of-turn
token (a newline) carry no loss.

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

import functools
import hashlib
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from pretrain.atomic import atomic_write
from pretrain.data.manifest import FORMAT, MANIFEST, write_manifest
from pretrain.data.shards import ShardWriter
from pretrain.data.tokenizer import tokenizer_hash
from pretrain.data.write_text import JOURNAL, journaled_shards, list_inputs, remove_stale_tmp
from pretrain.errors import DataError

IGNORE = -100
FIELDS = ("input_ids", "targets", "segment_ids")  # members `<key>.<field>.i32` of every row
MEMBER_EXT = "i32"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")


@dataclass(frozen=True)
class ChatTokenizer:
    """A checkpoint's tokenizer with what rendering needs: its chat template and end-of-turn ids."""

    tok: object  # a transformers fast tokenizer (offsets are needed)
    dir: Path  # holds tokenizer.json (for a .gguf: the converted tokenizer's cache directory)
    name: str  # the checkpoint directory's or the .gguf file's name: the identity a person reads
    template: str
    end_ids: tuple[int, ...]  # the template's end-of-turn tokens (eos of the tokenizer / generation config)

    @functools.cached_property
    def vocab_size(self) -> int:
        """One past the largest id of the vocabulary and the added tokens: taken from the ids themselves,
        since a tokenizer's declared size (or `len`) can miss ids past a gap."""
        ids = [*self.tok.get_vocab().values(), *(getattr(self.tok, "added_tokens_decoder", None) or {})]
        return max(ids) + 1

    @property
    def pad_id(self) -> int:
        pad = self.tok.pad_token_id
        return int(pad) if pad is not None else self.end_ids[0]


def load_chat_tokenizer(spec: str) -> ChatTokenizer:
    """The tokenizer of a checkpoint directory (tokenizer.json + tokenizer_config.json with a chat template,
    or a chat_template.jinja file, which wins) or of a .gguf file (via `pretrain.hub`)."""
    path = Path(spec)
    eos: list[int] = []
    if path.suffix == ".gguf" and path.is_file():
        from pretrain.hub import read_checkpoint  # lazy: reading GGUF pulls in gguf and torch

        try:
            released = read_checkpoint(path)
        except ValueError as e:  # CheckpointError: already one line
            raise DataError(f"--tokenizer {spec}: {e}") from None
        if released.tokenizer_dir is None:
            raise DataError(f"--tokenizer {spec}: the file holds no tokenizer")
        d = Path(released.tokenizer_dir)
        eos = [int(i) for i in getattr(released, "eos_token_ids", ()) or ()]
    elif path.is_dir():
        d = path
    else:
        raise DataError(f"--tokenizer {spec}: neither a checkpoint directory nor a .gguf file")
    if not (d / "tokenizer.json").is_file():
        raise DataError(f"--tokenizer {spec}: no tokenizer.json in {d}")
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(d), local_files_only=True, trust_remote_code=False)
    except Exception as e:  # transformers' errors are long; the first line names the problem
        raise DataError(f"--tokenizer {spec}: cannot load the tokenizer ({_first_line(e)})") from None
    if not getattr(tok, "is_fast", False):
        raise DataError(f"--tokenizer {spec}: not a fast (tokenizer.json) tokenizer; offsets are needed")
    jinja = d / "chat_template.jinja"
    template = jinja.read_text() if jinja.is_file() else tok.chat_template
    if isinstance(template, dict):  # named templates: the default one renders conversations
        template = template.get("default")
    if not template:
        raise DataError(f"--tokenizer {spec}: no chat template (neither chat_template.jinja nor a "
                        f"chat_template in tokenizer_config.json)")
    tok.chat_template = template
    eos += _generation_eos(d)
    if tok.eos_token_id is not None:
        eos.insert(0, int(tok.eos_token_id))
    end_ids = tuple(dict.fromkeys(eos))  # ordered, without repeats
    if not end_ids:
        raise DataError(f"--tokenizer {spec}: no eos token (tokenizer_config.json eos_token or "
                        f"generation_config.json eos_token_id) to end assistant turns")
    name = path.name if path.suffix == ".gguf" else path.resolve().name
    return ChatTokenizer(tok, d, name, template, end_ids)


def _generation_eos(d: Path) -> list[int]:
    """eos_token_id of a generation_config.json beside the tokenizer (an int or a list), if any."""
    f = d / "generation_config.json"
    if not f.is_file():
        return []
    try:
        ids = json.loads(f.read_text()).get("eos_token_id")
    except (ValueError, AttributeError):
        return []
    ids = [ids] if isinstance(ids, int) else ids if isinstance(ids, list) else []
    return [int(i) for i in ids if isinstance(i, int)]


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


# ------------------------------------------------------------------------------------------------ records
def read_records(files: list[Path]) -> list[tuple[str, list[dict]]]:
    """(where, messages) of every non-blank line; `where` is "FILE line N" for error messages."""
    out = []
    for f in files:
        try:
            lines = f.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError as e:
            raise DataError(f"input {f}: not UTF-8 text (byte {e.start})") from None
        for n, line in enumerate(lines, start=1):
            if line.strip():
                where = f"input {f} line {n}"
                out.append((where, _messages(line, where)))
    if not out:
        raise DataError(f"input: no records in {', '.join(map(str, files))}")
    return out


def _messages(line: str, where: str) -> list[dict]:
    try:
        rec = json.loads(line)
    except ValueError:
        raise DataError(f"{where}: not JSON") from None
    if isinstance(rec, dict) and "messages" in rec:
        msgs = rec["messages"]
        ok = isinstance(msgs, list) and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in msgs)
        if not ok:
            raise DataError(f"{where}: 'messages' must be a list of {{\"role\": str, \"content\": str}}")
        msgs = [{"role": m["role"], "content": m["content"]} for m in msgs]
    elif isinstance(rec, dict) and isinstance(rec.get("prompt"), str) and isinstance(rec.get("response"), str):
        msgs = [{"role": "user", "content": rec["prompt"]}, {"role": "assistant", "content": rec["response"]}]
    else:
        raise DataError(f"{where}: neither {{\"messages\": [...]}} nor {{\"prompt\": str, \"response\": str}}")
    if not any(m["role"] == "assistant" for m in msgs):
        raise DataError(f"{where}: no assistant turn (nothing to learn from)")
    return msgs


# ---------------------------------------------------------------------------------------------- rendering
def _render(ct: ChatTokenizer, messages: list[dict], where: str, gen: bool = False) -> str:
    try:
        return ct.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
    except Exception as e:  # a template's raise_exception ("roles must alternate"), a jinja error
        raise DataError(f"{where}: the chat template refuses it ({_first_line(e)})") from None


def supervised_spans(ct: ChatTokenizer, messages: list[dict], where: str) -> tuple[str, list[tuple[int, int, int]]]:
    """The rendered conversation and, per assistant turn, (content start, content end, turn end) in
    characters. The turn's text is what rendering messages[:i+1] adds to rendering messages[:i]."""
    full = _render(ct, messages, where)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        upto = _render(ct, messages[: i + 1], where)
        turn_end = len(upto)
        if not full.startswith(upto):
            raise DataError(f"{where}: the chat template renders message {i + 1} differently once later "
                            f"turns follow; cannot tell its tokens apart")
        head = 0
        if i:
            # After the generation prompt (the assistant header) where the template has one; else after
            # the previous turns.
            for gen in (True, False):
                prev = _render(ct, messages[:i], where, gen)
                if full.startswith(prev) and len(prev) <= turn_end:
                    head = len(prev)
                    break
            else:
                raise DataError(f"{where}: the chat template renders messages 1..{i} differently once "
                                f"later turns follow; cannot tell message {i + 1}'s tokens apart")
        content = m["content"]
        start = full.find(content, head, turn_end)
        if start < 0 and content.strip() != content:  # templates that trim the content
            content = content.strip()
            start = full.find(content, head, turn_end)
        if start < 0:
            raise DataError(f"{where}: the chat template changes the content of message {i + 1}; cannot "
                            f"find it in the rendering")
        spans.append((start, start + len(content), turn_end))
    return full, spans


def encode_example(ct: ChatTokenizer, messages: list[dict], where: str) -> tuple[np.ndarray, np.ndarray, str]:
    """(token ids int32, supervised bool, rendered text): supervised are the tokens overlapping an
    assistant turn's content and the first end-of-turn token after it within the turn."""
    text, spans = supervised_spans(ct, messages, where)
    enc = ct.tok(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = np.asarray(enc["input_ids"], dtype=np.int64)
    offsets = np.asarray(enc["offset_mapping"], dtype=np.int64).reshape(-1, 2)
    if len(ids) and int(ids.max()) >= ct.vocab_size:
        raise DataError(f"{where}: token id {int(ids.max())} is outside the tokenizer's vocabulary of "
                        f"{ct.vocab_size}")
    starts, ends = offsets[:, 0], offsets[:, 1]
    sup = np.zeros(len(ids), dtype=bool)
    end_ids = np.asarray(ct.end_ids, dtype=np.int64)
    for cs, ce, turn_end in spans:
        sup |= (starts < ce) & (ends > cs)
        after = np.flatnonzero((starts >= ce) & (starts < turn_end) & np.isin(ids, end_ids))
        if len(after):
            sup[after[0]] = True
    return ids.astype(np.int32), sup, text


def targets_of(ids: np.ndarray, sup: np.ndarray) -> np.ndarray:
    """Next-token targets of one example: token t+1 where it is supervised, else IGNORE (int32)."""
    tgt = np.full(len(ids), IGNORE, dtype=np.int32)
    tgt[:-1] = np.where(sup[1:], ids[1:], IGNORE)
    return tgt


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
