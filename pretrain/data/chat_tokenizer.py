"""The chat tokenizer of a checkpoint (`ChatTokenizer`): a transformers fast tokenizer with its chat
template and the end-of-turn ids, loaded from a checkpoint directory or a .gguf file (`load_chat_tokenizer`).
Rendering (`pretrain.data.sft_render`) and `pretrain data sft` use it.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path

from pretrain.errors import DataError, first_line


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
        raise DataError(f"--tokenizer {spec}: cannot load the tokenizer ({first_line(e)})") from None
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
