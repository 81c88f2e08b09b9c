"""The loader: a config file (or tree) becomes a checked `Config`, with its `model` and `objective` sections
resolved against the registries.

The schema (`pretrain.config`) imports no registry; this module imports both, so their sections are
registered before anything is read. Call it on the driver; the workers receive the resolved tree
(`config_from_dict` of its dump) and never read the file again.
"""

from __future__ import annotations

from pathlib import Path

import pretrain.models  # noqa: F401  (registers the model sections: gpt2, llama, bert, dit)
import pretrain.objectives  # noqa: F401  (registers the objective sections)
from pretrain.config import Config, parse_config, read_config


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read YAML, apply `section.key=value` overrides, validate. Raises ConfigError (one line)."""
    return read_config(path, overrides)


def config_from_dict(tree: dict) -> Config:
    """A config tree (a dumped config.yaml, a worker's copy) checked into a `Config`. ConfigError (one line)."""
    return parse_config(tree)
