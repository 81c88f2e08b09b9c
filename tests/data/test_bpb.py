"""Bits per byte: a trained byte-level BPE (`pretrain data tokenizer`), shards that record the UTF-8 bytes
each sample's targets cover, the stream that carries them, and the causal-LM metric `bpb` built on them."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from pretrain.cli.data import app
from pretrain.config import DataConfig
from pretrain.data import build_train_stream, build_val_batches, load_tokenizer, validate_data
from pretrain.data import write_text as wt
from pretrain.data.shards import read_shard
from pretrain.load import load_config
from pretrain.models import get_family
from pretrain.objectives import build_objective
from pretrain.train.loop import summarize
from tests.helpers import write_corpus

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bpe(tmp_path_factory) -> dict[str, Path]:
    """A 320-token BPE trained by the CLI on a generated corpus, and shards of that corpus written with it."""
    root = tmp_path_factory.mktemp("bpe")
    files = [str(f) for f in write_corpus(root / "corpus", n_docs=3, words_per_doc=600, seed=3)]
    tok = root / "tok" / "tokenizer.json"
    r = CliRunner().invoke(app, ["tokenizer", *files, "--vocab-size", "320", "--out", str(tok)])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(app, ["text", *files, "--tokenizer", str(tok), "--out", str(root / "shards"),
                                 "--seq-len", "16", "--val-fraction", "0.2", "--shard-size", "24KB"])
    assert r.exit_code == 0, r.output
    return {"tokenizer": tok, "shards": root / "shards", "corpus": root / "corpus"}


def test_token_bytes_cover_the_text_exactly():
    """Each token gets the text between the previous end and its own: multi-byte characters split over
    byte-level tokens, the separator special and a trailing run all sum to the text's UTF-8 bytes."""
    wt._init_worker("gpt2")
    text = "héllo wörld 日本語 <|endoftext|>  x\n\n  y😀 "
    enc = wt._TOK.encode(text)
    counts = wt.token_bytes(text, enc.offsets)
    assert counts.sum() == len(text.encode()) and len(counts) == len(enc.ids)
    assert counts[enc.ids.index(50256)] == len("<|endoftext|>")  # the literal text, not a separator
    assert wt.token_bytes("", []).size == 0


def test_trained_tokenizer_is_byte_level(bpe):
    tok = load_tokenizer(str(bpe["tokenizer"]))
    assert tok.get_vocab_size() == 320 and tok.token_to_id("<|endoftext|>") is not None
    text = "Speak, sweet lady 日本 — ok\n\n"  # never seen: bytes, not unknowns
    assert tok.decode(tok.encode(text).ids) == text
    assert len(tok.encode(" king").ids) < len(" king")  # merges learnt from the corpus


@pytest.mark.parametrize("case", ["small_vocab", "out_dir", "missing"])
def test_tokenizer_cli_bad_input_is_one_line(tmp_path, case):
    good = str(write_corpus(tmp_path / "c", n_docs=1, words_per_doc=50)[0])
    args = {"small_vocab": [good, "--vocab-size", "100", "--out", str(tmp_path / "t.json")],
            "out_dir": [good, "--vocab-size", "300", "--out", str(tmp_path)],
            "missing": [str(tmp_path / "nope.txt"), "--vocab-size", "300", "--out", str(tmp_path / "t.json")]}[case]
    r = CliRunner().invoke(app, ["tokenizer", *args])
    assert r.exit_code == 2, r.output
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in r.output, r.output
    assert not (tmp_path / "t.json").exists()


def test_samples_record_the_bytes_their_targets_cover(bpe):
    """ASCII text: a row's bytes are exactly the UTF-8 length of its decoded targets (the separator
    decodes to nothing); per-shard and split totals add up."""
    tok = load_tokenizer(str(bpe["tokenizer"]))
    for split in ("train", "val"):
        d = bpe["shards"] / split
        m = json.loads((d / "index.json").read_text())
        assert m["bytes_member"] == "bytes.u32" and len(m["shards"]) > 1
        for s in m["shards"]:
            counts = []
            for key, members in read_shard(str(d / s["name"]), sha256=s["sha256"], nbytes=s["bytes"], label=s["name"]):
                row = np.frombuffer(members["tokens.u16"], dtype="<u2")
                (n,) = np.frombuffer(members["bytes.u32"], dtype="<u4")
                assert n == len(tok.decode(row[1:].tolist()).encode()), key
                counts.append(int(n))
            assert sum(counts) == s["text_bytes"]
        assert m["text_bytes"] == sum(s["text_bytes"] for s in m["shards"])
    # Train and val targets together tile the corpus: all of its bytes but the first token's and the tails.
    total = sum(f.stat().st_size for f in bpe["corpus"].iterdir())
    covered = sum(json.loads((bpe["shards"] / s / "index.json").read_text())["text_bytes"] for s in ("train", "val"))
    assert 0.9 * total < covered <= total


def _objective(shards: Path, **extra):
    cfg = load_config(ROOT / "configs/gpt-tiny.yaml", [
        "model.n_layers=1", "model.d_model=32", "model.n_heads=2", "model.max_seq_len=16", "model.vocab_size=320",
        "model.kernels=reference", f"data.train={shards / 'train'}", f"data.val={shards / 'val'}",
        *[f"{k}={v}" for k, v in extra.items()]])
    return cfg, build_objective(cfg, validate_data(cfg.data))


def test_val_bpb_is_loss_per_byte(bpe):
    """bpb = summed NLL / ln 2 / bytes, so over the validation set val_bpb = val_loss / ln 2 x tokens / bytes."""
    cfg, obj = _objective(bpe["shards"])
    torch.manual_seed(0)
    model = get_family("gpt2").build(cfg.model).eval()
    raw = build_val_batches(cfg.data, rank=0, world_size=1, micro_batch_size=4, max_batches=3)
    metrics = obj.evaluate(model, [(obj.prepare(b, torch.device("cpu")), True) for b in raw])
    (loss, tokens), (bits, nbytes) = metrics["loss"], metrics["bpb"]
    assert tokens == 3 * 4 * 16 and nbytes == sum(int(b["bytes"].sum()) for b in raw)
    assert (bits / nbytes).item() == pytest.approx((loss / tokens).item() / math.log(2) * tokens.item() / nbytes.item(),
                                                   rel=1e-6)
    assert 1.0 < (bits / nbytes).item() < 8.0  # an untrained model: about ln V nats per token


def test_shards_without_byte_counts_give_no_bpb(bpe, tmp_path):
    """Older shards (no `bytes_member`) stream tokens alone and the objective reports no bpb; a mix of old
    and new train sources streams without bytes too."""
    import shutil

    old = tmp_path / "old"
    shutil.copytree(bpe["shards"], old)
    for split in ("train", "val"):
        m = json.loads((old / split / "index.json").read_text())
        del m["bytes_member"]
        (old / split / "index.json").write_text(json.dumps(m))
    cfg, obj = _objective(old)
    raw = build_val_batches(cfg.data, rank=0, world_size=1, micro_batch_size=4, max_batches=1)
    assert "bytes" not in raw[0]
    model = get_family("gpt2").build(cfg.model).eval()
    assert set(obj.evaluate(model, [(obj.prepare(raw[0], torch.device("cpu")), True)])) == {"loss"}
    mixed = DataConfig(train=[{"path": str(bpe["shards"] / "train"), "name": "new"},
                              {"path": str(old / "train"), "name": "old"}])
    batch = next(build_train_stream(mixed, seed=0, rank=0, world_size=1, micro_batch_size=4, grad_accum=1))
    assert "bytes" not in batch
    new = next(build_train_stream(DataConfig(train=str(bpe["shards"] / "train")), seed=0, rank=0, world_size=1,
                                  micro_batch_size=4, grad_accum=1))
    assert new["bytes"].shape == (4,) and int(new["bytes"].min()) > 0


def test_summary_carries_final_val_bpb(tmp_path):
    rows = [{"step": 0, "val_loss": 7.0, "val_bpb": 3.5, "tokens": 0},
            {"step": 1, "loss": 6.0, "bpb": 3.0, "tokens": 64, "flops": 1.0},
            {"step": 1, "val_loss": 5.0, "val_bpb": 2.5, "tokens": 64}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    s = summarize(tmp_path / "metrics.jsonl", "tokens")
    assert (s["initial_val_bpb"], s["final_val_bpb"], s["final_val_loss"]) == (3.5, 2.5, 5.0)
