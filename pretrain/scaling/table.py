"""The points a scaling fit reads: finished runs' summary.json files, or a CSV table (a published ladder),
checked before anything is fitted. Every problem is one line (a `ScalingError`).

What a run's `summary.json` must hold for a fit (the trainer writes it, pretrain/train/loop.py):

    params                N, total parameters (`params_non_embedding` instead with --params non-embedding)
    tokens                D, training tokens
    flops                 C, training FLOPs (optional: 6 N D when absent)
    final_val_loss        the loss fitted (`final_loss`, the last training loss, when no run has a validation
                          loss; `final_val_bpb`, bits per byte, with --metric bpb)
    data, tokenizer,      strings naming the training data, the tokenizer and the objective (causal_lm, ...);
    objective             runs whose values differ are not fitted together unless forced. When a summary
                          lacks them they come from the run's config.yaml and its train shards' index.json
                          (corpus hash and weight per source, tokenizer name and hash, objective.type); where
                          neither says, the run matches any other.
    budget                optional: the FLOP budget a ladder planned the run for (groups the isoFLOP curves;
                          without it runs group by their FLOPs, see fit.group_budgets)

A table is a CSV file with a header: columns `params`, `loss`, and `tokens` or `flops` (or both: the missing
one is derived with C = 6 N D); optional `budget` and `name`; other columns are ignored.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from pretrain.data.identity import identity  # noqa: F401  (pretrain.scaling.table.identity)
from pretrain.scaling import ScalingError

METRICS = {"loss": ("final_val_loss", "final_loss"), "bpb": ("final_val_bpb",)}  # preference order
PARAMS = {"total": "params", "non-embedding": "params_non_embedding"}
IDENTITY = ("data", "tokenizer", "objective")


@dataclass(frozen=True)
class Points:
    """One row per run: N, D, C, L (and a declared budget when every row has one)."""

    params: np.ndarray
    tokens: np.ndarray
    flops: np.ndarray
    loss: np.ndarray
    budget: np.ndarray | None
    names: list[str]
    metric: str  # the summary key (or table column) the loss came from
    identity: dict[str, str | None]  # the runs' common data, tokenizer, objective (None: not recorded)

    def __len__(self) -> int:
        return len(self.names)

    def rows(self) -> list[dict]:
        """One dict per point (name, params, tokens, flops, loss and budget when declared), for fit.json."""
        return [{"name": name, "params": float(self.params[i]), "tokens": float(self.tokens[i]),
                 "flops": float(self.flops[i]), "loss": float(self.loss[i]),
                 **({} if self.budget is None else {"budget": float(self.budget[i])})}
                for i, name in enumerate(self.names)]


def _positive(where: str, key: str, value: object) -> float:
    try:
        x = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ScalingError(f"{where}: {key} must be a positive number (got {value!r})") from None
    if not (math.isfinite(x) and x > 0):
        raise ScalingError(f"{where}: {key} must be a positive number (got {value!r})")
    return x


# ------------------------------------------------------------------------------------------ tables


def read_table(path: Path) -> Points:
    """A CSV of params, tokens (or flops) and loss."""
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise ScalingError(f"{path}: cannot read the table ({e})") from None
    if not rows:
        raise ScalingError(f"{path}: no rows (a header: params, tokens or flops, loss; then one row per run)")
    rows = [{(k or "").strip().lower(): (v or "").strip() for k, v in r.items()} for r in rows]
    columns = set(rows[0])
    missing = [c for c in ("params", "loss") if c not in columns]
    if "tokens" not in columns and "flops" not in columns:
        missing.append("tokens (or flops)")
    if missing:
        plural = "s" * (len(missing) > 1)
        raise ScalingError(f"{path}: the table lacks the column{plural} {', '.join(missing)} "
                           f"(it has: {', '.join(sorted(columns)) or 'none'})")
    n, d, c, loss, budget, names = [], [], [], [], [], []
    for i, r in enumerate(rows, start=2):  # row 1 is the header
        where = f"{path} row {i}"
        n.append(_positive(where, "params", r["params"]))
        loss.append(_positive(where, "loss", r["loss"]))
        tok = _positive(where, "tokens", r["tokens"]) if r.get("tokens") else None
        fl = _positive(where, "flops", r["flops"]) if r.get("flops") else None
        if tok is None and fl is None:
            raise ScalingError(f"{where}: needs tokens or flops")
        d.append(tok if tok is not None else fl / (6.0 * n[-1]))
        c.append(fl if fl is not None else 6.0 * n[-1] * d[-1])
        budget.append(_positive(where, "budget", r["budget"]) if r.get("budget") else None)
        names.append(r.get("name") or f"row {i}")
    return Points(np.array(n), np.array(d), np.array(c), np.array(loss),
                  np.array(budget) if all(b is not None for b in budget) else None, names, "loss",
                  {"data": None, "tokenizer": None})


# ------------------------------------------------------------------------------------------ runs


def run_dirs(paths: list[Path]) -> list[Path]:
    """The run directories named: each path holds a summary.json, or its subdirectories do (a ladder)."""
    out: list[Path] = []
    for p in paths:
        if (p / "summary.json").is_file():
            found = [p]
        elif p.is_dir():
            found = sorted(q.parent for q in p.glob("*/summary.json"))
        else:
            raise ScalingError(f"{p}: no such run directory")
        if not found:
            raise ScalingError(f"{p}: no summary.json there or in its subdirectories (not a finished run)")
        out += [q for q in found if q.resolve() not in {r.resolve() for r in out}]
    return out


def _identity_from_config(rdir: Path) -> dict[str, str | None]:
    """The identity of a run whose summary lacks it (one written before summaries carried it): from its config."""
    try:
        cfg = yaml.safe_load((rdir / "config.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError):
        return {}
    return identity(cfg)


def _check_identity(names: list[str], ids: list[dict[str, str | None]], force: bool) -> dict[str, str | None]:
    common: dict[str, str | None] = {}
    for key in IDENTITY:
        seen: dict[str, list[str]] = {}
        for name, ident in zip(names, ids, strict=True):
            if ident.get(key) is not None:
                seen.setdefault(str(ident[key]), []).append(name)
        if len(seen) > 1 and not force:
            kinds = {"data": "datasets", "tokenizer": "tokenizers", "objective": "objectives"}[key]
            groups = "; ".join(f"{v!r}: {', '.join(r[:2])}{' ...' * (len(r) > 2)}" for v, r in seen.items())
            raise ScalingError(f"runs of mixed {kinds} ({groups}): their losses do not compare; --force fits "
                               "them together anyway")
        common[key] = next(iter(seen)) if len(seen) == 1 else (None if not seen else "mixed")
    return common


def read_runs(paths: list[Path], *, metric: str = "loss", params: str = "total",
              force: bool = False) -> Points:
    """The runs under `paths`, one point each (see the module docstring for what a summary must hold)."""
    if metric not in METRICS:
        raise ScalingError(f"--metric must be one of {', '.join(METRICS)} (got {metric!r})")
    if params not in PARAMS:
        raise ScalingError(f"--params must be one of {', '.join(PARAMS)} (got {params!r})")
    dirs = run_dirs(paths)
    summaries = []
    for rdir in dirs:
        try:
            summaries.append(json.loads((rdir / "summary.json").read_text()))
        except (OSError, ValueError) as e:
            raise ScalingError(f"{rdir / 'summary.json'}: cannot read it ({e})") from None
    names = [str(r) for r in dirs]
    # One loss key for all runs: the most preferred one that every run has.
    key = next((k for k in METRICS[metric] if all(k in s for s in summaries)), None)
    if key is None:
        lacking = next(str(r) for r, s in zip(dirs, summaries, strict=True)
                       if not any(k in s for k in METRICS[metric]))
        raise ScalingError(f"{lacking}: summary.json has no {' or '.join(METRICS[metric])} "
                           "(every run of a fit needs the same loss)")
    pkey = PARAMS[params]
    n, d, c, loss, budget, ids = [], [], [], [], [], []
    for name, s in zip(names, summaries, strict=True):
        if pkey not in s or "tokens" not in s:
            raise ScalingError(f"{name}: summary.json lacks {pkey if pkey not in s else 'tokens'}")
        n.append(_positive(name, pkey, s[pkey]))
        d.append(_positive(name, "tokens", s["tokens"]))
        c.append(_positive(name, "flops", s["flops"]) if s.get("flops") is not None else 6.0 * n[-1] * d[-1])
        loss.append(_positive(name, key, s[key]))
        budget.append(_positive(name, "budget", s["budget"]) if s.get("budget") is not None else None)
        own = {k: str(s[k]) for k in IDENTITY if s.get(k)}
        ids.append(own if len(own) == len(IDENTITY) else {**_identity_from_config(Path(name)), **own})
    identity = _check_identity(names, ids, force)
    return Points(np.array(n), np.array(d), np.array(c), np.array(loss),
                  np.array(budget) if all(b is not None for b in budget) else None, names, key, identity)
