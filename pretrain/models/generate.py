"""Cached decoding for one prompt: prefill the KV cache with the prompt, then one forward per new token.

Greedy when temperature is 0; otherwise softmax sampling at that temperature, optionally restricted to
the top_k logits, from a CPU `torch.Generator` seeded by `seed`, so the same seed gives the same text on
any device (and every ZeRO-3 rank, calling this with the same arguments, runs the same forwards).
Decoding stops after an eos id, after max_new_tokens, or when the sequence reaches the model's
max_seq_len, whichever comes first: positions past the table (or past what RoPE was trained on) are never
produced. The end-of-run sample of `pretrain.objectives.causal_lm` is a separate, uncached demo.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


def _pick(logits: torch.Tensor, temperature: float, top_k: int | None, gen: torch.Generator) -> int:
    """One token id from the logits (V,) of the last position."""
    if temperature == 0.0:
        return int(logits.argmax())
    logits = logits.float().cpu() / temperature
    if top_k is not None and top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return int(torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=gen))


@torch.no_grad()
def generate(model, prompt_ids: list[int], max_new_tokens: int, *, temperature: float = 0.0,
             top_k: int | None = None, eos_ids: Iterable[int] = (), seed: int = 0) -> list[int]:
    """The new token ids (the prompt excluded) that `model` (a causal Transformer) continues
    `prompt_ids` with; the eos id that stopped decoding is included as the last one."""
    prompt = list(prompt_ids)
    max_len = model.cfg.max_seq_len
    if not prompt:
        raise ValueError("generate: the prompt is empty (it needs at least one token, e.g. BOS)")
    if len(prompt) > max_len:
        raise ValueError(f"generate: prompt of {len(prompt)} tokens exceeds model.max_seq_len {max_len}")
    if max_new_tokens < 0 or temperature < 0 or (top_k is not None and top_k < 1):
        raise ValueError(f"generate: want max_new_tokens >= 0, temperature >= 0, top_k >= 1 or None, got "
                         f"{max_new_tokens}, {temperature}, {top_k}")
    budget = min(max_new_tokens, max_len - len(prompt))
    if budget == 0:
        return []
    stop = set(eos_ids)
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    cache = model.new_cache(len(prompt) + budget)  # sized for this call, not for max_seq_len

    ids = torch.tensor([prompt], device=device)
    last = torch.zeros_like(ids, dtype=torch.bool)
    last[0, -1] = True  # the prefill needs the logits of its last position only
    logits = model(ids, logits_at=last, cache=cache)[0]
    out: list[int] = []
    while True:
        token = _pick(logits, temperature, top_k, gen)
        out.append(token)
        if token in stop or len(out) == budget:
            return out
        logits = model(torch.tensor([[token]], device=device), cache=cache)[0, -1]
