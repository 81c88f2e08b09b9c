"""The typed configuration tree: YAML loading, dotted command-line overrides, validation.

One pydantic model per component, every field documented. The schema imports nothing of the project but
`pretrain.errors`, and reads nothing but the YAML it is given: the model and objective sections are
registered by their registries, and values that need data or a model (the run length in steps) come from
`pretrain.length`. `pretrain.load.load_config(path, overrides)` is the way in; any mistake raises `ConfigError` with one line that names the key. Values derived from the
config (gradient accumulation, head size) are functions below, never written back into the tree.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializeAsAny,
    ValidationError,
    field_validator,
    model_validator,
)

from pretrain.errors import ConfigError


class Section(BaseModel):
    # Unknown keys are errors, not silently ignored: a typo must never train the wrong model.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RunConfig(Section):
    name: str = Field("run", description="run name; the run directory is <dir>/<name>")
    dir: str = Field("runs", description="root of run directories")

    @field_validator("name")
    @classmethod
    def _plain_name(cls, v: str) -> str:
        if not v or "/" in v or v.startswith("."):
            raise ValueError("must be a plain directory name")
        return v


class DataSource(Section):
    path: str = Field(description="shard directory (index.json + *.tar), brace pattern or URL list")
    weight: float = Field(1.0, gt=0, description="mixing weight (normalised over sources)")
    name: str | None = Field(None, description="label in metrics; default the directory's name (its parent's for a train/ or val/ split)")


def _as_source(v: Any) -> Any:
    return {"path": v} if isinstance(v, str) else v


class DataConfig(Section):
    train: list[DataSource] = Field(description="training sources; a plain string is one source")
    val: DataSource | None = Field(None, description="validation source; none disables validation")
    num_workers: int = Field(0, ge=0, description="DataLoader worker processes per rank")
    skip_corrupt: bool = Field(False, description="skip and count a corrupt shard instead of failing")

    @field_validator("train", mode="before")
    @classmethod
    def _train_list(cls, v: Any) -> Any:
        if isinstance(v, (str, dict)):
            v = [v]
        return [_as_source(s) for s in v] if isinstance(v, list) else v

    @field_validator("val", mode="before")
    @classmethod
    def _val_source(cls, v: Any) -> Any:
        return _as_source(v)

    @field_validator("train")
    @classmethod
    def _nonempty(cls, v: list[DataSource]) -> list[DataSource]:
        if not v:
            raise ValueError("needs at least one source")
        return v


LENGTH_KEYS = ("steps", "tokens", "flops")  # train.*: the alternative ways to say how long a run is


class TrainConfig(Section):
    # Run length: one of steps, tokens, flops (none given: 100 steps). tokens and flops become steps in
    # `total_steps` below; floats, so that YAML's 1e9 and 3.2e13 read as numbers.
    steps: int | None = Field(None, gt=0, description="optimizer steps in total (a resumed run continues to this); "
                              "default 100 unless train.tokens or train.flops is given")
    tokens: float | None = Field(None, gt=0, description="run length in training tokens (units of the objective: "
                                 "images for diffusion) instead of train.steps: ceil(tokens / (global batch x units per sample)) steps")
    flops: float | None = Field(None, gt=0, description="run length in training FLOPs instead of train.steps: the steps "
                                "whose tokens x the family's FLOPs per token reach it (rounded up)")
    seed: int = Field(1234, description="seed of model init, data order and dropout")
    micro_batch_size: int = Field(8, gt=0, description="sequences per rank per forward pass")
    global_batch_size: int = Field(16, gt=0, description="sequences per optimizer step over all ranks")
    precision: Literal["fp32", "bf16"] = Field("fp32", description="compute precision (bf16 is for GPUs)")
    tf32: bool = Field(False, description="fp32 matrix products on TF32 tensor cores (NVIDIA GPUs); MFU then uses the TF32 peak")
    lr: float = Field(1e-3, gt=0, description="peak learning rate (AdamW)")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="floor of the decay (cosine or wsd) as a fraction of lr")
    schedule: Literal["cosine", "wsd"] = Field("cosine", description="learning-rate schedule after warm-up: cosine decay, "
                                               "or warmup-stable-decay (constant, then a 1-sqrt cooldown; pretrain/train/schedule.py)")
    decay_fraction: float = Field(0.2, ge=0, le=1, description="wsd: the cooldown's share of the run's steps (the rest "
                                  "after warm-up is at the peak rate)")
    warmup_steps: int = Field(10, ge=0, description="linear warm-up steps")
    decay_steps: int | None = Field(None, gt=0, description="cosine horizon; default train.steps (set it to extend a run without changing its schedule)")
    weight_decay: float = Field(0.1, ge=0, description="AdamW decoupled weight decay (matrices only)")
    betas: tuple[float, float] = Field((0.9, 0.95), description="AdamW betas")
    grad_clip: float = Field(1.0, ge=0, description="max global gradient norm; 0 disables")
    eval_every: int = Field(50, ge=0, description="validation every N steps (and at the end); 0: only at the end")
    eval_batches: int = Field(4, gt=0, description="validation micro-batches per configured worker (a fixed set for the whole run)")
    ckpt_every: int = Field(100, ge=0, description="checkpoint every N steps (and at the end); 0: only at the end")
    ckpt_keep: int | None = Field(None, gt=0, description="keep the newest K complete checkpoints (an older one is deleted "
                                  "once a newer one is complete); none: keep every one")
    ckpt_keep_every: int | None = Field(None, gt=0, description="with ckpt_keep, also keep for good every checkpoint "
                                        "whose step is a multiple of M")
    branch_from: str | None = Field(None, description="PATH[@STEP]: a run without a checkpoint of its own starts from another "
                                    "run's (PATH its run directory or checkpoint location, a path or URL; STEP default its "
                                    "newest complete one): model, optimizer, data position and step, then this run's schedule")
    log_every: int = Field(1, gt=0, description="console progress line every N steps")
    activation_checkpointing: bool = Field(False, description="recompute block activations in backward")
    compile: bool = Field(False, description="torch.compile the model inside the DeepSpeed engine (engine.compile, inductor), "
                          "any ZeRO stage; compiled graphs are cached under ~/.cache/pretrain/inductor between runs")
    ema_decay: float | None = Field(None, gt=0, lt=1, description="keep an fp32 EMA of the weights with this decay (e.g. 0.9999); none: no EMA")
    ema_warmup: bool = Field(False, description="EMA decay min(ema_decay, (1+n)/(10+n)) after n updates, for short runs")
    init_from: str | None = Field(None, description="start from released weights: a Hugging Face model directory, a .gguf file, "
                                  "or another run's directory; the model section then comes from the checkpoint (keys set here override it)")

    @model_validator(mode="before")
    @classmethod
    def _default_length(cls, v: Any) -> Any:
        # 100 steps only when no length is given at all, so a dumped config (steps: null, tokens: X) reloads as it was.
        if isinstance(v, dict) and all(v.get(k) is None for k in LENGTH_KEYS):
            return {**v, "steps": 100}
        return v

    @model_validator(mode="after")
    def _one_length(self) -> TrainConfig:
        given = [k for k in LENGTH_KEYS if getattr(self, k) is not None]
        if len(given) > 1:
            raise ValueError(f"{given[0]} and {given[1]} are both set: give one run length (steps, tokens or flops)")
        if self.schedule == "wsd" and self.decay_steps is not None:
            raise ValueError("decay_steps is the cosine horizon: with schedule=wsd the cooldown is decay_fraction "
                             "of the run")
        return self


class LoraConfig(Section):
    """Low-rank adapters (Hu et al. 2021, https://arxiv.org/abs/2106.09685) on the Linear layers named by `targets`;
    every other weight is frozen, and checkpoints hold only the adapters and their optimizer state."""

    rank: int = Field(8, gt=0, description="adapter rank r")
    alpha: float = Field(16.0, gt=0, description="scaling numerator: the update is B A x * alpha / r")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the adapter's input")
    targets: list[str] = Field(["q_proj", "k_proj", "v_proj", "o_proj"], min_length=1,
                               description="module names (last component, or fnmatch patterns on the full name) that get adapters")


class ZeroConfig(Section):
    stage: int = Field(2, ge=0, le=3, description="ZeRO stage: 0 off, 1 optimizer, 2 +gradients, 3 +parameters")
    offload_optimizer: bool = Field(False, description="optimizer states in CPU memory (GPU runs)")
    offload_params: bool = Field(False, description="parameters in CPU memory (stage 3, GPU runs)")


class ClusterConfig(Section):
    workers: int = Field(2, gt=0, description="Ray Train workers (one per GPU, or per CPU process)")
    address: str | None = Field(None, description="Ray cluster address; none starts an embedded local Ray")
    use_gpu: bool | None = Field(None, description="one GPU per worker; default: when CUDA is available")
    cpus_per_worker: int = Field(1, gt=0, description="CPU cores reserved per worker")
    max_failures: int = Field(0, ge=-1, description="worker-group restarts before giving up (-1: unlimited)")
    min_workers: int | None = Field(None, gt=0, description="fewest workers to continue with after losing a node")
    worker_counts: list[Annotated[int, Field(gt=0)]] | None = Field(
        None, description="the only group sizes an elastic run may train at (must include min_workers and workers); "
        "none: every count from min_workers to workers, each of which must then divide the global batch")
    storage: str | None = Field(None, description="where checkpoints go: a shared path or an object-store URL (s3://, gs://; "
                                "endpoint and credentials from the client's standard variables), as <storage>/<run.name>/"
                                "checkpoints; default <run.dir>/<run.name>/checkpoints")
    collective_timeout_s: int = Field(1800, gt=0, description="a collective hung this long fails the step")


class LadderConfig(Section):
    """An isoFLOP ladder over this config's model family, read by `pretrain scaling ladder` only (`pretrain train`
    ignores it): every size at every budget, each run as long as its budget buys (pretrain/scaling/ladder.py)."""

    budgets: list[Annotated[float, Field(gt=0)]] = Field(min_length=1, description="training FLOPs per run, one isoFLOP curve each")
    sizes: list[str] = Field(min_length=1, description="model shapes as D x L (model.d_model x model.n_layers), e.g. 128x4; "
                             "or D x L x H to set model.n_heads too")
    head_dim: int = Field(64, gt=0, description="heads = d_model / head_dim when a size does not give them")
    out: str | None = Field(None, description="the ladder's directory (runs/, ladder.json, fit/); default <run.dir>/<run.name>")


class LogConfig(Section):
    wandb: bool = Field(True, description="log a W&B run (offline unless WANDB_API_KEY is set)")
    project: str = Field("pretrain", description="W&B project")
    peak_flops: float | None = Field(None, gt=0, description="per-worker peak FLOP/s for MFU; default: looked up or measured")


# The sections behind `model.type` and `objective.type`: each family and objective registers its own
# (pretrain/models/family.py, pretrain/objectives/base.py), so this schema imports neither registry.
# `pretrain.load` imports both before it reads a config.
_SECTIONS: dict[str, dict[str, type[Section]]] = {"model": {}, "objective": {}}
DEFAULT_TYPE = {"model": "gpt2", "objective": "causal_lm"}


def register_section(kind: str, name: str, cls: type[Section]) -> None:
    """Make `<kind>.type: name` read `cls` (called by the model and objective registries)."""
    _SECTIONS[kind][name] = cls


def section_class(kind: str, name: str) -> type[Section]:
    """The config class registered for `<kind>.type = name`; ConfigError naming the registered ones."""
    known = _SECTIONS[kind]
    if name not in known:
        raise ConfigError(f"{kind}.type {name!r} is not registered (registered: {', '.join(sorted(known))})")
    return known[name]


class Config(Section):
    run: RunConfig = Field(default_factory=RunConfig)
    # `model` and `objective` are unions discriminated by their `type`, over whatever is registered
    # (pretrain.models, pretrain.objectives): `typed_section` picks the class; SerializeAsAny keeps
    # the subclass's fields when the tree is dumped.
    model: SerializeAsAny[Section] = Field(default_factory=lambda: section_class("model", DEFAULT_TYPE["model"])())
    objective: SerializeAsAny[Section] = Field(default_factory=lambda: section_class("objective", DEFAULT_TYPE["objective"])())
    data: DataConfig
    train: TrainConfig = Field(default_factory=TrainConfig)
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
        return self

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
