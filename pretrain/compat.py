"""Every use of another library's private API in the project, in one place: Ray Train v2's `_internal` classes, DeepSpeed's
op table, engine internals and universal-checkpoint script, torch's dynamo and inductor internals, W&B's transaction log
(its format and `Record` protos). Nothing in them is promised to survive a release, so each entry calls `check(lib)`
with the library it touches, and `VERSIONS` records the version every entry was written (and tested) against.

Policy, when the installed version differs from the recorded one (`check`):
- another release (major.minor): `PrivateAPIVersionError`, one line naming the library, the version written against
  and the version found. The code below may do the wrong thing silently, so nothing runs on it unchecked.
- a patch release only (or another local build, `+cpu` / `+cu128`: ignored): the same line as a
  `PrivateAPIVersionWarning`. Failing would block a bug-fix upgrade that almost never moves internals; the
  warning says to re-run the tests (tests/test_compat.py fails on any difference) and record the new version.

The libraries are imported inside the functions: this module sits in the bottom layer (pretrain.errors'), and
importing it imports none of them.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import mmap
import os
import re
import struct
import warnings
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path

# The versions each entry below was written against (ray, deepspeed and wandb: their distributions; torch: its
# public version, without a local build tag).
VERSIONS = {"ray": "2.60.0", "deepspeed": "0.19.8", "torch": "2.13.0", "wandb": "0.31.0"}


class PrivateAPIVersionError(RuntimeError):
    """An installed library is another release than the one a private use of it was written against."""


class PrivateAPIVersionWarning(UserWarning):
    """An installed library is another patch release than the one a private use of it was written against."""


@functools.cache
def installed(lib: str) -> str:
    """The installed version of `lib`, from its distribution's metadata (the library is not imported), without
    a local build tag (`2.13.0+cpu` -> `2.13.0`)."""
    return importlib.metadata.version(lib).split("+", 1)[0]


def _release(version: str) -> tuple[str, ...]:
    m = re.match(r"(\d+)\.(\d+)", version)
    return m.groups() if m else (version,)


def mismatch(lib: str, found: str | None = None) -> str | None:
    """The one line saying that `lib`'s installed version (or `found`) is not the recorded one; None when it is."""
    written = VERSIONS[lib]
    found = installed(lib) if found is None else found.split("+", 1)[0]
    if found == written:
        return None
    return (f"{lib} {found} is installed, but pretrain/compat.py's uses of private {lib} APIs were written "
            f"against {lib} {written}: check them and record {found} in pretrain.compat.VERSIONS")


def check(lib: str, found: str | None = None) -> None:
    """Before a private use of `lib`: raise PrivateAPIVersionError when the installed version (or `found`, for the
    tests) is another release than the recorded one; warn when it is another patch release (module docstring)."""
    found = installed(lib) if found is None else found
    line = mismatch(lib, found)
    if line is None:
        return
    if _release(found) != _release(VERSIONS[lib]):
        raise PrivateAPIVersionError(line)
    warnings.warn(line, PrivateAPIVersionWarning, stacklevel=2)


# ----------------------------------------------------------------------------- ray (Ray Train v2 internals)


def ray_worker_group_callback() -> type:
    """Ray Train v2's worker-group callback base class (the DeveloperAPI `RunConfig.callbacks` takes, defined in
    `_internal`): its `before_init_train_context(workers)` runs once the worker actors exist."""
    check("ray")
    from ray.train.v2._internal.execution.callback import WorkerGroupCallback

    return WorkerGroupCallback


def _fixed_policy_without_autoscaler() -> type:
    """Ray Train's fixed-size scaling policy without its autoscaling coordinator (see `ray_embedded_torch_trainer`)."""
    from ray.train.v2._internal.execution.scaling_policy.fixed import FixedScalingPolicy

    class OneMachineScalingPolicy(FixedScalingPolicy):
        def after_controller_start(self, train_run_context) -> None:
            pass  # no coordinator to register with

        def _maybe_send_resource_request(self) -> None:
            pass  # (cancelling is a no-op already while no coordinator client exists)

    return OneMachineScalingPolicy


def ray_embedded_torch_trainer() -> type:
    """Ray Train's TorchTrainer without the dataset manager and placement-group cleaner callbacks (filtered out of
    its private `_create_default_callbacks`) and with a fixed-size policy that sends the autoscaling coordinator
    no resource requests (swapped in by its private `_initialize_and_run_controller`); why: launch/trainer.py."""
    check("ray")
    from ray.train.torch import TorchTrainer
    from ray.train.v2._internal.callbacks import DatasetsCallback
    from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback
    from ray.train.v2._internal.execution.scaling_policy.fixed import FixedScalingPolicy

    policy = _fixed_policy_without_autoscaler()

    class EmbeddedTorchTrainer(TorchTrainer):
        def _create_default_callbacks(self):
            return [c for c in super()._create_default_callbacks()
                    if not isinstance(c, DatasetsCallback | PlacementGroupCleanerCallback)]

        def _initialize_and_run_controller(self, **kwargs):
            if type(kwargs.get("scaling_policy")) is FixedScalingPolicy:
                kwargs["scaling_policy"] = policy(scaling_config=kwargs["scaling_policy"].scaling_config)
            return super()._initialize_and_run_controller(**kwargs)

    return EmbeddedTorchTrainer


def ray_preemption_notice():
    """Ray Train's preemption notice for this worker (its PreemptionInfo) or None, read from the private train
    context without the barrier that the public `ray.train.get_preemption_info` is (every worker would have to
    call it at the same point); None outside a Ray Train worker."""
    check("ray")
    try:
        from ray.train.v2._internal.execution.context import get_train_context

        return get_train_context().preemption_context.preemption_info
    except Exception:  # noqa: BLE001 - no train context in this process (yet)
        return None


def ray_auth_token_loader():
    """Ray's own auth-token loader (env vars, then token file), from `ray._raylet`: `has_token` and `get_raw_token`.
    (pretrain/launch/jobs.py's `find_token`.)"""
    check("ray")
    from ray._raylet import AuthenticationTokenLoader

    return AuthenticationTokenLoader.instance()


# ----------------------------------------------------------------------------- deepspeed


def deepspeed_skip_op(name: str) -> None:
    """Mark DeepSpeed's op `name` incompatible, so DeepSpeed never builds it: DeepSpeed keeps its op-compatibility
    table in one module dict (`deepspeed.ops.__compatible_ops__`) whose edits persist."""
    check("deepspeed")
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__[name] = False


@contextlib.contextmanager
def deepspeed_module_state_without(engine, drop: set[str]):
    """While inside, the DeepSpeed engine's module state (what `save_checkpoint` writes) leaves out every name in
    `drop`. DeepSpeed's save calls `self.module_state_dict`: an instance attribute shadows the method, and
    deleting it restores the method."""
    check("deepspeed")
    full = engine.module_state_dict
    engine.module_state_dict = lambda *a, **k: OrderedDict((n, t) for n, t in full(*a, **k).items() if n not in drop)
    try:
        yield
    finally:
        del engine.module_state_dict


@contextlib.contextmanager
def deepspeed_checkpoint_engine(engine, make):
    """While inside, the DeepSpeed engine saves through `make(its own checkpoint engine)` (yielded): DeepSpeed's
    `save_checkpoint` writes every file with `self.checkpoint_engine.save(state_dict, path)` and calls its
    create / makedirs / commit, an attribute `_configure_checkpointing` sets; the engine's own is put back."""
    check("deepspeed")
    own = engine.checkpoint_engine
    engine.checkpoint_engine = make(own)
    try:
        yield engine.checkpoint_engine
    finally:
        engine.checkpoint_engine = own


def deepspeed_to_universal(input_folder: str, output_folder: str) -> None:
    """DeepSpeed's universal-checkpoint conversion of one step directory, in this process: the `main` of its
    `ds_to_universal` script, driven by the argparse namespace its command line would build."""
    check("deepspeed")
    import argparse

    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    ds_to_universal(argparse.Namespace(
        input_folder=input_folder, output_folder=output_folder, num_extract_workers=1, num_merge_workers=1,
        keep_temp_folder=False, strict=True, inject_missing_state=True,
    ))


def deepspeed_pending_grad_norm(engine) -> float | None:
    """The global gradient norm (before clipping) that the engine's ZeRO 1-3 or bf16 optimizer has taken for the
    step under way, read while its inner optimizer steps: those optimizers keep it in their private
    `_global_grad_norm` before calling the inner `step`, and the engine's public `get_global_grad_norm` copies it
    only after the step. None when the engine's optimizer is the inner one (ZeRO-0 in fp32) or keeps no norm."""
    check("deepspeed")
    norm = getattr(engine.optimizer, "_global_grad_norm", None)
    return None if norm is None else float(norm)


def deepspeed_expert_groups(ep: int) -> str:
    """Make DeepSpeed's expert-parallel and expert-data-parallel groups of size `ep` once (collective: every rank);
    their name. `deepspeed.utils.groups._create_expert_and_data_parallel` is what DeepSpeed's own MoE layer calls,
    and its registry (`_get_expert_parallel_group_dict`) is where its engine and ZeRO look the groups up."""
    check("deepspeed")
    from deepspeed.utils import groups

    name = f"ep_size_{ep}"
    if name not in groups._get_expert_parallel_group_dict():
        groups._create_expert_and_data_parallel(ep)
    return name


def deepspeed_expert_group(name: str):
    """The expert-parallel process group named `name` (the ranks that hold one layer's experts between them)."""
    check("deepspeed")
    from deepspeed.utils import groups

    return groups._get_expert_parallel_group(name)


def deepspeed_expert_data_rank(name: str) -> int:
    """This rank's place in its expert-data-parallel group of `name` (the ranks that hold the same experts)."""
    check("deepspeed")
    from deepspeed.utils import groups

    return groups._get_expert_data_parallel_rank(name)


# How DeepSpeed's MoE checkpoints name an expert's tensors: `<layer>.deepspeed_moe.experts.deepspeed_experts.<i>.<w>`,
# `<i>` global in the files and local in the state dict its `load_checkpoint` hands on (it renames them).
DEEPSPEED_EXPERT_KEY = "deepspeed_moe.experts.deepspeed_experts"


def deepspeed_expert_file(save_dir: str, tag: str, layer: int, expert: int) -> str:
    """The file of global expert `expert` of the `layer`-th MoE layer in a DeepSpeed checkpoint (`save_dir/tag/
    layer_<L>_expert_<E>_mp_rank_00_model_states.pt`): where `load_checkpoint` of an engine with MoE layers reads
    each rank's experts (its private static `_get_expert_ckpt_name`)."""
    check("deepspeed")
    from deepspeed.runtime.engine import DeepSpeedEngine

    return DeepSpeedEngine._get_expert_ckpt_name(save_dir, layer, expert, tag, checkpoint_mp_rank=0)


def deepspeed_load_universal(engine, universal: bool) -> None:
    """Whether the engine's next `load_checkpoint` reads DeepSpeed's universal format: the `checkpoint.load_universal`
    of the config it was built with, kept in its private `_config` and read at every load (a rollback may load
    a checkpoint of another world size than the one the run resumed from)."""
    check("deepspeed")
    engine._config.load_universal_checkpoint = universal


# ----------------------------------------------------------------------------- torch (dynamo, inductor)


def torch_inductor_cache_dir(path: str) -> None:
    """Inductor's caches (FX graph, AOTAutograd) in `path` unless the user chose a directory."""
    check("torch")
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    # Inductor writes its default (/tmp/torchinductor_<user>) into the environment the first time anything asks
    # for it, imports included: only a directory the user chose is kept.
    if os.environ.get("TORCHINDUCTOR_CACHE_DIR", default_cache_dir()) == os.path.abspath(default_cache_dir()):
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = path


def torch_dynamo_recompiles(limit: int) -> None:
    """Let dynamo compile at most `limit` graphs of one function (then it runs it eagerly), and log each
    recompile with the guard that failed."""
    check("torch")
    import torch._dynamo
    import torch._logging

    torch._dynamo.config.recompile_limit = limit
    torch._logging.set_logs(recompiles=True)


def torch_dynamo_counts() -> dict:
    """What dynamo compiled in this process, from its counters: frames compiled (each recompile is one more),
    graphs, and graph breaks."""
    check("torch")
    from torch._dynamo.utils import counters

    return {"compiled_frames": int(counters["frames"]["ok"]), "compiled_graphs": int(counters["stats"]["unique_graphs"]),
            "graph_breaks": int(sum(counters["graph_break"].values()))}


def torch_has_grouped_mm() -> bool:
    """Whether this torch has `torch._grouped_mm` (a benchmark baseline for pretrain.kernels.grouped_mm)."""
    import torch

    return hasattr(torch, "_grouped_mm")


def torch_grouped_mm(xs, w, counts):
    """`torch._grouped_mm` for 2-D rows in consecutive groups times 3-D per-group weights: group e (counts[e]
    rows) times w[e]; it takes the groups' end offsets as int32."""
    check("torch")
    import torch

    return torch._grouped_mm(xs, w, offs=torch.cumsum(counts, 0).to(torch.int32))


# ----------------------------------------------------------------------------- wandb (its transaction log)

# A run's `run-<id>.wandb`: a 7-byte header (":W&B", 0xBEE1, version 0), then LevelDB-log records in 32 KiB
# blocks. Each chunk has a 7-byte header (crc32c, length, type: 1 full, 2 first, 3 middle, 4 last); a block's
# tail too short for a header is padding, so every block starts with a chunk. The records are wandb's private
# `Record` protos (wandb >= 0.20 writes the log from its Go core and ships no Python reader).
_WANDB_BLOCK, _WANDB_CHUNK, _WANDB_HEADER = 32768, 7, b":W&B\xe1\xbe\x00"


def _wandb_records(data, pos: int) -> Iterator[bytes]:
    """The whole records from offset `pos` (a block's start) on; chunks that continue a record begun before `pos`
    are passed over, and a torn or garbled tail (a writer killed mid-record) ends the iteration."""
    pending = None
    while pos + _WANDB_CHUNK <= len(data):
        room = _WANDB_BLOCK - pos % _WANDB_BLOCK
        if room < _WANDB_CHUNK:
            pos += room
            continue
        _, length, kind = struct.unpack_from("<IHB", data, pos)
        end = pos + _WANDB_CHUNK + length
        if kind not in (1, 2, 3, 4) or length > room - _WANDB_CHUNK or end > len(data):
            return
        chunk, pos = bytes(data[pos + _WANDB_CHUNK:end]), end
        if kind == 1:
            yield chunk
        elif kind == 2:
            pending = chunk
        elif pending is not None:
            pending += chunk
            if kind == 4:
                yield pending
                pending = None


def wandb_last_step(path: str | Path) -> int:
    """The last history step a W&B run's transaction log (`run-<id>.wandb`) holds: what W&B has persisted of it;
    -1 for none (or not a transaction log). Read from the last block back, so a long run's log is not read
    whole: its history steps only grow (wandb drops a step below the current one)."""
    check("wandb")
    from google.protobuf.message import DecodeError
    from wandb.proto import wandb_internal_pb2 as pb

    with open(path, "rb") as f:
        if f.read(len(_WANDB_HEADER)) != _WANDB_HEADER:
            return -1
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            for block in range((len(data) - 1) // _WANDB_BLOCK, -1, -1):
                last = -1
                for raw in _wandb_records(data, max(block * _WANDB_BLOCK, len(_WANDB_HEADER))):
                    rec = pb.Record()
                    try:
                        rec.ParseFromString(raw)
                    except DecodeError:
                        break  # garbled (a torn write the length did not show): what came before stands
                    if rec.WhichOneof("record_type") == "history":
                        last = rec.history.step.num
                if last >= 0:
                    return last
    return -1
