"""The trained model as one file: consolidated weights in safetensors beside the model config.

Under ZeRO-3 the parameters are gathered from every rank first (a collective), so this is called by all
ranks; rank 0 writes. `load_final_model` rebuilds the model on CPU for sampling or export.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file, save_file

from pretrain.config import Config, ModelConfig
from pretrain.models.transformer import Transformer


def save_final_weights(engine, cfg: Config, out: Path, rank: int) -> None:
    import deepspeed  # here, not at the top: sampling on the driver must not pay for (or print) its import

    module = engine.module
    gather = (
        deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None)
        if cfg.zero.stage == 3 else contextlib.nullcontext()
    )
    with gather:
        if rank == 0:
            out.mkdir(parents=True, exist_ok=True)
            tmp = out / "model.safetensors.tmp"
            # Always fp32 on disk: exact for fp32 runs, lossless widening for bf16 ones.
            tensors = {k: v.detach().float().cpu().contiguous() for k, v in module.state_dict().items()}
            if module.lm_head.weight is module.embed.weight:
                tensors.pop("lm_head.weight", None)  # tied: one tensor, stored once
            save_file(tensors, str(tmp))
            os.replace(tmp, out / "model.safetensors")
            (out / "model.yaml").write_text(yaml.safe_dump(cfg.model.model_dump(mode="json"), sort_keys=False))


def load_final_model(path: Path) -> Transformer:
    mcfg = ModelConfig.model_validate(yaml.safe_load((path / "model.yaml").read_text()))
    model = Transformer(mcfg)
    missing, unexpected = model.load_state_dict(load_file(str(path / "model.safetensors")), strict=False)
    tied = model.lm_head.weight is model.embed.weight
    if unexpected or set(missing) - ({"lm_head.weight"} if tied else set()):
        raise ValueError(f"{path}: weights do not match the model (missing {missing}, unexpected {unexpected})")
    return model.eval()


@torch.no_grad()
def sample_text(path: Path, tokenizer, prompt: str, max_new_tokens: int, seed: int = 0) -> str:
    """Generate a short continuation of `prompt` with the saved model (CPU)."""
    model = load_final_model(path)
    ids = tokenizer.encode(prompt).ids or [0]
    g = torch.Generator().manual_seed(seed)
    out = model.generate(torch.tensor([ids]), max_new_tokens, generator=g)
    return tokenizer.decode(out[0].tolist())
