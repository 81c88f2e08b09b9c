"""tools/plain_gpt.py, the yardstick of tools/bench_train.py, computes what `model.type=gpt2` computes: with our
model's weights copied in, the same loss and the same gradients, so the benchmark compares like with like."""

import sys
from pathlib import Path

import torch

from pretrain.load import load_config
from pretrain.models import get_family

sys.path.insert(0, str(Path(__file__).parents[1] / "tools"))
from plain_gpt import PlainGPT  # noqa: E402


def test_plain_gpt_matches_our_gpt2_loss_and_gradients():
    L, D, H, V, T = 2, 32, 4, 50, 16
    cfg = load_config("configs/gpt-tiny.yaml", [f"model.n_layers={L}", f"model.d_model={D}", f"model.n_heads={H}",
                                                 f"model.vocab_size={V}", f"model.max_seq_len={T}"])
    torch.manual_seed(0)
    ours = get_family("gpt2").build(cfg.model)
    plain = PlainGPT(L, D, H, V, T)
    o = dict(ours.named_parameters())
    renames = {"wte.weight": "embed.weight", "wpe.weight": "pos_embed.weight", "ln_f.weight": "norm.weight",
               "ln_f.bias": "norm.bias"}
    with torch.no_grad():
        for name, p in plain.named_parameters():
            if name.startswith("blocks."):
                i, rest = name.split(".", 2)[1:]
                mine = {"ln1": "attn_norm", "ln2": "mlp_norm", "proj": "attn.o_proj", "up": "mlp.up_proj",
                        "down": "mlp.down_proj"}
                part, leaf = rest.split(".")
                if part == "qkv":  # one (3D, D) product in the plain model, three in ours
                    p.copy_(torch.cat([o[f"blocks.{i}.attn.{x}_proj.{leaf}"] for x in "qkv"]))
                else:
                    p.copy_(o[f"blocks.{i}.{mine[part]}.{leaf}"])
            else:
                p.copy_(o[renames[name]])
    ids = torch.randint(0, V, (3, T), generator=torch.Generator().manual_seed(1))
    targets = torch.roll(ids, -1, dims=1)
    ours_loss = ours(ids, targets) / targets.numel()
    plain_loss = plain(ids, targets)
    assert torch.allclose(ours_loss, plain_loss, atol=1e-5), (ours_loss, plain_loss)
    ours_loss.backward()
    plain_loss.backward()
    assert torch.allclose(o["embed.weight"].grad, plain.wte.weight.grad, atol=1e-5)
    assert torch.allclose(o["blocks.1.mlp.up_proj.weight"].grad, plain.blocks[1].up.weight.grad, atol=1e-5)
