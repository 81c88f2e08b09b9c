"""Causal language modelling: predict token t+1 from tokens up to t.

A batch row holds seq_len + 1 tokens; inputs are the first seq_len, targets the last seq_len.
"""

from __future__ import annotations

import torch
from torch import nn


def causal_lm(model: nn.Module, batch: dict) -> tuple[torch.Tensor, dict]:
    """(model, batch) -> (mean next-token loss, metrics). `model` may be a DeepSpeed engine."""
    ids = batch["input_ids"]
    loss = model(ids[:, :-1], targets=ids[:, 1:])
    return loss, {"tokens": ids[:, 1:].numel()}
