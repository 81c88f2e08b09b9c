"""`pretrain plan`: whether a run fits the GPUs it names, and how long it will take, before anything starts.

Per-rank GPU memory is predicted term by term for the configured ZeRO stage and offload, from the model's
parameter shapes (the family builds it on the meta device: nothing is allocated) and from what DeepSpeed
0.19.8 itself allocates, as measured on its partitioned tensors (tests/test_plan.py):

- model states, with lp = the parameter dtype's bytes (2 bf16, 4 fp32), n = this rank's partition of
  the trainable parameters T, P all parameters:

  | stage | params | grads | optimizer (fp32 master + AdamW m, v) |
  |---|---|---|---|
  | 0 | lp P | lp T (+ 4 T fp32 copies at the step for bf16) | 8 T (+ 4 T master for bf16) |
  | 1 | lp P | max(lp T while accumulating, 4 n fp32 at the step) | 12 n (a master copy even in fp32) |
  | 2 | lp P | lp x (whole parameters overlapping my partition) + 4 n | 12 n |
  | 3 | lp n (+ whole small parameters, <= stage3_param_persistence_threshold) | (lp + 4) n | 12 n |

  Offloading the optimizer moves master, m, v and the fp32 gradients to CPU memory (and, for ZeRO-2/3, the
  gradient partition); offloading parameters (ZeRO-3) moves the partitions.
- activations of one micro-batch, per layer and token (Korthikanti et al. 2022,
  https://arxiv.org/abs/2205.05198, section 4.1, for this model's tensors: no dropout, so no masks, and a
  flash attention that keeps q, k, v, its output and the log-sum-exp instead of the s x s scores):
  lp (4 d + 3 q + 2 kv + m) + 4 heads + norm statistics, d the model width, q and kv the query and
  key/value widths, m = 2 d_ff (GELU: its input and output) or 3 d_ff (SwiGLU: gate, up and product);
  4 d: both norms' inputs and outputs, 3 q: the attention output as saved and as o_proj's input, and q.
  With activation checkpointing a layer keeps only its input (lp d) and one layer is recomputed at a
  time. The LM head fused with cross-entropy keeps d hidden (lp d per token) and the fp32 d weight
  (4 V d) from the forward, plus one chunk of logits.
- temporary buffers from DeepSpeed's bucket sizes (the engine sets none: DeepSpeed's defaults): ZeRO-0
  all-reduces flattened gradient buckets, ZeRO-1 flattens its reduce buckets, ZeRO-2 holds two
  reduce_bucket_size gradient buffers (contiguous_gradients with overlap_comm), ZeRO-3 one, plus the
  gathered largest layer (its parameters and full gradient) and the prefetch bucket.
- mixtures of experts: the experts' sharding over expert-parallel ranks, their and the router's activations and the
  all-to-all buffers (pretrain/plan_moe.py).

Time comes from the family's model FLOPs per token at a stated MFU against the peak table
(`pretrain.metrics.flops`, also the table of device memory). Not modelled: the CUDA context, NCCL's own
buffers and allocator fragmentation (a fixed reserve), activation gradients in flight, DiT families.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import asdict, dataclass, field

from pretrain import plan_moe
from pretrain.config import Config
from pretrain.errors import PlanError

GiB = 2**30
# CUDA context, NCCL communicators and allocator fragmentation: what a run never gets of the sheet's memory.
RESERVE_BYTES = 2 * GiB
# DeepSpeed pads each flat ZeRO-1/2 group to a multiple of 2 x world elements (nccl_start_alignment_factor).
ALIGN = 2
ALLREDUCE_BUCKET = 500_000_000  # deepspeed.runtime.engine.MEMORY_OPT_ALLREDUCE_SIZE: ZeRO-0's flat all-reduce



@dataclass(frozen=True)
class ModelShape:
    """What memory depends on, read from the model built on the meta device."""

    params: int  # every parameter once (a tied head is the embedding)
    numels: tuple[int, ...]  # each parameter's size
    groups: tuple[tuple[int, ...], ...]  # trainable sizes per optimizer group, in the engine's order
    largest_module: int  # most parameters one module holds itself (DeepSpeed's "largest layer")
    counts: dict = field(default_factory=dict)  # the family's count_parameters
    experts: tuple[int, ...] = ()  # the trainable MoE expert weights' sizes (in numels and groups too)

    @property
    def trainable(self) -> int:
        return sum(map(sum, self.groups))


def _import_deepspeed() -> None:
    """DeepSpeed warns on stdout, when first imported on a machine without a GPU (a laptop planning a
    cluster job), that it picked the CPU, and its logger keeps stdout. `plan --json` and `submit` (whose
    stdout is the job id) keep stdout for their answer and stderr for one line: that import-time notice
    is dropped, and DeepSpeed's later messages go to stderr."""
    import contextlib
    import io
    import logging
    import sys

    if "deepspeed" in sys.modules:
        return
    with contextlib.redirect_stdout(io.StringIO()):
        import deepspeed  # noqa: F401
    for handler in logging.getLogger("DeepSpeed").handlers:
        if isinstance(handler, logging.StreamHandler):
            handler.setStream(sys.stderr)


def model_shape(cfg: Config) -> ModelShape:
    """The parameter shapes of the run's model (LoRA adapters included), without allocating it."""
    _import_deepspeed()
    import torch

    from pretrain.models import get_family
    from pretrain.train.engine import _param_groups

    family = get_family(cfg.model.type)
    with torch.device("meta"):
        model = family.build(cfg.model)
        counts = family.count_parameters(model)
        if cfg.lora is not None:
            from pretrain.models.lora import apply_lora

            apply_lora(model, cfg.lora)
    from pretrain.models.moe import Experts

    params = list(model.parameters())
    groups = tuple(tuple(p.numel() for p in g["params"]) for g in _param_groups(model, cfg.optimizer.weight_decay))
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    experts = tuple(p.numel() for m in model.modules() if isinstance(m, Experts) for p in m.parameters(recurse=False)
                    if p.requires_grad)
    return ModelShape(sum(p.numel() for p in params), tuple(p.numel() for p in params), groups, largest, counts,
                      experts)


def expert_sharded_states(shape: ModelShape, ep: int, stage: int, world: int, lp: int, **offload) -> dict[str, int]:
    """`model_state_bytes` of a model whose experts are spread over `ep` ranks (pretrain/plan_moe.py): the dense part
    partitioned over `world` ranks, plus this rank's 1 / ep of the experts partitioned over world / ep."""
    if ep == 1 or not shape.experts:
        return model_state_bytes(shape, stage, world, lp, **offload)
    pool = list(shape.experts)
    groups = []
    for g in shape.groups:  # the groups without the expert weights (each size taken out once)
        kept = []
        for n in g:
            if n in pool:
                pool.remove(n)
            else:
                kept.append(n)
        groups.append(tuple(kept))
    x = sum(shape.experts)
    dense = ModelShape(shape.params - x, tuple(shape.numels), tuple(groups), shape.largest_module, shape.counts)
    local = tuple(n // ep for n in shape.experts)
    mine = ModelShape(sum(local), local, (local,), max(local), shape.counts, local)
    # Experts held by one rank only (world = ep) have no partition to reduce to: ZeRO-2 then holds their gradients
    # once, as ZeRO-1 does (measured, tests/test_plan.py).
    expert_stage = 1 if stage == 2 and world == ep else stage
    a = model_state_bytes(dense, stage, world, lp, **offload)
    b = model_state_bytes(mine, expert_stage, world // ep, lp, **offload)
    return {k: a[k] + b[k] for k in a}


def zero_settings(cfg: Config, world: int):
    """DeepSpeed's own reading of the engine's zero_optimization section: bucket sizes and thresholds."""
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    from pretrain.train.engine import deepspeed_config

    return DeepSpeedZeroConfig(**deepspeed_config(cfg, world)["zero_optimization"])


# ----------------------------------------------------------------------------- model states


def _flat_partition(group: tuple[int, ...], world: int) -> int:
    return math.ceil(sum(group) / (ALIGN * world)) * ALIGN


def _overlap(groups: tuple[tuple[int, ...], ...], world: int) -> int:
    """ZeRO-2 copies each gradient whole into the partition buffer of every rank whose slice of the flat
    group it touches (stage_1_and_2.py, grads_in_partition); the most any rank holds."""
    per_rank = [0] * world
    for group in groups:
        part, start = _flat_partition(group, world), 0
        for numel in group:
            first, last = start // part, (start + numel - 1) // part
            for r in range(first, min(last, world - 1) + 1):
                per_rank[r] += numel
            start += numel
    return max(per_rank)


def model_state_bytes(shape: ModelShape, stage: int, world: int, lp: int, *, offload_optimizer: bool = False,
                      offload_params: bool = False, persistence_threshold: int = 100_000) -> dict[str, int]:
    """Per-rank bytes of params, grads and optimizer on the GPU at their peak (the optimizer step), and what
    offload puts in CPU memory (`cpu`). lp: bytes of the parameter dtype."""
    P, T = shape.params, shape.trainable
    mixed = lp != 4  # a 16-bit model: DeepSpeed keeps fp32 master weights and fp32 gradients for the step
    cpu = 0
    if stage == 0:
        params, grads, optimizer = lp * P, lp * T + 4 * T * mixed, 8 * T + 4 * T * mixed
    elif stage in (1, 2):
        n = sum(_flat_partition(g, world) for g in shape.groups)
        params = lp * P
        if stage == 1:
            grads = lp * T if offload_optimizer else max(lp * T, 4 * n)
        else:
            grads = 0 if offload_optimizer else lp * _overlap(shape.groups, world) + 4 * n
        optimizer = 12 * n
        if offload_optimizer:  # master, m, v, fp32 gradients, and a pinned 16-bit copy of the partition
            cpu, optimizer = 16 * n + lp * n, 0
    elif stage == 3:
        n = sum(math.ceil(k / world) for g in shape.groups for k in g)
        n_all = sum(math.ceil(k / world) for k in shape.numels)
        persistent = sum(k for k in shape.numels if k <= persistence_threshold)
        params, grads, optimizer = lp * (n_all + persistent), (lp + 4) * n, 12 * n
        if offload_optimizer:
            cpu, grads, optimizer = 16 * n, 0, 0
        if offload_params:
            cpu, params = cpu + lp * n_all, lp * persistent
    else:
        raise PlanError(f"zero.stage {stage}: want 0-3")
    return {"params": params, "grads": grads, "optimizer": optimizer, "cpu": cpu}


def buffer_bytes(shape: ModelShape, stage: int, lp: int, zero) -> dict[str, int]:
    """DeepSpeed's temporary buffers per rank, from its bucket sizes (`zero`: DeepSpeedZeroConfig)."""
    T = shape.trainable
    if stage == 0:
        return {"allreduce": lp * min(T, ALLREDUCE_BUCKET)}
    if stage == 1:
        return {"reduce": lp * min(T, zero.reduce_bucket_size)}
    if stage == 2:
        if not zero.contiguous_gradients:
            return {"reduce": lp * min(T, zero.reduce_bucket_size)}
        # torch.empty(reduce_bucket_size) whatever the model's size; a second one with overlap_comm.
        return {"reduce": (2 if zero.overlap_comm else 1) * lp * zero.reduce_bucket_size}
    # ZeRO-3: one reduce bucket; the layer being computed, gathered whole, and in backward its whole gradient
    # before the reduce-scatter; the next parameters fetched ahead.
    return {"reduce": lp * zero.reduce_bucket_size, "gathered_layer": 2 * lp * shape.largest_module,
            "prefetch": lp * min(zero.prefetch_bucket_size, shape.params)}


# ----------------------------------------------------------------------------- activations


def activation_bytes(cfg: Config, micro_batch: int, seq_len: int, lp: int,
                     checkpointing: bool) -> dict[str, int]:
    """Activation bytes of one micro-batch kept for the backward (see the module docstring for the terms)."""
    from pretrain.models.transformer import TransformerConfig, d_ff, head_dim, n_kv_heads

    m = cfg.model
    if not isinstance(m, TransformerConfig):
        raise PlanError(f"model.type={m.type}: pretrain plan models the memory of Transformer families only")
    from pretrain.kernels.linear_cross_entropy import chunk_rows

    tokens = micro_batch * seq_len
    h, q, kv = m.d_model, m.n_heads * head_dim(m), n_kv_heads(m) * head_dim(m)
    mlp = (3 if m.mlp == "swiglu" else 2) * d_ff(m)
    stats = 2 * (8 if m.norm == "layernorm" else 4)  # fp32 mean and rstd (LayerNorm) or rstd (RMSNorm), 2 norms
    layer = tokens * (lp * (4 * h + 3 * q + 2 * kv + mlp) + 4 * m.n_heads + stats)
    n_moe = plan_moe.moe_layers(m)  # mixture-of-experts layers keep their experts' and router's tensors instead
    moe_layer = layer + tokens * (plan_moe.moe_layer_bytes_per_token(m, d_ff(m), lp) - lp * mlp) if n_moe else 0
    if checkpointing:
        layers = m.n_layers * tokens * lp * h + max(layer, moe_layer)
    else:
        layers = (m.n_layers - n_moe) * layer + n_moe * moe_layer
    head = tokens * 2 * lp * h + 4 * m.vocab_size * h + lp * chunk_rows(tokens, m.vocab_size, h) * m.vocab_size
    a2a = plan_moe.all_to_all_bytes(m, tokens, lp)
    return {"layers": layers, "head": head, "all_to_all": a2a, "total": layers + head + a2a}


# ----------------------------------------------------------------------------- the plan


@dataclass
class Plan:
    gpu: str
    gpus: int
    zero_stage: int
    precision: str
    micro_batch_size: int
    seq_len: int
    params: int
    trainable: int
    per_rank_bytes: dict[str, int]
    cpu_bytes_per_rank: int
    activations_bytes: dict[str, int]  # one micro-batch, with and without activation checkpointing
    buffers_bytes: dict[str, int]
    device_bytes: int
    reserve_bytes: int
    fits: bool
    headroom_bytes: int  # negative: short by this much
    largest_micro_batch: int  # 0: not even one sequence fits
    mfu: float
    peak_flops_per_gpu: float
    flops_per_token: float
    step_time_s: float
    tokens_per_s: float
    steps: int
    tokens: int
    time_to_budget_s: float
    gpu_hours: float

    def as_dict(self) -> dict:
        return asdict(self)

    def verdict(self) -> str:
        use = f"{self.per_rank_bytes['total'] / GiB:.1f} GiB per GPU of {self.gpu}'s {self.device_bytes / GiB:.1f} GiB"
        reserve = f"a {self.reserve_bytes / GiB:.0f} GiB reserve"
        if self.fits:
            return f"fits: {use} ({self.headroom_bytes / GiB:.1f} GiB to spare after {reserve})"
        return f"does not fit: {use}, short by {-self.headroom_bytes / GiB:.1f} GiB after {reserve}"


def _total_steps(cfg: Config, step_tokens: int, flops_per_token: float) -> int:
    """The configured run length in optimizer steps: train.steps, or what train.tokens / train.flops take at
    this plan's tokens per step (pretrain.length's rounding; no data manifests needed)."""
    t = cfg.train
    if getattr(t, "steps", None) is not None:
        return t.steps
    from pretrain.length import LengthError, steps_for

    try:
        return steps_for(units_per_step=step_tokens, tokens=getattr(t, "tokens", None), flops=getattr(t, "flops", None),
                         flops_per_unit=flops_per_token)
    except LengthError as e:
        raise PlanError(str(e)) from None


def device(name: str):
    """The peak-table entry for a --gpu name such as h100-sxm, or a PlanError listing the known ones."""
    from pretrain.metrics.flops import SPECS, device_spec

    spec = device_spec(name)
    if spec is None:
        known = ", ".join(s.model.lower().replace(" ", "-") for s in SPECS)
        raise PlanError(f"--gpu {name!r}: not in the peak table (known: {known})")
    return spec


def make_plan(cfg: Config, gpu: str, gpus: int | None = None, mfu: float = 0.4,
              seq_len: int | None = None) -> Plan:
    """The plan of `cfg` on `gpus` GPUs (default cluster.workers) of type `gpu`. `seq_len` defaults to
    model.max_seq_len: rows of the full length the model allows."""
    from pretrain.metrics.flops import peak_for
    from pretrain.models import get_family

    spec = device(gpu)
    world = gpus or cfg.cluster.workers
    t, z = cfg.train, cfg.zero
    if not 0 < mfu <= 1:
        raise PlanError(f"--mfu {mfu}: want a fraction in (0, 1]")
    if t.global_batch_size % (t.micro_batch_size * world):
        raise PlanError(f"train.global_batch_size ({t.global_batch_size}) is not a multiple of "
                        f"train.micro_batch_size x {world} GPUs ({t.micro_batch_size * world})")
    seq = seq_len or getattr(cfg.model, "max_seq_len", None)
    if not seq:
        raise PlanError(f"model.type={cfg.model.type}: no max_seq_len; pass --seq-len")
    lp = 2 if t.precision == "bf16" else 4
    shape = model_shape(cfg)
    zero = zero_settings(cfg, world)
    states = expert_sharded_states(shape, plan_moe.expert_parallel(cfg.model), z.stage, world, lp,
                                   offload_optimizer=z.offload_optimizer, offload_params=z.offload_params,
                                   persistence_threshold=zero.param_persistence_threshold)
    buffers = buffer_bytes(shape, z.stage, lp, zero)
    fixed = states["params"] + states["grads"] + states["optimizer"] + sum(buffers.values())
    acts = {ac: activation_bytes(cfg, t.micro_batch_size, seq, lp, ac)["total"] for ac in (False, True)}
    usable = spec.memory_gb * 1e9 - RESERVE_BYTES

    def total(mb: int) -> int:
        return fixed + activation_bytes(cfg, mb, seq, lp, t.activation_checkpointing)["total"]

    # The largest micro-batch whose total fits: total() grows with it, so bisect over 1..2^20.
    largest = bisect.bisect_right(range(1, 2**20 + 1), usable, key=total)
    per_rank = {"params": states["params"], "grads": states["grads"], "optimizer": states["optimizer"],
                "activations": acts[t.activation_checkpointing], "buffers": sum(buffers.values())}
    per_rank["total"] = sum(per_rank.values())
    workload = {"seq_len": seq, "head_fraction": 1.0}  # causal LM: every token reaches the head
    fpt = get_family(cfg.model.type).flops_per_unit(cfg.model, shape.counts, workload)
    peak = peak_for(spec.model, t.precision, t.tf32)
    step_tokens = t.global_batch_size * seq
    # Model FLOPs at the stated MFU: activation checkpointing's recomputation is part of what lowers MFU.
    step_time = fpt * step_tokens / (world * peak * mfu)
    steps = _total_steps(cfg, step_tokens, fpt)
    return Plan(
        gpu=spec.model, gpus=world, zero_stage=z.stage, precision=t.precision,
        micro_batch_size=t.micro_batch_size, seq_len=seq, params=shape.params, trainable=shape.trainable,
        per_rank_bytes=per_rank, cpu_bytes_per_rank=states["cpu"],
        activations_bytes={"checkpointing": acts[True], "no_checkpointing": acts[False]},
        buffers_bytes=buffers, device_bytes=int(spec.memory_gb * 1e9), reserve_bytes=RESERVE_BYTES,
        fits=per_rank["total"] <= usable, headroom_bytes=int(usable - per_rank["total"]),
        largest_micro_batch=largest, mfu=mfu, peak_flops_per_gpu=peak, flops_per_token=fpt,
        step_time_s=step_time, tokens_per_s=step_tokens / step_time, steps=steps, tokens=steps * step_tokens,
        time_to_budget_s=steps * step_time, gpu_hours=steps * step_time * world / 3600,
    )


def _gib(b: float) -> str:
    return f"{b / GiB:8.2f} GiB"


def _duration(s: float) -> str:
    return f"{s / 86400:,.1f} days" if s >= 2 * 86400 else f"{s / 3600:,.2f} hours"


def render(plan: Plan, activation_checkpointing: bool) -> str:
    """The plan as the lines `pretrain plan` prints."""
    p, r, a = plan, plan.per_rank_bytes, plan.activations_bytes
    ac = "on" if activation_checkpointing else "off"
    buffers = ", ".join(f"{k} {v / GiB:.2f}" for k, v in p.buffers_bytes.items())
    lines = [
        f"{p.params / 1e6:,.1f}M parameters ({p.trainable / 1e6:,.1f}M trained), ZeRO-{p.zero_stage}, "
        f"{p.precision}, {p.gpus} x {p.gpu}, micro-batch {p.micro_batch_size} x {p.seq_len} tokens",
        "per GPU:",
        f"  params       {_gib(r['params'])}",
        f"  grads        {_gib(r['grads'])}",
        f"  optimizer    {_gib(r['optimizer'])}   (fp32 master weights and AdamW m, v)",
        f"  activations  {_gib(r['activations'])}   (checkpointing {ac}; on: {a['checkpointing'] / GiB:.2f} GiB, "
        f"off: {a['no_checkpointing'] / GiB:.2f} GiB)",
        f"  buffers      {_gib(r['buffers'])}   ({buffers} GiB)",
        f"  total        {_gib(r['total'])}",
    ]
    if p.cpu_bytes_per_rank:
        lines.append(f"  CPU memory   {_gib(p.cpu_bytes_per_rank)}   (offloaded optimizer/parameters)")
    lines += [
        p.verdict(),
        f"largest micro-batch that fits: {p.largest_micro_batch}",
        f"at {p.mfu:.0%} MFU ({p.peak_flops_per_gpu / 1e12:,.0f} TFLOP/s peak, {p.flops_per_token / 1e9:.3g} GFLOP "
        f"per token): {p.step_time_s:.3g} s per step, {p.tokens_per_s:,.0f} tokens/s",
        f"{p.steps:,} steps = {p.tokens:.3g} tokens: {_duration(p.time_to_budget_s)}, {p.gpu_hours:,.1f} GPU-hours",
    ]
    return "\n".join(lines)
