"""Masked language modelling (BERT, Devlin et al. 2019, https://arxiv.org/abs/1810.04805, section 3.1).

Of each sequence's tokens a fraction `mask_rate` (15%) is chosen; of those, 80% are replaced by the
mask token, 10% by a random token and 10% are left as they are, and the loss is taken on the chosen
positions only. The counts are stochastically rounded per sequence (floor(x + u)), so the expected
fractions are exact and their spread over a batch is far below a Bernoulli draw's. Every draw is a
pure function of (seed, sample position) (`sample_rng`), so a resume at another world size masks the
same tokens. The mask token defaults to the first id the data's tokenizer never produces (GPT-2's
50257 inside a 50304-row embedding); no new vocabulary is needed.

Training and evaluation compute logits only at the chosen positions (about 15% of the rows), and log
the masked-token accuracy beside the loss.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from pydantic import Field, model_validator

from pretrain import kernels
from pretrain.config import Section
from pretrain.objectives.base import ObjectiveError, register
from pretrain.objectives.sample_rng import uniform
from pretrain.objectives.tokens import TokenObjective

IGNORE = -100
# Streams of sample_rng: one per kind of draw, so the draws are independent.
_CHOOSE, _COUNT, _SPLIT, _RANDOM = 1, 2, 3, 4


class MaskedLMConfig(Section):
    type: Literal["masked_lm"] = Field("masked_lm", description="BERT-style masked-token prediction")
    mask_rate: float = Field(0.15, gt=0, lt=1, description="fraction of tokens chosen for the loss")
    mask_fraction: float = Field(0.8, ge=0, le=1, description="of the chosen: replaced by the mask token")
    random_fraction: float = Field(0.1, ge=0, le=1, description="of the chosen: replaced by a random token")
    mask_token: int | None = Field(None, ge=0, description="id of the mask token; default the data's vocabulary size")
    sample_tokens: int = Field(48, ge=0, description="tokens of validation text shown filled in after the run (0: none)")

    @model_validator(mode="after")
    def _fractions(self) -> MaskedLMConfig:
        if self.mask_fraction + self.random_fraction > 1:
            raise ValueError("objective.mask_fraction + objective.random_fraction must not exceed 1")
        return self


def mask_tokens(ids: np.ndarray, positions: np.ndarray, seed: int, cfg: MaskedLMConfig, mask_token: int,
                vocab: int) -> tuple[np.ndarray, np.ndarray]:
    """(inputs, targets) for rows `ids` (B, T) at global sample `positions` (B,); targets are IGNORE
    except at the chosen positions."""
    b, t = ids.shape
    u = uniform(seed, positions, t, _CHOOSE)
    rank = np.argsort(np.argsort(u, axis=1, kind="stable"), axis=1, kind="stable")  # a random order per row
    k = np.floor(cfg.mask_rate * t + uniform(seed, positions, 1, _COUNT)[:, 0]).astype(np.int64)
    s = uniform(seed, positions, 2, _SPLIT)
    n_mask = np.floor(cfg.mask_fraction * k + s[:, 0]).astype(np.int64)
    n_rand = np.minimum(np.floor(cfg.random_fraction * k + s[:, 1]).astype(np.int64), k - np.minimum(n_mask, k))
    n_mask = np.minimum(n_mask, k)
    chosen = rank < k[:, None]
    as_mask = rank < n_mask[:, None]
    as_rand = (rank >= n_mask[:, None]) & (rank < (n_mask + n_rand)[:, None])
    random_ids = np.floor(uniform(seed, positions, t, _RANDOM) * vocab).astype(ids.dtype)
    inputs = np.where(as_mask, mask_token, np.where(as_rand, random_ids, ids))
    targets = np.where(chosen, ids, IGNORE)
    return inputs, targets


@register
class MaskedLM(TokenObjective):
    name = "masked_lm"
    Config = MaskedLMConfig
    causal = False

    @property
    def mask_token(self) -> int:
        o = self.cfg.objective
        return int(self.data["vocab_size"]) if o.mask_token is None else o.mask_token

    def workload(self) -> dict:
        return {"seq_len": self.seq_len, "head_fraction": self.cfg.objective.mask_rate}

    def check(self) -> None:
        super().check()
        if self.mask_token >= self.cfg.model.vocab_size:
            raise ObjectiveError(f"objective.mask_token ({self.mask_token}) needs an embedding row: model.vocab_size "
                                 f"({self.cfg.model.vocab_size}) must exceed it")

    def prepare(self, batch: dict, device: torch.device) -> dict:
        ids = batch["input_ids"][:, : self.seq_len].numpy()
        inputs, targets = mask_tokens(ids, batch["positions"].numpy(), self.cfg.train.seed, self.cfg.objective,
                                      self.mask_token, int(self.data["vocab_size"]))
        return {"input_ids": torch.from_numpy(inputs).to(device, non_blocking=True),
                "targets": torch.from_numpy(targets).to(device, non_blocking=True)}

    def count(self, batch: dict) -> torch.Tensor:
        return (batch["targets"] != IGNORE).sum()

    def loss(self, model, batch: dict):
        targets = batch["targets"]
        chosen = targets != IGNORE
        logits = model(batch["input_ids"], logits_at=chosen)  # (n_chosen, V)
        tgt = targets[chosen]
        n = chosen.sum()
        if tgt.numel() == 0:
            zero = logits.sum().float() * 0.0
            return zero, n, {"accuracy": (zero.detach(), n)}
        backend = "reference" if self.cfg.model.kernels == "reference" else "auto"
        total = kernels.cross_entropy(logits, tgt, backend=backend) * tgt.numel()
        correct = (logits.detach().argmax(-1) == tgt).sum().float()
        return total, n, {"accuracy": (correct, n)}

    def artefact(self, model, ctx) -> str | None:
        """The first validation (or training) row with its chosen tokens filled in: `[prediction|truth]`."""
        n = self.cfg.objective.sample_tokens
        if not n or ctx.sample_batch is None:
            return None
        batch = self.prepare({k: v[:1] for k, v in ctx.sample_batch.items() if k in ("input_ids", "positions")},
                             ctx.device)
        ids, targets = batch["input_ids"][:, :n], batch["targets"][:, :n]
        with torch.no_grad():
            pred = model(ids).argmax(-1)[0].tolist()
        tok = self.tokenizer()
        out = []
        for i, t in enumerate(targets[0].tolist()):
            if t == IGNORE:
                out.append(tok.decode([ids[0, i].item()]))
            else:
                out.append(f"[{tok.decode([pred[i]]).strip()}|{tok.decode([t]).strip()}]")
        return "".join(out)
