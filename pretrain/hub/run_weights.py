"""A finished run's weights read back: `final/` holds the consolidated weights in safetensors (one file,
or shards with an index) beside `model.yaml`, written by `pretrain.train.final_weights`. Reading them
needs no DeepSpeed and no ranks; `load_final_model` rebuilds any registered family's model on CPU."""

from __future__ import annotations

from pathlib import Path

import yaml

from pretrain.config import typed_section


def unique_tensors(module) -> dict:
    """Parameters (each shared one once, under its first name) and persistent buffers."""
    out = {k: p for k, p in module.named_parameters()}  # named_parameters skips repeats of a tensor
    names = set(module.state_dict())
    out.update({k: b for k, b in module.named_buffers() if k in names})
    return out


def final_tensors(path: Path, weights: str = "model"):
    """(name, fp32 tensor) of a run's `final/` weights, one at a time: `model` (one file, or shards with an
    index for a large model) or `ema`. FileNotFoundError naming what is missing."""
    from pretrain.hub.safetensors_io import INDEX, iter_file_tensors, read_headers, weight_files

    if weights == "model" and (path / INDEX).is_file():
        yield from iter_file_tensors(read_headers(weight_files(path)))
        return
    f = path / f"{weights}.safetensors"
    if not f.is_file():
        what = "EMA weights (train with ema.decay set)" if weights == "ema" else "final weights"
        raise FileNotFoundError(f"{path.parent}: the run has no {what}: {f} is missing")
    yield from iter_file_tensors(read_headers([f]))


def load_final_model(path: Path, weights: str = "model"):
    """The model of a run's `final/` directory, on CPU, in eval mode; `weights="ema"` loads the EMA."""
    from pretrain.models import get_family

    mcfg = typed_section("model", yaml.safe_load((path / "model.yaml").read_text()))
    model = get_family(mcfg.type).build(mcfg)
    state = dict(final_tensors(path, weights))
    expected = set(unique_tensors(model))
    if set(state) != expected:
        raise ValueError(f"{path}: weights do not match the model (missing {sorted(expected - set(state))}, "
                         f"unexpected {sorted(set(state) - expected)})")
    model.load_state_dict(state, strict=False)  # tied aliases are filled by their shared tensor
    return model.eval()
