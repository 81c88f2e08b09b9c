"""Special-token ids of an exported model (pretrain.hub.hf_write): they come from the tokenizer that ships
with it, never from a config class's defaults (GPT-2's 50256, Llama's 1 and 2).

A from-scratch run exported the way `pretrain export` does it (its data's own byte-level BPE, 300-odd
tokens, only <|endoftext|>) must say that id in config.json and generation_config.json, leave bos and pad
unset, load in transformers without its out-of-vocabulary warning, and stop generating at end of text.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import save_file
from tokenizers import Tokenizer, models, pre_tokenizers

from pretrain.config import dump_config
from pretrain.data.train_tokenizer import train_tokenizer
from pretrain.data.write_text import write_text
from pretrain.hub import CheckpointError, write_hf
from pretrain.hub.run_weights import unique_tensors
from pretrain.load import load_config
from pretrain.models import get_family
from pretrain.trained.export_run import export_run
from tests.helpers import write_corpus

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 320  # the model's rows; the trained tokenizer has at most 300


class _Records(logging.Handler):
    """transformers' log lines while a block runs (its logger does not propagate to pytest's caplog)."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())

    def __enter__(self):
        logging.getLogger("transformers").addHandler(self)
        return self

    def __exit__(self, *exc):
        logging.getLogger("transformers").removeHandler(self)


def _token_ids(d: Path) -> dict[str, dict]:
    return {f: {k: v for k, v in json.loads((d / f).read_text()).items() if k.endswith("_token_id")}
            for f in ("config.json", "generation_config.json")}


def _finished_run(tmp_path: Path) -> tuple[Path, int]:
    """A run directory as training leaves it (final/config.yaml + final/model.safetensors) for a tiny GPT-2
    on data written with its own tokenizer; the weights make <|endoftext|> the greedy choice everywhere.
    Returns (run, the end-of-text id)."""
    files = write_corpus(tmp_path / "corpus", n_docs=3, words_per_doc=400)
    tok = train_tokenizer([str(f) for f in files], vocab_size=300, out=tmp_path / "bpe" / "tokenizer.json")
    write_text([str(f) for f in files], tokenizer=str(tmp_path / "bpe" / "tokenizer.json"), out=tmp_path / "data",
               seq_len=32, workers=1)
    eot = tok.token_to_id("<|endoftext|>")
    cfg = load_config(ROOT / "configs" / "gpt-tiny.yaml", [
        "model.n_layers=1", "model.d_model=32", "model.n_heads=2", f"model.vocab_size={VOCAB}",
        "model.max_seq_len=32", f"data.train={tmp_path / 'data' / 'train'}", "data.val=null",
        f"run.dir={tmp_path / 'runs'}"])
    model = get_family("gpt2").build(cfg.model)
    with torch.no_grad():  # logits = norm(h) . embed: a constant norm output aligned with eot's row only
        model.norm.weight.zero_()
        model.norm.bias.copy_(torch.eye(32)[0])
        model.embed.weight[:, 0] = 0.0
        model.embed.weight[eot, 0] = 10.0
    final = tmp_path / "run" / "final"
    final.mkdir(parents=True)
    (final / "config.yaml").write_text(dump_config(cfg))
    save_file({k: v.detach().contiguous() for k, v in unique_tensors(model).items()},
              str(final / "model.safetensors"))
    return final.parent, eot


def test_from_scratch_export_carries_its_tokenizers_ids(tmp_path):
    run, eot = _finished_run(tmp_path)
    with _Records() as logs:
        export_run(run, tmp_path / "hf")
        exported = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    out_of_vocab = [line for line in logs.lines if "within the vocabulary" in line]
    assert out_of_vocab == []
    ids = _token_ids(tmp_path / "hf")
    for f in ids:
        assert ids[f]["eos_token_id"] == eot and ids[f]["bos_token_id"] is None, (f, ids[f])
        assert ids[f].get("pad_token_id") is None
        assert all(v is None or 0 <= v < VOCAB for v in ids[f].values())
    assert exported.config.vocab_size == VOCAB and exported.generation_config.eos_token_id == eot

    # Generation stops at end of text: the weights make it the first token generated.
    tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    assert tok.eos_token_id == eot
    prompt = torch.tensor([tok("the king")["input_ids"]])
    with torch.no_grad():
        out = exported.generate(prompt, max_new_tokens=12, do_sample=False, pad_token_id=eot)
    assert out[0, prompt.shape[1]:].tolist() == [eot]


def _word_tokenizer(d: Path, n: int, specials: dict[str, int]) -> None:
    """A word-level tokenizer of `n` ids with the named special tokens (bos/eos/pad) at the given ids."""
    names = {i: f"<{role}>" for role, i in specials.items()}
    vocab = {names.get(i, f"w{i}"): i for i in range(n)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="w0", **{f"{role}_token": f"<{role}>" for role in specials})
    fast.save_pretrained(str(d))


@pytest.mark.parametrize("specials", [{"bos": 5, "eos": 6, "pad": 7}, {"eos": 60}])
def test_llama_export_takes_bos_eos_pad_from_the_tokenizer(tmp_path, specials):
    """No ids given: each comes from the tokenizer; one it lacks stays unset (not Llama's default 1 or 2)."""
    _word_tokenizer(tmp_path / "tok", 61, specials)
    cfg = get_family("llama").config(n_layers=1, d_model=16, n_heads=2, vocab_size=64, max_seq_len=16)
    model = get_family("llama").build(cfg)
    with _Records() as logs:
        write_hf(tmp_path / "hf", cfg, model.named_parameters(), tokenizer_dir=tmp_path / "tok")
        loaded = transformers.AutoConfig.from_pretrained(str(tmp_path / "hf"))
    assert [line for line in logs.lines if "within the vocabulary" in line] == []
    ids = _token_ids(tmp_path / "hf")
    for f in ids:
        for role in ("bos", "eos", "pad"):
            assert ids[f].get(f"{role}_token_id") == specials.get(role), (f, role)
    assert (loaded.bos_token_id, loaded.eos_token_id) == (specials.get("bos"), specials["eos"])


def test_export_refuses_an_id_outside_the_vocabulary(tmp_path):
    cfg = get_family("gpt2").config(n_layers=1, d_model=16, n_heads=2, vocab_size=64, max_seq_len=16)
    model = get_family("gpt2").build(cfg)
    with pytest.raises(CheckpointError, match=r"^export: eos_token_id 50256 is outside the model's vocabulary "
                                              r"\(0\.\.63\)$"):
        write_hf(tmp_path / "hf", cfg, model.named_parameters(), eos_token_ids=[50256])
    assert not (tmp_path / "hf").exists()
