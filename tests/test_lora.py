"""LoRA: the adapter layer and its freezing, merging, PEFT's on-disk layout (loaded by `peft` itself on the
transformers model), and training under a real DeepSpeed ZeRO-3 engine (gloo, one rank)."""

from __future__ import annotations

import json

import pytest
import torch
from pydantic import ValidationError
from torch import nn

from pretrain.config import ConfigError
from pretrain.models.lora import (
    LoraConfig,
    LoRALinear,
    apply_lora,
    describe_trainable,
    load_lora_state,
    lora_state,
    match_targets,
    merge_lora,
    merged_state,
    trainable_parameters,
)
from pretrain.models.transformer import LlamaConfig, Transformer


def _tiny(**kw) -> Transformer:
    cfg = LlamaConfig(n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, d_ff=48, vocab_size=96, max_seq_len=16,
                      kernels="reference", **kw)
    return Transformer(cfg).eval()


def _randomise_adapters(model: nn.Module, std: float = 0.05) -> None:
    with torch.no_grad():
        for t in lora_state(model).values():
            t.normal_(0.0, std)


def _ids(vocab: int = 96, b: int = 2, t: int = 12) -> torch.Tensor:
    return torch.randint(0, vocab, (b, t), generator=torch.Generator().manual_seed(1))


# ----------------------------------------------------------------------------- mechanics


def test_base_is_frozen_only_adapters_train_and_zero_b_is_the_base():
    model = _tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = _ids()
    base_out = model(ids)
    names = apply_lora(model, LoraConfig(rank=4, alpha=8, targets=["q_proj", "*.mlp.down_proj"]))
    assert names == [f"blocks.{i}.{m}" for i in range(2) for m in ("attn.q_proj", "mlp.down_proj")]

    # The base's names and values are all still there (released weights load unchanged), plus A and B.
    state = model.state_dict()
    assert set(state) == set(before) | set(lora_state(model))
    assert all(torch.equal(state[k], v) for k, v in before.items())
    q = model.blocks[0].attn.q_proj
    assert isinstance(q, LoRALinear) and q.lora_A.weight.shape == (4, 32) and q.lora_B.weight.shape == (32, 4)
    assert q.scaling == 2.0 and not q.lora_B.weight.any()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(lora_state(model))
    n_adapter = 2 * (4 * (32 + 32) + 4 * (48 + 32))
    assert trainable_parameters(model) == (n_adapter, sum(v.numel() for v in before.values()) + n_adapter)
    assert describe_trainable(model).startswith(f"trainable {n_adapter:,} of ")

    assert torch.equal(model(ids), base_out)  # B = 0: exactly the base model
    model.train()
    model.blocks[0].attn.q_proj.lora_dropout = nn.Dropout(0.5)  # dropout reaches the adapter's input only
    assert torch.equal(model(ids), base_out)

    loss = model(ids, targets=ids)
    loss.backward()
    assert {n for n, p in model.named_parameters() if p.grad is not None} == trainable


def test_merge_equals_the_adapted_model_and_restores_plain_linears():
    model = _tiny()
    original_names = [n for n, _ in model.named_parameters()]
    apply_lora(model, LoraConfig(rank=3, alpha=5, targets=["*_proj"]))  # every Linear: attention and MLP
    _randomise_adapters(model)
    ids = _ids()
    adapted = model(ids)
    folded = dict(merged_state(model))
    assert set(folded) == set(original_names)
    assert merge_lora(model) and not any(isinstance(m, LoRALinear) for m in model.modules())
    assert [n for n, _ in model.named_parameters()] == original_names
    assert all(type(model.get_submodule(n.rsplit(".", 1)[0])) is nn.Linear for n in original_names if "_proj" in n)
    assert torch.allclose(model(ids), adapted, atol=1e-6, rtol=0)
    assert all(torch.equal(folded[n], p) for n, p in model.named_parameters())


def test_adapter_state_round_trips_into_a_fresh_lora_model():
    cfg = LoraConfig(rank=2, alpha=2)
    a, b = _tiny(), _tiny()
    b.load_state_dict(a.state_dict())
    apply_lora(a, cfg)
    apply_lora(b, cfg)
    _randomise_adapters(a)
    load_lora_state(b, {k: v.clone() for k, v in lora_state(a).items()})
    ids = _ids()
    assert torch.equal(a(ids), b(ids))
    with pytest.raises(ValueError, match="missing"):
        load_lora_state(b, {})


def test_targets_that_match_nothing_and_bad_values_are_refused():
    model = _tiny()
    assert match_targets(model, ["*.q_proj"]) == match_targets(model, ["q_proj"])
    assert match_targets(model, ["blocks.1.attn.*"]) == [f"blocks.1.attn.{p}_proj" for p in "qkvo"]
    with pytest.raises(ConfigError) as e:
        apply_lora(model, LoraConfig(targets=["q_proj", "query"]))
    msg = str(e.value)
    assert "\n" not in msg and "lora.targets" in msg and "'query'" in msg and "q_proj" in msg
    assert not any(isinstance(m, LoRALinear) for m in model.modules())  # refused before anything changed
    assert all(p.requires_grad for p in model.parameters())
    for bad in ({"rank": 0}, {"alpha": 0}, {"dropout": 1.0}, {"targets": []}, {"r": 8}):
        with pytest.raises(ValidationError):
            LoraConfig(**bad)
    apply_lora(model, LoraConfig())
    with pytest.raises(ValueError, match="already"):
        apply_lora(model, LoraConfig())


# ----------------------------------------------------------------------------- DeepSpeed ZeRO-3


def _dir_bytes(path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


_DS = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "train_batch_size": 2,
       "zero_optimization": {"stage": 3}, "zero_allow_untested_optimizer": True, "steps_per_print": 10**9}


def _zero3_engine(seed: int = 0):
    """As a run builds it: a partitioned base, adapters made inside zero.Init (partitioned as they are
    created), then an engine whose optimizer holds only the trainable parameters. (The base is initialised
    whole and then partitioned: the run writes its values into the partitions, which is build.py's part.)"""
    import deepspeed

    torch.manual_seed(seed)
    model = Transformer(LlamaConfig(n_layers=2, d_model=64, n_heads=4, d_ff=128, vocab_size=512, max_seq_len=16,
                                    kernels="reference"))
    # No dtype= : DeepSpeed 0.19.8 turns an explicit float32 into bf16 on CPU; the config's (fp32) is kept.
    deepspeed.zero.Init(module=model, config_dict_or_path=_DS)
    with deepspeed.zero.Init(config_dict_or_path=_DS):
        apply_lora(model, LoraConfig(rank=2, alpha=4))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=_DS, dist_init_required=False)
    return engine


def _gathered(engine) -> dict[str, torch.Tensor]:
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
        return {n: p.detach().clone() for n, p in engine.module.named_parameters()}


def test_zero3_trains_only_the_adapters_and_saves_no_frozen_weights(tmp_path, one_rank_group):
    engine = _zero3_engine()
    assert all(hasattr(p, "ds_id") for p in engine.module.parameters())  # really partitioned
    start = _gathered(engine)
    adapters = [n for n in start if ".lora_" in n]
    assert adapters and all(not start[n].any() for n in adapters if ".lora_B" in n)  # B zero in partitions
    assert {n for n, p in engine.module.named_parameters() if p.requires_grad} == set(adapters)
    base_bytes = 4 * sum(t.numel() for n, t in start.items() if n not in adapters)
    ids = _ids(vocab=512, t=16)
    losses = []
    for _ in range(3):
        loss = engine(ids[:, :-1], targets=ids[:, 1:]) / ids[:, 1:].numel()
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]

    after = _gathered(engine)
    assert all(torch.equal(after[n], start[n]) for n in start if n not in adapters)  # bit-identical base
    assert all(not torch.equal(after[n], start[n]) for n in adapters)  # every A and every B moved

    engine.save_checkpoint(str(tmp_path / "lean"), tag="t", exclude_frozen_parameters=True)
    engine.save_checkpoint(str(tmp_path / "full"), tag="t")
    lean, full = _dir_bytes(tmp_path / "lean"), _dir_bytes(tmp_path / "full")
    print(f"base {base_bytes} B, checkpoint {full} B, adapter-only {lean} B")
    assert full > base_bytes  # the frozen fragments are in the ordinary checkpoint ...
    assert lean < base_bytes / 4  # ... and not in the adapter-only one

    # Resume: the same base (same seed) with fresh adapters takes the trained adapters from the lean checkpoint.
    fresh = _zero3_engine()
    fresh.load_checkpoint(str(tmp_path / "lean"), tag="t", load_module_strict=False)
    resumed = _gathered(fresh)
    assert all(torch.equal(resumed[n], after[n]) for n in after)


# ----------------------------------------------------------------------------- PEFT's layout


def _hf_llama(path):
    """A tiny random transformers Llama saved as a released checkpoint (safetensors + config.json)."""
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                   rms_norm_eps=1e-5, tie_word_embeddings=False)
    transformers.LlamaForCausalLM(cfg).save_pretrained(path)
    return path


def _ours_from(path):
    from pretrain.hub import load_weights, read_checkpoint
    from pretrain.models import get_family

    released = read_checkpoint(path)
    mcfg = released.model_cfg.model_copy(update={"kernels": "reference"})
    model = get_family(mcfg.type).build(mcfg)
    load_weights(model, released.iter_tensors())
    return model.eval(), mcfg


def _hf_model(path):
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    torch.manual_seed(0)
    return _hf_llama(tmp_path_factory.mktemp("hf") / "llama")


def test_our_adapter_loads_in_peft_and_merges_like_peft(tmp_path, llama_dir):
    from peft import PeftModel

    from pretrain.hub import write_hf
    from pretrain.hub.peft import read_peft, write_peft

    ours, mcfg = _ours_from(llama_dir)
    lora = LoraConfig(rank=4, alpha=6, targets=["q_proj", "v_proj", "o_proj", "gate_proj", "blocks.1.mlp.down_proj"])
    apply_lora(ours, lora)
    _randomise_adapters(ours, std=0.1)
    ids = _ids()
    with torch.no_grad():
        adapted = ours(ids)
        base = _hf_model(llama_dir)(ids).logits
    assert (adapted - base).abs().max() > 1e-2  # the adapter matters
    out = write_peft(tmp_path / "adapter", mcfg, lora, lora_state(ours), str(llama_dir))
    config = json.loads((out / "adapter_config.json").read_text())
    # down_proj is adapted in block 1 only: that module is named in full, the others by their last name.
    assert config["target_modules"] == ["gate_proj", "model.layers.1.mlp.down_proj", "o_proj", "q_proj", "v_proj"]

    peft_model = PeftModel.from_pretrained(_hf_model(llama_dir), str(out)).eval()
    assert peft_model.peft_config["default"].r == 4 and peft_model.peft_config["default"].lora_alpha == 6
    wrapped = {n.removeprefix("base_model.model.").removesuffix(".lora_A.default")
               for n, _ in peft_model.named_modules() if n.endswith(".lora_A.default")}
    assert len(wrapped) == 2 * 4 + 1
    with torch.no_grad():
        theirs = peft_model(ids).logits
    assert torch.allclose(theirs, adapted, atol=1e-4, rtol=0), (theirs - adapted).abs().max()

    back = read_peft(out, mcfg)  # and back: the same settings and factors under our names
    assert back.lora.model_dump() == lora.model_dump() | {"targets": sorted(
        ["q_proj", "v_proj", "o_proj", "gate_proj", "blocks.1.mlp.down_proj"])}
    assert back.base_model_name_or_path == str(llama_dir)
    assert back.tensors.keys() == lora_state(ours).keys()
    assert all(torch.equal(back.tensors[k], v) for k, v in lora_state(ours).items())

    # Merged: ours (merge_lora, then write_hf) equals PEFT's merge_and_unload, and loads in transformers.
    merge_lora(ours)
    merged_dir = write_hf(tmp_path / "merged", mcfg, ours.named_parameters())
    with torch.no_grad():
        peft_merged = peft_model.merge_and_unload().state_dict()
        from_disk = _hf_model(merged_dir)
        for name, t in from_disk.state_dict().items():
            assert torch.allclose(t, peft_merged[name], atol=1e-6, rtol=0), name
        assert torch.allclose(from_disk(ids).logits, adapted, atol=1e-4, rtol=0)


def test_peft_adapter_loads_into_our_model(tmp_path, llama_dir):
    import peft

    from pretrain.hub.peft import read_peft

    hf = _hf_model(llama_dir)
    theirs = peft.get_peft_model(hf, peft.LoraConfig(r=3, lora_alpha=5, target_modules=["k_proj", "up_proj"],
                                                     task_type="CAUSAL_LM"))
    with torch.no_grad():
        for n, p in theirs.named_parameters():
            if "lora_" in n:
                p.normal_(0.0, 0.1)
    theirs.save_pretrained(tmp_path / "theirs")
    ids = _ids()
    with torch.no_grad():
        expected = theirs.eval()(ids).logits

    ours, mcfg = _ours_from(llama_dir)
    adapter = read_peft(tmp_path / "theirs", mcfg)
    assert (adapter.lora.rank, adapter.lora.alpha, adapter.lora.targets) == (3, 5, ["k_proj", "up_proj"])
    apply_lora(ours, adapter.lora)
    load_lora_state(ours, adapter.tensors)
    with torch.no_grad():
        assert torch.allclose(ours(ids), expected, atol=1e-4, rtol=0)


def test_gpt2_exports_all_but_its_fused_qkv(tmp_path):
    import transformers
    from peft import PeftModel

    from pretrain.hub import CheckpointError
    from pretrain.hub.peft import write_peft

    torch.manual_seed(0)
    hf_cfg = transformers.GPT2Config(vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=32)
    transformers.GPT2LMHeadModel(hf_cfg).save_pretrained(tmp_path / "gpt2")
    ours, mcfg = _ours_from(tmp_path / "gpt2")
    lora = LoraConfig(rank=2, alpha=4, targets=["o_proj", "up_proj", "down_proj"])
    apply_lora(ours, lora)
    _randomise_adapters(ours, std=0.1)
    out = write_peft(tmp_path / "adapter", mcfg, lora, lora_state(ours))
    ids = _ids()
    with torch.no_grad():
        theirs = PeftModel.from_pretrained(_hf_model(tmp_path / "gpt2"), str(out)).eval()(ids).logits
        assert torch.allclose(theirs, ours(ids), atol=1e-4, rtol=0)

    qkv = _ours_from(tmp_path / "gpt2")[0]
    apply_lora(qkv, LoraConfig(rank=2, targets=["q_proj", "v_proj"]))
    with pytest.raises(CheckpointError, match="c_attn") as e:
        write_peft(tmp_path / "refused", mcfg, lora.model_copy(update={"rank": 2}), lora_state(qkv))
    assert "\n" not in str(e.value) and not (tmp_path / "refused").exists()


def test_adapters_we_cannot_compute_are_refused(tmp_path, llama_dir):
    from pretrain.hub import CheckpointError
    from pretrain.hub.peft import read_peft, write_peft

    ours, mcfg = _ours_from(llama_dir)
    lora = LoraConfig(rank=2, alpha=2)
    apply_lora(ours, lora)
    good = write_peft(tmp_path / "a", mcfg, lora, lora_state(ours))
    config = json.loads((good / "adapter_config.json").read_text())
    for change, field in (({"use_dora": True}, "use_dora"), ({"use_rslora": True}, "use_rslora"),
                          ({"bias": "all"}, "bias"), ({"peft_type": "IA3"}, "peft_type"),
                          ({"rank_pattern": {"q_proj": 4}}, "rank_pattern"), ({"r": 3}, "shape")):
        (good / "adapter_config.json").write_text(json.dumps(config | change))
        with pytest.raises(CheckpointError, match=field) as e:
            read_peft(good, mcfg)
        assert "\n" not in str(e.value)
    (good / "adapter_config.json").write_text(json.dumps(config))
    (good / "adapter_model.safetensors").rename(good / "adapter_model.bin")
    with pytest.raises(CheckpointError, match="pickle"):
        read_peft(good, mcfg)
    with pytest.raises(CheckpointError, match="lora.rank 3"):  # factors of another rank than the config's
        write_peft(tmp_path / "b", mcfg, lora.model_copy(update={"rank": 3}), lora_state(ours))
