"""`pretrain export`: a finished run's weights in the formats other tools load.

- `hf`: a Hugging Face model directory (`pretrain.hub.hf_write`: config.json, generation_config.json,
  safetensors shards, the tokenizer with its chat template), streamed tensor by tensor from `final/`. A LoRA
  run is exported with its adapters folded into the base.
- `peft`: a LoRA run's adapters in PEFT's layout, with `base_model_name_or_path` naming the checkpoint the
  run started from; `--merge` writes the merged model as `hf` does instead.

The output directory must not exist; it appears whole or not at all.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import yaml


def _tensors(final: Path, weights: str):
    from pretrain.hub.run_weights import final_tensors

    yield from final_tensors(final, weights)


def _merged(cfg, final: Path, weights: str):
    """(name, tensor) of the base with every adapter folded in (W + B A alpha / r), adapters dropped."""
    from pretrain.hub import load_weights
    from pretrain.models import get_family
    from pretrain.models.lora import apply_lora, merged_state

    model = get_family(cfg.model.type).build(cfg.model)
    apply_lora(model, cfg.lora)
    load_weights(model, _tensors(final, weights), str(final))
    yield from merged_state(model)


def _tokenizer_dir(cfg, scratch: Path) -> tuple[Path | None, tuple[int, ...]]:
    """The tokenizer to ship beside the weights: the released checkpoint's, or the one the data was written with."""
    if cfg.init.path:
        from pretrain.hub.sources import open_source

        src = open_source(cfg.init.path)
        return src.tokenizer_dir, src.eos_token_ids
    from pretrain.trained.loaded import _data_tokenizer

    tok = _data_tokenizer(cfg)
    tok.save_pretrained(str(scratch))
    return scratch, ((tok.eos_token_id,) if tok.eos_token_id is not None else ())


def export_run(run: Path, out: Path, *, format: str = "hf", merge: bool = False, weights: str = "model") -> str:
    from pretrain.hub import write_hf
    from pretrain.load import config_from_dict

    final = run / "final"
    if not (final / "config.yaml").is_file():
        raise FileNotFoundError(f"{run}: not a finished run (no final/config.yaml)")
    if out.exists():
        raise FileExistsError(f"{out} exists; export writes a new directory")
    cfg = config_from_dict(yaml.safe_load((final / "config.yaml").read_text()))
    if format == "peft" and cfg.lora is None:
        raise ValueError(f"{run}: not a LoRA run (no lora section); export it with --format hf")
    if format == "peft" and not merge:
        from pretrain.hub.peft import write_peft

        adapters = {k: v for k, v in _tensors(final, weights) if ".lora_" in k}
        write_peft(out, cfg.model, cfg.lora, adapters, base_model_name_or_path=cfg.init.path or str(run))
        return f"PEFT LoRA adapter, {len(adapters)} tensors, base {cfg.init.path}"
    tensors = _merged(cfg, final, weights) if cfg.lora is not None else _tensors(final, weights)
    with tempfile.TemporaryDirectory() as scratch:
        tok_dir, eos = _tokenizer_dir(cfg, Path(scratch))
        write_hf(out, cfg.model, tensors, tokenizer_dir=tok_dir, eos_token_ids=eos)
    return "Hugging Face model" + (" (LoRA merged)" if cfg.lora is not None else "")
