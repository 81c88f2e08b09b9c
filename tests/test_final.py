"""A run's `final/` weights: one file for a small model, Hugging-Face-style shards with an index above the shard
limit (rank 0 writes each shard as it fills, never holding the whole model); every reader takes both."""

from __future__ import annotations

import torch
import yaml

from pretrain.config import typed_section
from pretrain.hub.run_weights import final_tensors, load_final_model
from pretrain.hub.safetensors_io import INDEX, write_shards
from pretrain.models import get_family


def test_sharded_final_weights_load_like_one_file(tmp_path):
    cfg = typed_section("model", {"type": "llama", "n_layers": 2, "d_model": 32, "n_heads": 2, "vocab_size": 64,
                                  "max_seq_len": 16, "kernels": "reference"})
    torch.manual_seed(0)
    model = get_family("llama").build(cfg)
    for d, limit in (("one", 1e9), ("sharded", 4096)):
        out = tmp_path / d
        out.mkdir()
        write_shards(out, ((n, p.detach()) for n, p in model.named_parameters()), limit)
        (out / "model.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    assert (tmp_path / "sharded" / INDEX).is_file() and len(list((tmp_path / "sharded").glob("model-*"))) > 2
    assert not (tmp_path / "one" / INDEX).exists() and (tmp_path / "one" / "model.safetensors").is_file()
    one, sharded = dict(final_tensors(tmp_path / "one")), dict(final_tensors(tmp_path / "sharded"))
    assert one.keys() == sharded.keys() == dict(model.named_parameters()).keys()
    assert all(torch.equal(one[k], sharded[k]) for k in one)
    ids = torch.randint(0, 64, (1, 8))
    with torch.no_grad():
        assert torch.equal(load_final_model(tmp_path / "sharded")(ids), model.eval()(ids))
