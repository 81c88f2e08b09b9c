"""`init.path`: where a run's first weights come from, and the model config they imply.

A source is a Hugging Face model directory, a `.gguf` file (both read by `pretrain.hub`), or another
run's directory (its `final/`). The model section of the run is the checkpoint's: `resolve` replaces it on
the driver before any worker starts, so every worker, the dumped config and a resume all see the same
architecture. A few keys may still be set in the run's config (`OVERRIDABLE`); setting an architecture key
is refused in one line, because the weights fix it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from pretrain.config import Config, ConfigError, Section, typed_section

# Keys of `model` a run may set over the checkpoint's: they change how it computes, not what the weights mean.
OVERRIDABLE = {"kernels", "max_seq_len"}


@dataclass
class Source:
    """Released weights, in our parameter names, read lazily."""

    path: str
    model_cfg: Section
    # (our name, fp32 CPU tensor or an unread LazyTensor), one at a time, for `pretrain.hub.load_weights`
    iter_tensors: Callable[[], Iterator[tuple[str, Any]]]
    tokenizer_dir: Path | None = None
    eos_token_ids: tuple[int, ...] = ()
    released: Any = None  # the pretrain.hub object, when the source is a released checkpoint


def _run_source(path: Path) -> Source:
    final = path / "final"
    model_cfg = typed_section("model", yaml.safe_load((final / "model.yaml").read_text()))

    from pretrain.hub.run_weights import final_tensors

    return Source(str(path), model_cfg, lambda: final_tensors(final))


def open_source(path: str | Path, max_seq_len: int | None = None) -> Source:
    """The weights at `path`; a one-line error (ConfigError) when there are none. `max_seq_len` sets a rotary
    model's context (a sliding-window checkpoint is accepted up to its window)."""
    p = Path(path).expanduser()
    if (p / "final" / "model.yaml").is_file():
        return _run_source(p)
    if p.is_dir() and (p / "checkpoints").is_dir() and not (p / "final").is_dir():
        raise ConfigError(f"init.path: {p} is a run without final weights (it has not finished)")
    if not p.exists():
        raise ConfigError(f"init.path: {p} does not exist")
    from pretrain.hub import CheckpointError, read_checkpoint

    try:
        r = read_checkpoint(p, max_seq_len=max_seq_len)
    except CheckpointError as e:
        raise ConfigError(f"init.path: {e}") from None
    return Source(str(p), r.model_cfg, r.iter_lazy, tokenizer_dir=r.tokenizer_dir,
                  eos_token_ids=tuple(r.eos_token_ids or ()), released=r)


def resolve(cfg: Config) -> Config:
    """The run's config with its model section taken from `init.path` (unchanged without one)."""
    if not cfg.init.path:
        return cfg
    mine = cfg.model
    given = {k for k in mine.model_fields_set if k != "type"}
    src = open_source(cfg.init.path, mine.max_seq_len if "max_seq_len" in given else None)
    fixed = sorted(k for k in given if k not in OVERRIDABLE and getattr(mine, k) != getattr(src.model_cfg, k, None))
    if fixed:
        raise ConfigError(f"model.{fixed[0]}: set by the checkpoint of init.path ({src.path}); remove it from the "
                          f"config (only {', '.join(sorted(OVERRIDABLE))} may be set)")
    tree = src.model_cfg.model_dump(mode="json")  # max_seq_len already applied by the checkpoint's reader
    tree.update({k: getattr(mine, k) for k in given if k in OVERRIDABLE - {"max_seq_len"}})
    out = cfg.model_copy()
    object.__setattr__(out, "model", typed_section("model", tree))
    return out
