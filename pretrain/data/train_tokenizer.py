"""`pretrain data tokenizer`: train a byte-level BPE on a corpus with Hugging Face `tokenizers`.

Byte-level, as GPT-2's: the 256 byte symbols are the base alphabet, so every text encodes (nothing is
unknown) and every token stands for a definite byte string. `<|endoftext|>` is the one special token, the
document separator that `pretrain data text` puts after each document. The corpus is read as the text
writer reads it (files, directories, `.jsonl` with a "text" per line; the same pieces cut between lines),
so a tokenizer trained here sees the documents that `pretrain data text` will tokenize with it.

The result is one `tokenizer.json`, written atomically (`pretrain.atomic.atomic_write`): a killed run
leaves the previous file or none, never a torn one.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from pretrain.atomic import atomic_write
from pretrain.data.tokenizer import GPT2_EOT
from pretrain.data.write_text import Piece, list_inputs, plan_pieces
from pretrain.errors import DataError

MIN_VOCAB = 256 + 1  # the byte alphabet and the separator


def _documents(pieces: list[Piece], progress: Callable[[int], None]) -> Iterator[str]:
    """The texts of the corpus pieces in order (one per .jsonl line); DataError naming a file that is not
    UTF-8 or a line that is not JSON with a "text"."""
    for p in pieces:
        with open(p.path, "rb") as f:
            f.seek(p.start)
            data = f.read(p.end - p.start)
        if p.jsonl:
            for line in data.splitlines():
                if line.strip():
                    try:
                        yield json.loads(line)["text"]
                    except (ValueError, KeyError, TypeError):
                        raise DataError(f"input {p.path}: a line near byte {p.start} is not JSON with a 'text' "
                                        f"field") from None
        else:
            try:
                yield data.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"input {p.path}: not UTF-8 text (byte {p.start + e.start})") from None
        progress(p.end - p.start)


def train_tokenizer(inputs: list[str], *, vocab_size: int, out: Path, min_frequency: int = 2,
                    progress: Callable[[int, int], None] | None = None) -> Tokenizer:
    """Train a byte-level BPE of at most `vocab_size` tokens (the separator included) on `inputs` and write
    it to `out`. Fewer tokens result when the corpus has fewer pairs seen `min_frequency` times.
    `progress(done_bytes, total_bytes)` is called as pieces are read."""
    if vocab_size < MIN_VOCAB:
        raise DataError(f"--vocab-size must be at least {MIN_VOCAB} (256 bytes and {GPT2_EOT}; got {vocab_size})")
    if out.is_dir():
        raise DataError(f"--out {out} is a directory; give the tokenizer.json file to write")
    pieces, _, _ = plan_pieces(list_inputs(inputs), 0.0)
    total, done = sum(p.end - p.start for p in pieces), [0]

    def step(n: int) -> None:
        done[0] += n
        if progress:
            progress(done[0], total)

    tok = Tokenizer(models.BPE())
    # GPT-2's pre-tokenization (its regex, no prefix space) and byte-to-symbol mapping, as `load_tokenizer`'s
    # "gpt2"; the decoder maps the symbols back to bytes.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=[GPT2_EOT],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")  # the trainer's own threads
    tok.train_from_iterator(_documents(pieces, step), trainer=trainer, length=len(pieces))
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, tok.to_str())
    return tok
