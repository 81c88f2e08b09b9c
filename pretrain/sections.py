"""The sections of the config tree, one pydantic model per component, every field with a one-line description.
`pretrain.config` assembles them into `Config` (with the model and objective sections their registries
bring) and reads YAML into it. Imports nothing of the project but `pretrain.errors`: no torch, no registry."""

from __future__ import annotations

import fnmatch
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class Section(BaseModel):
    # Unknown keys are errors, not silently ignored: a typo must never train the wrong model. No float anywhere
    # in the tree may be NaN or infinite (YAML's .inf, an override's `inf`): a bound such as gt=0 lets inf through.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


SEED_LIMIT = 2**32  # np.random.seed (pretrain/train/run.py) takes only [0, 2**32): refuse it here, not on every worker
Seed = Annotated[int, Field(ge=0, lt=SEED_LIMIT)]
Beta = Annotated[float, Field(ge=0, lt=1)]  # an AdamW moment decay: 1 would never forget, above 1 diverges


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
    """How long, on what batches, in what precision: the step itself. The optimizer, its schedule,
    evaluation, checkpoints, EMA and initial weights have sections of their own."""

    # Run length: one of steps, tokens, flops (none given: 100 steps). tokens and flops become steps in
    # `pretrain.length.total_steps`; floats, so that YAML's 1e9 and 3.2e13 read as numbers.
    steps: int | None = Field(None, gt=0, description="optimizer steps in total (a resumed run continues to this); "
                              "default 100 unless train.tokens or train.flops is given")
    tokens: float | None = Field(None, gt=0, description="run length in training tokens (units of the objective: "
                                 "images for diffusion) instead of train.steps: ceil(tokens / (global batch x units per sample)) steps")
    flops: float | None = Field(None, gt=0, description="run length in training FLOPs instead of train.steps: the steps "
                                "whose tokens x the family's FLOPs per token reach it (rounded up)")
    seed: Seed = Field(1234, description="seed of model init, data order and dropout, in [0, 2**32)")
    micro_batch_size: int = Field(8, gt=0, description="sequences per rank per forward pass")
    global_batch_size: int = Field(16, gt=0, description="sequences per optimizer step over all ranks")
    precision: Literal["fp32", "bf16"] = Field("fp32", description="compute precision (bf16 is for GPUs)")
    tf32: bool = Field(False, description="fp32 matrix products on TF32 tensor cores (NVIDIA GPUs); MFU then uses the TF32 peak")
    log_every: int = Field(1, gt=0, description="console progress line every N steps")
    activation_checkpointing: bool = Field(False, description="recompute block activations in backward")
    compile: bool = Field(False, description="torch.compile the model inside the DeepSpeed engine (engine.compile, inductor), "
                          "any ZeRO stage; compiled graphs are cached under ~/.cache/pretrain/inductor between runs")

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
        return self


class OptimizerConfig(Section):
    """AdamW with decoupled weight decay (Loshchilov & Hutter 2019, https://arxiv.org/abs/1711.05101)."""

    lr: float = Field(1e-3, gt=0, description="peak learning rate")
    weight_decay: float = Field(0.1, ge=0, description="decoupled weight decay (matrices only)")
    betas: tuple[Beta, Beta] = Field((0.9, 0.95), description="AdamW betas (beta1, beta2), each in [0, 1)")
    grad_clip: float = Field(1.0, ge=0, description="max global gradient norm; 0 disables")


class ScheduleConfig(Section):
    """The learning rate over the run: linear warm-up, then cosine decay or warmup-stable-decay (pretrain/train/schedule.py)."""

    type: Literal["cosine", "wsd"] = Field("cosine", description="after warm-up: cosine decay, or warmup-stable-decay "
                                           "(constant, then a 1-sqrt cooldown)")
    warmup_steps: int = Field(10, ge=0, description="linear warm-up steps")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="floor of the decay (cosine or wsd) as a fraction of optimizer.lr")
    decay_steps: int | None = Field(None, gt=0, description="cosine horizon; default train.steps (set it to extend a run "
                                    "without changing its schedule)")
    decay_fraction: float = Field(0.2, ge=0, le=1, description="wsd: the cooldown's share of the run's steps (the rest "
                                  "after warm-up is at the peak rate)")

    @model_validator(mode="after")
    def _horizon(self) -> ScheduleConfig:
        if self.type == "wsd" and self.decay_steps is not None:
            raise ValueError("decay_steps is the cosine horizon: with schedule.type=wsd the cooldown is decay_fraction "
                             "of the run")
        return self


class EvalConfig(Section):
    every: int = Field(50, ge=0, description="validation every N steps (and at the end); 0: only at the end")
    batches: int = Field(4, gt=0, description="validation micro-batches per configured worker (a fixed set for the whole run)")


class CheckpointConfig(Section):
    every: int = Field(100, ge=0, description="checkpoint every N steps (and at the end); 0: only at the end")
    keep: int | None = Field(None, gt=0, description="keep the newest K complete checkpoints (an older one is deleted "
                             "once a newer one is complete); none: keep every one")
    keep_every: int | None = Field(None, gt=0, description="with checkpoint.keep, also keep for good every checkpoint "
                                   "whose step is a multiple of M")
    branch_from: str | None = Field(None, description="PATH[@STEP]: a run without a checkpoint of its own starts from another "
                                    "run's (PATH its run directory or checkpoint location, a path or URL; STEP default its "
                                    "newest complete one): model, optimizer, data position and step, then this run's schedule")


class EmaConfig(Section):
    decay: float | None = Field(None, gt=0, lt=1, description="keep an fp32 EMA of the weights with this decay (e.g. 0.9999); none: no EMA")
    warmup: bool = Field(False, description="EMA decay min(ema.decay, (1+n)/(10+n)) after n updates, for short runs")


class SpikeConfig(Section):
    """Loss spikes and non-finite values (pretrain/train/spike.py): a step whose loss or gradient norm is not finite, or
    more than `sigma` standard deviations above the running window, is skipped (no weight, optimizer-state or EMA
    update); `max_consecutive` skips in a row roll the run back to the newest checkpoint before the first of them,
    and that data window is then skipped."""

    sigma: float | None = Field(6.0, gt=0, description="skip a step whose loss (or gradient norm) exceeds the window's mean "
                                "by this many standard deviations; none: skip non-finite steps only")
    window: int = Field(100, gt=1, description="steps in the running window of loss and gradient norm")
    warmup: int = Field(100, ge=2, description="steps the window must hold before the sigma test applies (early "
                        "training's gradient norms swing widely: at 20 the CPU demo skipped ordinary steps)")
    max_consecutive: int = Field(5, ge=0, description="skips in a row before rolling back to the checkpoint before the first; "
                                 "0: never roll back")
    max_rollbacks: int = Field(2, ge=0, description="rollbacks before the run stops with the step and its data positions")


class InitConfig(Section):
    path: str | None = Field(None, description="start from released weights: a Hugging Face model directory, a .gguf file, "
                             "or another run's directory; the model section then comes from the checkpoint (keys set here override it)")


class LoraConfig(Section):
    """Low-rank adapters (Hu et al. 2021, https://arxiv.org/abs/2106.09685) on the Linear layers named by `targets`;
    every other weight is frozen, and checkpoints hold only the adapters and their optimizer state."""

    rank: int = Field(8, gt=0, description="adapter rank r")
    alpha: float = Field(16.0, gt=0, description="scaling numerator: the update is B A x * alpha / r")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the adapter's input")
    targets: list[str] = Field(["q_proj", "k_proj", "v_proj", "o_proj"], min_length=1,
                               description="module names (last component, or fnmatch patterns on the full name) that get "
                               "adapters; in MoE layers also the experts' stacked weights (gate_up, down)")

    @staticmethod
    def pattern_matches(pattern: str, name: str) -> bool:
        """Whether a `targets` entry selects `name`: without a dot it names the last component (as PEFT's
        target_modules do), with one it is an fnmatch pattern on the full name."""
        return fnmatch.fnmatchcase(name if "." in pattern else name.rsplit(".", 1)[-1], pattern)


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
    # Goodput (pretrain/launch/watch.py, pretrain/train/pulse.py): hangs, stragglers, preemption.
    hang_timeout_s: float | None = Field(None, gt=0, description="a hang: no rank advances a step or a phase for this long "
                                         "(then every rank's stacks go to <run>/hangs/ and the group restarts from the newest "
                                         "checkpoint, one failure of max_failures); none: 10 x the median step time, at least 120 s")
    startup_timeout_s: float = Field(900, gt=0, description="the same for start-up, the first step, evaluation and checkpoints")
    straggler_ratio: float = Field(1.3, gt=1, description="warn when a rank's compute time per step stays this many times the "
                                   "median rank's for cluster.straggler_windows windows in a row")
    straggler_every: int = Field(50, gt=0, description="steps per straggler window (one small all-gather per window)")
    straggler_windows: int = Field(3, gt=0, description="consecutive slow windows before a rank is named a straggler")
    preemption_grace_s: float = Field(60, gt=0, description="after SIGTERM (worker or driver) or Ray's preemption notice: "
                                      "save a checkpoint at the current step within this long, then stop")


class LadderConfig(Section):
    """A scaling ladder over this config's model family, read by `pretrain scaling ladder` only (`pretrain train`
    ignores it). `grid`: every size at every budget, each run as long as its budget buys (pretrain/scaling/ladder.py);
    `wsds`: each size trained once on the wsd schedule, a cooldown branched at each token count
    (pretrain/scaling/wsds.py)."""

    mode: Literal["grid", "wsds"] | None = Field(None, description="grid (isoFLOP: every size at every budget, from "
                                                 "scratch) or wsds (one stable trunk per size, a cooldown per point); "
                                                 "default wsds when tokens_per_param is given, else grid")
    budgets: list[Annotated[float, Field(gt=0)]] | None = Field(None, min_length=1, description="training FLOPs per run, "
                                                               "one isoFLOP curve each")
    tokens_per_param: list[Annotated[float, Field(gt=0)]] | None = Field(
        None, min_length=1, description="wsds: each size's points as tokens per parameter (N: active parameters), "
        "instead of budgets, e.g. [5, 10, 20, 40, 80]")
    sizes: list[str] = Field(min_length=1, description="model shapes as D x L (model.d_model x model.n_layers), e.g. 128x4; "
                             "or D x L x H to set model.n_heads too; a suffix -eE or -eEkK sets model.moe's experts "
                             "and top-k (128x4-e8k2), one sparsity per ladder")
    head_dim: int = Field(64, gt=0, description="heads = d_model / head_dim when a size does not give them")
    out: str | None = Field(None, description="the ladder's directory (runs/, ladder.json, fit/); default <run.dir>/<run.name>")

    @model_validator(mode="after")
    def _points(self) -> LadderConfig:
        if self.budgets and self.tokens_per_param:
            raise ValueError("give budgets or tokens_per_param, not both")
        if self.tokens_per_param and self.mode == "grid":
            raise ValueError("tokens_per_param needs mode wsds (a grid's runs are set by FLOP budgets)")
        return self


class LogConfig(Section):
    wandb: bool = Field(True, description="log a W&B run (offline unless WANDB_API_KEY is set)")
    project: str = Field("pretrain", description="W&B project")
    peak_flops: float | None = Field(None, gt=0, description="per-worker peak FLOP/s for MFU; default: looked up or measured")
