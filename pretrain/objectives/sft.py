"""Supervised fine-tuning: next-token loss on the assistant turns of packed chat rows (`pretrain data sft`).

A row holds seq_len tokens of several whole examples (not seq_len + 1 as a pretraining row: its targets
are stored beside it, -100 wherever the loss does not apply: prompts, role headers, padding, the last
token of each example). The model gets each example's own positions (restarting at 0) and its segment
ids, so attention never crosses from one packed example into another and every example is computed as if
it were alone. The loss is summed over the supervised targets and the loop divides by their global
count, so an example weighs by its supervised tokens whatever row or rank it lands on.

Evaluation of what was learned is `pretrain generate` on held-out prompts; there is no end-of-run artefact.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from pretrain.config import Section
from pretrain.objectives.base import register
from pretrain.objectives.tokens import TokenObjective

IGNORE = -100
# Model input -> batch field of the sft stream (`positions` in a batch are global sample positions).
_INPUTS = {"input_ids": "input_ids", "targets": "targets", "positions": "token_positions",
           "segment_ids": "segment_ids"}


class SFTConfig(Section):
    type: Literal["sft"] = Field("sft", description="supervised fine-tuning: next-token loss on the assistant "
                                                    "turns of packed chat rows (`pretrain data sft`)")


@register
class SFT(TokenObjective):
    name = "sft"
    Config = SFTConfig
    data_kind = "sft"
    causal = True

    @property
    def seq_len(self) -> int:
        """Tokens the model sees per row: an sft row holds exactly seq_len (its targets beside it)."""
        return int(self.data["seq_len"])

    def workload(self) -> dict:
        # Only supervised positions reach the LM head (LMHead drops the -100 rows before its product).
        return {"seq_len": self.seq_len, "head_fraction": float(self.data.get("supervised_fraction", 1.0))}

    def prepare(self, batch: dict, device: torch.device) -> dict:
        return {name: batch[field].to(device, non_blocking=True) for name, field in _INPUTS.items()}

    def count(self, batch: dict) -> torch.Tensor:
        return (batch["targets"] != IGNORE).sum()

    def loss(self, model, batch: dict):
        total = model(batch["input_ids"], targets=batch["targets"], positions=batch["positions"],
                      segment_ids=batch["segment_ids"])
        return total, self.count(batch), {}
