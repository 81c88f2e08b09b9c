"""WSD-S ladders (pretrain.scaling.wsds, ladder.mode: wsds): where trunks checkpoint and branches start, the
plan's FLOPs against the same points from scratch and against configs/ladder-tiny.yaml's grid, bad input in
one line, resume bookkeeping with an injected run function, and one small real ladder under Ray (a trunk and
two cooldowns) that is interrupted and resumed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from pretrain.load import load_config
from pretrain.scaling.books import finished
from pretrain.scaling.ladder import plan_ladder
from pretrain.scaling.runner import run_ladder, train_run
from pretrain.scaling.wsds import WsdsError, checkpoint_every, cooldown_start, plan_size, total_for_start

ROOT = Path(__file__).resolve().parents[1]
TPP = [5, 10, 20, 40, 80]
# configs/ladder-tiny.yaml on the test shards (GPT-2 BPE, 32-token sequences): its sizes, batch and schedule.
ON_SHARDS = ["model.vocab_size=50304", "model.max_seq_len=32", "model.kernels=reference", "log.wandb=false"]


def _tiny(tmp_path: Path, shards: Path, config: str = "ladder-tiny.yaml", *extra: str):
    return load_config(ROOT / "configs" / config, [*ON_SHARDS, f"run.dir={tmp_path / 'runs'}",
                                                   f"data.train={shards / 'train'}", f"data.val={shards / 'val'}", *extra])


def test_points_line_up():
    for f in (0.1, 0.2, 0.25, 0.5):
        for k in range(1, 400):  # every cooldown start has a run length, nearest the one asked
            assert cooldown_start(total_for_start(k, f, round(k / (1 - f))), f) == k
    asked = [("tpp5", 187), ("tpp10", 373), ("tpp20", 746), ("tpp40", 1491), ("tpp80", 2982)]
    every, points = plan_size(asked, fraction=0.2, warmup=5, size="16x1")
    assert every == 150 == cooldown_start(187, 0.2)  # doubling points: one checkpoint per first stretch
    *branches, trunk = points
    assert trunk.trunk and trunk.steps == 2982 and not any(p.trunk for p in branches)
    for p, (_, want) in zip(branches, asked[:-1], strict=True):
        assert p.start % every == 0 and cooldown_start(p.steps, 0.2) == p.start <= cooldown_start(trunk.steps, 0.2)
        assert abs(p.steps - want) <= 0.05 * want
    assert checkpoint_every([100, 130, 170]) == 34  # 102, 136, 170: each within 5%; no larger interval is
    assert checkpoint_every([7, 11]) == 1
    with pytest.raises(WsdsError, match=r"size 16x1, point tpp1: its cooldown would start at step 4 of 5, inside "
                                        r"schedule.warmup_steps=5"):
        plan_size([("tpp1", 5), ("tpp80", 400)], fraction=0.2, warmup=5, size="16x1")
    with pytest.raises(WsdsError, match="0 < schedule.decay_fraction < 1"):
        plan_size(asked, fraction=0.0, warmup=5, size="16x1")


def test_plan_and_its_cost(tmp_path, tiny_shards):
    cfg = _tiny(tmp_path, tiny_shards, "ladder-tiny.yaml", "schedule.type=wsd")
    lad = plan_ladder(cfg, tokens_per_param=TPP, out=tmp_path / "w")
    assert lad.mode == "wsds" and len(lad.rungs) == 30
    for size, every in lad.checkpoint_every.items():
        rungs = [r for r in lad.rungs if r.size == size]
        trunk, branches = rungs[-1], rungs[:-1]
        t_cfg = lad.configs[trunk.name]
        assert trunk.branch_from is None and t_cfg.checkpoint.every == every and t_cfg.checkpoint.keep is None
        assert t_cfg.train.steps == trunk.steps and trunk.own_flops == trunk.flops
        for r in branches:  # a branch starts at one of the trunk's checkpoints, in its stable phase
            path, step = r.branch_from.rsplit("@", 1)
            assert path == str(lad.rdir(trunk)) and lad.configs[r.name].checkpoint.branch_from == r.branch_from
            assert int(step) % every == 0 and cooldown_start(r.steps, 0.2) == int(step)
            assert int(step) <= cooldown_start(trunk.steps, 0.2) and int(step) >= cfg.schedule.warmup_steps
            assert r.own_flops == pytest.approx(r.flops * (r.steps - int(step)) / r.steps)
            assert abs(r.tokens / r.params_active / r.tokens_per_param - 1) < 0.06 and r.budget is None
    # Against the same 30 points from scratch: (T5 + f (T1 + ... + T4)) / (T1 + ... + T5) = 95 / 155 for
    # doubling points, never under T5 / sum = 52%: 40% needs denser points.
    cost = lad.cost()
    assert cost["ratio"] == pytest.approx(95 / 155, abs=0.01)
    dense = plan_ladder(cfg, tokens_per_param=list(range(8, 81, 8)), out=tmp_path / "d").cost()
    assert dense["ratio"] <= 0.40
    doc = lad.plan_json()
    assert doc["mode"] == "wsds" and doc["flops"] == cost and doc["tokens_per_param"] == TPP
    # configs/ladder-tiny-wsds.yaml against configs/ladder-tiny.yaml's 18-run grid: more points, <= 40% of it.
    grid = plan_ladder(_tiny(tmp_path, tiny_shards), out=tmp_path / "g")
    wsds = plan_ladder(_tiny(tmp_path, tiny_shards, "ladder-tiny-wsds.yaml"), out=tmp_path / "s")
    assert len(wsds.rungs) >= len(grid.rungs) == 18 and grid.cost()["ratio"] == 1
    assert wsds.cost()["plan"] <= 0.40 * grid.cost()["plan"]
    assert all(r.budget is not None for r in wsds.rungs)  # budgets: isoFLOP groups for approach 2


def test_bad_input(tmp_path, tiny_shards):
    from pretrain import cli

    cli._mount(["pretrain", "scaling"])
    cfg = _tiny(tmp_path, tiny_shards, "ladder-tiny.yaml", "schedule.type=wsd")
    config = tmp_path / "l.yaml"
    config.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))

    def one_line(args: list[str], match: str) -> None:
        r = CliRunner().invoke(cli.app, ["scaling", "ladder", str(config), *args, "--plan"])
        assert r.exit_code == 2 and len(r.stderr.strip().splitlines()) == 1 and match in r.stderr, r.output

    one_line(["--tokens-per-param", "0,5"], "--tokens-per-param must be positive")
    one_line(["--tokens-per-param", "5,x"], "--tokens-per-param must be comma-separated numbers")
    one_line(["--tokens-per-param", "0.0005,5"], "inside schedule.warmup_steps=5")  # 16x1: its start in warm-up
    one_line(["--tokens-per-param", "5", "--budgets", "1e12"], "budgets or tokens per parameter, not both")
    one_line(["--tokens-per-param", "5", "--mode", "grid"], "tokens per parameter need the wsds mode")
    one_line(["--tokens-per-param", "5", "schedule.type=cosine"], "a WSD-S ladder trains on schedule.type=wsd")
    one_line(["--tokens-per-param", "5", "schedule.decay_fraction=0"], "0 < schedule.decay_fraction < 1")
    tree = cfg.model_dump(mode="json")
    tree["ladder"]["tokens_per_param"] = [5, 10]  # with the block's budgets
    config.write_text(yaml.safe_dump(tree))
    one_line([], "budgets or tokens_per_param, not both")
    r = CliRunner().invoke(cli.app, ["scaling", "ladder", str(ROOT / "configs/ladder-tiny-wsds.yaml"), *ON_SHARDS,
                                     f"data.train={tiny_shards / 'train'}", f"data.val={tiny_shards / 'val'}",
                                     "--out", str(tmp_path / "p"), "--plan"])
    assert r.exit_code == 0 and "points each from scratch" in r.output, r.output
    assert json.loads((tmp_path / "p" / "ladder.json").read_text())["mode"] == "wsds"


def _wsds(tmp_path: Path, shards: Path, out: str):
    """One size, three budgets: a 16-step trunk (checkpoints every 3 steps) and cooldowns of 8 and 12 steps."""
    cfg = load_config(ROOT / "configs/gpt-tiny.yaml", [
        "model.vocab_size=50304", "model.max_seq_len=32", "model.kernels=reference", "train.micro_batch_size=4",
        "train.global_batch_size=8", "schedule.warmup_steps=2", "schedule.type=wsd", "schedule.decay_fraction=0.25",
        "schedule.min_lr_ratio=0", "eval.every=0", "eval.batches=1", "checkpoint.every=0", "cluster.workers=1",
        "zero.stage=0", "objective.sample_tokens=0", "log.wandb=false", f"run.dir={tmp_path / 'runs'}",
        "run.name=ws", f"data.train={shards / 'train'}", f"data.val={shards / 'val'}"])
    probe = plan_ladder(cfg, budgets=[1e12], sizes=["32x1"], head_dim=32, out=tmp_path / "probe", mode="wsds")
    per_step = probe.rungs[0].flops_per_token * 8 * 32
    return plan_ladder(cfg, budgets=[8 * per_step, 12 * per_step, 16 * per_step], sizes=["32x1"], head_dim=32,
                       out=tmp_path / out, mode="wsds")


def test_resume_keeps_finished(tmp_path, tiny_shards):
    """Bookkeeping without training: the trunk runs first; an interrupted ladder runs only what is missing."""
    lad = _wsds(tmp_path, tiny_shards, "fake")
    assert [r.steps for r in lad.rungs] == [8, 12, 16] and lad.checkpoint_every == {"32x1": 3}
    assert [r.branch_from and r.branch_from.rsplit("@")[1] for r in lad.rungs] == ["6", "9", None]
    tried: list = []

    def broken(tree: dict) -> None:
        tried.append(tree["run"]["name"])
        raise RuntimeError("out of memory")

    tracker = run_ladder(lad, run_fn=broken, cluster=False, show=False)  # the trunk fails: no cooldown starts
    assert tried == [lad.rungs[2].name] and tracker.failed == {
        lad.rungs[2].name: "out of memory", **{r.name: f"its trunk {lad.rungs[2].name} failed" for r in lad.rungs[:2]}}
    calls: list = []

    def fake(tree: dict, stop_at: int | None = None) -> None:
        name = tree["run"]["name"]
        if len(calls) == stop_at:
            raise KeyboardInterrupt  # the ladder stopped before this run
        calls.append(name)
        r = next(r for r in lad.rungs if r.name == name)
        (Path(tree["run"]["dir"]) / name / "summary.json").write_text(json.dumps(
            {"steps": r.steps, "tokens": r.tokens, "flops": r.flops, "final_loss": 5.0, "params": r.params}))

    with pytest.raises(KeyboardInterrupt):
        run_ladder(lad, run_fn=lambda t: fake(t, stop_at=2), cluster=False, show=False)
    assert calls == [lad.rungs[2].name, lad.rungs[0].name]  # the trunk first, then the cooldowns
    calls.clear()
    tracker = run_ladder(lad, run_fn=fake, cluster=False, show=False)
    assert calls == [lad.rungs[1].name] and sorted(tracker.done) == sorted(r.name for r in lad.rungs)
    assert all(json.loads((lad.rdir(r) / "summary.json").read_text())["budget"] == r.budget for r in lad.rungs)


@pytest.mark.slow
@pytest.mark.ray
def test_wsds_ladder_trains_and_resumes(tmp_path, tiny_shards, ray_local):
    """A real WSD-S ladder: the trunk trains, the ladder stops before its cooldowns; run again, it keeps the
    trunk and trains each cooldown from the trunk's checkpoint: each step once, the schedule of a run from
    scratch, the summary's tokens those of the whole run."""
    from pretrain.train.schedule import lr_lambda

    lad = _wsds(tmp_path, tiny_shards, "real")
    trunk = lad.rungs[-1]

    def trunk_only(tree: dict) -> None:
        if tree["run"]["name"] == trunk.name:
            return train_run(tree)
        # The first cooldown killed after logging two steps and before any checkpoint of its own: run again, it
        # starts over from the trunk's checkpoint, and those rows go.
        (lad.rdir(lad.rungs[0]) / "metrics.jsonl").write_text(
            "".join(json.dumps({"step": s, "loss": 99.0, "lr": 0.0}) + "\n" for s in (7, 8)))
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_ladder(lad, run_fn=trunk_only, cluster=False, show=False)
    assert finished(lad.rdir(trunk), trunk)
    trunk_metrics = (lad.rdir(trunk) / "metrics.jsonl").read_text()
    tracker = run_ladder(lad, cluster=False, show=False)
    assert not tracker.failed and sorted(tracker.done) == sorted(r.name for r in lad.rungs)
    assert (lad.rdir(trunk) / "metrics.jsonl").read_text() == trunk_metrics  # kept, not trained again
    for r in lad.rungs:
        rows = [json.loads(ln) for ln in (lad.rdir(r) / "metrics.jsonl").read_text().splitlines()]
        steps = [row["step"] for row in rows if "loss" in row]
        start = int(r.branch_from.rsplit("@")[1]) if r.branch_from else 0
        assert steps == list(range(start + 1, r.steps + 1))  # each step once, from the branch step on
        assert 99.0 not in [row.get("loss") for row in rows]
        sched = lr_lambda(lad.configs[r.name].schedule, r.steps)
        lrs = [row["lr"] for row in rows if "loss" in row]
        assert lrs == pytest.approx([lad.configs[r.name].optimizer.lr * sched(s) for s in steps])
        s = json.loads((lad.rdir(r) / "summary.json").read_text())
        assert s["steps"] == r.steps and s["tokens"] == r.tokens and s["budget"] == r.budget
