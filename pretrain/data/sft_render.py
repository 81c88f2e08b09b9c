"""Chat records -> supervised token examples for `pretrain data sft`: reading the records, rendering them
with the checkpoint's chat template, and finding the supervised tokens on the rendered text.

Records (one JSON object a line) are `{"messages": [{"role", "content"}, ...]}` or `{"prompt", "response"}`
(read as a user turn and an assistant turn). Each is rendered with the checkpoint's own chat template
(transformers' `apply_chat_template`, so the fine-tuned model sees exactly what it will be prompted with)
and tokenised once, with character offsets. The supervised tokens are found on the text, not by
tokenising prefixes: the rendering of `messages[:i+1]` must be a prefix of the whole rendering (the
template renders turn by turn; checked), the turn's content is located after the rendering of
`messages[:i]` with the generation prompt, and the tokens that overlap it plus the template's end-of-turn
token after it are supervised. Role headers, system and user turns, and whatever follows the end-of-turn
token (a newline) carry no loss.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from pretrain.data.chat_tokenizer import ChatTokenizer
from pretrain.errors import DataError, first_line

IGNORE = -100


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
        raise DataError(f"{where}: the chat template refuses it ({first_line(e)})") from None


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
