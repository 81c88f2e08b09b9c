"""Data that cannot execute: a manifest's shard and tokenizer names are file names inside their source.

A name that would leave the source (`../x.tar`, an absolute path), run a command (`a.tar; touch PWNED #`)
or read another URL is refused with one line naming the manifest and the name, on the driver
(`validate_data`), in a worker (`build_train_stream`) and in `pretrain data inspect --verify`, and no
command runs. Remote manifests get the same check (tests/data/test_object_store.py).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pretrain.cli.data import app
from pretrain.config import DataConfig
from pretrain.data import DataError, build_train_stream, tokenizer_for, validate_data

EVIL = ["a.tar; touch PWNED #", "../x.tar", "/ABS/x.tar"]  # /ABS: replaced by a real absolute path


def _source_with(sources, tmp_path: Path, name: str) -> tuple[Path, str]:
    """A copy of the prose source whose first shard is listed (and stored) under `name`; returns the
    directory and the name as written into the manifest."""
    d = tmp_path / "src" / "train"
    shutil.copytree(sources["prose"], d)
    first = d / "shard-000000.tar"
    if name.startswith("/ABS/"):
        name = str(tmp_path / name.removeprefix("/ABS/"))
    target = Path(name) if name.startswith("/") else d / name
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(first, target)  # the file is there: only the name check stands in the way
    m = json.loads((d / "index.json").read_text())
    m["shards"][0]["name"] = name
    (d / "index.json").write_text(json.dumps(m))
    return d, name


def _no_pwned(*dirs: Path) -> None:
    for d in dirs:
        assert not list(d.rglob("PWNED")), f"a command ran in {d}"


@pytest.mark.parametrize("evil", EVIL)
def test_manifest_name_leaving_the_source_is_refused(sources, tmp_path, monkeypatch, evil):
    monkeypatch.chdir(tmp_path)
    d, name = _source_with(sources, tmp_path, evil)
    cfg = DataConfig(train=str(d))
    for attempt in (lambda: validate_data(cfg),
                    lambda: build_train_stream(cfg, seed=0, rank=0, world_size=1, micro_batch_size=2, grad_accum=1)):
        with pytest.raises(DataError) as e:
            attempt()
        msg = str(e.value)
        assert "\n" not in msg and msg.startswith("data.train: manifest ")
        assert str(d / "index.json") in msg and repr(name) in msg
    _no_pwned(tmp_path, Path.cwd())


@pytest.mark.parametrize("evil", EVIL)
def test_inspect_verify_refuses_the_same(sources, tmp_path, monkeypatch, evil):
    monkeypatch.chdir(tmp_path)
    d, name = _source_with(sources, tmp_path, evil)
    result = CliRunner().invoke(app, ["inspect", str(d), "--verify"])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: directory: manifest ")
    assert str(d / "index.json") in lines[0] and repr(name) in lines[0]
    _no_pwned(tmp_path, Path.cwd())


@pytest.mark.parametrize("evil", ["pipe:touch PWNED.tar", "s3://b/x.tar", "a b.tar", "$(touch PWNED).tar",
                                  "`touch PWNED`.tar", "a'b.tar", "a>b.tar", "a\nb.tar", "a\x00b.tar",
                                  ".hidden.tar", "a..b.tar", "x.tar/", "x.tgz", "", 7])
def test_every_command_or_path_form_is_refused(sources, tmp_path, monkeypatch, evil):
    """Only letters, digits, '.', '_', '-' (no leading dot, no '..'), ending .tar: what the writers produce."""
    monkeypatch.chdir(tmp_path)
    d = tmp_path / "train"
    shutil.copytree(sources["prose"], d)
    m = json.loads((d / "index.json").read_text())
    m["shards"][0]["name"] = evil
    (d / "index.json").write_text(json.dumps(m))
    with pytest.raises(DataError, match=r"^data.train: manifest .* lists shard .*not a file name") as e:
        validate_data(DataConfig(train=str(d)))
    assert "\n" not in str(e.value)
    _no_pwned(tmp_path)


def test_writer_names_pass(sources):
    """The names `pretrain data text` writes (shard-000000.tar) are accepted as they are."""
    names = [s["name"] for s in json.loads((sources["prose"] / "index.json").read_text())["shards"]]
    assert names[0] == "shard-000000.tar"
    assert validate_data(DataConfig(train=str(sources["prose"])))["train_samples"] > 0


def test_tokenizer_name_cannot_enter_a_command(sources, tmp_path, monkeypatch):
    """A user's own `pipe:` source finds its tokenizer by putting the manifest's tokenizer name into the
    command: that name is checked like a shard name, so the manifest cannot extend the command."""
    monkeypatch.chdir(tmp_path)
    d = tmp_path / "train"
    shutil.copytree(sources["prose"], d)
    m = json.loads((d / "index.json").read_text())
    m["tokenizer"] = "t.json; touch PWNED #"
    (d / "index.json").write_text(json.dumps(m))
    n = len(m["shards"])
    cfg = DataConfig(train=f"pipe:cat {d}/shard-{{000000..{n - 1:06d}}}.tar")
    for attempt in (lambda: validate_data(cfg), lambda: tokenizer_for(cfg)):
        with pytest.raises(DataError, match=r"^data.train: manifest .*index.json names tokenizer "
                                            r"'t.json; touch PWNED #', neither 'gpt2' nor a file name"):
            attempt()
    _no_pwned(tmp_path)


def test_users_own_pipe_source_is_announced(sources):
    """A `pipe:` path the user wrote runs its command, and validate_data says so in one line per source."""
    d = sources["prose"]
    n = len(json.loads((d / "index.json").read_text())["shards"])
    cmd = f"cat {d}/shard-{{000000..{n - 1:06d}}}.tar"
    info = validate_data(DataConfig(train=f"pipe:{cmd}", val=str(sources["val"])))
    assert info["commands"] == [f"data.train executes a command: {cmd}"]
    assert validate_data(DataConfig(train=str(d)))["commands"] == []
