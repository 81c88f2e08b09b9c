"""What fine-tuning released checkpoints needs from the Transformer: packed rows that are invisible to the
loss (positions restart per document, segment ids keep attention inside it), cached decoding that matches a
full forward, q/k/v biases, a head width of its own, Llama 3.1's scaled RoPE (checked against
transformers on the same weights), and FLOPs that follow the attention width."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig as HFLlamaConfig
from transformers import LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from pretrain.config import ConfigError, typed_section
from pretrain.models import get_family
from pretrain.models.generate import generate
from pretrain.models.kv_cache import KVCache
from pretrain.models.transformer import IGNORE, Transformer, count_parameters, flops_per_token, rope_inv_freq

V = 97
SCALING = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 16}


def _model(family: str, **kw) -> Transformer:
    base = dict(n_layers=2, d_model=32, n_heads=4, vocab_size=V, max_seq_len=32, kernels="reference")
    return Transformer(get_family(family).config(**{**base, **kw}))


def _packed(lengths: list[int], pad: int) -> tuple[list[torch.Tensor], dict]:
    """Documents of the given lengths and one packed row of them plus `pad` padding tokens: inputs, next-token
    targets inside each document (-100 on its last token and on padding), positions restarting at 0 per
    document, segment ids 1..k (0 = padding)."""
    docs = [torch.randint(1, V, (n,)) for n in lengths]
    targets = [torch.cat([d[1:], torch.tensor([IGNORE])]) for d in docs]
    fill = torch.zeros(pad, dtype=torch.long)
    row = {
        "input_ids": torch.cat([*docs, fill])[None],
        "targets": torch.cat([*targets, fill + IGNORE])[None],
        "positions": torch.cat([*(torch.arange(n) for n in lengths), fill])[None],
        "segment_ids": torch.cat([*(torch.full((n,), i + 1) for i, n in enumerate(lengths)), fill])[None],
    }
    return list(zip(docs, targets, strict=True)), row


def _grads(model: Transformer) -> dict[str, torch.Tensor]:
    out = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    return out


@pytest.mark.parametrize("kernels", ["reference", "triton"])
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_packing_is_invisible(family, kernels, monkeypatch):
    if kernels == "triton":
        monkeypatch.setenv("TRITON_INTERPRET", "1")  # Triton kernels on CPU tensors
    torch.manual_seed(0)  # the same documents whatever ran before
    model = _model(family, kernels=kernels, n_kv_heads=2 if family == "llama" else None)
    docs, row = _packed([5, 9, 7], pad=3)
    separate = sum(model(d[None], targets=t[None]) for d, t in docs)
    separate.backward()
    want = _grads(model)
    packed = model(row["input_ids"], targets=row["targets"], positions=row["positions"],
                   segment_ids=row["segment_ids"])
    packed.backward()
    got = _grads(model)
    torch.testing.assert_close(packed, separate, rtol=1e-6, atol=1e-5)  # a sum of ~80: fp32 rounding is ~1e-5
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-5, msg=name)
    # Without the segment ids the documents would see each other: the test can tell the difference.
    leaky = model(row["input_ids"], targets=row["targets"], positions=row["positions"])
    assert abs(leaky.item() - separate.item()) > 1e-3


def test_activation_checkpointing_passes_positions_and_segments():
    model = _model("llama")
    _, row = _packed([6, 10], pad=2)
    model(**row).backward()
    want = _grads(model)
    model.activation_checkpointing = True
    model(**row).backward()
    for name, g in _grads(model).items():
        torch.testing.assert_close(g, want[name], msg=name)


@pytest.mark.parametrize(("family", "kernels"), [("llama", "reference"), ("gpt2", "reference"), ("llama", "triton")])
def test_cached_decoding_equals_full_forward(family, kernels, monkeypatch):
    if kernels == "triton":  # decode steps read strided views of the cache buffers
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    extra = dict(n_kv_heads=2, head_dim=12, rope_scaling=SCALING) if family == "llama" else {}
    # A wide init: no near-ties among the argmaxes.
    model = _model(family, init_std=0.2, kernels=kernels, **extra).eval()
    seq, steps = torch.randint(0, V, (1, 6)), 8 if kernels == "reference" else 3  # the interpreter is slow
    cache = KVCache(model.cfg.n_layers, model.cfg.max_seq_len)
    with torch.no_grad():
        torch.testing.assert_close(model(seq, cache=cache), model(seq), rtol=0, atol=1e-5)  # the prefill
        for _ in range(steps):  # greedy steps: one cached token against a forward over everything so far
            full = model(seq)[0, -1]
            nxt = full.argmax().view(1, 1)
            seq = torch.cat([seq, nxt], dim=1)
            step = model(nxt, cache=cache)[0, -1]
            torch.testing.assert_close(step, model(seq)[0, -1], rtol=0, atol=1e-5)
    assert cache.length == seq.shape[1]
    assert generate(model, seq[0, :6].tolist(), steps) == seq[0, 6:].tolist()


def test_generate_stops_and_samples():
    model = _model("llama", init_std=0.2).eval()
    prompt = [3, 1, 4, 1, 5]
    greedy = generate(model, prompt, 6)
    assert len(greedy) == 6
    # Stops after an eos id (included), at max_seq_len (32), and never with a prompt that fills it.
    assert generate(model, prompt, 6, eos_ids=[greedy[2]]) == greedy[:greedy.index(greedy[2]) + 1]
    assert len(generate(model, list(range(30)), 10)) == 2
    assert generate(model, list(range(32)), 10) == []
    with pytest.raises(ValueError, match="exceeds model.max_seq_len 32"):
        generate(model, list(range(33)), 1)
    # Sampling: reproducible per seed; top_k=1 is greedy at any temperature.
    a, b = generate(model, prompt, 12, temperature=1.5, seed=7), generate(model, prompt, 12, temperature=1.5, seed=7)
    assert a == b and a != generate(model, prompt, 12, temperature=1.5, seed=8)
    assert generate(model, prompt, 6, temperature=2.0, top_k=1, seed=3) == greedy


def test_cache_refusals():
    model = _model("llama").eval()
    cache = model.new_cache()
    model(torch.randint(0, V, (1, 4)), cache=cache)
    with pytest.raises(ValueError, match="one token at a time"):
        model(torch.randint(0, V, (1, 2)), cache=cache)
    with pytest.raises(ValueError, match="segment_ids cannot be combined"):
        model(torch.randint(0, V, (1, 1)), cache=cache, segment_ids=torch.ones(1, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="causal"):
        _model("bert")(torch.randint(0, V, (1, 3)), cache=KVCache(2, 32))
    with pytest.raises(ValueError, match="positions must be"):
        model(torch.randint(0, V, (2, 4)), positions=torch.arange(5))


def test_qkv_bias_and_head_dim():
    qwen = _model("llama", qkv_bias=True, head_dim=12, n_kv_heads=2)
    attn = qwen.blocks[0].attn
    assert all(getattr(attn, f"{n}_proj").bias is not None for n in "qkv") and attn.o_proj.bias is None
    assert qwen.blocks[0].mlp.up_proj.bias is None
    shapes = {n: tuple(getattr(attn, f"{n}_proj").weight.shape) for n in "qkvo"}
    assert shapes == {"q": (48, 32), "k": (24, 32), "v": (24, 32), "o": (32, 48)}
    d, ff, L = 32, qwen.blocks[0].mlp.up_proj.out_features, 2
    per_block = 32 * 48 + 2 * 32 * 24 + 48 * 32 + (48 + 2 * 24) + 3 * d * ff + 2 * d
    counts = count_parameters(qwen)
    assert counts["params"] == 2 * V * d + L * per_block + d
    assert qwen(torch.randint(0, V, (2, 7))).shape == (2, 7, V)
    gpt2 = _model("gpt2", qkv_bias=False).blocks[0].attn
    assert gpt2.q_proj.bias is None and gpt2.o_proj.bias is not None
    # head_dim lets d_model be no multiple of n_heads, as Hugging Face allows.
    assert _model("llama", d_model=30, head_dim=8)(torch.randint(0, V, (1, 5))).shape == (1, 5, V)


def test_flops_follow_the_attention_width():
    m = _model("llama", head_dim=12)
    counts = count_parameters(m)
    body = counts["params_non_embedding"] - V * 32  # untied: the head is a matrix product too
    want = 6.0 * (body + V * 32) + 12.0 * 2 * (4 * 12) * 32
    assert flops_per_token(m.cfg, counts, {"seq_len": 32}) == want


def test_rope_scaling_matches_transformers_and_changes_logits():
    cfg = get_family("llama").config(d_model=32, n_heads=4, head_dim=12, rope_theta=500000.0, rope_scaling=SCALING)
    hf = HFLlamaConfig(hidden_size=32, num_attention_heads=4, head_dim=12, max_position_embeddings=64,
                       rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, **SCALING})
    assert torch.equal(rope_inv_freq(cfg, 12), ROPE_INIT_FUNCTIONS["llama3"](hf, "cpu")[0])
    assert rope_inv_freq(cfg.model_copy(update={"rope_scaling": None}), 12) is None
    plain, scaled = _model("llama", init_std=0.2), _model("llama", init_std=0.2, rope_scaling=SCALING)
    assert plain.state_dict().keys() == scaled.state_dict().keys()  # the table is no tensor of the checkpoint
    with torch.device("meta"):  # built where nothing can be computed (the trainer counts parameters so)
        Transformer(scaled.cfg)
    scaled.load_state_dict(plain.state_dict())
    ids = torch.randint(0, V, (1, 24))
    assert not torch.allclose(plain(ids), scaled(ids), atol=1e-4)


def _copy_from_hf(ours: Transformer, hf) -> None:
    """Hugging Face Llama/Qwen2 names -> ours, by hand (the checkpoint adapters live in pretrain.hub)."""
    rename = {"model.embed_tokens": "embed", "model.norm": "norm", "model.layers": "blocks", "self_attn": "attn",
              "input_layernorm": "attn_norm", "post_attention_layernorm": "mlp_norm"}
    state = {}
    for name, t in hf.state_dict().items():
        for a, b in rename.items():
            name = name.replace(a, b)
        state[name] = t
    ours.load_state_dict(state, strict=True)


@pytest.mark.parametrize("arch", ["llama3", "qwen2"])
def test_logits_match_transformers(arch):
    common = dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
                  num_hidden_layers=2, vocab_size=V, max_position_embeddings=32, rms_norm_eps=1e-6,
                  tie_word_embeddings=False, initializer_range=0.2)
    same = dict(n_kv_heads=2, d_ff=64, norm_eps=1e-6)
    if arch == "llama3":
        rope = {"rope_type": "llama3", "rope_theta": 500000.0, **SCALING}
        hf = LlamaForCausalLM(HFLlamaConfig(head_dim=12, rope_parameters=rope, **common))
        ours = _model("llama", head_dim=12, rope_theta=500000.0, rope_scaling=SCALING, **same)
    else:
        hf = Qwen2ForCausalLM(Qwen2Config(**common))
        ours = _model("llama", qkv_bias=True, **same)
        for layer in hf.model.layers:  # transformers zero-initialises biases: give them something to carry
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                torch.nn.init.normal_(proj.bias, std=0.5)
    _copy_from_hf(ours, hf.eval())
    ids = torch.randint(0, V, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits, rtol=0, atol=1e-5)
        theirs = hf.generate(ids[:1, :5], attention_mask=torch.ones(1, 5, dtype=torch.long), max_new_tokens=6,
                             do_sample=False, eos_token_id=None, pad_token_id=0)
    assert generate(ours.eval(), ids[0, :5].tolist(), 6) == theirs[0, 5:].tolist()


@pytest.mark.parametrize(("fields", "message"), [
    ({"d_model": 30}, "model.d_model (30) must be a multiple of model.n_heads (4) unless model.head_dim is set"),
    ({"head_dim": 7}, "model.head_dim (7) must be even for rotary positions"),
    ({"rope_scaling": {**SCALING, "high_freq_factor": 0.5}},
     "model.rope_scaling: high_freq_factor (0.5) must be greater than low_freq_factor (1.0)"),
    ({"rope_scaling": {**SCALING, "type": "yarn"}}, "model.rope_scaling.type"),
    ({"rope_scaling": {**SCALING, "factor": 0.5}}, "model.rope_scaling.factor"),
    ({"position": "learned", "rope_scaling": SCALING}, "model.rope_scaling needs model.position=rope"),
])
def test_config_refusals_are_one_line(fields, message):
    with pytest.raises(ConfigError) as e:
        typed_section("model", {"type": "llama", "n_heads": 4, **fields})
    assert message in str(e.value) and "\n" not in str(e.value)
