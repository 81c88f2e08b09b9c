"""The states a resume reads besides DeepSpeed's files: per-rank RNG (JSON, never unpickled; an old pickle
only with the user's opt-in) and the data-stream state (plain JSON values). No Ray, no DeepSpeed."""

from __future__ import annotations

import json
import pickle
import random

import numpy as np
import pytest
import torch

from pretrain.train import checkpoint as ckpt


def _draws() -> tuple:
    return (random.random(), random.gauss(0, 1), np.random.rand(3).tolist(), np.random.randn(2).tolist(),
            torch.rand(3).tolist())


@pytest.fixture
def no_unpickling(monkeypatch):
    """Any unpickling (torch.load included, which goes through pickle) fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("unpickled")

    for mod, name in ((pickle, "load"), (pickle, "loads"), (torch, "load")):
        monkeypatch.setattr(mod, name, refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)


def test_rng_round_trip_is_json_and_never_unpickles(tmp_path, no_unpickling):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    random.gauss(0, 1)  # leaves a cached gaussian in python's and numpy's states
    np.random.randn(1)
    ckpt.save_rng(tmp_path, rank=3)
    expected = _draws()
    _draws()  # move every generator on
    assert ckpt.load_rng(tmp_path, rank=3) is True
    assert _draws() == expected
    state = json.loads(ckpt.rng_file(tmp_path, 3).read_text())
    assert set(state) == {"format", "python", "numpy", "torch", "cuda"}
    assert ckpt.load_rng(tmp_path, rank=0) is False  # a rank the checkpoint did not have: nothing to restore


class _Payload:
    """A pickle that touches a file when unpickled: the proof that something ran."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (type(self.marker).touch, (self.marker,))


def test_old_pickled_rng_needs_the_opt_in(tmp_path, monkeypatch):
    monkeypatch.delenv(ckpt.TRUST_PICKLES, raising=False)
    marker = tmp_path / "ran"
    torch.save({"python": _Payload(marker)}, tmp_path / "rng-rank0.pt")
    with pytest.raises(ckpt.CheckpointPickleError) as e:
        ckpt.load_rng(tmp_path, rank=0)
    msg = str(e.value)
    assert "\n" not in msg and "rng-rank0.pt" in msg and f"{ckpt.TRUST_PICKLES}=1" in msg
    assert not marker.exists()

    # A real old-format state (what earlier versions wrote) loads once the user trusts the directory.
    random.seed(5)
    np.random.seed(6)
    torch.manual_seed(7)
    torch.save({"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
                "cuda": None}, tmp_path / "rng-rank1.pt")
    expected = _draws()
    monkeypatch.setenv(ckpt.TRUST_PICKLES, "1")
    assert ckpt.load_rng(tmp_path, rank=1) is True
    assert _draws() == expected


def test_unknown_rng_format_is_one_line(tmp_path):
    ckpt.rng_file(tmp_path, 0).write_text(json.dumps({"format": 99}))
    with pytest.raises(ValueError, match="format 99") as e:
        ckpt.load_rng(tmp_path, rank=0)
    assert "\n" not in str(e.value)


def test_data_state_is_plain_json(tiny_shards):
    """The data state rides in DeepSpeed's client state: it must hold JSON values only (no numpy scalars,
    no tuples or sets), so that it could be written and read as JSON anywhere."""
    from pretrain.config import DataConfig
    from pretrain.data import build_train_stream

    stream = build_train_stream(DataConfig(train=[str(tiny_shards / "train")]), seed=0, rank=0, world_size=2,
                                micro_batch_size=2, grad_accum=2)
    it = iter(stream)
    for _ in range(3):
        next(it)
    state = stream.state_dict()
    assert json.loads(json.dumps(state)) == state
    stream.load_state_dict(json.loads(json.dumps(state)))
