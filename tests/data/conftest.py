"""Fixtures of the data tests: small real shard directories written by the project's own writer."""

from __future__ import annotations

from pathlib import Path

import pytest

from pretrain.data.write_text import write_text
from tests.helpers import write_corpus


def write_source(root: Path, name: str, seed: int, seq_len: int = 16, shard_bytes: int = 24 << 10,
                 val_fraction: float = 0.0, n_docs: int = 4, words: int = 600) -> Path:
    """A corpus of `n_docs` generated documents tokenized with GPT-2 BPE into shards of ~12 samples."""
    files = write_corpus(root / f"{name}-corpus", n_docs=n_docs, words_per_doc=words, seed=seed)
    write_text([str(f) for f in files], tokenizer="gpt2", out=root / name, seq_len=seq_len,
               val_fraction=val_fraction, shard_bytes=shard_bytes, workers=1)
    return root / name


@pytest.fixture(scope="session")
def sources(tmp_path_factory) -> dict[str, Path]:
    """Two train sources ("prose", "code") and a val split, seq_len 16, many small shards each."""
    root = tmp_path_factory.mktemp("data-sources")
    prose = write_source(root, "prose", seed=1, val_fraction=0.1)
    code = write_source(root, "code", seed=2, n_docs=3)
    return {"prose": prose / "train", "val": prose / "val", "code": code / "train"}
