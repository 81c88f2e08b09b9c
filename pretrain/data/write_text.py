"""`pretrain data text`: tokenize a corpus in parallel and pack it into fixed-length token shards.

Pipeline: files -> pieces (byte ranges of at most ~1 MiB cut where the tokenizer would cut anyway) ->
token ids (a process pool, in order) -> one stream per split with `<|endoftext|>` after every document ->
samples of seq_len + 1 tokens (stride seq_len, so consecutive samples share one token) -> tar shards of a
fixed sample count -> `index.json`.

Bytes per sample: beside its tokens each sample holds `bytes.u32`, the UTF-8 bytes of the text its targets
(tokens 1..seq_len) cover, so validation can report bits per byte, a loss that compares across tokenizers.
The count is taken while tokenizing, decode-free: each token gets the bytes of the text between the end of
the tokens before it and its own end (the tokenizer's character offsets), so the tokens of a piece cover its
text exactly once, whatever the tokenizer (a byte-level BPE token that holds part of a character gets the
rest of it or nothing; separators and added specials get 0). Consecutive samples' targets tile the stream,
so the manifest's `text_bytes` is the split's text less its first token's and the dropped tail's.

Restartable: a journal (`progress.json`) records every finished shard and the tokens of every piece, so a
second run with the same inputs and settings keeps the shards it finds intact and tokenizes only from the
piece where the first unfinished shard starts (nothing, if the split was finished). Shards appear under
their final name only when complete; the manifest only when all are. Journal and manifest are written with
`pretrain.atomic.atomic_write` (whole or not at all, durable once written).
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pretrain.atomic import atomic_write
from pretrain.data.manifest import FORMAT, MANIFEST, write_manifest
from pretrain.data.shards import ShardWriter, token_ext
from pretrain.data.tokenizer import eos_id, id_bound, load_tokenizer, tokenizer_hash
from pretrain.errors import DataError

PIECE_BYTES = 1 << 20
JOURNAL = "progress.json"
BYTES_MEMBER = "bytes.u32"  # per sample: UTF-8 bytes its targets cover, one little-endian uint32


@dataclass(frozen=True)
class Piece:
    """A byte range of one input file; `last` marks the end of a document (a separator follows it).
    For .jsonl files the range covers whole lines and each line's "text" is one document."""

    path: str
    start: int
    end: int
    last: bool
    jsonl: bool


def list_inputs(paths: Iterable[str]) -> list[Path]:
    """Files named, and files under directories named (sorted, hidden ones skipped)."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            out += sorted(f for f in p.rglob("*") if f.is_file() and not any(s.startswith(".") for s in f.parts))
        elif p.is_file():
            out.append(p)
        else:
            raise DataError(f"input: no such file or directory: {p}")
    if not out:
        raise DataError("input: no files to tokenize")
    return out


def _safe_cut(data: bytes, target: int, jsonl: bool) -> int:
    """First offset >= target just after a newline whose next byte is not whitespace: byte-level BPE
    pre-tokenizes a newline before a word as a token of its own, so cutting there changes no token."""
    i = target
    while True:
        i = data.find(b"\n", i)
        if i < 0 or i + 1 >= len(data):
            return len(data)
        if jsonl or not data[i + 1 : i + 2].isspace():
            return i + 1
        i += 1


def plan_pieces(files: list[Path], val_fraction: float) -> tuple[list[Piece], list[Piece], str]:
    """Split files into pieces; the last `val_fraction` of the corpus bytes go to validation.
    Also returns the sha256 of the corpus bytes in order (the manifest's record of what was read)."""
    h = hashlib.sha256()
    total = sum(f.stat().st_size for f in files)
    cut = round(total * (1 - val_fraction)) if val_fraction > 0 else total
    train, val, offset = [], [], 0
    for f in files:
        data = f.read_bytes()
        h.update(len(data).to_bytes(8, "little") + data)  # length-prefixed: file boundaries count
        jsonl = f.suffix == ".jsonl"
        bounds, pos = [], 0
        while pos < len(data):
            nxt = _safe_cut(data, pos + PIECE_BYTES, jsonl)
            # The train/val cut falls inside this range: cut there too (on the same safe boundary rule).
            if offset + pos < cut < offset + nxt:
                mid = _safe_cut(data, cut - offset, jsonl)
                if pos < mid < nxt:
                    bounds.append((pos, mid))
                    pos = mid
                    continue
            bounds.append((pos, nxt))
            pos = nxt
        for a, b in bounds:
            piece = Piece(str(f), a, b, b == len(data), jsonl)
            (train if offset + a < cut else val).append(piece)
        offset += len(data)
    return train, val, h.hexdigest()


_TOK = None


def _init_worker(spec: str) -> None:
    global _TOK
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one process per core already
    _TOK = load_tokenizer(spec)


def token_bytes(text: str, offsets: list[tuple[int, int]]) -> np.ndarray:
    """UTF-8 bytes of `text` each token covers, from the tokens' character offsets: the bytes between the
    furthest end so far and this token's end (text before the first token goes to it, text after the last
    to the last), so the counts sum to the text's bytes exactly (uint32)."""
    total = len(text.encode("utf-8"))
    if not offsets:
        return np.zeros(0, dtype=np.uint32)
    cp = np.frombuffer(text.encode("utf-32-le"), dtype="<u4")
    widths = 1 + (cp >= 0x80).astype(np.int64) + (cp >= 0x800) + (cp >= 0x10000)
    at = np.concatenate([[0], np.cumsum(widths)])  # byte offset of each character boundary
    ends = np.maximum.accumulate(at[np.asarray(offsets, dtype=np.int64).reshape(-1, 2)[:, 1]])
    out = np.diff(ends, prepend=0)
    out[-1] += total - ends[-1]
    return out.astype(np.uint32)


def _encode(text: str) -> tuple[list[int], np.ndarray]:
    enc = _TOK.encode(text)
    return enc.ids, token_bytes(text, enc.offsets)


def encode_piece(piece: Piece) -> tuple[np.ndarray, np.ndarray]:
    """Token ids of one piece, a separator after each document it ends, and the UTF-8 bytes of the text
    each token covers (`token_bytes`; 0 for a separator); both uint32."""
    with open(piece.path, "rb") as f:
        f.seek(piece.start)
        data = f.read(piece.end - piece.start)
    eos = eos_id(_TOK)
    ids: list[int] = []
    nbytes: list[np.ndarray] = []
    if piece.jsonl:
        for line in data.splitlines():
            if line.strip():
                try:
                    text = json.loads(line)["text"]
                except (ValueError, KeyError, TypeError):
                    raise DataError(f"input {piece.path}: a line near byte {piece.start} is not JSON with a 'text' field") from None
                doc, b = _encode(text)
                ids += doc + [eos]
                nbytes += [b, np.zeros(1, dtype=np.uint32)]
    else:
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"input {piece.path}: not UTF-8 text (byte {piece.start + e.start})") from None
        ids, b = _encode(text)
        nbytes.append(b)
        if piece.last:
            ids.append(eos)
            nbytes.append(np.zeros(1, dtype=np.uint32))
    counts = np.concatenate(nbytes) if nbytes else np.zeros(0, dtype=np.uint32)
    return np.asarray(ids, dtype=np.uint32), counts


def _encoded(pieces: list[Piece], spec: str, workers: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(token ids, bytes per token) of `pieces` in order, from a pool of `workers` processes (in-process for 1)."""
    if workers <= 1 or len(pieces) <= 1:
        _init_worker(spec)
        yield from map(encode_piece, pieces)
        return
    # fork: spawn would re-import the caller's __main__; the parent never encodes, so no Rust thread
    # pool exists yet to be copied.
    with mp.get_context("fork").Pool(workers, initializer=_init_worker, initargs=(spec,)) as pool:
        yield from pool.imap(encode_piece, pieces, chunksize=1)


class _SplitWriter:
    """Packs one split's token stream into samples and shards, resuming from its journal."""

    def __init__(self, out: Path, header: dict, samples_per_shard: int, pieces: list[Piece]):
        self.out, self.header, self.sps, self.pieces = out, header, samples_per_shard, pieces
        self.seq_len = header["seq_len"]
        self.ext, self.dtype = token_ext(header["vocab_size"])
        self.shards: list[dict] = []
        self.piece_tokens: list[int] = []
        self.dropped: int | None = None  # known once the whole split was written
        self._text_bytes = 0  # UTF-8 bytes covered by the samples of the shard being written
        out.mkdir(parents=True, exist_ok=True)
        self._resume()

    def _resume(self) -> None:
        """Keep the journal's shards that are intact, in order; drop the journal if settings changed."""
        state, self.shards = journaled_shards(self.out, self.header)
        if state is None:
            return  # no journal, or other inputs or settings: start over (finished shards are rewritten)
        self.piece_tokens = state["piece_tokens"]
        if len(self.shards) == len(state["shards"]):
            self.dropped = state.get("dropped")  # every shard intact: a finished split is done

    def _journal(self) -> None:
        atomic_write(self.out / JOURNAL, json.dumps({"header": self.header, "piece_tokens": self.piece_tokens,
                                                     "shards": self.shards, "dropped": self.dropped}, sort_keys=True))

    def run(self, spec: str, workers: int, progress: Callable[[int], None]) -> dict:
        if self.dropped is not None:
            progress(sum(p.end - p.start for p in self.pieces))
            return self._manifest()
        L = self.seq_len
        done_samples = sum(s["samples"] for s in self.shards)
        skip = done_samples * L  # tokens already in finished shards (samples overlap by one)
        # Restart at the piece where the first unfinished sample's tokens begin.
        cum, first = 0, 0
        while first < len(self.piece_tokens) and cum + self.piece_tokens[first] <= skip:
            cum += self.piece_tokens[first]
            first += 1
        self.piece_tokens = self.piece_tokens[:first]
        for p in self.pieces[:first]:
            progress(p.end - p.start)
        buf = np.zeros(0, dtype=np.uint32)
        bbuf = np.zeros(0, dtype=np.uint32)  # bytes of each token in buf
        drop = skip - cum
        index, writer = done_samples, None
        for k, (ids, nbytes) in enumerate(_encoded(self.pieces[first:], spec, workers), start=first):
            if len(ids) and int(ids.max()) >= self.header["vocab_size"]:
                if writer is not None:
                    writer.abort()  # no partial shard left; finished ones stay journaled, and no manifest
                raise self._id_error(int(ids.max()), self.pieces[k], spec)
            self.piece_tokens.append(int(len(ids)))
            progress(self.pieces[k].end - self.pieces[k].start)
            if drop:
                cut = min(drop, len(ids))
                ids, nbytes, drop = ids[cut:], nbytes[cut:], drop - cut
            buf = np.concatenate([buf, ids]) if len(buf) else ids
            bbuf = np.concatenate([bbuf, nbytes]) if len(bbuf) else nbytes
            n = (len(buf) - 1) // L if len(buf) > L else 0
            for i in range(n):
                if writer is None:
                    writer = ShardWriter(self.out / f"shard-{len(self.shards):06d}.tar")
                    self._text_bytes = 0
                sample = buf[i * L : i * L + L + 1].astype(self.dtype)
                covered = int(bbuf[i * L + 1 : i * L + L + 1].sum())  # the targets' text
                self._text_bytes += covered
                writer.add(f"{index:010d}", {self.ext: sample.tobytes(),
                                             BYTES_MEMBER: np.uint32(covered).astype("<u4").tobytes()})
                index += 1
                if writer.samples == self.sps:
                    self._finish(writer)
                    writer = None
            buf, bbuf = buf[n * L :], bbuf[n * L :]
        self.dropped = max(len(buf) - 1, 0)
        if writer is not None:
            self._finish(writer)
        self._journal()
        return self._manifest()

    def _id_error(self, top: int, piece: Piece, spec: str) -> DataError:
        # Checked before any id is cast to the shards' dtype (chosen from vocab_size): a larger one would wrap
        # around in uint16 and train on another token without a word.
        return DataError(f"input {piece.path}: tokenizer {spec} gave token id {top}, outside its vocabulary of "
                         f"{self.header['vocab_size']} ids (shards store {np.dtype(self.dtype).name})")

    def _finish(self, writer: ShardWriter) -> None:
        entry = writer.close()
        entry.update(samples=writer.samples, tokens=writer.samples * self.seq_len, text_bytes=self._text_bytes)
        self.shards.append(entry)
        self._journal()

    def _manifest(self) -> dict:
        m = dict(self.header)
        m.update(
            samples=sum(s["samples"] for s in self.shards),
            tokens=sum(s["tokens"] for s in self.shards),
            text_bytes=sum(s["text_bytes"] for s in self.shards),
            dropped_tokens=self.dropped,
            shards=self.shards,
        )
        if not self.shards:
            raise DataError(f"output {self.out}: fewer than seq_len + 1 = {self.seq_len + 1} tokens; no samples")
        write_manifest(self.out, m)  # the journal stays: a second run with the same inputs has nothing to do
        return m


def remove_stale_tmp(d: Path) -> None:
    """Temporary files of journal and manifest writes that a killed run left in `d` (`atomic_write`'s
    `.<name>.tmp-*`, and the fixed `<name>.tmp` of earlier versions). Partial shards (`shard-*.tar.tmp`)
    go with the stale shards once the split is written."""
    for name in (JOURNAL, MANIFEST):
        for stale in [*d.glob(f".{name}.tmp-*"), d / f"{name}.tmp"]:
            stale.unlink(missing_ok=True)


def journaled_shards(out: Path, header: dict) -> tuple[dict | None, list[dict]]:
    """(the journal of a split being written, its leading shards that are still intact) when the journal was
    written with the same `header` (inputs and settings); (None, []) otherwise, and the split starts over."""
    j = out / JOURNAL
    try:
        state = json.loads(j.read_text()) if j.is_file() else None
    except ValueError:
        state = None
    if state is None or state.get("header") != header:
        return None, []
    shards = []
    for s in state["shards"]:
        p = out / s["name"]
        if not p.is_file() or p.stat().st_size != s["bytes"] or _sha256(p) != s["sha256"]:
            break
        shards.append(s)
    return state, shards


def _sha256(p: Path) -> str:
    h = hashlib.sha256()
    with open(p, "rb") as f:
        while b := f.read(1 << 20):
            h.update(b)
    return h.hexdigest()


def samples_per_shard(shard_bytes: int, seq_len: int, vocab_size: int) -> int:
    """Samples that fit a target shard size: each is two tar members (512-byte header, padded data): its
    tokens and its byte count."""
    _, dtype = token_ext(vocab_size)
    member = 512 + -(-(seq_len + 1) * np.dtype(dtype).itemsize // 512) * 512
    return max(1, shard_bytes // (member + 1024))


def write_text(
    inputs: list[str], *, tokenizer: str, out: Path, seq_len: int, val_fraction: float = 0.0,
    shard_bytes: int = 64 << 20, workers: int | None = None, progress: Callable[[int, int], None] | None = None,
) -> dict[str, dict]:
    """Tokenize `inputs` into `out/train/` (and `out/val/` when val_fraction > 0). Returns the manifests
    by split. `progress(done_bytes, total_bytes)` is called as pieces finish."""
    if seq_len < 1:
        raise DataError(f"--seq-len must be positive (got {seq_len})")
    if not 0 <= val_fraction < 1:
        raise DataError(f"--val-fraction must be in [0, 1) (got {val_fraction})")
    tok = load_tokenizer(tokenizer)
    files = list_inputs(inputs)
    train, val, corpus_sha = plan_pieces(files, val_fraction)
    if val_fraction > 0 and not val:
        raise DataError(f"--val-fraction {val_fraction}: the corpus is too small to hold anything out")
    vocab = id_bound(tok)  # not the token count: the storage dtype must hold the largest id
    ext, dtype = token_ext(vocab)
    spec = "gpt2" if tokenizer == "gpt2" else "tokenizer.json"
    total = sum(p.end - p.start for p in train + val)
    # A pool pays off only past a few MiB of text (and forking a process that runs Ray threads, as a
    # test session may, is best avoided when it buys nothing).
    workers = max(1, min(workers or os.cpu_count() or 1, -(-total // (4 * PIECE_BYTES))))
    done = [0]

    def step(n: int) -> None:
        done[0] += n
        if progress:
            progress(done[0], total)

    manifests = {}
    for split, pieces in (("train", train), ("val", val)):
        if not pieces:
            continue
        d = out / split
        d.mkdir(parents=True, exist_ok=True)
        remove_stale_tmp(d)
        if spec != "gpt2":
            atomic_write(d / "tokenizer.json", Path(tokenizer).read_bytes())  # read beside the shards
        header = {
            "format": FORMAT, "kind": "tokens", "split": split, "seq_len": seq_len, "member": ext,
            "dtype": np.dtype(dtype).name, "tokenizer": spec, "tokenizer_sha256": tokenizer_hash(tok),
            "vocab_size": vocab, "eos_id": eos_id(tok), "corpus_sha256": corpus_sha, "files": len(files),
            "val_fraction": val_fraction, "bytes_member": BYTES_MEMBER,
        }
        sps = samples_per_shard(shard_bytes, seq_len, vocab)
        header["samples_per_shard"] = sps
        if (d / MANIFEST).is_file():
            (d / MANIFEST).unlink()  # rewritten at the end; never a manifest for shards being replaced
        manifests[split] = _SplitWriter(d, header, sps, pieces).run(tokenizer, workers, step)
        for stale in sorted(d.glob("shard-*.tar*")):
            if stale.name not in {s["name"] for s in manifests[split]["shards"]}:
                stale.unlink()  # left from an earlier, larger write into the same directory
    return manifests
