"""From a fit to a run: at a compute budget, N_opt and D_opt by the fit's law (approach 3, with intervals from
its bootstrap laws), a model shape of the base config's family near N_opt, the learning rate and batch size by
the hyperparameter laws (hyper.json beside fit.json), the run length, and the config that trains it.
`pretrain scaling recommend` (pretrain/cli/scaling_decide.py) adds `pretrain plan`'s memory and time.

The shape rule (`SHAPE_RULE`): keep the base config's aspect ratio d_model / n_layers and its head size, and
change only depth. Kaplan et al. 2020 (https://arxiv.org/abs/2001.08361, section 3.1 and figure 5) find the
loss within a few percent over aspect ratios of 20 to 200 at fixed N, so the family's own ratio (Llama 2 7B,
13B: 128) is as good as any; the head size stays what the family's kernels and published checkpoints use.
d_model is a multiple of the head size (and of the heads per key/value group under GQA); an explicit d_ff
keeps its ratio to d_model, rounded to a multiple of 256 as SwiGLU models round it. The depth chosen is the
one whose N (the count the fit used: total, non-embedding or active) is nearest N_opt in log.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from pretrain.config import Config, ConfigError
from pretrain.scaling import ScalingError
from pretrain.scaling.fit import ScalingFit
from pretrain.scaling.hyper import law_at, load_hyper
from pretrain.scaling.saved import budget_range, fit_from_json, predict_point, read_fit
from pretrain.scaling.table import PARAMS

SHAPE_RULE = ("depth from N_opt at the base config's aspect ratio d_model/n_layers and head size "
              "(Kaplan et al. 2020, section 3.1: loss is flat over aspect ratios 20-200)")
EXTRAPOLATION = 100.0  # warn beyond two decades past the ladder's largest budget
MAX_LAYERS = 512
FAR = 1.5  # warn when the shape's N is further than this factor from N_opt


@dataclass
class Recommendation:
    flops: float
    n_opt: float
    d_opt: float
    ci95: dict  # n_opt, d_opt, tokens_per_param, loss: [low, high]
    loss: float  # the frontier's loss at `flops`
    shape: dict  # d_model, n_layers, n_heads, d_ff, n_kv_heads, params (the fit's count), count_kind
    tokens: float  # the run length: flops / (k N of the shape)
    loss_at_shape: dict  # the law at (N of the shape, tokens), with its interval
    lr: float
    batch_tokens: float
    global_batch_size: int
    hyper: dict  # where lr and batch came from, with intervals
    config: Config
    warnings: list[str] = field(default_factory=list)


def _shape_tree(base: dict, layers: int, aspect: float, head: int, group: int, ff_ratio: float | None) -> dict:
    """The base model tree at `layers` blocks by the shape rule."""
    step = head * group  # d_model = heads x head size, heads a multiple of the GQA group
    d = step * max(1, round(aspect * layers / step))
    m = dict(base, n_layers=layers, d_model=d, n_heads=d // head)
    if base.get("n_kv_heads"):
        m["n_kv_heads"] = max(1, d // head // group)
    if ff_ratio is not None:
        m["d_ff"] = 256 * max(1, math.ceil(ff_ratio * d / 256))
    return m


def shape_for(cfg: Config, n_target: float, kind: str) -> tuple[dict, int]:
    """(model tree, its N of `kind`) nearest N_opt in log by the shape rule (module docstring)."""
    from pretrain.length import parameter_counts
    from pretrain.load import config_from_dict

    m = cfg.model
    if not all(hasattr(m, k) for k in ("d_model", "n_layers", "n_heads")):
        raise ScalingError(f"model.type={m.type}: recommend shapes transformer families (d_model, n_layers, "
                           "n_heads); this one has no such shape")
    base = m.model_dump(mode="json")
    head = getattr(m, "head_dim", None) or m.d_model // m.n_heads
    group = m.n_heads // (getattr(m, "n_kv_heads", None) or m.n_heads)
    ff_ratio = m.d_ff / m.d_model if getattr(m, "d_ff", None) else None
    aspect = m.d_model / m.n_layers
    tree = cfg.model_dump(mode="json")
    key = PARAMS.get(kind, "params")
    memo: dict[int, tuple[dict, int]] = {}

    def count(layers: int) -> tuple[dict, int]:
        if layers not in memo:
            model = _shape_tree(base, layers, aspect, head, group, ff_ratio)
            try:
                counts = parameter_counts(config_from_dict({**tree, "model": model}))
            except ConfigError as e:
                raise ScalingError(f"shape of {layers} layers: {e}") from None
            memo[layers] = (model, int(counts.get(key, counts["params"])))
        return memo[layers]

    # N grows with depth: double from the base depth past N_opt (models on the meta device, but a 512-layer
    # one still takes seconds to build), then bisect for the first depth at or above it.
    lo, hi = 1, m.n_layers
    while count(hi)[1] < n_target:
        if hi >= MAX_LAYERS:
            raise ScalingError(f"N_opt {n_target:.3g} is beyond {MAX_LAYERS} layers at this aspect ratio")
        lo, hi = hi + 1, min(2 * hi, MAX_LAYERS)
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (mid + 1, hi) if count(mid)[1] < n_target else (lo, mid)
    near = [count(x) for x in {max(1, lo - 1), lo}]
    return min(near, key=lambda p: abs(math.log(p[1] / n_target)))


def _batch_sequences(batch_tokens: float, seq_len: int, multiple: int) -> int:
    """Sequences per step nearest `batch_tokens`, a multiple of micro-batch x GPUs so the plan accepts it."""
    return max(multiple, multiple * round(batch_tokens / seq_len / multiple))


def recommend(fit_dir: Path, cfg: Config, flops: float, *, gpus: int | None = None,
              fit: ScalingFit | None = None) -> Recommendation:
    """The recommendation at `flops` for the family of `cfg` (module docstring)."""
    from pretrain.load import config_from_dict

    if not (flops > 0 and math.isfinite(flops)):
        raise ScalingError(f"the budget must be a positive number of FLOPs (got {flops:g})")
    doc = read_fit(fit_dir)
    fit = fit or fit_from_json(doc)
    warnings = []
    low, top = budget_range(doc)
    if flops > EXTRAPOLATION * top:
        warnings.append(f"{flops:.3g} FLOPs is {math.log10(flops / top):.1f} decades beyond the ladder's largest "
                        f"budget ({top:.3g}): the law is extrapolated far past its points")
    elif flops < low / EXTRAPOLATION:
        warnings.append(f"{flops:.3g} FLOPs is {math.log10(low / flops):.1f} decades below the ladder's smallest "
                        f"budget ({low:.3g}): the law is extrapolated far below its points")
    pred = fit.predict3(flops)
    kind = doc["source"].get("params", "total")
    model, n_shape = shape_for(cfg, pred["n_opt"], kind)
    tokens = flops / (fit.k * n_shape)
    if abs(math.log(n_shape / pred["n_opt"])) > math.log(FAR):
        warnings.append(f"the nearest shape by the rule has {n_shape:,} parameters, {n_shape / pred['n_opt']:.2g} x "
                        f"N_opt: the family's shapes are coarse here (or N_opt is below its smallest)")
    seq = getattr(cfg.model, "max_seq_len", None) or 1
    world = gpus or cfg.cluster.workers
    multiple = cfg.train.micro_batch_size * world
    hyper_path = Path(fit_dir) / "hyper.json"
    lr, batch_tokens = cfg.optimizer.lr, float(cfg.train.global_batch_size * seq)
    hyper = {"source": "config", "lr_ci95": None, "batch_ci95": None}
    if hyper_path.is_file():
        h = load_hyper(hyper_path)
        hyper["source"] = str(hyper_path)
        got_lr, got_b = law_at(h, "lr", flops), law_at(h, "batch", flops)
        if got_lr:
            lr, hyper["lr_ci95"] = got_lr
        if got_b:
            batch_tokens, hyper["batch_ci95"] = got_b
        swept = max((b["flops"] for b in h.get("budgets", []) if b.get("used")), default=math.nan)
        if flops > EXTRAPOLATION * swept:
            warnings.append(f"{flops:.3g} FLOPs is {math.log10(flops / swept):.1f} decades beyond the sweep's "
                            f"largest budget ({swept:.3g}): lr and batch are extrapolated")
        if not (got_lr and got_b):
            warnings.append(f"{hyper_path} has no law for {'lr' if not got_lr else 'batch'}: the config's is kept")
    else:
        warnings.append(f"no {hyper_path.name} in {fit_dir} (fit a sweep with `pretrain scaling hyperfit`): "
                        f"lr {lr:g} and batch {cfg.train.global_batch_size} x {seq} tokens are the config's own")
    gbs = _batch_sequences(batch_tokens, seq, multiple)
    tree = cfg.model_dump(mode="json")
    tree["model"] = model
    tree["run"]["name"] = f"{cfg.run.name}-{flops:.2g}".replace("+", "")
    tree["train"].update(steps=None, flops=None, tokens=float(f"{tokens:.4g}"), global_batch_size=gbs)
    tree["optimizer"]["lr"] = float(f"{lr:.4g}")
    if gpus:
        tree["cluster"]["workers"] = gpus
    try:
        new = config_from_dict(tree)
    except ConfigError as e:
        raise ScalingError(f"the recommended config does not validate: {e}") from None
    shape = {k: model.get(k) for k in ("d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff")}
    shape.update(params=n_shape, count_kind=kind, rule=SHAPE_RULE)
    return Recommendation(flops, pred["n_opt"], pred["d_opt"], pred["ci95"], pred["loss"], shape, tokens,
                          predict_point(fit, n_shape, tokens), float(lr), batch_tokens, gbs, hyper, new, warnings)


def to_json(r: Recommendation) -> dict:
    """What `recommend --json` prints and recommend.json holds."""
    return {"flops": r.flops, "n_opt": r.n_opt, "d_opt": r.d_opt, "ci95": r.ci95, "loss": r.loss,
            "shape": r.shape, "tokens": r.tokens, "loss_at_shape": r.loss_at_shape, "lr": r.lr,
            "batch_tokens": r.batch_tokens, "global_batch_size": r.global_batch_size, "hyper": r.hyper,
            "warnings": r.warnings}

