"""Mixture-of-experts checkpoints in and out (pretrain.hub.moe_adapter), checked against transformers itself.

Tiny random Mixtral, Qwen2-MoE, Qwen3-MoE and OLMoE checkpoints, made by transformers' own config classes with
several expert counts and top-k (and dense leading layers, tied heads, renormalised or raw top-k weights), are
saved with save_pretrained (one SwiGLU per expert on disk) and imported: our logits equal transformers' (fp32,
reference and default kernels), greedy continuations agree, the ZeRO-3 lazy reader gives the same tensors, and
our export loads back in transformers with the same logits.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    MixtralConfig,
    OlmoeConfig,
    Qwen2MoeConfig,
    Qwen3MoeConfig,
)

from pretrain.hub import CheckpointError, load_weights, read_checkpoint, write_hf
from pretrain.hub.safetensors_io import LazyStack
from pretrain.models import get_family
from pretrain.models.generate import generate
from tests.helpers import assert_same_logits, released_model
from tests.test_checkpoints_hf import VOCAB, _edit_config, _randomise, _refused, _tokenizer, _tokens

_SMALL = dict(num_hidden_layers=2, vocab_size=VOCAB, max_position_embeddings=64, bos_token_id=1, eos_token_id=2,
              pad_token_id=0)
FAMILIES = {
    "mixtral-e4k1": lambda: MixtralConfig(hidden_size=40, num_attention_heads=5, num_key_value_heads=1,
                                          intermediate_size=36, num_local_experts=4, num_experts_per_tok=1, **_SMALL),
    # Layer 0 dense (mlp_only_layers): our first_dense.
    "qwen2_moe-e6k2": lambda: Qwen2MoeConfig(hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                                             intermediate_size=44, moe_intermediate_size=20, num_experts=6,
                                             num_experts_per_tok=2, shared_expert_intermediate_size=28,
                                             mlp_only_layers=[0], **_SMALL),
    # Layer 0 dense (decoder_sparse_step 2), head_dim apart from d / heads, renormalised top-k, a tied head.
    "qwen3_moe-e8k3": lambda: Qwen3MoeConfig(hidden_size=48, num_attention_heads=4, num_key_value_heads=2,
                                             head_dim=16, intermediate_size=40, moe_intermediate_size=24,
                                             num_experts=8, num_experts_per_tok=3, norm_topk_prob=True,
                                             decoder_sparse_step=2, tie_word_embeddings=True, **_SMALL),
    "olmoe-e8k3": lambda: OlmoeConfig(hidden_size=36, num_attention_heads=3, num_key_value_heads=1,
                                      intermediate_size=20, num_experts=8, num_experts_per_tok=3, **_SMALL),
}


def _hf_checkpoint(directory, family: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(FAMILIES[family]()).eval()
    _randomise(model)
    model.save_pretrained(str(directory))
    _tokenizer(directory)
    return model


@pytest.mark.parametrize("family", list(FAMILIES))
def test_import_matches_transformers_and_export_round_trips(tmp_path, family):
    hf_model = _hf_checkpoint(tmp_path / "hf", family)
    released = read_checkpoint(tmp_path / "hf")
    cfg = released.model_cfg
    assert cfg.type == family.split("-")[0] and cfg.moe.n_experts == hf_model.config.num_experts
    ids = _tokens()
    ours = released_model(released)
    # The default kernels: Triton on a GPU, the plain-PyTorch path on CPU.
    device = "cuda" if torch.cuda.is_available() else "cpu"
    default = get_family(cfg.type).build(cfg)
    load_weights(default, released.iter_tensors())
    with torch.no_grad():
        ref = hf_model(ids).logits
        assert_same_logits(ref, ours(ids))
        assert_same_logits(ref, default.to(device).eval()(ids.to(device)).cpu())
        prompt = ids[:1, :5]
        theirs = hf_model.generate(prompt, max_new_tokens=10, do_sample=False, eos_token_id=None,
                                   min_new_tokens=10)[0, 5:].tolist()
    assert generate(ours, prompt[0].tolist(), 10) == theirs

    out = write_hf(tmp_path / "out", cfg, released.iter_tensors(), tokenizer_dir=released.tokenizer_dir)
    reloaded = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    assert type(reloaded) is type(hf_model)
    with torch.no_grad():
        assert torch.allclose(reloaded(ids).logits, ref, rtol=0, atol=1e-6)
    again = read_checkpoint(out)
    assert again.model_cfg == cfg
    first = released.state
    assert all(torch.equal(first[k], v) for k, v in again.state.items())


def test_lazy_stacks_fill_zero3_partitions(tmp_path, monkeypatch):
    """`init.path` streams each layer's experts unread (`LazyStack`): every ZeRO-3 partition of a stacked weight,
    its flat range ending inside experts and rows, reads exactly its slice of the whole tensor; whole parameters
    load from the same stream."""
    from types import SimpleNamespace

    from pretrain.hub import load
    from pretrain.hub.sources import open_source

    _hf_checkpoint(tmp_path / "hf", "qwen2_moe-e6k2")
    src = open_source(tmp_path / "hf")
    whole = src.released.state
    lazy = dict(src.iter_tensors())
    assert set(lazy) == set(whole)
    for name in ("blocks.1.mlp.experts.gate_up", "blocks.1.mlp.experts.down"):
        stack = lazy[name]
        assert isinstance(stack, LazyStack) and stack.shape == whole[name].shape
        n, world = whole[name].numel(), 7
        size = -(-n // world)
        parts = []
        for rank in range(world):
            p = SimpleNamespace(ds_tensor=torch.full((size,), -1.0), ds_shape=stack.shape, ds_numel=n,
                                ds_process_group=None)
            p.ds_tensor.ds_numel = size
            monkeypatch.setattr(load.dist, "get_rank", lambda group, r=rank: r)
            load.write_parameter(p, stack)
            parts.append(p.ds_tensor)
        assert torch.equal(torch.cat(parts)[:n], whole[name].reshape(-1))
    model = get_family(src.model_cfg.type).build(src.model_cfg)
    load_weights(model, src.iter_tensors())
    assert all(torch.equal(p, whole[k]) for k, p in model.named_parameters())


def test_init_path_builds_the_released_model(tmp_path):
    """A run's `init.path` takes its model section from the checkpoint (routing included) and starts from its
    weights."""
    from pretrain.hub.sources import resolve
    from pretrain.load import load_config
    from pretrain.train.build import build_model

    hf_model = _hf_checkpoint(tmp_path / "hf", "olmoe-e8k3")
    cfg = load_config(Path(__file__).parents[1] / "configs/finetune-smollm2.yaml",
                      [f"init.path={tmp_path / 'hf'}", "model.kernels=reference"])
    cfg.lora = None
    cfg = resolve(cfg)
    assert cfg.model.type == "olmoe" and (cfg.model.moe.n_experts, cfg.model.moe.top_k) == (8, 3)
    model, counts = build_model(cfg, torch.device("cpu"))
    assert counts["params_active"] < counts["params"]
    with torch.no_grad():
        assert_same_logits(hf_model(_tokens()).logits, model.eval()(_tokens()))


@pytest.mark.parametrize("family,changes,match", [
    ("mixtral-e4k1", {"kv_lora_rank": 512}, r"kv_lora_rank 512 \(DeepSeek's latent attention\) is not supported"),
    ("mixtral-e4k1", {"model_type": "deepseek_v3"}, "model_type 'deepseek_v3' is not supported"),
    ("qwen2_moe-e6k2", {"mlp_only_layers": [1]}, r"mlp_only_layers \[1\] is not supported"),
    ("qwen3_moe-e8k3", {"attention_bias": True}, "attention_bias true is not supported"),
    ("olmoe-e8k3", {"clip_qkv": 8.0}, "clip_qkv 8.0 is not supported"),
])
def test_unsupported_variants_are_refused_in_one_line(tmp_path, family, changes, match):
    _hf_checkpoint(tmp_path / "hf", family)
    _edit_config(tmp_path / "hf", **changes)
    assert "config.json" in _refused(tmp_path / "hf", match)


@pytest.mark.parametrize("mtype,changes,match", [
    ("olmoe", {"qk_norm": "none"}, "model.qk_norm 'none' has no Hugging Face Olmoe equivalent"),
    ("mixtral", {"moe": {"renormalize": False}}, "model.moe.renormalize False has no Hugging Face Mixtral"),
    ("qwen3_moe", {"moe": {"bias_balance": 0.01}}, "model.moe.bias_balance 0.01 has no Hugging Face Qwen3Moe"),
    ("llama", {"moe": {}}, "model.moe has no Hugging Face Llama equivalent"),
])
def test_export_refuses_what_hf_cannot_express(tmp_path, mtype, changes, match):
    cfg = get_family(mtype).config(n_layers=1, d_model=16, n_heads=2, vocab_size=VOCAB, **changes)
    with pytest.raises(CheckpointError, match=match):
        write_hf(tmp_path / "out", cfg, [])
    assert not (tmp_path / "out").exists()
