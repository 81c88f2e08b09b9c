"""Loss spikes and non-finite values (pretrain/train/spike.py), end to end through Ray Train and real DeepSpeed
engines on real shards: a window of uniformly random tokens met after the model has learned is skipped and
logged with its data (ZeRO-0), a streak longer than `spike.max_consecutive` rolls the run back and passes the
window (ZeRO-3, 2 workers), a DiT image with a NaN value is skipped (ZeRO-3, 2 workers), and past
`spike.max_rollbacks` the run stops with one line."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from pretrain.data import build_train_stream
from pretrain.data.manifest import FORMAT, MANIFEST, write_manifest
from pretrain.data.shards import ShardWriter, read_shard
from pretrain.errors import RunError
from pretrain.launch.local import launch
from pretrain.load import load_config
from pretrain.train.schedule import lr_lambda
from tests.test_train import TINY

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.slow, pytest.mark.ray]

WINDOW = (37, 39)  # the steps whose samples are random tokens
SPIKE = ["spike.window=20", "spike.warmup=10", "spike.sigma=4", "eval.batches=4"]


def _cfg(tmp_path: Path, train: Path, val: Path, name: str, *extra: str):
    return load_config(ROOT / "configs/gpt-tiny.yaml", [
        *TINY, *SPIKE, f"run.dir={tmp_path / 'runs'}", f"run.name={name}", f"data.train={train}", f"data.val={val}",
        *extra])


def _rows(run: Path) -> list[dict]:
    return [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]


def _rewrite(src: Path, out: Path, chosen: dict[str, set[int]], replace) -> None:
    """A copy of the shard directory `src` in which sample i of shard s (i in chosen[s]) has its members
    replaced by `replace(members, rng)`; the manifest's sizes and hashes follow."""
    out.mkdir(parents=True)
    manifest = json.loads((src / MANIFEST).read_text())
    rng = np.random.default_rng(0)
    for entry in manifest["shards"]:
        samples = read_shard(str(src / entry["name"]), sha256=entry["sha256"], nbytes=entry["bytes"], label=entry["name"])
        writer = ShardWriter(out / entry["name"])
        for i, (key, members) in enumerate(samples):
            writer.add(key, replace(members, rng) if i in chosen.get(entry["name"], ()) else members)
        entry.update(writer.close())
    for f in src.iterdir():  # the tokenizer and anything else beside the shards
        if not (out / f.name).exists() and f.is_file():
            (out / f.name).write_bytes(f.read_bytes())
    write_manifest(out, manifest)


def _where(cfg, steps: range) -> dict[int, list[dict]]:
    """The data of each of `steps` (a pure function of the step: any layout of the same global batch)."""
    t = cfg.train
    stream = build_train_stream(cfg.data, seed=t.seed, rank=0, world_size=1, micro_batch_size=t.global_batch_size,
                                grad_accum=1)
    return {s: stream.samples_of(s - 1) for s in steps}


@pytest.fixture(scope="module")
def spiked(tiny_shards, tmp_path_factory) -> Path:
    """tiny_shards' train/ with the samples of steps WINDOW (global batch 8) as uniformly random GPT-2 tokens."""
    out = tmp_path_factory.mktemp("spiked") / "shards" / "train"  # the same source name: the same order
    cfg = _cfg(out.parent, tiny_shards / "train", tiny_shards / "val", "x")
    chosen: dict[str, set[int]] = {}
    for where in _where(cfg, range(WINDOW[0], WINDOW[1] + 1)).values():
        for p in where:
            chosen.setdefault(p["shard"], set()).update(p["samples"])

    def noise(members: dict, rng) -> dict:
        (name, payload), = ((k, v) for k, v in members.items() if k.startswith("tokens."))
        dtype = np.dtype("<u2" if name == "tokens.u16" else "<u4")
        tokens = rng.integers(0, 50257, len(payload) // dtype.itemsize).astype(dtype)
        return {**members, name: tokens.tobytes()}

    _rewrite(tiny_shards / "train", out, chosen, noise)
    return out


def _summary(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


def test_random_tokens_are_skipped_with_their_data(tmp_path, tiny_shards, spiked, ray_local):
    """ZeRO-0, one worker: the window's steps are skipped and logged once each with their data; the final
    validation loss is within 2% of a run on data without the window."""
    extra = ["zero.stage=0", "cluster.workers=1", "train.steps=56"]  # within the first epoch (58 steps)
    cfg = _cfg(tmp_path, spiked, tiny_shards / "val", "spiked", *extra)
    launch(cfg, started_at=time.time(), quiet=True)
    clean = _cfg(tmp_path, tiny_shards / "train", tiny_shards / "val", "clean", *extra)
    launch(clean, started_at=time.time(), quiet=True)

    runs = tmp_path / "runs"
    rows = _rows(runs / "spiked")
    window = list(range(WINDOW[0], WINDOW[1] + 1))
    skips = {r["step"]: r for r in rows if "skipped" in r}
    # The window's steps on their loss; the clean data has gradient-norm spikes of its own (one step's norm ~60x
    # the others'), skipped as well, in either run.
    assert all(skips[s]["skipped"].startswith("loss ") for s in window), skips
    assert "sigma above the window's mean" in skips[window[0]]["skipped"]
    assert all(r["skipped"].startswith("grad_norm ") for s, r in skips.items() if s not in window)
    where = _where(cfg, list(skips))
    assert all(r["positions"] == where[s] for s, r in skips.items())
    assert [r["skips"] for r in skips.values()] == list(range(1, len(skips) + 1))
    trained = [r["step"] for r in rows if "loss" in r]
    assert trained == [s for s in range(1, 57) if s not in skips]  # each step once: trained or skipped
    assert json.loads((runs / "spiked" / "skips.json").read_text())["skipped"] == [
        {"step": s, "reason": r["skipped"]} for s, r in skips.items()]
    got, ref = _summary(runs / "spiked"), _summary(runs / "clean")
    assert got["skipped_steps"] == len(skips) and got["rollbacks"] == 0
    assert got["final_val_loss"] == pytest.approx(ref["final_val_loss"], rel=0.02)
    assert got["final_val_loss"] < got["initial_val_loss"] - 1


def test_a_long_streak_rolls_back_and_passes_the_window(tmp_path, tiny_shards, spiked, ray_local):
    """ZeRO-3, two workers, spike.max_consecutive 2 below the window's 3 steps: back to the checkpoint of step
    30, steps 31-36 again, steps 37-38 passed untrained; step 39 is skipped on its own and the run finishes.
    With spike.max_rollbacks 0 (one worker) the same streak stops the run with one line naming the step and its data."""
    extra = ["zero.stage=3", "cluster.workers=2", "checkpoint.every=10", "spike.max_consecutive=2", "train.steps=48"]
    cfg = _cfg(tmp_path, spiked, tiny_shards / "val", "rollback", *extra)
    launch(cfg, started_at=time.time(), quiet=True)
    run = tmp_path / "runs" / "rollback"
    rows = _rows(run)
    events = [r for r in rows if "rollback" in r]
    assert [(r["step"], r["rollback"]) for r in events] == [(38, {"to": 30, "skip_steps": [37, 38]})]
    steps = [r["step"] for r in rows if "loss" in r or "skipped" in r]
    assert steps == list(range(1, 49))  # each step logged once, the replayed ones not again
    skipped = [r["step"] for r in rows if "skipped" in r]
    assert {37, 38, 39} <= set(skipped)  # and the data's own gradient-norm spikes, if any (see above)
    assert all(r["skipped"].startswith("grad_norm ") for r in rows if r.get("skipped") and r["step"] > 39)
    record = json.loads((run / "skips.json").read_text())
    assert record["rollbacks"] == [{"step": 38, "to": 30, "skip_steps": [37, 38]}]
    assert [s["step"] for s in record["skipped"]] == skipped
    summary = _summary(run)
    assert summary["skipped_steps"] == len(skipped) and summary["rollbacks"] == 1
    assert summary["goodput"]["lost_s"] > 0 and summary["goodput"]["recovery_s"] > 0  # steps 31-38 again

    stuck = _cfg(tmp_path, spiked, tiny_shards / "val", "stuck", *extra, "spike.max_rollbacks=0", "train.steps=40",
                 "zero.stage=0", "cluster.workers=1")
    with pytest.raises(RunError) as e:
        launch(stuck, started_at=time.time(), quiet=True)
    line = str(e.value)
    assert "\n" not in line and line.startswith("step 38: 2 skipped steps in a row (37-38)"), line
    first = _where(cfg, [38])[38][0]
    assert f"{first['shard']} samples {','.join(map(str, first['samples']))}" in line


# ----------------------------------------------------------------------------- DiT: a NaN in an image

DIT = ["model.d_model=48", "model.n_layers=2", "model.n_heads=3", "model.kernels=reference", "model.input_size=8",
       "model.in_channels=4", "model.patch_size=2", "train.micro_batch_size=4", "train.global_batch_size=8",
       "schedule.warmup_steps=3", "schedule.decay_steps=20", "eval.every=0", "checkpoint.every=0", "eval.batches=1",
       "objective.eval_samples=0", "objective.grid_samples=0", "log.wandb=false", "ema.decay=0.9"]


def _latents(out: Path, n: int, nan: set[int] = frozenset()) -> None:
    """Latent shards (4x8x8 float32, 10 classes) of smooth random values; sample i in `nan` holds one NaN."""
    import io

    from pretrain.data.write_images import _write_split

    rng = np.random.default_rng(1)

    def items(start: int):
        for i in range(start, n):
            z = rng.normal(size=(4, 8, 8)).astype(np.float32)
            if i in nan:
                z[1, 3, 5] = np.nan
            yield z, i % 10, None

    def npy(z) -> bytes:
        buf = io.BytesIO()
        np.save(buf, z, allow_pickle=False)
        return buf.getvalue()

    header = {"format": FORMAT, "kind": "images", "split": out.name, "origin": "test", "classes": [str(c) for c in range(10)],
              "members": ["latent.npy", "label.cls"], "samples_per_shard": 40, "encoding": "latents",
              "latent_scale": 1.0}
    _write_split(out, header, items, n, 40, lambda k: None, member="latent.npy", encode=npy)


def test_a_nan_in_an_image_skips_its_step(tmp_path, ray_local):
    """A DiT (ZeRO-3, two workers) meets a latent with one NaN value at step 6: that step is skipped (no
    weight, schedule or EMA update), its data named; every other step trains and the run finishes."""
    data = tmp_path / "latents"
    _latents(data / "val", 16)
    _latents(data / "train", 120)
    cfg = load_config(ROOT / "configs/dit-fashion.yaml", [
        *DIT, f"run.dir={tmp_path / 'runs'}", "run.name=nan", f"data.train={data / 'train'}",
        f"data.val={data / 'val'}", "train.steps=10", "zero.stage=3", "cluster.workers=2"])
    where = _where(cfg, [6])[6][0]  # the order does not depend on the values: the same with the NaN
    shutil.rmtree(data / "train")
    _latents(data / "train", 120, {40 * int(where["shard"][6:12]) + where["samples"][0]})
    launch(cfg, started_at=time.time(), quiet=True)

    rows = _rows(tmp_path / "runs" / "nan")
    skips = [r for r in rows if "skipped" in r]
    assert [r["step"] for r in skips] == [6] and "nan" in skips[0]["skipped"], skips
    assert any(p["shard"] == where["shard"] and where["samples"][0] in p["samples"] for p in skips[0]["positions"])
    trained = [r for r in rows if "loss" in r]
    assert [r["step"] for r in trained] == [s for s in range(1, 11) if s != 6]
    assert all(np.isfinite(r["loss"]) and np.isfinite(r["grad_norm"]) for r in trained)
    lr, fn = {r["step"]: r["lr"] for r in trained}, lr_lambda(cfg.schedule, 10)
    assert lr[5] == pytest.approx(cfg.optimizer.lr * fn(5)) and lr[7] == pytest.approx(cfg.optimizer.lr * fn(6))
    assert _summary(tmp_path / "runs" / "nan")["skipped_steps"] == 1


# ----------------------------------------------------------------------------- a refused step, in one engine


class _Gate:
    def __init__(self):
        self.allow = True

    def allows(self) -> bool:
        return self.allow

    def measured(self, norm: float) -> None:
        pass


def _state(engine) -> list:
    """Every number a step may change: this rank's weights, the optimizer's state, the learning rate."""
    import torch

    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
    weights = [getattr(p, "ds_tensor", p).detach().clone() for p in engine.module.parameters()]
    moments = [t.detach().clone() for s in inner.state.values() for t in s.values() if torch.is_tensor(t)]
    return [*weights, *moments, torch.tensor(engine.get_lr())]


@pytest.mark.parametrize("stage", [0, 3])
def test_a_refused_step_changes_nothing(stage, one_rank_group, tmp_path):
    """A real engine at ZeRO 0 and 3: a step its gate refuses leaves weights, Adam's moments and the schedule
    exactly as they were; the next allowed step moves them again."""
    import torch

    from pretrain.train.engine import backward_and_step, build_engine

    cfg = _cfg(tmp_path, Path("unused"), Path("unused"), "unit", f"zero.stage={stage}", "train.steps=10")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    gate = _Gate()
    engine = build_engine(cfg, model, 1, steps=10, gate=gate)
    x = torch.randn(4, 8)

    def step() -> float:
        for _ in range(2):  # grad_accum 2: global batch 8 of micro-batches of 4 on one rank
            norm = backward_and_step(engine, engine(x).pow(2).mean(), 1.0 if stage == 0 else None, gate)
        return norm

    step()
    before = _state(engine)
    gate.allow = False
    refused = step()
    assert all(torch.equal(a, b) for a, b in zip(before, _state(engine), strict=True))
    gate.allow = True
    assert step() == pytest.approx(refused, rel=1e-6)  # the same weights and batch: no gradient left behind
    assert not all(torch.equal(a, b) for a, b in zip(before, _state(engine), strict=True))
