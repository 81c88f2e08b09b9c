"""What every objective over token shards shares: the data and model checks (vocabulary, sequence
length, attention direction) and the tokenizer the data was written with."""

from __future__ import annotations

from pretrain.objectives.base import Objective, ObjectiveError


class TokenObjective(Objective):
    data_kind = "tokens"
    unit = "tokens"
    causal: bool  # the attention the objective needs

    def check(self) -> None:
        super().check()
        m, d = self.cfg.model, self.data
        for key in ("vocab_size", "max_seq_len", "causal"):
            if not hasattr(m, key):
                raise ObjectiveError(f"objective.type={self.name} needs a language model; model.type={m.type} has no {key}")
        if d["vocab_size"] > m.vocab_size:
            raise ObjectiveError(f"model.vocab_size ({m.vocab_size}) is smaller than the data's tokenizer "
                                 f"vocabulary ({d['vocab_size']})")
        if self.seq_len > m.max_seq_len:
            raise ObjectiveError(f"model.max_seq_len ({m.max_seq_len}) is shorter than the data's sequences "
                                 f"({self.seq_len})")
        if m.causal != self.causal:
            want = "causal (model.causal=true)" if self.causal else "bidirectional (model.causal=false, e.g. model.type=bert)"
            raise ObjectiveError(f"objective.type={self.name} needs {want} attention; model.causal is {str(m.causal).lower()}")

    @property
    def seq_len(self) -> int:
        """Tokens the model sees per sample (a shard row holds data seq_len + 1 tokens)."""
        return int(self.data["seq_len"])

    def units_per_sample(self) -> int:
        return self.seq_len

    def workload(self) -> dict:
        return {"seq_len": self.seq_len, "head_fraction": 1.0}

    def tokenizer(self):
        from pretrain.data import tokenizer_for

        return tokenizer_for(self.cfg.data)
