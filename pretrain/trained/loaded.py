"""A model ready to answer prompts: a finished run, a Hugging Face model directory or a GGUF file, on CPU or
one GPU, with the tokenizer, chat template and end-of-sequence ids that belong to it.

A run's weights come from its `final/` (LoRA adapters folded into the base); its tokenizer is that of the
checkpoint it was fine-tuned from (`init.path`), else the one its data was written with. Released
checkpoints bring their own (`pretrain.hub`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml


@dataclass
class Loaded:
    model: Any  # a causal Transformer in eval mode
    tokenizer: Any  # a transformers tokenizer
    eos_ids: tuple[int, ...]
    source: str

    def encode(self, text: str, chat: bool) -> list[int]:
        if not chat:
            return self.tokenizer(text, add_special_tokens=True)["input_ids"] or [self.eos_ids[0]]
        return self.encode_chat([{"role": "user", "content": text}])

    def encode_chat(self, messages: list[dict]) -> list[int]:
        """The prompt for the assistant's next turn, rendered with the checkpoint's chat template."""
        if not getattr(self.tokenizer, "chat_template", None):
            raise ValueError(f"{self.source}: the checkpoint has no chat template (drop --chat)")
        return list(self.tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True,
                                                       return_dict=False))

    def answer(self, ids: list[int], max_new_tokens: int, temperature: float = 0.0, top_k: int | None = None,
               seed: int = 0) -> str:
        from pretrain.models.generate import generate

        out = generate(self.model, ids, max_new_tokens, temperature=temperature, top_k=top_k,
                       eos_ids=self.eos_ids, seed=seed)
        return self.decode(out)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)


def _hf_tokenizer(tokenizer_dir: Path | None, source: str):
    from transformers import AutoTokenizer

    if tokenizer_dir is None:
        raise ValueError(f"{source}: no tokenizer found beside the weights")
    return AutoTokenizer.from_pretrained(str(tokenizer_dir), trust_remote_code=False)


def _data_tokenizer(run_cfg) -> Any:
    """The tokenizer a from-scratch run's data was written with, as a transformers tokenizer."""
    from transformers import PreTrainedTokenizerFast

    from pretrain.data import tokenizer_for

    tok = tokenizer_for(run_cfg.data)
    eot = tok.token_to_id("<|endoftext|>")
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>" if eot is not None else None)


def _eos(tokenizer, given: tuple[int, ...]) -> tuple[int, ...]:
    ids = list(given)
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return tuple(ids)


def load_run(run: Path, weights: str = "model") -> Loaded:
    from pretrain.hub import load_weights
    from pretrain.hub.run_weights import final_tensors
    from pretrain.hub.sources import open_source
    from pretrain.load import config_from_dict

    final = run / "final"
    if not (final / "config.yaml").is_file():
        raise FileNotFoundError(f"{run}: not a finished run (no final/config.yaml)")
    cfg = config_from_dict(yaml.safe_load((final / "config.yaml").read_text()))
    from pretrain.models import get_family

    model = get_family(cfg.model.type).build(cfg.model)
    if cfg.lora is not None:
        from pretrain.models.lora import apply_lora

        apply_lora(model, cfg.lora)
    load_weights(model, final_tensors(final, weights), str(final))
    if cfg.lora is not None:
        from pretrain.models.lora import merge_lora

        merge_lora(model)
    if cfg.init.path:
        src = open_source(cfg.init.path)
        tok = _hf_tokenizer(src.tokenizer_dir, src.path)
        eos = _eos(tok, src.eos_token_ids)
    else:
        tok = _data_tokenizer(cfg)
        eos = _eos(tok, ())
    return Loaded(model.eval(), tok, eos, str(run))


def load_released(path: Path) -> Loaded:
    from pretrain.hub import load_weights
    from pretrain.hub.sources import open_source
    from pretrain.models import get_family

    src = open_source(path)
    model = get_family(src.model_cfg.type).build(src.model_cfg)
    load_weights(model, src.iter_tensors(), src.path)
    tok = _hf_tokenizer(src.tokenizer_dir, src.path)
    return Loaded(model.eval(), tok, _eos(tok, src.eos_token_ids), src.path)


def load(path: str | Path, weights: str = "model") -> Loaded:
    """A run directory, a Hugging Face model directory or a .gguf file."""
    p = Path(path)
    loaded = load_run(p, weights) if (p / "final").is_dir() else load_released(p)
    if torch.cuda.is_available():
        loaded.model.cuda()
    return loaded


def split_record(rec: dict, where: str) -> tuple[list[dict], str]:
    """(the conversation up to the last assistant turn, that turn's reference text) of a chat or a
    prompt/response record."""
    if "messages" in rec:
        msgs = rec["messages"]
        last = max((i for i, m in enumerate(msgs) if m.get("role") == "assistant"), default=None)
        if last is None:
            raise ValueError(f"{where}: the record has no assistant turn to compare with")
        return msgs[:last], str(msgs[last]["content"])
    if "prompt" in rec and "response" in rec:
        return [{"role": "user", "content": str(rec["prompt"])}], str(rec["response"])
    raise ValueError(f"{where}: a record needs 'messages' or 'prompt' and 'response'")


def exact_match(loaded: Loaded, records: list[dict], max_new_tokens: int, progress=None, where: str = "") -> dict:
    """Greedy answers to each record's last assistant turn, and how many equal the reference exactly
    (surrounding whitespace ignored)."""
    rows, right = [], 0
    for i, rec in enumerate(records):
        msgs, ref = split_record(rec, f"{where}:{i + 1}")
        got = loaded.answer(loaded.encode_chat(msgs), max_new_tokens).strip()
        ok = got == ref.strip()
        right += ok
        rows.append({"prompt": msgs[-1]["content"] if msgs else "", "reference": ref, "answer": got, "correct": ok})
        if progress is not None:
            progress(i + 1, len(records))
    return {"n": len(records), "correct": right, "accuracy": right / max(len(records), 1), "answers": rows}
