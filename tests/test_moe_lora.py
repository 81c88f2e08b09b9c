"""LoRA on mixture-of-experts layers (pretrain/models/lora_experts.py, pretrain/hub/peft.py), checked against PEFT
itself on transformers' own MoE models.

Tiny random Mixtral, Qwen2-MoE (a dense first layer, a gated shared expert) and OLMoE checkpoints are imported
into our model; adapters on attention, the router and both stacked expert weights, all nonzero, give the same
logits as the PEFT-wrapped transformers model loading our export (PEFT's `target_parameters`), the same adapter
gradients, and the same merged weights. PEFT's own adapters load into ours. An export with B's columns in
expert-major order (the layout one would guess) is shown to break the parity, so the test can fail.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from pretrain.config import ConfigError
from pretrain.hub import CheckpointError, read_checkpoint, write_hf
from pretrain.models import get_family
from pretrain.models.lora import (
    LoraConfig,
    apply_lora,
    load_lora_state,
    lora_state,
    merge_lora,
    merged_state,
)
from pretrain.models.lora_experts import LoRAExperts
from pretrain.models.moe import Experts
from tests.helpers import assert_same_logits, released_model
from tests.test_checkpoints_hf import _tokens
from tests.test_moe_hub import _hf_checkpoint

pytest.importorskip("peft")

# Attention, the router and both expert weights everywhere; Qwen2-MoE's shared expert and dense layer too.
TARGETS = {
    "mixtral-e4k1": ["q_proj", "o_proj", "router", "gate_up", "down"],
    "qwen2_moe-e6k2": ["v_proj", "router", "gate_up", "down", "blocks.1.mlp.shared.up_proj", "blocks.0.mlp.down_proj"],
    "olmoe-e8k3": ["q_proj", "k_proj", "gate_up", "blocks.1.mlp.experts.down"],
}


def _hf(path):
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


def _peft(hf_dir, adapter_dir, trainable: bool = False):
    from peft import PeftModel

    return PeftModel.from_pretrained(_hf(hf_dir), str(adapter_dir), is_trainable=trainable).eval()


def _adapted(tmp_path, family, lora):
    """(HF checkpoint dir, our model with nonzero random adapters, its model config)."""
    _hf_checkpoint(tmp_path / "hf", family)
    released = read_checkpoint(tmp_path / "hf")
    ours = released_model(released)
    apply_lora(ours, lora)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for t in lora_state(ours).values():
            t.copy_(0.1 * torch.randn(t.shape, generator=g))
    return tmp_path / "hf", ours, released.model_cfg.model_copy(update={"kernels": "reference"})


def _loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1))


@pytest.mark.parametrize("family", list(TARGETS))
def test_expert_adapters_export_to_peft_with_the_same_logits_gradients_and_merge(tmp_path, family):
    lora = LoraConfig(rank=3, alpha=5, targets=TARGETS[family])
    hf_dir, ours, mcfg = _adapted(tmp_path, family, lora)
    ids = _tokens()
    experts = [m for m in ours.modules() if isinstance(m, LoRAExperts)]
    assert experts and all(not m.gate_up.requires_grad and not m.down.requires_grad for m in experts)
    with torch.no_grad():
        adapted, base = ours(ids), _hf(hf_dir)(ids).logits
    assert (adapted - base).abs().max() > 1e-1  # the adapters matter

    out = write_peft_checked(tmp_path / "adapter", mcfg, lora, ours, str(hf_dir))
    theirs = _peft(hf_dir, out, trainable=True)
    with torch.no_grad():
        peft_logits = theirs(ids).logits
    assert torch.allclose(peft_logits, adapted, atol=1e-4, rtol=0), (peft_logits - adapted).abs().max()
    assert_same_logits(peft_logits, adapted)

    # Gradients: ours reach the adapters only, and equal PEFT's (named through the same export).
    ours.zero_grad()
    _loss(ours(ids), ids).backward()
    grads = {n: p.grad for n, p in ours.named_parameters() if p.grad is not None}
    assert set(grads) == set(lora_state(ours)) and all(g.abs().sum() > 0 for g in grads.values())
    _loss(theirs(ids).logits, ids).backward()
    peft_grads = {n.replace(".default.", "."): p.grad for n, p in theirs.named_parameters() if p.grad is not None}
    from pretrain.hub.peft import write_peft

    as_peft = load_file(str(write_peft(tmp_path / "grads", mcfg, lora, grads) / "adapter_model.safetensors"))
    assert as_peft.keys() == peft_grads.keys()
    for k, g in as_peft.items():
        assert torch.allclose(g, peft_grads[k], atol=1e-5, rtol=1e-4), k

    # Merged: the export without adapters equals the adapted model, in transformers and in ours (merge_lora).
    merged_dir = write_hf(tmp_path / "merged", mcfg, merged_state(ours))
    with torch.no_grad():
        assert torch.allclose(_hf(merged_dir)(ids).logits, adapted, atol=1e-4, rtol=0)
        peft_merged = theirs.merge_and_unload().state_dict()
        for name, t in _hf(merged_dir).state_dict().items():
            assert torch.allclose(t, peft_merged[name], atol=1e-6, rtol=0), name
        merged = merge_lora(ours)
        assert any(n.endswith(".experts.gate_up") for n in merged)
        assert not any(isinstance(m, LoRAExperts) for m in ours.modules())
        assert all(type(m.mlp.experts) is Experts for m in ours.blocks if hasattr(m.mlp, "experts"))
        assert torch.allclose(ours(ids), adapted, atol=1e-4, rtol=0)


def write_peft_checked(out, mcfg, lora, ours, base):
    """Our export, with the settings PEFT reads checked, and read back by us unchanged."""
    from pretrain.hub.peft import read_peft, write_peft

    out = write_peft(out, mcfg, lora, lora_state(ours), base)
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["lora_dropout"]) == (3, 5, 0.0)
    assert config["target_parameters"] and all(".experts." in t or t.endswith("gate.weight")
                                                for t in config["target_parameters"])
    back = read_peft(out, mcfg)
    assert sorted(back.lora.targets) == sorted(lora.targets) and back.lora.rank == lora.rank
    assert back.tensors.keys() == lora_state(ours).keys()
    assert all(torch.equal(back.tensors[k], v) for k, v in lora_state(ours).items())
    return out


def test_b_in_expert_major_order_breaks_the_parity(tmp_path):
    """The layout matters: B's columns are (rank, expert), expert minor. Written expert-major instead, PEFT
    computes another model."""
    lora = LoraConfig(rank=3, alpha=5, targets=["down"])
    hf_dir, ours, mcfg = _adapted(tmp_path, "mixtral-e4k1", lora)
    out = write_peft_checked(tmp_path / "adapter", mcfg, lora, ours, None)
    ids = _tokens()
    with torch.no_grad():
        adapted = ours(ids)
        assert torch.allclose(_peft(hf_dir, out)(ids).logits, adapted, atol=1e-4, rtol=0)
    f = out / "adapter_model.safetensors"
    tensors = load_file(str(f))
    for k, t in tensors.items():
        if k.endswith("lora_B.weight"):
            tensors[k] = t.view(t.shape[0], 3, 4).transpose(1, 2).reshape(t.shape)
    save_file(tensors, str(f), metadata={"format": "pt"})
    with torch.no_grad():
        assert (_peft(hf_dir, out)(ids).logits - adapted).abs().max() > 1e-2


def test_peft_expert_adapters_load_into_our_model(tmp_path):
    """PEFT's own adapter: `down_proj` in every layer (on the experts module itself), `gate_up_proj` in layer 1
    only (there the innermost, under `base_layer`), attention through target_modules."""
    import peft

    _hf_checkpoint(tmp_path / "hf", "mixtral-e4k1")
    hf = _hf(tmp_path / "hf")
    config = peft.LoraConfig(r=2, lora_alpha=3, target_modules=["k_proj"], task_type="CAUSAL_LM",
                             target_parameters=["experts.down_proj", "model.layers.1.mlp.experts.gate_up_proj"])
    theirs = peft.get_peft_model(hf, config)
    with torch.no_grad():
        for n, p in theirs.named_parameters():
            if "lora_" in n:
                p.normal_(0.0, 0.1)
    theirs.save_pretrained(tmp_path / "theirs")
    ids = _tokens()
    with torch.no_grad():
        expected = theirs.eval()(ids).logits

    from pretrain.hub.peft import read_peft

    released = read_checkpoint(tmp_path / "hf")
    adapter = read_peft(tmp_path / "theirs", released.model_cfg)
    assert (adapter.lora.rank, adapter.lora.alpha) == (2, 3)
    assert sorted(adapter.lora.targets) == ["blocks.1.mlp.experts.gate_up", "down", "k_proj"]
    ours = released_model(released)
    apply_lora(ours, adapter.lora)
    load_lora_state(ours, adapter.tensors)
    with torch.no_grad():
        assert torch.allclose(ours(ids), expected, atol=1e-4, rtol=0)


def test_build_starts_expert_adapters_at_the_base_and_trains_only_them(tmp_path):
    """The trainer's build (init.path, then the seeded adapter init): B zero, so the model is the released one;
    only the adapters require gradients."""
    from pretrain.hub.sources import resolve
    from pretrain.load import load_config
    from pretrain.train.build import build_model

    hf_model = _hf_checkpoint(tmp_path / "hf", "olmoe-e8k3")
    cfg = load_config(Path(__file__).parents[1] / "configs/finetune-smollm2.yaml",
                      [f"init.path={tmp_path / 'hf'}", "model.kernels=reference", "lora.targets=[q_proj,gate_up,down]"])
    model, counts = build_model(resolve(cfg), torch.device("cpu"))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(lora_state(model)) and any(".experts.down_lora.lora_A" in n for n in trainable)
    e, d, f = 8, 36, 20  # OLMoE's experts, d_model, d_expert; rank 8 (the config's)
    r = cfg.lora.rank
    assert model.blocks[0].mlp.experts.gate_up_lora.lora_A.weight.shape == (r * e, d)
    assert model.blocks[0].mlp.experts.down_lora.lora_B.weight.shape == (d, r * e)
    assert counts["params_trainable"] == sum(lora_state(model)[n].numel() for n in trainable)
    assert f == model.blocks[0].mlp.experts.d_expert
    with torch.no_grad():
        assert_same_logits(hf_model(_tokens()).logits, model.eval()(_tokens()))


def test_unsupported_combinations_are_refused_in_one_line(tmp_path):
    from pretrain.hub.peft import read_peft, write_peft
    from pretrain.load import load_config

    cfg = get_family("mixtral").config(n_layers=2, d_model=16, n_heads=2, vocab_size=64, kernels="reference",
                                       moe={"n_experts": 4, "top_k": 2, "expert_parallel": 2})
    with pytest.raises(ConfigError, match="expert_parallel 1") as e:
        apply_lora(get_family("mixtral").build(cfg), LoraConfig(targets=["q_proj", "down"]))
    assert "\n" not in str(e.value)
    root = Path(__file__).parents[1]
    with pytest.raises(ConfigError, match=r"lora.targets 'gate_up' adapts expert weights.*expert_parallel 1") as e:
        load_config(root / "configs/moe-tiny.yaml", ["model.moe.expert_parallel=2", "cluster.workers=2",
                                                      "lora.targets=[q_proj,gate_up]"])
    assert "\n" not in str(e.value)
    apply_lora(get_family("mixtral").build(cfg), LoraConfig(targets=["q_proj"]))  # attention only: fine at EP 2

    lora = LoraConfig(rank=2, dropout=0.1, targets=["gate_up"])
    hf_dir, ours, mcfg = _adapted(tmp_path, "mixtral-e4k1", lora)
    with pytest.raises(CheckpointError, match="lora.dropout 0.1 .*target_parameters") as e:
        write_peft(tmp_path / "refused", mcfg, lora, lora_state(ours))
    assert "\n" not in str(e.value) and not (tmp_path / "refused").exists()

    good = write_peft(tmp_path / "a", mcfg, lora.model_copy(update={"dropout": 0.0}), lora_state(ours))
    config = json.loads((good / "adapter_config.json").read_text())
    (good / "adapter_config.json").write_text(json.dumps(config | {"target_parameters": ["mlp.experts.w9"]}))
    with pytest.raises(CheckpointError, match="target_parameters 'mlp.experts.w9' names no parameter") as e:
        read_peft(good, mcfg)
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="matches no Linear module or expert weight"):
        apply_lora(released_model(read_checkpoint(hf_dir)), LoraConfig(targets=["gate_upp"]))


def test_zero3_partitions_expert_adapters_and_trains_only_them(one_rank_group):
    """Under DeepSpeed ZeRO-3 (one gloo rank) the adapters, made inside zero.Init, are partitioned like the experts;
    each factor is gathered by its own module's call, so the first loss is the whole model's and three steps move
    every A and B and nothing else."""
    import deepspeed

    ds = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "train_batch_size": 2,
          "zero_optimization": {"stage": 3}, "zero_allow_untested_optimizer": True, "steps_per_print": 10**9}
    cfg = get_family("mixtral").config(n_layers=2, d_model=32, n_heads=4, vocab_size=128, max_seq_len=16,
                                       kernels="reference", moe={"n_experts": 4, "top_k": 2, "d_expert": 24})
    torch.manual_seed(0)
    model = get_family("mixtral").build(cfg)
    lora = LoraConfig(rank=2, alpha=4, targets=["q_proj", "gate_up", "down"])
    plain = get_family("mixtral").build(cfg)
    plain.load_state_dict(model.state_dict())
    apply_lora(plain, lora)
    deepspeed.zero.Init(module=model, config_dict_or_path=ds)
    with deepspeed.zero.Init(config_dict_or_path=ds):
        apply_lora(model, lora)
    assert all(hasattr(p, "ds_id") for p in model.parameters())
    with deepspeed.zero.GatheredParameters(list(model.parameters())):
        start = {n: p.detach().clone() for n, p in model.named_parameters()}
    adapters = {n for n in start if ".lora_" in n}
    assert any(".experts.gate_up_lora.lora_A" in n for n in adapters)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == adapters
    missing, _ = plain.load_state_dict(start, strict=False)  # the same adapters (A as made in partitions, B zero)
    assert all(n.endswith(".balance") for n in missing)  # buffers, not parameters
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds, dist_init_required=False)
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))
    losses = []
    for _ in range(3):
        loss = _loss(engine(ids), ids)
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    with torch.no_grad():
        assert abs(losses[0] - _loss(plain(ids), ids).item()) < 1e-5
    assert losses[-1] < losses[0]
    with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
        after = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
    assert all(torch.equal(after[n], start[n]) for n in start if n not in adapters)
    assert all(not torch.equal(after[n], start[n]) for n in adapters)
