"""The points a scaling fit reads: finished runs' summary.json files, or a CSV table (a published ladder),
checked before anything is fitted. Every problem is one line (a `ScalingError`).

What a run's `summary.json` must hold for a fit (the trainer writes it, pretrain/train/loop.py):

    params                N, total parameters (`params_non_embedding` instead with --params non-embedding)
    params_active         the parameters one token passes through (a mixture of experts' k of E experts, pretrain/
                          models/transformer.py); N with --params active, and by default when any run has fewer
                          active than total parameters. A summary without it (a dense run from before mixtures
                          of experts) counts all its parameters as active.
    tokens                D, training tokens; a run whose `unit` is another (a diffusion run's `images`) has D
                          under that key instead, and every run of a fit must count D in the same unit
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
one is derived with C = 6 N D, N the parameters fitted); optional `params_active` (default: `params`),
`params_non_embedding` (needed with --params non-embedding), `budget` and `name`; other columns are ignored.

Which count is N (`--params`): `total`, `non-embedding`, `active`, or `auto` (the default): active when some
row has fewer active than total parameters, else total. A mixture of experts' FLOPs per token follow its
active parameters (C ~ 6 N_active D), so a fit on total parameters would misplace its compute-optimal frontier.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

from pretrain.data.identity import identity  # noqa: F401  (pretrain.scaling.table.identity)
from pretrain.scaling import ScalingError

METRICS = {"loss": ("final_val_loss", "final_loss"), "bpb": ("final_val_bpb",)}  # preference order
PARAMS = {"total": "params", "non-embedding": "params_non_embedding", "active": "params_active"}
AUTO = "auto"  # active parameters where some row has fewer than total (a mixture of experts), else total
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
    params_kind: str = "total"  # which count `params` holds: a key of PARAMS, never "auto"
    counts: dict[str, np.ndarray] = field(default_factory=dict)  # every count known, by its summary key
    unit: str = "tokens"  # what D counts: tokens, or images for a diffusion model (summary.json's `unit`)

    def __len__(self) -> int:
        return len(self.names)

    def rows(self) -> list[dict]:
        """One dict per point for fit.json: name, the counts under their summary keys (params is the total,
        params_active beside it), n (the N fitted, as `params_kind` says), tokens, flops, loss, budget."""
        return [{"name": name, **{k: float(v[i]) for k, v in self.counts.items()}, "n": float(self.params[i]),
                 "tokens": float(self.tokens[i]), "flops": float(self.flops[i]), "loss": float(self.loss[i]),
                 **({} if self.budget is None else {"budget": float(self.budget[i])})}
                for i, name in enumerate(self.names)]


def summary_unit(summary: dict) -> str:
    """What a run's summary.json counts D in: its `unit` (images for a diffusion model), tokens when unsaid."""
    return str(summary.get("unit") or "tokens")


def positive(where: str, key: str, value: object) -> float:
    try:
        x = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ScalingError(f"{where}: {key} must be a positive number (got {value!r})") from None
    if not (math.isfinite(x) and x > 0):
        raise ScalingError(f"{where}: {key} must be a positive number (got {value!r})")
    return x


def _check_params(params: str) -> None:
    if params != AUTO and params not in PARAMS:
        raise ScalingError(f"--params must be one of {', '.join([AUTO, *PARAMS])} (got {params!r})")


def _resolve(params: str, counts: dict[str, list[float]]) -> tuple[str, np.ndarray]:
    """(the kind of N, N): `auto` is active where some row has fewer active than total parameters."""
    if params == AUTO:
        params = "active" if any(a < t for a, t in zip(counts["params_active"], counts["params"], strict=True)) \
            else "total"
    return params, np.array(counts[PARAMS[params]])


def _active(where: str, total: float, value: object) -> float:
    """A row's active parameters: `value`, or all of them when not given (a dense model)."""
    if value is None or value == "":
        return total
    active = positive(where, "params_active", value)
    if active > total:
        raise ScalingError(f"{where}: params_active ({active:g}) exceeds params ({total:g})")
    return active


# ------------------------------------------------------------------------------------------ tables


def read_table(path: Path, *, params: str = AUTO) -> Points:
    """A CSV of params, tokens (or flops) and loss (and params_active for a mixture of experts)."""
    _check_params(params)
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
    if params in ("non-embedding", "active") and PARAMS[params] not in columns:
        missing.append(f"{PARAMS[params]} (--params {params})")
    if missing:
        plural = "s" * (len(missing) > 1)
        raise ScalingError(f"{path}: the table lacks the column{plural} {', '.join(missing)} "
                           f"(it has: {', '.join(sorted(columns)) or 'none'})")
    counts: dict[str, list[float]] = {k: [] for k in PARAMS.values() if k in columns or k == "params_active"}
    given, loss, budget, names = [], [], [], []  # given: (tokens, flops), either may be None
    for i, r in enumerate(rows, start=2):  # row 1 is the header
        where = f"{path} row {i}"
        counts["params"].append(positive(where, "params", r["params"]))
        counts["params_active"].append(_active(where, counts["params"][-1], r.get("params_active")))
        if "params_non_embedding" in counts:
            counts["params_non_embedding"].append(positive(where, "params_non_embedding", r["params_non_embedding"]))
        loss.append(positive(where, "loss", r["loss"]))
        tok = positive(where, "tokens", r["tokens"]) if r.get("tokens") else None
        fl = positive(where, "flops", r["flops"]) if r.get("flops") else None
        if tok is None and fl is None:
            raise ScalingError(f"{where}: needs tokens or flops")
        given.append((tok, fl))
        budget.append(positive(where, "budget", r["budget"]) if r.get("budget") else None)
        names.append(r.get("name") or f"row {i}")
    kind, n = _resolve(params, counts)
    d = np.array([tok if tok is not None else fl / (6.0 * ni) for (tok, fl), ni in zip(given, n, strict=True)])
    c = np.array([fl if fl is not None else 6.0 * ni * di for (_, fl), ni, di in zip(given, n, d, strict=True)])
    return Points(n, d, c, np.array(loss), np.array(budget) if all(b is not None for b in budget) else None,
                  names, "loss", {"data": None, "tokenizer": None}, kind,
                  {k: np.array(v) for k, v in counts.items()})


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


def read_runs(paths: list[Path], *, metric: str = "loss", params: str = AUTO,
              force: bool = False) -> Points:
    """The runs under `paths`, one point each (see the module docstring for what a summary must hold)."""
    if metric not in METRICS:
        raise ScalingError(f"--metric must be one of {', '.join(METRICS)} (got {metric!r})")
    _check_params(params)
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
    units = {summary_unit(s) for s in summaries}
    if len(units) > 1:
        raise ScalingError(f"runs count their data in {' and '.join(sorted(units))}: a fit needs one unit of D "
                           "(a language model's tokens and a diffusion model's images do not compare)")
    unit = units.pop()
    need = ["params", unit] + (["params_non_embedding"] if params == "non-embedding" else [])
    counts: dict[str, list[float]] = {"params": [], "params_active": []}
    if all("params_non_embedding" in s for s in summaries):
        counts["params_non_embedding"] = []
    d, flops, loss, budget, ids = [], [], [], [], []
    for name, s in zip(names, summaries, strict=True):
        if lacking := next((k for k in need if k not in s), None):
            raise ScalingError(f"{name}: summary.json lacks {lacking}")
        counts["params"].append(positive(name, "params", s["params"]))
        counts["params_active"].append(_active(name, counts["params"][-1], s.get("params_active")))
        if "params_non_embedding" in counts:
            counts["params_non_embedding"].append(positive(name, "params_non_embedding", s["params_non_embedding"]))
        d.append(positive(name, unit, s[unit]))
        flops.append(positive(name, "flops", s["flops"]) if s.get("flops") is not None else None)
        loss.append(positive(name, key, s[key]))
        budget.append(positive(name, "budget", s["budget"]) if s.get("budget") is not None else None)
        own = {k: str(s[k]) for k in IDENTITY if s.get(k)}
        ids.append(own if len(own) == len(IDENTITY) else {**_identity_from_config(Path(name)), **own})
    identity = _check_identity(names, ids, force)
    kind, n = _resolve(params, counts)
    c = np.array([f if f is not None else 6.0 * ni * di for f, ni, di in zip(flops, n, d, strict=True)])
    return Points(n, np.array(d), c, np.array(loss), np.array(budget) if all(b is not None for b in budget) else None,
                  names, key, identity, kind, {k: np.array(v) for k, v in counts.items()}, unit=unit)
