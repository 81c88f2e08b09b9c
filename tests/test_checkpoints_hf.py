"""Hugging Face checkpoints in and out (pretrain.hub), checked against transformers itself.

Tiny random checkpoints with odd sizes are made by transformers' own config classes and save_pretrained;
our model (reference kernels, fp32) must give transformers' logits on the same tokens (1e-4 relative,
KL < 1e-9), our export must load in transformers with the same logits, and re-importing the export must
give identical tensors. Each refusal is one line naming the file and the field or tensor.
"""

from __future__ import annotations

import json
import weakref
from pathlib import Path

import pytest
import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from pretrain.hub import CheckpointError, hf_name, read_checkpoint, write_hf
from pretrain.models import get_family
from tests.helpers import assert_same_logits, released_model

VOCAB = 97
CHAT = "{% for m in messages %}<s> {{ m['content'] }} </s> {% endfor %}"
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16}

# name -> (config, model class): odd widths, grouped-query attention, every family's own switches.
_SMALL = dict(num_hidden_layers=2, vocab_size=VOCAB, max_position_embeddings=64)
FAMILIES = {
    "llama-gqa": (lambda: LlamaConfig(hidden_size=40, num_attention_heads=5, num_key_value_heads=1,
                                      intermediate_size=70, rms_norm_eps=1e-5, **_SMALL,
                                      rope_parameters={"rope_type": "default", "rope_theta": 5e5}),
                  LlamaForCausalLM),
    "llama3-scaled": (lambda: LlamaConfig(hidden_size=48, num_attention_heads=4, num_key_value_heads=2,
                                          head_dim=16, intermediate_size=70, num_hidden_layers=2,
                                          vocab_size=VOCAB, max_position_embeddings=256,
                                          tie_word_embeddings=True, rope_parameters=LLAMA3_ROPE),
                      LlamaForCausalLM),
    "mistral": (lambda: MistralConfig(hidden_size=36, num_attention_heads=3, num_key_value_heads=1,
                                      head_dim=12, intermediate_size=50, sliding_window=None, **_SMALL),
                MistralForCausalLM),
    "qwen2-bias": (lambda: Qwen2Config(hidden_size=40, num_attention_heads=5, num_key_value_heads=1,
                                       intermediate_size=70, tie_word_embeddings=True, **_SMALL),
                   Qwen2ForCausalLM),
    "gpt2": (lambda: GPT2Config(n_embd=36, n_head=3, n_layer=2, vocab_size=VOCAB, n_positions=40,
                                bos_token_id=1, eos_token_id=2),
             GPT2LMHeadModel),
}


def _tokenizer(directory: Path, n_tokens: int = VOCAB) -> None:
    """A word-level tokenizer with `n_tokens` ids (specials included) and a chat template."""
    # <|endoftext|> too: transformers picks Qwen2Tokenizer for a qwen2 directory, which adds it when absent.
    specials = ["<unk>", "<s>", "</s>", "<|endoftext|>"]
    vocab = {w: i for i, w in enumerate(specials + [f"w{i}" for i in range(n_tokens - len(specials))])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                                unk_token="<unk>")
    fast.chat_template = CHAT
    fast.save_pretrained(str(directory))


def _randomise(model: torch.nn.Module) -> None:
    """Weights far from the init (biases and norm gains too), so that a swapped or mis-laid tensor shows."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            is_gain = p.dim() == 1 and ("norm" in name or "ln_" in name) and name.endswith("weight")
            p.copy_(1.0 + 0.2 * noise if is_gain else 0.2 * noise)


def _hf_checkpoint(directory: Path, family: str, **save) -> torch.nn.Module:
    config_fn, cls = FAMILIES[family]
    torch.manual_seed(0)
    model = cls(config_fn()).eval()
    _randomise(model)
    model.save_pretrained(str(directory), **save)
    _tokenizer(directory)
    return model


def _tokens() -> torch.Tensor:
    return torch.randint(4, VOCAB, (2, 19), generator=torch.Generator().manual_seed(2))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_import_matches_transformers_and_export_round_trips(tmp_path, family):
    hf_model = _hf_checkpoint(tmp_path / "hf", family)
    released = read_checkpoint(tmp_path / "hf")
    assert released.tokenizer_dir == tmp_path / "hf" and released.chat_template == CHAT
    ids = _tokens()
    with torch.no_grad():
        ref = hf_model(ids).logits
        assert_same_logits(ref, released_model(released)(ids))

    out = write_hf(tmp_path / "out", released.model_cfg, released.iter_tensors(),
                   tokenizer_dir=released.tokenizer_dir, eos_token_ids=[2], bos_token_id=1)
    reloaded = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    # Mistral without a sliding window is Llama: it exports as Llama, the one layout we write per preset.
    assert type(reloaded) is (LlamaForCausalLM if family == "mistral" else type(hf_model))
    with torch.no_grad():
        assert torch.allclose(reloaded(ids).logits, ref, rtol=0, atol=1e-6)
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == 2
    tok = transformers.AutoTokenizer.from_pretrained(str(out))
    assert tok.chat_template == CHAT and len(tok) == VOCAB

    again = read_checkpoint(out)
    assert again.model_cfg == released.model_cfg and again.eos_token_ids == (2,)
    first, second = released.state, again.state
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_sharded_checkpoint_and_sharded_export(tmp_path):
    hf_model = _hf_checkpoint(tmp_path / "hf", "llama-gqa", max_shard_size="20KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    assert len(list((tmp_path / "hf").glob("model-*.safetensors"))) > 2
    released = read_checkpoint(tmp_path / "hf")
    ids = _tokens()
    with torch.no_grad():
        assert_same_logits(hf_model(ids).logits, released_model(released)(ids))

    out = write_hf(tmp_path / "out", released.model_cfg, released.iter_tensors(), max_shard_bytes=30_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert not (out / "model.safetensors").exists()
    with torch.no_grad():
        got = AutoModelForCausalLM.from_pretrained(str(out)).eval()(ids).logits
    assert torch.allclose(got, hf_model(ids).logits, rtol=0, atol=1e-6)
    # A second export replaces the directory: no stale shards beside the new single file.
    write_hf(out, released.model_cfg, released.iter_tensors())
    files = sorted(p.name for p in out.iterdir())
    assert files == ["config.json", "generation_config.json", "model.safetensors"]


def test_shard_index_is_replaced_not_written_in_place(tmp_path):
    """The index goes to a temporary file renamed over the old one (pretrain.atomic): a file that shared the
    old index's inode (a hard link, a reader's open handle) keeps its bytes, and no temporary file stays."""
    from pretrain.hub.safetensors_io import INDEX, write_shards

    (tmp_path / "out").mkdir()
    (tmp_path / "elsewhere.json").write_text("theirs\n")
    (tmp_path / "out" / INDEX).hardlink_to(tmp_path / "elsewhere.json")
    tensors = [(f"t{i}", torch.full((64,), float(i))) for i in range(3)]
    write_shards(tmp_path / "out", tensors, max_shard_bytes=300)
    assert (tmp_path / "elsewhere.json").read_text() == "theirs\n"
    index = json.loads((tmp_path / "out" / INDEX).read_text())
    assert sorted(index["weight_map"]) == ["t0", "t1", "t2"] and index["metadata"]["total_size"] == 3 * 256
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)] + [INDEX]


def test_bf16_checkpoint_is_widened_to_fp32(tmp_path):
    hf_model = _hf_checkpoint(tmp_path / "hf", "qwen2-bias")
    hf_model.to(torch.bfloat16).save_pretrained(str(tmp_path / "bf16"))
    state = read_checkpoint(tmp_path / "bf16").state
    assert all(t.dtype == torch.float32 for t in state.values())
    expected = hf_model.state_dict()["model.layers.1.self_attn.k_proj.bias"].float()
    assert torch.equal(state["blocks.1.attn.k_proj.bias"], expected)


def test_iter_tensors_keeps_one_tensor_at_a_time(tmp_path):
    """Nothing the reader yielded stays referenced once the next tensor comes (GPT-2's c_attn split too)."""
    _hf_checkpoint(tmp_path / "hf", "gpt2", max_shard_size="20KB")
    previous = None
    for _name, t in read_checkpoint(tmp_path / "hf").iter_tensors():
        assert previous is None or previous() is None
        previous = weakref.ref(t)
        del t


def test_gpt2_without_transformer_prefix_and_with_mask_buffers(tmp_path):
    """Released GPT-2 files were saved from GPT2Model (no `transformer.` prefix), with the mask buffers."""
    from safetensors.torch import load_file, save_file

    hf_model = _hf_checkpoint(tmp_path / "hf", "gpt2")
    state = load_file(str(tmp_path / "hf" / "model.safetensors"))
    old = {k.removeprefix("transformer."): v for k, v in state.items()}
    old["h.0.attn.bias"] = torch.tril(torch.ones(1, 1, 40, 40))
    old["h.0.attn.masked_bias"] = torch.tensor(-1e4)
    save_file(old, str(tmp_path / "hf" / "model.safetensors"), metadata={"format": "pt"})
    ids = _tokens()
    with torch.no_grad():
        assert_same_logits(hf_model(ids).logits, released_model(read_checkpoint(tmp_path / "hf"))(ids))


@pytest.mark.parametrize("family", ["llama-gqa", "qwen2-bias", "gpt2"])
def test_hf_name_points_at_each_linear_module(tmp_path, family):
    config_fn, cls = FAMILIES[family]
    hf_modules = dict(cls(config_fn()).named_modules())
    _hf_checkpoint(tmp_path / "hf", family)
    cfg = read_checkpoint(tmp_path / "hf").model_cfg
    ours = get_family(cfg.type).build(cfg.model_copy(update={"kernels": "reference"}))
    linears = [n for n, m in ours.named_modules() if isinstance(m, torch.nn.Linear)]
    assert linears
    for name in linears:
        assert hf_name(cfg, name) in hf_modules, name
    if family == "gpt2":
        assert hf_name(cfg, "blocks.1.attn.k_proj") == "transformer.h.1.attn.c_attn"
    else:
        assert hf_name(cfg, "blocks.1.attn.q_proj") == "model.layers.1.self_attn.q_proj"
        assert hf_name(cfg, "blocks.0.mlp.down_proj.weight") == "model.layers.0.mlp.down_proj.weight"


# --- refusals: one line, naming the file and the field or tensor ---------------------------------------


def _refused(path, match: str, **kw) -> str:
    with pytest.raises(CheckpointError, match=match) as e:
        read_checkpoint(path, **kw)
    assert "\n" not in str(e.value)
    return str(e.value)


def _edit_config(directory: Path, **changes) -> None:
    path = directory / "config.json"
    cfg = json.loads(path.read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    path.write_text(json.dumps(cfg))


def test_missing_shard_is_named(tmp_path):
    _hf_checkpoint(tmp_path / "hf", "llama-gqa", max_shard_size="20KB")
    victim = sorted((tmp_path / "hf").glob("model-*.safetensors"))[1]
    victim.unlink()
    assert victim.name in _refused(tmp_path / "hf", "names shard .* which is missing")


def test_shape_against_config_names_the_tensor(tmp_path):
    _hf_checkpoint(tmp_path / "hf", "llama-gqa")
    _edit_config(tmp_path / "hf", intermediate_size=72)
    _refused(tmp_path / "hf", r"model\.safetensors: tensor model\.layers\.0\.mlp\.down_proj\.weight has "
                              r"shape \(40, 70\) but config\.json implies \(40, 72\)")


def test_tokenizer_larger_than_vocab(tmp_path):
    _hf_checkpoint(tmp_path / "hf", "gpt2")
    _tokenizer(tmp_path / "hf", n_tokens=VOCAB + 5)
    _refused(tmp_path / "hf", f"tokenizer has token id {VOCAB + 4} but the model's vocab_size is {VOCAB}")


@pytest.mark.parametrize("family,changes,match", [
    ("llama-gqa", {"hidden_act": "gelu"}, "hidden_act 'gelu' is not supported"),
    ("llama-gqa", {"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}},
     "rope_scaling type 'yarn' is not supported"),
    ("llama-gqa", {"attention_bias": True}, "attention_bias true without mlp_bias"),
    ("llama-gqa", {"architectures": ["LlamaForSequenceClassification"]},
     "architectures 'LlamaForSequenceClassification' is not supported"),
    ("llama-gqa", {"model_type": "phi3"}, "model_type 'phi3' is not supported"),
    ("llama-gqa", {"quantization_config": {"quant_method": "bitsandbytes"}},
     r"quantization_config \(bitsandbytes\)"),
    ("mistral", {"sliding_window": 16}, r"sliding_window 16 is shorter than model\.max_seq_len 64"),
    ("gpt2", {"activation_function": "relu"}, "activation_function 'relu' is not supported"),
])
def test_unsupported_settings_are_refused(tmp_path, family, changes, match):
    _hf_checkpoint(tmp_path / "hf", family)
    _edit_config(tmp_path / "hf", **changes)
    msg = _refused(tmp_path / "hf", match)
    assert "config.json" in msg


def test_sliding_window_accepted_at_a_shorter_context(tmp_path):
    _hf_checkpoint(tmp_path / "hf", "mistral")
    _edit_config(tmp_path / "hf", sliding_window=32)
    assert read_checkpoint(tmp_path / "hf", max_seq_len=32).model_cfg.max_seq_len == 32


def test_pickles_and_mismatched_tied_heads_are_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    _hf_checkpoint(tmp_path / "hf", "qwen2-bias")
    path = tmp_path / "hf" / "model.safetensors"
    state = load_file(str(path))
    state["lm_head.weight"] = state["model.embed_tokens.weight"] + 1.0
    save_file(state, str(path), metadata={"format": "pt"})
    released = read_checkpoint(tmp_path / "hf")
    with pytest.raises(CheckpointError, match="lm_head.weight differs from the embedding"):
        _ = released.state
    state["lm_head.weight"] = state["model.embed_tokens.weight"].clone()  # equal: accepted
    save_file(state, str(path), metadata={"format": "pt"})
    assert "lm_head.weight" not in read_checkpoint(tmp_path / "hf").state

    path.unlink()
    (tmp_path / "hf" / "pytorch_model.bin").write_bytes(b"not loaded")
    _refused(tmp_path / "hf", "only pytorch_model.bin")


def test_export_refuses_what_hf_cannot_express(tmp_path):
    cfg = get_family("llama").config(n_layers=1, d_model=16, n_heads=2, vocab_size=VOCAB, norm="layernorm")
    with pytest.raises(CheckpointError, match="model.norm 'layernorm' has no Hugging Face Llama equivalent"):
        write_hf(tmp_path / "out", cfg, [])
    cfg = get_family("llama").config(n_layers=1, d_model=16, n_heads=2, vocab_size=VOCAB)
    model = get_family("llama").build(cfg)
    params = [(n, p) for n, p in model.named_parameters() if n != "norm.weight"]
    with pytest.raises(CheckpointError, match="model.norm.weight was not given"):
        write_hf(tmp_path / "out", cfg, params)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.tmp-*"))


def test_lazy_tensors_read_any_flat_range(tmp_path, monkeypatch):
    """A ZeRO-3 partition's slice of a stored tensor, read in row blocks (bf16 widened), equals the slice of
    the whole tensor, for ranges that start and end inside rows and blocks."""
    from safetensors.torch import save_file

    from pretrain.hub import safetensors_io as io

    t = torch.randn(37, 11, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    save_file({"w": t}, str(tmp_path / "m.safetensors"))
    monkeypatch.setattr(io, "_CHUNK_BYTES", 3 * 11 * 2)  # 3 rows a block
    (lazy,) = io.iter_lazy_tensors(io.read_headers([tmp_path / "m.safetensors"]))
    flat = t.float().reshape(-1)
    for start, stop in ((0, 407), (5, 6), (10, 200), (203, 407), (398, 407)):
        out = torch.full((stop - start + 3,), -1.0)
        lazy.read_flat_into(out, start, stop)
        assert torch.equal(out[: stop - start], flat[start:stop]) and (out[stop - start:] == -1).all()
    assert torch.equal(lazy.materialise(), t.float())
