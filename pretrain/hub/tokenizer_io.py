"""Tokenizers of released checkpoints, through transformers (never remote code): loading one from a
checkpoint directory, its largest token id, and the conversion of a GGUF file's embedded tokenizer into
an ordinary tokenizer directory.

The GGUF conversion (transformers' own, `AutoTokenizer.from_pretrained(dir, gguf_file=...)`) takes seconds,
so its result is cached under `$PRETRAIN_CACHE` (default `~/.cache/pretrain`), keyed by the file's path,
size and mtime and by the transformers version; it is written to a temporary directory and renamed into
place, so a reader never sees half a tokenizer.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import transformers

from pretrain.atomic import rename_if_absent
from pretrain.errors import CheckpointError, first_line

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


def load_tokenizer(directory: Path, where: str) -> Any | None:
    """The transformers tokenizer saved in `directory`, or None when it holds no tokenizer files."""
    if not any((directory / f).is_file() for f in _TOKENIZER_FILES):
        return None
    try:
        return transformers.AutoTokenizer.from_pretrained(str(directory), trust_remote_code=False)
    except Exception as e:  # transformers raises many types; the caller gets one line
        raise CheckpointError(f"{where}: tokenizer does not load ({first_line(e)})") from None


def max_token_id(tok: Any) -> int:
    """The largest id the tokenizer can produce: its vocabulary and its added (special) tokens."""
    ids = list(tok.get_vocab().values()) + list(getattr(tok, "added_tokens_decoder", {}) or {})
    return max(ids, default=-1)


def cache_root() -> Path:
    if os.environ.get("PRETRAIN_CACHE"):
        return Path(os.environ["PRETRAIN_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "pretrain"


def gguf_tokenizer_dir(path: Path) -> Path:
    """A tokenizer directory (tokenizer.json, tokenizer_config.json, chat template) converted from the
    tokenizer embedded in a GGUF file; cached, see the module docstring."""
    st = path.stat()
    key = f"{path.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\0{transformers.__version__}"
    final = cache_root() / "gguf-tokenizers" / hashlib.sha256(key.encode()).hexdigest()[:32]
    if (final / "tokenizer_config.json").is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        tok = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name,
                                                         trust_remote_code=False)
        tok.save_pretrained(str(tmp))
        # Another process may have renamed its copy first: theirs is as good as ours.
        rename_if_absent(tmp, final, present=lambda d: (d / "tokenizer_config.json").is_file())
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(f"{path}: its tokenizer does not convert ({first_line(e)})") from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(tmp)
    return final
