"""A scaling ladder: plan the runs (an isoFLOP grid, or WSD-S trunks and cooldowns), run them on Ray, resume, fit.

`pretrain scaling ladder CONFIG` reads a run config and its `ladder:` block (budgets, sizes, head_dim, out;
`--budgets/--sizes` override it). A size is `DxL` (model.d_model x model.n_layers, heads = D / head_dim) or
`DxLxH`; each run is the config at that shape with `train.flops` = its budget, so the trainer's own length
rule (pretrain/length.py) gives its steps: tokens = budget / FLOPs per token, rounded up to whole
steps, FLOPs per token from the family's count (the figure the runs log). The ladder's directory holds

    ladder.json            the plan: each run's shape, N (total and active), FLOPs per token, steps, tokens, FLOPs
    runs/<name>/           each run's directory, its resolved config.yaml written before it starts
    fit/                   fit.json and the plots of `pretrain scaling fit`, from the same code path

`ladder.mode: wsds` (or `ladder.tokens_per_param`) trains each size once on the wsd schedule and branches a
cooldown at each point (tokens per parameter x N, or budget / FLOPs per token): pretrain.scaling.wsds places
the trunk's checkpoints and the branch steps; ladder.json's `flops` holds the plan's cost against the same
points each trained from scratch.

This module plans the ladder; pretrain.scaling.books keeps its books (which runs are done, which to run),
pretrain.scaling.runner runs it, pretrain.scaling.report fits it.

A mixture-of-experts ladder: the config's model is one (`model.type: mixtral`, ..., or a `model.moe` section), or
its sizes say so with `-eE` or `-eEkK` (`128x4-e8k2`: model.moe.n_experts 8, top_k 2, the rest of model.moe from
the config or its defaults), which turns a dense config's ladder into a sparse one. FLOPs per token, hence
tokens per budget, follow the active parameters, and the fit takes them as N. All sizes of one ladder share
one sparsity (experts and top-k): the isoFLOP curves and the law compare sizes of one family only.

Interrupted, the ladder resumes: a run whose summary.json is complete (a final loss, all planned steps) is
kept; any other starts again, from its own checkpoints where it has them (the trainer resumes). A run
directory that holds another config than the plan's is refused, never mixed into the fit.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pretrain.config import Config, ConfigError, run_dir
from pretrain.scaling import ScalingError


def config_of(tree: dict) -> Config:
    """`pretrain.load.config_from_dict`, imported on first use: the loader imports the model and objective
    registries (torch, 2 s), which `pretrain scaling fit` and every command's start-up do not need."""
    from pretrain.load import config_from_dict

    return config_from_dict(tree)

SIZE = re.compile(r"^\s*(\d+)\s*x\s*(\d+)\s*(?:x\s*(\d+))?\s*(?:-\s*p\s*(\d+))?\s*(?:-\s*e\s*(\d+)\s*(?:k\s*(\d+))?)?\s*$",
                  re.I)


class LadderError(ScalingError):
    """A ladder that cannot be planned or run as asked (one line)."""


@dataclass(frozen=True)
class Size:
    label: str  # as written, normalised: 128x4, 128x4x2, 128x4-e8k2 or (a DiT) 192x6-p4
    d_model: int
    n_layers: int
    n_heads: int
    experts: int | None = None  # model.moe.n_experts a `-eE` suffix sets
    top_k: int | None = None  # model.moe.top_k a `kK` suffix sets
    patch: int | None = None  # model.patch_size a `-pP` suffix sets (a DiT's patch side)


def parse_size(text: str, head_dim: int) -> Size:
    """`DxL` (heads = D / head_dim, at least 1) or `DxLxH`, then `-pP` for a DiT's patch side P, and `-eE` or
    `-eEkK` (E experts, top-k K) for a mixture of experts."""
    m = SIZE.match(text)
    if not m:
        raise LadderError(f"size {text!r}: write it as DxL (d_model x n_layers, e.g. 128x4) or DxLxH, with "
                          "-pP for a DiT's patch side (192x6-p4), -eE or -eEkK for E experts of which K per token "
                          "(128x4-e8k2)")
    d, n_layers = int(m[1]), int(m[2])
    heads = int(m[3]) if m[3] else max(1, d // head_dim)
    if d % heads or not n_layers or not heads:
        raise LadderError(f"size {text!r}: d_model {d} does not split into {heads} heads"
                          + ("" if m[3] else f" of ladder.head_dim={head_dim}"))
    patch, experts, top_k = (int(m[i]) if m[i] else None for i in (4, 5, 6))
    if patch == 0:
        raise LadderError(f"size {text!r}: a patch side is at least 1 (-p{patch})")
    if experts == 0 or top_k == 0 or (top_k or 0) > (experts or 0):
        raise LadderError(f"size {text!r}: want 1 <= top-k <= experts (-e{experts}k{top_k})")
    label = (f"{d}x{n_layers}" + (f"x{heads}" if m[3] else "") + (f"-p{patch}" if patch else "")
             + (f"-e{experts}" if experts else "") + (f"k{top_k}" if top_k else ""))
    return Size(label, d, n_layers, heads, experts, top_k, patch)


def budget_label(budget: float) -> str:
    """3e+13 -> 3e13, 1.5e+14 -> 1.5e14: part of a run's name."""
    return f"{budget:.3g}".replace("e+", "e").replace("e0", "e")


@dataclass(frozen=True)
class Rung:
    """One planned run of the ladder."""

    name: str
    budget: float | None
    size: str
    d_model: int
    n_layers: int
    n_heads: int
    params: int
    params_non_embedding: int
    params_active: int  # what one token passes through: params for a dense model, less for a mixture of experts
    flops_per_token: float
    steps: int
    tokens: int  # what the steps train on
    flops: float  # what they cost from scratch: >= budget by less than one step
    branch_from: str | None = None  # wsd: the same size's longest run at a stable-phase checkpoint (PATH@STEP)
    own_flops: float | None = None  # what this run trains itself: a branch only its steps after the branch step
    tokens_per_param: float | None = None  # wsds: the point as asked (budget is then None: no isoFLOP curve)


@dataclass
class Ladder:
    out: Path
    rungs: list[Rung]
    configs: dict[str, Config]  # by run name
    skipped: list[dict] = field(default_factory=list)  # (budget, size) pairs under one step

    moe: dict | None = None  # the ladder's sparsity, {"n_experts", "top_k"}; None: dense
    mode: str = "grid"  # or "wsds"
    checkpoint_every: dict[str, int] = field(default_factory=dict)  # wsds: each size's trunk saves every E steps
    unit: str = "tokens"  # what a rung's `tokens` count: the objective's unit (images for a diffusion model)

    def cost(self) -> dict:
        """FLOPs the plan trains (branches only after their branch step) against the same points each trained
        from scratch (the full grid), and their ratio."""
        own = sum(r.flops if r.own_flops is None else r.own_flops for r in self.rungs)
        grid = sum(r.flops for r in self.rungs)
        return {"plan": own, "full_grid": grid, "ratio": own / grid if grid else None}

    def plan_json(self) -> dict:
        return {"out": str(self.out), "mode": self.mode, "unit": self.unit,
                "budgets": sorted({r.budget for r in self.rungs if r.budget is not None}),
                "tokens_per_param": sorted({r.tokens_per_param for r in self.rungs if r.tokens_per_param}),
                "sizes": list(dict.fromkeys(r.size for r in self.rungs)), "moe": self.moe, "flops": self.cost(),
                "checkpoint_every": self.checkpoint_every,
                "runs": [asdict(r) for r in self.rungs], "skipped": self.skipped}

    def rdir(self, rung: Rung) -> Path:
        return run_dir(self.configs[rung.name])


# ------------------------------------------------------------------------------------------ planning


def plan_ladder(cfg: Config, *, budgets: list[float] | None = None, sizes: list[str] | None = None,
                head_dim: int | None = None, out: Path | None = None, tokens_per_param: list[float] | None = None,
                mode: str | None = None) -> Ladder:
    """The runs of the ladder `cfg` (its `ladder:` block, or the arguments) describes; reads the data's
    manifests, builds nothing but meta-device models. `mode`: grid (every size at every budget) or wsds (one
    trunk per size, a cooldown per point; default when tokens_per_param is given)."""
    block = cfg.ladder
    if tokens_per_param and budgets:
        raise LadderError("give budgets or tokens per parameter, not both")
    if budgets is None and tokens_per_param is None and block:
        budgets, tokens_per_param = block.budgets, block.tokens_per_param
    sizes = sizes or (block.sizes if block else None)
    mode = mode or (block.mode if block else None) or ("wsds" if tokens_per_param else "grid")
    if mode not in ("grid", "wsds"):
        raise LadderError(f"ladder mode {mode!r}: grid or wsds")
    if tokens_per_param and mode != "wsds":
        raise LadderError("tokens per parameter need the wsds mode (a grid's runs are set by FLOP budgets)")
    if not (budgets or tokens_per_param) or not sizes:
        raise LadderError("a ladder needs budgets and sizes: --budgets 1e13,3e13 --sizes 64x2,128x4, or a ladder: block")
    for what, values in (("--budgets must be positive FLOP counts", budgets),
                         ("--tokens-per-param must be positive", tokens_per_param)):
        if values and any(not (v > 0 and math.isfinite(v)) for v in values):
            raise LadderError(f"{what} (got {values})")
    if mode == "wsds" and cfg.schedule.type != "wsd":
        raise LadderError(f"a WSD-S ladder trains on schedule.type=wsd (the config has {cfg.schedule.type}): "
                          "set schedule.type=wsd")
    head_dim = head_dim or (block.head_dim if block else 64)
    out = Path(out or (block.out if block and block.out else run_dir(cfg))).expanduser().resolve()
    per_size, moe, unit = probe_sizes(cfg, [parse_size(t, head_dim) for t in sizes], out, (budgets or [1e12])[0])
    if mode == "wsds":
        ladder = _plan_wsds(cfg, per_size, out, moe, budgets=budgets, tokens_per_param=tokens_per_param)
    else:
        ladder = _plan_grid(cfg, per_size, out, moe, budgets)
    ladder.unit = unit
    return ladder


def probe_sizes(cfg: Config, shapes: list[Size], out: Path, budget: float) -> tuple[list, dict | None, str]:
    """Per size (shape, config tree, parameter counts, FLOPs per unit, units per step), the ladder's sparsity,
    and its unit (the objective's: tokens, or images); checks each shape's config, data and objective."""
    from pretrain.length import flops_per_unit, parameter_counts
    from pretrain.objectives.preflight import preflight

    shapes = list({s.label: s for s in shapes}.values())
    base = cfg.model_dump(mode="json")
    base["ladder"] = None
    base["run"]["dir"] = str(out / "runs")
    for key in ("steps", "tokens", "flops"):
        base["train"][key] = None
    per_size = []
    sparsity = {}  # size label -> its model.moe's experts and top-k (None: dense)
    for shape in shapes:
        tree = json.loads(json.dumps(base))
        tree["model"].update(d_model=shape.d_model, n_layers=shape.n_layers, n_heads=shape.n_heads)
        if shape.patch:
            if "patch_size" not in tree["model"]:
                raise LadderError(f"size {shape.label}: model.type={tree['model']['type']} has no patch size "
                                  "(-pP is for a DiT)")
            tree["model"]["patch_size"] = shape.patch
        if shape.experts:  # over the config's model.moe (a preset's routing stays), or a new one
            routing = dict(tree["model"].get("moe") or {}, n_experts=shape.experts)
            tree["model"]["moe"] = routing if shape.top_k is None else dict(routing, top_k=shape.top_k)
        tree["train"]["flops"] = float(budget)
        try:
            probe = config_of(tree)
        except ConfigError as e:
            raise LadderError(f"size {shape.label}: {e}") from None
        objective = preflight(probe)  # the data, and that the objective accepts this shape
        counts = parameter_counts(probe)
        m = getattr(probe.model, "moe", None)
        sparsity[shape.label] = None if m is None else {"n_experts": m.n_experts, "top_k": m.top_k}
        per_size.append((shape, tree, counts, flops_per_unit(probe, objective, counts),
                         probe.train.global_batch_size * objective.units_per_sample()))
    unit = str(objective.unit)
    return per_size, _one_sparsity(sparsity), unit  # before any run is named: a mixed ladder is refused whole


def make_rung(name: str, budget: float | None, shape: Size, counts: dict, fpt: float, steps: int, per_step: int,
          **extra) -> Rung:
    return Rung(name, budget, shape.label, shape.d_model, shape.n_layers, shape.n_heads, int(counts["params"]),
                int(counts["params_non_embedding"]), int(counts.get("params_active", counts["params"])), fpt,
                steps, steps * per_step, steps * per_step * fpt, **extra)


def _plan_grid(cfg: Config, per_size: list, out: Path, moe: dict | None, budgets: list[float]) -> Ladder:
    from pretrain.launch.local import resolve_paths
    from pretrain.length import steps_for

    rungs, configs, skipped = [], {}, []
    for budget in sorted(set(float(b) for b in budgets)):
        smallest = min(per_size, key=lambda p: p[3] * p[4])
        if budget < smallest[3] * smallest[4]:
            raise LadderError(
                f"budget {budget:.3g} FLOPs is less than one step of the smallest model ({smallest[0].label}: "
                f"{smallest[3] * smallest[4]:.3g} FLOPs per step of {smallest[4]:,} tokens); raise it or lower "
                "train.global_batch_size")
        for shape, tree, counts, fpt, per_step in per_size:
            if budget < fpt * per_step:
                skipped.append({"budget": budget, "size": shape.label, "reason": "less than one step"})
                continue
            name = f"{cfg.run.name}-{budget_label(budget)}-{shape.label}"
            run_tree = json.loads(json.dumps(tree))
            run_tree["run"]["name"] = name
            run_tree["train"]["flops"] = budget
            configs[name] = resolve_paths(config_of(run_tree))
            steps = steps_for(units_per_step=per_step, flops=budget, flops_per_unit=fpt)
            rungs.append(make_rung(name, budget, shape, counts, fpt, steps, per_step))
    if cfg.schedule.type == "wsd" and cfg.checkpoint.every:
        rungs = _branches(rungs, configs, cfg.checkpoint.every, cfg.schedule.decay_fraction)
    return Ladder(out, rungs, configs, skipped, moe)


def _plan_wsds(cfg: Config, per_size: list, out: Path, moe: dict | None, *, budgets: list[float] | None,
               tokens_per_param: list[float] | None) -> Ladder:
    """Per size, its points (tokens per parameter x N active, or budget / FLOPs per token) in whole steps; the
    longest trains from scratch (the trunk, checkpointing every E steps, keeping them all), each other branches
    from the trunk's checkpoint at its cooldown start (pretrain.scaling.wsds)."""
    from pretrain.launch.local import resolve_paths
    from pretrain.length import steps_for
    from pretrain.scaling.wsds import plan_size

    rungs, configs, skipped, every = [], {}, [], {}
    for shape, tree, counts, fpt, per_step in per_size:
        n = int(counts.get("params_active", counts["params"]))
        asked = ([(f"tpp{t:g}", t, None, steps_for(units_per_step=per_step, tokens=t * n))
                  for t in sorted(set(tokens_per_param))] if tokens_per_param else
                 [(budget_label(b), None, b, steps_for(units_per_step=per_step, flops=b, flops_per_unit=fpt))
                  for b in sorted(set(float(b) for b in budgets)) if b >= fpt * per_step])
        skipped += [{"budget": b, "size": shape.label, "reason": "less than one step"}
                    for b in (budgets or []) if b < fpt * per_step]
        if not asked:
            continue
        every[shape.label], points = plan_size([(a[0], a[3]) for a in asked], fraction=cfg.schedule.decay_fraction,
                                               warmup=cfg.schedule.warmup_steps, size=shape.label)
        kept = {p.label for p in points}
        skipped += [{"size": shape.label, "point": a[0], "reason": "the same steps as a shorter point"}
                    for a in asked if a[0] not in kept]
        trunk = next(p for p in points if p.trunk)
        by_label = {a[0]: a for a in asked}
        for p in sorted(points, key=lambda p: p.steps):
            label, tpp, budget, _ = by_label[p.label]
            name = (f"{cfg.run.name}-{shape.label}-{label}" if tpp else f"{cfg.run.name}-{label}-{shape.label}")
            run_tree = json.loads(json.dumps(tree))
            run_tree["run"]["name"] = name
            run_tree["train"].update(flops=None, steps=p.steps)
            if p.trunk:  # a checkpoint at every branch step, all kept until the branches have read them
                run_tree["checkpoint"].update(every=every[shape.label], keep=None, keep_every=None)
            else:
                trunk_name = (f"{cfg.run.name}-{shape.label}-{trunk.label}" if tpp
                              else f"{cfg.run.name}-{trunk.label}-{shape.label}")
                run_tree["checkpoint"]["branch_from"] = f"{_trunk_dir(cfg, out, trunk_name)}@{p.start}"
            configs[name] = resolve_paths(config_of(run_tree))
            own = p.steps if p.trunk else p.steps - p.start
            rungs.append(make_rung(name, budget, shape, counts, fpt, p.steps, per_step,
                               branch_from=run_tree["checkpoint"]["branch_from"],
                               own_flops=own * per_step * fpt, tokens_per_param=tpp))
    if not rungs:
        raise LadderError("no size gets one step at any budget: raise the budgets or lower train.global_batch_size")
    return Ladder(out, rungs, configs, skipped, moe, mode="wsds", checkpoint_every=every)


def _trunk_dir(cfg: Config, out: Path, name: str) -> str:
    """Where a trunk's checkpoints are: <cluster.storage>/<name> when set, else its run directory."""
    return f"{cfg.cluster.storage.rstrip('/')}/{name}" if cfg.cluster.storage else str(out / "runs" / name)


def _one_sparsity(by_size: dict[str, dict | None]) -> dict | None:
    """The ladder's sparsity ({n_experts, top_k}; None: dense). Sizes that differ in it are refused: at one
    budget, more experts at the same active size lower the loss, which no law in N and D alone describes."""
    def say(s: dict | None) -> str:
        return "dense" if s is None else f"{s['n_experts']} experts, top-{s['top_k']}"

    (first, want), *rest = by_size.items()
    for label, got in rest:
        if got != want:
            raise LadderError(f"sizes {first} ({say(want)}) and {label} ({say(got)}) differ in sparsity: a ladder "
                              "fits one family; plan one ladder per experts and top-k")
    return want


def _branches(rungs: list[Rung], configs: dict[str, Config], every: int, fraction: float) -> list[Rung]:
    """Under wsd, a size's shorter runs branch from its longest run (the trunk): the trunk's checkpoint at the
    last multiple of checkpoint.every before the shorter run's cooldown has seen exactly the steps (rate and
    data) an independent run would have, so only the cooldown is trained again. Saves (1 - decay_fraction) of
    every shorter run, less up to ckpt_every steps each."""
    import dataclasses

    from pretrain.train.schedule import wsd_decay_steps

    trunks = {}
    for r in rungs:
        if r.size not in trunks or r.steps > trunks[r.size].steps:
            trunks[r.size] = r
    out = []
    for r in rungs:
        trunk = trunks[r.size]
        k = (r.steps - wsd_decay_steps(r.steps, fraction)) // every * every
        if r is trunk or k <= 0:
            out.append(r)
            continue
        t_cfg = configs[trunk.name]
        where = (f"{t_cfg.cluster.storage.rstrip('/')}/{trunk.name}" if t_cfg.cluster.storage else str(run_dir(t_cfg)))
        spec = f"{where}@{k}"
        tree = configs[r.name].model_dump(mode="json")
        tree["checkpoint"]["branch_from"] = spec
        configs[r.name] = config_of(tree)
        out.append(dataclasses.replace(r, branch_from=spec, own_flops=r.flops * (r.steps - k) / r.steps))
    return out
