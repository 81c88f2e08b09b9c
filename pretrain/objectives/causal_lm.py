"""Causal language modelling: predict token t+1 from tokens up to t.

A shard row holds seq_len + 1 tokens; inputs are the first seq_len, targets the last seq_len. The
end-of-run artefact is a sampled continuation of `objective.sample_prompt`.

Bits per byte: where the shards record the UTF-8 bytes each row's targets cover (`write_text`), the loss
comes with a metric `bpb` = (summed NLL in nats / ln 2, bytes), so training logs `bpb` and validation
`val_bpb`, the loss per byte of text whatever the tokenizer (and the summary `final_val_bpb`). Rows from
older shards have no byte counts: no metric, no error. The separator after each document is a target with
no bytes of its own, so its NLL counts: bpb is the code length of the text with its document boundaries.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field

from pretrain.config import Section
from pretrain.objectives.base import register
from pretrain.objectives.tokens import TokenObjective

IGNORE = -100


class CausalLMConfig(Section):
    type: Literal["causal_lm"] = Field("causal_lm", description="next-token prediction")
    sample_tokens: int = Field(48, ge=0, description="tokens generated from the final model (0: no sample)")
    sample_prompt: str = Field("\n", description="prompt of the final sample")


@torch.no_grad()
def generate(model, input_ids: torch.Tensor, max_new_tokens: int, max_len: int, temperature: float = 0.8,
             top_k: int = 50, generator: torch.Generator | None = None) -> torch.Tensor:
    """Sample continuations with top-k sampling (no KV cache: this is the end-of-run demo, not serving).
    `model(ids)` must return logits; under ZeRO-3 every rank calls this with the same generator seed."""
    for _ in range(max_new_tokens):
        logits = model(input_ids[:, -max_len:])[:, -1].float() / max(temperature, 1e-6)
        if top_k:
            kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        nxt = torch.multinomial(torch.softmax(logits, -1).cpu(), 1, generator=generator).to(input_ids.device)
        input_ids = torch.cat([input_ids, nxt], dim=1)
    return input_ids


@register
class CausalLM(TokenObjective):
    name = "causal_lm"
    Config = CausalLMConfig
    causal = True

    def prepare(self, batch: dict, device: torch.device) -> dict:
        ids = batch["input_ids"].to(device, non_blocking=True)
        out = {"input_ids": ids[:, :-1], "targets": ids[:, 1:]}
        # Every target counts, so a row's bytes are its targets' (a subclass that masks targets drops them).
        if "bytes" in batch:
            out["bytes"] = batch["bytes"].to(device, non_blocking=True)
        return out

    def count(self, batch: dict) -> torch.Tensor:
        return (batch["targets"] != IGNORE).sum()

    def loss(self, model, batch: dict):
        total = model(batch["input_ids"], targets=batch["targets"])
        metrics = {"bpb": (total / math.log(2), batch["bytes"].sum())} if "bytes" in batch else {}
        return total, self.count(batch), metrics

    def artefact(self, model, ctx) -> str | None:
        o = self.cfg.objective
        if not o.sample_tokens:
            return None
        tok = self.tokenizer()
        ids = torch.tensor([tok.encode(o.sample_prompt).ids or [0]], device=ctx.device)
        out = generate(model, ids, o.sample_tokens, self.cfg.model.max_seq_len,
                       generator=torch.Generator().manual_seed(self.cfg.train.seed))
        return tok.decode(out[0].tolist())
