"""The typed configuration tree: `Config`, YAML loading, dotted command-line overrides, validation.

One pydantic model per component (`pretrain.sections`), every field documented. The schema imports nothing of
the project but `pretrain.errors` and its sections, and reads nothing but the YAML it is given: the model and
objective sections are registered by their registries, and values that need data or a model (the run length
in steps) come from `pretrain.length`. `pretrain.load.load_config(path, overrides)` is the way in; any mistake
raises `ConfigError` with one line that names the key. Values derived from the config (gradient accumulation,
group sizes) are functions below, never written back into the tree.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from pydantic import (
    Field,
    SerializeAsAny,
    ValidationError,
    model_validator,
)

from pretrain.errors import ConfigError
from pretrain.sections import (  # noqa: F401  (the sections, importable from here as before)
    LENGTH_KEYS,
    CheckpointConfig,
    ClusterConfig,
    DataConfig,
    DataSource,
    EmaConfig,
    EvalConfig,
    InitConfig,
    LadderConfig,
    LogConfig,
    LoraConfig,
    OptimizerConfig,
    RunConfig,
    ScheduleConfig,
    Section,
    SpikeConfig,
    TrainConfig,
    ZeroConfig,
)

# The sections behind `model.type` and `objective.type`: each family and objective registers its own
# (pretrain/models/family.py, pretrain/objectives/base.py), so this schema imports neither registry.
# `pretrain.load` imports both before it reads a config.
# Each value is the section class, or a function that returns it when a config is read (an objective may set
# its `Config` after registering).
_SECTIONS: dict[str, dict[str, type[Section] | Callable[[], type[Section]]]] = {"model": {}, "objective": {}}
DEFAULT_TYPE = {"model": "gpt2", "objective": "causal_lm"}


def register_section(kind: str, name: str, cls: type[Section] | Callable[[], type[Section]]) -> None:
    """Make `<kind>.type: name` read `cls` (called by the model and objective registries)."""
    _SECTIONS[kind][name] = cls


def section_class(kind: str, name: str) -> type[Section]:
    """The config class registered for `<kind>.type = name`; ConfigError naming the registered ones."""
    known = _SECTIONS[kind]
    if name not in known:
        raise ConfigError(f"{kind}.type {name!r} is not registered (registered: {', '.join(sorted(known))})")
    found = known[name]
    return found if isinstance(found, type) else found()


class Config(Section):
    run: RunConfig = Field(default_factory=RunConfig)
    # `model` and `objective` are unions discriminated by their `type`, over whatever is registered
    # (pretrain.models, pretrain.objectives): `typed_section` picks the class; SerializeAsAny keeps
    # the subclass's fields when the tree is dumped.
    model: SerializeAsAny[Section] = Field(default_factory=lambda: section_class("model", DEFAULT_TYPE["model"])())
    objective: SerializeAsAny[Section] = Field(default_factory=lambda: section_class("objective", DEFAULT_TYPE["objective"])())
    data: DataConfig
    train: TrainConfig = Field(default_factory=TrainConfig)
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    ema: EmaConfig = Field(default_factory=EmaConfig)
    spike: SpikeConfig = Field(default_factory=SpikeConfig)
    init: InitConfig = Field(default_factory=InitConfig)
    zero: ZeroConfig = Field(default_factory=ZeroConfig)
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
    log: LogConfig = Field(default_factory=LogConfig)
    lora: LoraConfig | None = Field(None, description="train low-rank adapters instead of all weights (fine-tuning)")
    ladder: LadderConfig | None = Field(None, description="a scaling ladder built from this config (`pretrain scaling ladder`)")

    @model_validator(mode="after")
    def _batch(self) -> Config:
        per_step = self.train.micro_batch_size * self.cluster.workers
        if self.train.global_batch_size % per_step:
            raise ValueError(
                f"train.global_batch_size ({self.train.global_batch_size}) must be a multiple of "
                f"train.micro_batch_size x cluster.workers ({per_step})"
            )
        if self.zero.offload_params and self.zero.stage != 3:
            raise ValueError("zero.offload_params needs zero.stage=3")
        if self.cluster.min_workers and self.cluster.min_workers > self.cluster.workers:
            raise ValueError("cluster.min_workers must not exceed cluster.workers")
        self._elastic()
        self._expert_parallel()
        self._lora_on_experts()
        return self

    def _lora_on_experts(self) -> None:
        # Expert adapters sit beside the whole stacked experts (pretrain/models/lora_experts.py); expert parallelism
        # swaps in one rank's slice of them, which the adapters do not follow. Checked again on the model (apply_lora).
        ep = expert_parallel(self)
        if ep == 1 or self.lora is None:
            return
        names = [f"blocks.{i}.mlp.experts.{w}" for i in range(getattr(self.model, "n_layers", 0)) for w in ("gate_up", "down")]
        for pattern in self.lora.targets:
            if any(LoraConfig.pattern_matches(pattern, n) for n in names):
                raise ValueError(f"lora.targets {pattern!r} adapts expert weights, which needs model.moe.expert_parallel 1 "
                                 f"(not {ep}: each rank holds only its experts)")

    def _expert_parallel(self) -> None:
        # `model.moe.expert_parallel` (MoE families only) against every group size the run may have; the trainer
        # checks the size it gets again (pretrain/train/expert_parallel.py).
        ep = expert_parallel(self)
        if ep == 1:
            return
        if self.zero.stage == 3:
            raise ValueError(f"model.moe.expert_parallel ({ep}) needs zero.stage 0-2 (ZeRO-3 partitions experts over "
                             "every rank; at expert_parallel 1 it partitions them like any other weight)")
        for n in worker_counts(self):
            if n % ep:
                where = "cluster.workers" if n == self.cluster.workers else "every allowed group size (cluster.min_workers, cluster.worker_counts)"
                raise ValueError(f"model.moe.expert_parallel ({ep}) must divide {where}: {n} workers")
        if len(worker_counts(self)) > 1:
            # Its checkpoints hold each EP rank's experts as that layout (pretrain/train/resume.py).
            raise ValueError(f"model.moe.expert_parallel ({ep}) resumes only at the same number of workers: leave "
                             "cluster.min_workers and cluster.worker_counts unset")
        if self.ema.decay is not None:
            raise ValueError(f"ema.decay with model.moe.expert_parallel ({ep}): not supported (each rank would "
                             "average other experts); use expert_parallel 1")

    def _elastic(self) -> None:
        # Every group size the run may restart at must divide the global batch, or a lost node ends
        # in DeepSpeed's batch assertion on every restart instead of continuing.
        c, t = self.cluster, self.train
        lo = c.min_workers or c.workers
        if c.worker_counts is not None:
            if lo not in c.worker_counts or c.workers not in c.worker_counts:
                raise ValueError(f"cluster.worker_counts {c.worker_counts} must include cluster.min_workers ({lo}) "
                                 f"and cluster.workers ({c.workers})")
            where, counts = "cluster.worker_counts", sorted(c.worker_counts)
        else:
            where, counts = f"cluster.min_workers={lo}", range(lo, c.workers + 1)
        for n in counts:
            if t.global_batch_size % (t.micro_batch_size * n):
                raise ValueError(f"{where}: {n} workers do not divide train.global_batch_size "
                                 f"({t.global_batch_size}) by train.micro_batch_size ({t.micro_batch_size})")


# ----------------------------------------------------------------------------- derived values


def grad_accum_steps(cfg: Config, workers: int | None = None) -> int:
    """Micro-batches per rank per optimizer step: global / (micro x workers)."""
    w = workers or cfg.cluster.workers
    return cfg.train.global_batch_size // (cfg.train.micro_batch_size * w)


def expert_parallel(cfg: Config) -> int:
    """The ranks each MoE layer's experts are spread over (`model.moe.expert_parallel`); 1 for a model without."""
    return getattr(getattr(cfg.model, "moe", None), "expert_parallel", 1)


def worker_counts(cfg: Config) -> list[int]:
    """The group sizes the run may train at, ascending: cluster.worker_counts within min_workers..workers,
    else every count from cluster.min_workers (default cluster.workers) to cluster.workers."""
    c = cfg.cluster
    lo = c.min_workers or c.workers
    if c.worker_counts is None:
        return list(range(lo, c.workers + 1))
    return sorted(n for n in set(c.worker_counts) if lo <= n <= c.workers)


def run_dir(cfg: Config) -> Path:
    return Path(cfg.run.dir) / cfg.run.name


# ----------------------------------------------------------------------------- loading


def _parse_value(text: str) -> Any:
    # YAML scalars: "12" -> 12, "true" -> True, "abc" -> "abc", "[a, b]" -> list; pydantic then checks types.
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _apply_override(tree: dict, item: str) -> None:
    if "=" not in item:
        raise ConfigError(f"override '{item}' is not of the form section.key=value")
    key, value = item.split("=", 1)
    parts = key.strip().split(".")
    if len(parts) < 2 or not all(parts):
        raise ConfigError(f"override '{item}': key must be section.key")
    node = tree
    for p in parts[:-1]:
        nxt = node.setdefault(p, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"{key}: '{p}' is not a section")
        node = nxt
    node[parts[-1]] = _parse_value(value)
    if parts[0] == "train" and len(parts) == 2 and parts[1] in LENGTH_KEYS:  # train.tokens=X replaces the file's steps
        for other in set(LENGTH_KEYS) - {parts[1]}:
            node.pop(other, None)


def _first_error(err: ValidationError) -> str:
    e = err.errors()[0]
    loc = ".".join(str(p) for p in e["loc"] if not isinstance(p, int))
    msg = e["msg"].removeprefix("Value error, ")
    if not loc:  # a cross-field check: its message names the keys itself
        return msg
    if e["type"] == "extra_forbidden":
        return f"{loc}: unknown key"
    if e["type"] == "missing":
        return f"{loc}: required key is missing"
    return f"{loc}: {msg} (got {e.get('input')!r})" if "input" in e and not isinstance(e["input"], dict) else f"{loc}: {msg}"


# Keys that moved: an old config gets one line saying what the key is called now.
RENAMED = {
    "model.family": "model.type (gpt2, llama, bert, ...)",
    "train.sample_tokens": "objective.sample_tokens",
    "train.sample_prompt": "objective.sample_prompt",
}
# Keys that moved out of `train` into sections of their own: an old config gets "train.lr is now optimizer.lr".
MOVED = {
    **{f"train.{k}": f"optimizer.{k}" for k in ("lr", "weight_decay", "betas", "grad_clip")},
    "train.schedule": "schedule.type",
    **{f"train.{k}": f"schedule.{k}" for k in ("warmup_steps", "decay_steps", "decay_fraction", "min_lr_ratio")},
    "train.eval_every": "eval.every", "train.eval_batches": "eval.batches",
    "train.ckpt_every": "checkpoint.every", "train.ckpt_keep": "checkpoint.keep",
    "train.ckpt_keep_every": "checkpoint.keep_every", "train.branch_from": "checkpoint.branch_from",
    "train.ema_decay": "ema.decay", "train.ema_warmup": "ema.warmup",
    "train.init_from": "init.path",
}
def typed_section(kind: str, value: Any) -> Section:
    if isinstance(value, Section):
        return value
    if not isinstance(value, dict):
        raise ConfigError(f"{kind}: must be a mapping (got {value!r})")
    name = value.get("type", DEFAULT_TYPE[kind])
    cls = section_class(kind, str(name))
    try:
        return cls.model_validate({**value, "type": name})
    except ValidationError as err:
        msg = _first_error(err)
        raise ConfigError(msg if msg.startswith(f"{kind}.") else f"{kind}.{msg}") from None


def parse_config(tree: dict) -> Config:
    for old, new in RENAMED.items():
        section, key = old.split(".")
        if isinstance(tree.get(section), dict) and key in tree[section]:
            raise ConfigError(f"{old} is now called {new}")
    for old, new in MOVED.items():
        section, key = old.split(".")
        if isinstance(tree.get(section), dict) and key in tree[section]:
            raise ConfigError(f"{old} is now {new}")
    tree = dict(tree)
    for kind in DEFAULT_TYPE:
        if kind in tree:
            tree[kind] = typed_section(kind, tree[kind])
    try:
        return Config.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(_first_error(err)) from None


def read_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read YAML, apply `section.key=value` overrides, validate. Raises ConfigError (one line)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        tree = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{p}: top level must be a mapping of sections")
    for item in overrides:
        _apply_override(tree, item)
    return parse_config(tree)


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
