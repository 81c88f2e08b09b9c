"""The typed configuration tree: YAML loading, dotted command-line overrides, validation.

One pydantic model per component, every field documented. `load_config(path, overrides)` is the only
way in; any mistake raises `ConfigError` with one line that names the key. Values derived from the
config (gradient accumulation, head size) are functions below, never written back into the tree.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ConfigError(ValueError):
    """A bad config file, key or value. The message is one line naming the key."""


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


class ModelConfig(Section):
    family: Literal["gpt2", "llama"] = Field("gpt2", description="architecture family")
    n_layers: int = Field(4, gt=0, description="Transformer blocks")
    d_model: int = Field(128, gt=0, description="residual stream width")
    n_heads: int = Field(4, gt=0, description="query heads")
    n_kv_heads: int | None = Field(None, gt=0, description="key/value heads (GQA); default n_heads")
    d_ff: int | None = Field(None, gt=0, description="MLP hidden size; default 4*d_model (gpt2) or ~8/3*d_model (llama)")
    vocab_size: int = Field(50304, gt=0, description="embedding rows; >= the tokenizer's vocabulary")
    max_seq_len: int = Field(128, gt=0, description="longest sequence (learned positions for gpt2)")
    norm_eps: float = Field(1e-5, gt=0, description="normalisation epsilon")
    rope_theta: float = Field(10000.0, gt=0, description="RoPE base (llama)")
    tie_embeddings: bool | None = Field(None, description="share input and output embeddings; default: gpt2 yes, llama no")
    init_std: float = Field(0.02, gt=0, description="std of the normal init; residual projections scaled by 1/sqrt(2*n_layers)")
    kernels: Literal["triton", "reference"] = Field("triton", description="Triton kernels where the device allows, or plain PyTorch")

    @model_validator(mode="after")
    def _shapes(self) -> ModelConfig:
        if self.d_model % self.n_heads:
            raise ValueError(f"model.d_model ({self.d_model}) must be a multiple of model.n_heads ({self.n_heads})")
        if self.n_kv_heads is not None and self.n_heads % self.n_kv_heads:
            raise ValueError(f"model.n_heads ({self.n_heads}) must be a multiple of model.n_kv_heads ({self.n_kv_heads})")
        return self


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


class TrainConfig(Section):
    steps: int = Field(100, gt=0, description="optimizer steps in total (a resumed run continues to this)")
    seed: int = Field(1234, description="seed of model init, data order and dropout")
    micro_batch_size: int = Field(8, gt=0, description="sequences per rank per forward pass")
    global_batch_size: int = Field(16, gt=0, description="sequences per optimizer step over all ranks")
    precision: Literal["fp32", "bf16"] = Field("fp32", description="compute precision (bf16 is for GPUs)")
    lr: float = Field(1e-3, gt=0, description="peak learning rate (AdamW)")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="cosine floor as a fraction of lr")
    warmup_steps: int = Field(10, ge=0, description="linear warm-up steps")
    decay_steps: int | None = Field(None, gt=0, description="cosine horizon; default train.steps (set it to extend a run without changing its schedule)")
    weight_decay: float = Field(0.1, ge=0, description="AdamW decoupled weight decay (matrices only)")
    betas: tuple[float, float] = Field((0.9, 0.95), description="AdamW betas")
    grad_clip: float = Field(1.0, ge=0, description="max global gradient norm; 0 disables")
    eval_every: int = Field(50, ge=0, description="validation every N steps (and at the end); 0: only at the end")
    eval_batches: int = Field(4, gt=0, description="validation micro-batches per configured worker (a fixed set for the whole run)")
    ckpt_every: int = Field(100, ge=0, description="checkpoint every N steps (and at the end); 0: only at the end")
    log_every: int = Field(1, gt=0, description="console progress line every N steps")
    activation_checkpointing: bool = Field(False, description="recompute block activations in backward")
    sample_tokens: int = Field(48, ge=0, description="tokens of text generated from the final model")
    sample_prompt: str = Field("\n", description="prompt of the final sample")


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
    storage: str | None = Field(None, description="shared path or object-store URL for checkpoints; default the run dir")
    collective_timeout_s: int = Field(1800, gt=0, description="a collective hung this long fails the step")


class LogConfig(Section):
    wandb: bool = Field(True, description="log a W&B run (offline unless WANDB_API_KEY is set)")
    project: str = Field("pretrain", description="W&B project")
    peak_flops: float | None = Field(None, gt=0, description="per-worker peak FLOP/s for MFU; default: looked up or measured")


class Config(Section):
    run: RunConfig = Field(default_factory=RunConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig
    train: TrainConfig = Field(default_factory=TrainConfig)
    zero: ZeroConfig = Field(default_factory=ZeroConfig)
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
    log: LogConfig = Field(default_factory=LogConfig)

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
        return self


# ----------------------------------------------------------------------------- derived values


def grad_accum_steps(cfg: Config, workers: int | None = None) -> int:
    """Micro-batches per rank per optimizer step: global / (micro x workers)."""
    w = workers or cfg.cluster.workers
    return cfg.train.global_batch_size // (cfg.train.micro_batch_size * w)


def n_kv_heads(m: ModelConfig) -> int:
    return m.n_kv_heads or m.n_heads


def d_ff(m: ModelConfig) -> int:
    if m.d_ff:
        return m.d_ff
    if m.family == "gpt2":
        return 4 * m.d_model
    # Llama: 2/3 of 4*d rounded up to a multiple of 256 keeps SwiGLU's parameter count at a 4x MLP's.
    return 256 * math.ceil(int(8 * m.d_model / 3) / 256)


def tie_embeddings(m: ModelConfig) -> bool:
    return m.family == "gpt2" if m.tie_embeddings is None else m.tie_embeddings


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


def config_from_dict(tree: dict) -> Config:
    try:
        return Config.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(_first_error(err)) from None


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Config:
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
    return config_from_dict(tree)


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
