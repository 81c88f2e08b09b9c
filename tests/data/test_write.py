"""The text writer: real GPT-2 tokenization, packing, deterministic shards, restart, bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from pretrain.cli.data import app
from pretrain.data import load_tokenizer
from pretrain.data import write_text as wt
from pretrain.data.shards import read_shard
from tests.helpers import write_corpus

HAMLET = ("To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n"
          "The slings and arrows of outrageous fortune,\nOr to take arms against a sea of troubles\n")


def test_gpt2_reference_ids():
    tok = load_tokenizer("gpt2")
    assert tok.get_vocab_size() == 50257 and tok.token_to_id("<|endoftext|>") == 50256
    assert tok.encode("Hello world").ids == [15496, 995]
    assert tok.encode("The quick brown fox jumps over the lazy dog").ids == [464, 2068, 7586, 21831, 18045, 625, 262,
                                                                          16931, 3290]
    assert tok.encode(" Hello\n\nworld!").ids == [18435, 198, 198, 6894, 0]
    assert tok.encode("<|endoftext|>").ids == [50256]
    ids = tok.encode(HAMLET).ids
    assert tok.decode(ids) == HAMLET and len(ids) < len(HAMLET.split()) * 2


def _samples(d) -> tuple[list[str], np.ndarray]:
    m = json.loads((d / "index.json").read_text())
    keys, rows = [], []
    for s in m["shards"]:
        for key, members in read_shard(str(d / s["name"]), sha256=s["sha256"], nbytes=s["bytes"], label=s["name"]):
            keys.append(key)
            rows.append(np.frombuffer(members["tokens.u16"], dtype="<u2"))
    return keys, np.stack(rows)


def test_packing_and_val_split(tmp_path):
    """Samples are the document stream (EOT after each document) cut into seq_len + 1 windows of stride
    seq_len; val/ continues the same stream where train/ stops."""
    files = write_corpus(tmp_path / "c", n_docs=3, words_per_doc=400)
    files.append(tmp_path / "c" / "hamlet.txt")
    files[-1].write_text(HAMLET)
    ms = wt.write_text([str(f) for f in files], tokenizer="gpt2", out=tmp_path / "out", seq_len=20,
                       val_fraction=0.2, shard_bytes=8 << 10, workers=1)
    tok = load_tokenizer("gpt2")
    stream = [i for f in files for i in tok.encode(f.read_text()).ids + [50256]]
    L = 20
    for split in ("train", "val"):
        m = ms[split]
        keys, rows = _samples(tmp_path / "out" / split)
        assert rows.shape == (m["samples"], L + 1) and keys == [f"{i:010d}" for i in range(m["samples"])]
        assert (rows[1:, 0] == rows[:-1, -1]).all()  # consecutive samples share one token
        assert len(m["shards"]) > 1 and m["tokenizer"] == "gpt2" and m["dtype"] == "uint16"
        assert sum(s["tokens"] for s in m["shards"]) == m["tokens"] == m["samples"] * L
    train = _samples(tmp_path / "out" / "train")[1]
    val = _samples(tmp_path / "out" / "val")[1]
    flat_train = np.concatenate([train[:, :-1].ravel(), train[-1, -1:]])
    flat_val = np.concatenate([val[:, :-1].ravel(), val[-1, -1:]])
    # The split cuts between lines, so each side's tokens are exactly a stretch of the whole stream.
    assert stream[: len(flat_train)] == flat_train.tolist()
    assert stream[-len(flat_val) - ms["val"]["dropped_tokens"]:][: len(flat_val)] == flat_val.tolist()
    assert 0.1 < len(flat_val) / len(stream) < 0.3
    assert tok.decode(val[-1].tolist()) in HAMLET + "<|endoftext|>" or "question" in tok.decode(flat_val.tolist())


def test_pieces_cut_where_the_tokenizer_cuts(tmp_path, monkeypatch):
    """A long file split into many pieces tokenizes exactly like the whole file."""
    f = tmp_path / "long.txt"
    f.write_text((HAMLET + "\n  indented line\n\n\nThe end.\n") * 40)
    monkeypatch.setattr(wt, "PIECE_BYTES", 300)
    pieces, _, _ = wt.plan_pieces([f], 0.0)
    assert len(pieces) > 10
    wt._init_worker("gpt2")
    got = np.concatenate([wt.encode_piece(p)[0] for p in pieces]).tolist()
    assert got == load_tokenizer("gpt2").encode(f.read_text()).ids + [50256]


def test_jsonl_documents(tmp_path):
    f = tmp_path / "docs.jsonl"
    f.write_text("\n".join(json.dumps({"text": t}) for t in ["Hello world", "To be", "or not"]) + "\n")
    pieces, _, _ = wt.plan_pieces([f], 0.0)
    wt._init_worker("gpt2")
    tok = load_tokenizer("gpt2")
    want = [i for t in ["Hello world", "To be", "or not"] for i in tok.encode(t).ids + [50256]]
    assert np.concatenate([wt.encode_piece(p)[0] for p in pieces]).tolist() == want


def _files(d):
    return {p.relative_to(d): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def test_same_corpus_twice_is_byte_identical(tmp_path, monkeypatch):
    files = [str(f) for f in write_corpus(tmp_path / "c", n_docs=4, words_per_doc=500)]
    monkeypatch.setattr(wt, "PIECE_BYTES", 1024)  # many pieces, so the second write uses the process pool
    kw = dict(tokenizer="gpt2", seq_len=16, val_fraction=0.1, shard_bytes=8 << 10)
    wt.write_text(files, out=tmp_path / "a", workers=1, **kw)
    wt.write_text(files, out=tmp_path / "b", workers=2, **kw)  # the process pool gives the same bytes
    a, b = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert len(a) > 6 and a == b


def test_interrupted_write_keeps_finished_shards(tmp_path, monkeypatch):
    files = [str(f) for f in write_corpus(tmp_path / "c", n_docs=6, words_per_doc=500)]
    kw = dict(tokenizer="gpt2", seq_len=16, shard_bytes=8 << 10, workers=1)
    calls = []

    def stop_midway(done, total):
        calls.append(done)
        if len(calls) == 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        wt.write_text(files, out=tmp_path / "x", progress=stop_midway, **kw)
    d = tmp_path / "x" / "train"
    assert not (d / "index.json").exists()
    journal = json.loads((d / "progress.json").read_text())
    finished = {s["name"]: (d / s["name"]).stat().st_ino for s in journal["shards"]}
    assert finished and set(finished) == {p.name for p in d.glob("shard-*.tar")}  # no partial under a final name
    wt.write_text(files, out=tmp_path / "x", **kw)
    assert all((d / n).stat().st_ino == ino for n, ino in finished.items())  # kept, not rewritten
    wt.write_text(files, out=tmp_path / "clean", **kw)
    assert _files(tmp_path / "x") == _files(tmp_path / "clean")
    # A finished output is up to date: a third run tokenizes nothing and changes no byte.
    monkeypatch.setattr(wt, "encode_piece", lambda piece: pytest.fail("re-tokenized a finished split"))
    wt.write_text(files, out=tmp_path / "x", **kw)
    assert _files(tmp_path / "x") == _files(tmp_path / "clean")


def _gap_tokenizer(path) -> str:
    """Words a..z and [UNK] at ids 0..26, <|endoftext|> at 70000: a vocabulary of 28 tokens whose largest id
    needs uint32."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {chr(97 + i): i for i in range(26)} | {"[UNK]": 26, "<|endoftext|>": 70000}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path))
    return str(path)


def test_the_storage_dtype_holds_the_largest_id_not_the_token_count(tmp_path):
    (tmp_path / "doc.txt").write_text("a b c d e f g h\n" * 20)
    tok = _gap_tokenizer(tmp_path / "tokenizer.json")
    m = wt.write_text([str(tmp_path / "doc.txt")], tokenizer=tok, out=tmp_path / "out", seq_len=8, workers=1)["train"]
    assert (m["vocab_size"], m["dtype"], m["member"], m["eos_id"]) == (70001, "uint32", "tokens.u32", 70000)
    d = tmp_path / "out" / "train"
    rows = [np.frombuffer(members["tokens.u32"], dtype="<u4") for s in m["shards"]
            for _, members in read_shard(str(d / s["name"]), sha256=s["sha256"], nbytes=s["bytes"], label=s["name"])]
    assert np.concatenate(rows).max() == 70000  # the separator, whole (uint16 would have stored 4464)


def test_an_id_past_the_vocabulary_is_refused_before_it_is_stored(tmp_path, monkeypatch):
    """With the vocabulary taken as the token count (28: uint16), the separator 70000 would wrap around: the
    writer stops with one line naming the file, the tokenizer and the id, leaving no shard and no manifest."""
    (tmp_path / "doc.txt").write_text("a b c d e f g h\n" * 100)
    tok = _gap_tokenizer(tmp_path / "tokenizer.json")
    monkeypatch.setattr(wt, "id_bound", lambda t: t.get_vocab_size(with_added_tokens=True))
    monkeypatch.setattr(wt, "PIECE_BYTES", 256)  # the separator comes in a later piece, a shard being written
    with pytest.raises(wt.DataError) as e:
        wt.write_text([str(tmp_path / "doc.txt")], tokenizer=tok, out=tmp_path / "out", seq_len=8, workers=1)
    msg = str(e.value)
    assert "\n" not in msg and str(tmp_path / "doc.txt") in msg and tok in msg and "70000" in msg and "uint16" in msg
    d = tmp_path / "out" / "train"
    assert not (d / "index.json").exists() and not list(d.glob("shard-*"))


@pytest.mark.parametrize("case", ["missing", "tokenizer", "val_fraction", "binary", "seq_len"])
def test_cli_bad_input_is_one_line(tmp_path, case):
    good = write_corpus(tmp_path / "c", n_docs=1, words_per_doc=50)[0]
    args = {"missing": [str(tmp_path / "nope.txt"), "--tokenizer", "gpt2"],
            "tokenizer": [str(good), "--tokenizer", str(tmp_path / "tok.json")],
            "val_fraction": [str(good), "--tokenizer", "gpt2", "--val-fraction", "1.5"],
            "binary": [str(good), str(tmp_path / "bin.txt"), "--tokenizer", "gpt2"],
            "seq_len": [str(good), "--tokenizer", "gpt2", "--seq-len", "100000"]}[case]
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00abc" * 10)
    if "--seq-len" not in args:
        args += ["--seq-len", "16"]
    r = CliRunner().invoke(app, ["text", *args, "--out", str(tmp_path / "out")])
    assert r.exit_code == 2, r.output
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in r.output
    assert not (tmp_path / "out" / "train" / "index.json").exists()


def test_cli_text_and_inspect(tmp_path):
    files = [str(f) for f in write_corpus(tmp_path / "c", n_docs=2, words_per_doc=300)]
    r = CliRunner().invoke(app, ["text", *files, "--tokenizer", "gpt2", "--out", str(tmp_path / "o"),
                                 "--seq-len", "32", "--val-fraction", "0.1", "--shard-size", "16KB"])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(app, ["inspect", str(tmp_path / "o" / "train"), "--verify", "--json"])
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    m = json.loads((tmp_path / "o" / "train" / "index.json").read_text())
    assert summary["samples"] == m["samples"] and summary["verified_shards"] == len(m["shards"]) > 1
    assert summary["tokenizer"] == "gpt2" and summary["seq_len"] == 32
