"""A ladder's books: which planned runs are finished, which to run, and the marks a fit reads.

`prepare` writes ladder.json and the configs of the runs still to do (refusing a run directory that holds
another config: changing a ladder's config under a finished run would mix two ladders); `finished` says
whether a run's summary.json is complete; `mark` adds the planned budget and size to a finished summary.
pretrain.scaling.runner runs what `prepare` leaves to do. Planning is pretrain.scaling.ladder.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from pretrain.config import Config, ConfigError, dump_config
from pretrain.redact import redact_yaml, redacted_tree
from pretrain.scaling.ladder import Ladder, LadderError, Rung, config_of


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _config_change(rdir: Path, cfg: Config) -> str | None:
    """The first key where rdir/config.yaml differs from `cfg` ("key: old -> new"); None when equal or absent."""
    path = rdir / "config.yaml"
    if not path.is_file():
        return None
    try:
        old = _flat(redacted_tree(config_of(yaml.safe_load(path.read_text()) or {}).model_dump(mode="json")))
    except (ConfigError, yaml.YAMLError) as e:
        return f"its config.yaml does not load ({e})"
    new = _flat(redacted_tree(cfg.model_dump(mode="json")))  # both redacted: config.yaml is written so
    for key in sorted(set(old) | set(new)):
        if old.get(key) != new.get(key):
            return f"{key}: {old.get(key)!r} -> {new.get(key)!r}"
    return None


def finished(rdir: Path, rung: Rung) -> bool:
    """Whether the run is complete: its summary.json has a final loss and all the planned steps."""
    try:
        summary = json.loads((rdir / "summary.json").read_text())
    except (OSError, ValueError):
        return False
    return summary.get("final_loss") is not None and int(summary.get("steps", 0)) >= rung.steps


def prepare(ladder: Ladder) -> tuple[list[Rung], list[Rung]]:
    """Write ladder.json and the configs of the runs still to do; (done, todo). Refuses a run directory that
    holds another config (changing the ladder's config under a finished run would mix two ladders)."""
    from pretrain.atomic import atomic_write

    done, todo = [], []
    for rung in ladder.rungs:
        rdir, cfg = ladder.rdir(rung), ladder.configs[rung.name]
        change = _config_change(rdir, cfg)
        if change is not None:
            raise LadderError(f"{rdir} holds a run of another config ({change}): delete it or give another --out")
        (done if finished(rdir, rung) else todo).append(rung)
    ladder.out.mkdir(parents=True, exist_ok=True)
    atomic_write(ladder.out / "ladder.json", json.dumps(ladder.plan_json(), indent=2) + "\n")
    for rung in todo:
        rdir = ladder.rdir(rung)
        rdir.mkdir(parents=True, exist_ok=True)
        atomic_write(rdir / "config.yaml", redact_yaml(dump_config(ladder.configs[rung.name])))
    return done, todo


def mark(rdir: Path, rung: Rung) -> None:
    """Add the planned budget and size to a finished run's summary.json, so `pretrain scaling fit` on the
    runs groups them by the budget they were planned for (their FLOPs overshoot it by under one step)."""
    from pretrain.atomic import atomic_write

    path = rdir / "summary.json"
    summary = json.loads(path.read_text())
    if summary.get("budget") != rung.budget or summary.get("ladder_size") != rung.size:
        summary.update(budget=rung.budget, ladder_size=rung.size)
        atomic_write(path, json.dumps(summary, indent=2) + "\n")
