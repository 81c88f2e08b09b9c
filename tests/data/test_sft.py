"""Supervised (chat) data: the loss mask is exactly the assistant turns, rows are packed deterministically
into exactly seq_len tokens, the stream gives per-document positions and resumes exactly, and the `sft`
objective's loss on a packed row equals the sum of the losses of its examples run one by one.

The tokenizer is a real one: byte-level BPE trained with `tokenizers` on a tiny text, wrapped as a
transformers fast tokenizer with a chat template (a default system turn, as SmolLM2's has), saved with
save_pretrained."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from pretrain.cli.data import app
from pretrain.config import DataConfig
from pretrain.data import DataError, build_train_stream, build_val_batches, tokenizer_for, validate_data
from pretrain.data.chat_tokenizer import load_chat_tokenizer
from pretrain.data.decode import segment_positions
from pretrain.data.sft_render import IGNORE, encode_example
from pretrain.data.write_sft import pack, write_sft
from pretrain.load import config_from_dict
from tests.helpers import CHAT_WORDS, make_chat_tokenizer

ROOT = Path(__file__).resolve().parents[2]
WORDS = CHAT_WORDS


@pytest.fixture(scope="module")
def tokdir(tmp_path_factory) -> Path:
    return make_chat_tokenizer(tmp_path_factory.mktemp("tok") / "tiny-chat")


def records(n: int, seed: int = 0) -> list[dict]:
    """Chat records of varied lengths: single- and two-turn chats and prompt/response pairs."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        q = " ".join(rng.choice(WORDS, int(rng.integers(1, 6))))
        a = " ".join(rng.choice(WORDS, int(rng.integers(1, 4))))
        if i % 3 == 0:
            out.append({"prompt": q, "response": a})
        elif i % 3 == 1:
            out.append({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]})
        else:
            out.append({"messages": [{"role": "system", "content": "Answer."}, {"role": "user", "content": q},
                                     {"role": "assistant", "content": a}, {"role": "user", "content": "again"},
                                     {"role": "assistant", "content": str(i)}]})
    return out


def write_jsonl(path: Path, recs: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path


def test_mask_is_exactly_the_assistant_turns(tokdir):
    """Content and end-of-turn token of each assistant turn, nothing else: not the headers (even when the
    content is a substring of `assistant`), not the newline after <|im_end|>, not the user turns."""
    ct = load_chat_tokenizer(str(tokdir))
    msgs = [{"role": "user", "content": "what is the word"}, {"role": "assistant", "content": "ant"},
            {"role": "user", "content": "spell it"}, {"role": "assistant", "content": "a n t"}]
    ids, sup, text = encode_example(ct, msgs, "test")
    assert ct.tok.decode(ids.tolist()) == text == ct.tok.apply_chat_template(msgs, tokenize=False)
    runs = np.split(np.flatnonzero(sup), np.flatnonzero(np.diff(np.flatnonzero(sup)) > 1) + 1)
    assert [ct.tok.decode(ids[r].tolist()) for r in runs] == ["ant<|im_end|>", "a n t<|im_end|>"]
    assert ct.end_ids == (ct.tok.convert_tokens_to_ids("<|im_end|>"),)


def test_chat_template_file_wins(tokdir, tmp_path):
    d = tmp_path / "other"
    d.mkdir()
    for f in tokdir.iterdir():
        (d / f.name).write_bytes(f.read_bytes())
    (d / "chat_template.jinja").write_text("{% for m in messages %}### {{ m['role'] }}: {{ m['content'] }}"
                                           "<|im_end|>{% endfor %}")
    ct = load_chat_tokenizer(str(d))
    ids, sup, text = encode_example(ct, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}],
                                    "test")
    assert text == "### user: hi<|im_end|>### assistant: ok<|im_end|>"
    assert ct.tok.decode(ids[sup].tolist()) == "ok<|im_end|>"


def test_rows_packed_deterministically_with_targets_and_segments(tokdir, tmp_path):
    """Rows of exactly seq_len; each segment is one whole example (in first-fit order); targets are the
    next supervised token within the segment; padding is segment 0 at the end; two writes give the same
    bytes."""
    src = write_jsonl(tmp_path / "chat.jsonl", records(40))
    a = write_sft([str(src)], tokenizer=str(tokdir), out=tmp_path / "a", seq_len=96)["train"]
    b = write_sft([str(src)], tokenizer=str(tokdir), out=tmp_path / "b", seq_len=96)["train"]
    assert [s["sha256"] for s in a["shards"]] == [s["sha256"] for s in b["shards"]]
    shard = tmp_path / "a" / "train" / a["shards"][0]["name"]
    before = shard.stat().st_mtime_ns
    again = write_sft([str(src)], tokenizer=str(tokdir), out=tmp_path / "a", seq_len=96)["train"]
    assert again == a and shard.stat().st_mtime_ns == before  # the journal keeps finished shards
    assert a["examples"] == 40 and a["tokens"] == a["samples"] * 96

    ct = load_chat_tokenizer(str(tokdir))
    examples = [encode_example(ct, (r.get("messages") or [{"role": "user", "content": r["prompt"]},
                                                           {"role": "assistant", "content": r["response"]}]), "t")
                for r in records(40)]
    rows = pack([len(ids) for ids, _, _ in examples], 96)
    cfg = DataConfig(train=str(tmp_path / "a" / "train"))
    batch = build_val_batches(DataConfig(train=cfg.train, val=cfg.train[0]), rank=0, world_size=1,
                              micro_batch_size=a["samples"], max_batches=1)[0]
    assert batch["input_ids"].shape == (len(rows), 96)
    sup_total = 0
    for r, members in enumerate(rows):
        seg, ids, tgt = (batch[k][r].numpy() for k in ("segment_ids", "input_ids", "targets"))
        used = sum(len(examples[k][0]) for k in members)
        assert (seg[:used] > 0).all() and (seg[used:] == 0).all() and (tgt[used:] == IGNORE).all()
        for s, k in enumerate(members, start=1):
            want_ids, want_sup, _ = examples[k]
            at = np.flatnonzero(seg == s)
            assert ids[at].tolist() == want_ids.tolist()
            assert tgt[at][:-1].tolist() == np.where(want_sup[1:], want_ids[1:], IGNORE).tolist()
            assert tgt[at][-1] == IGNORE  # never a target across into the next example
            sup_total += int(want_sup[1:].sum())
    assert sup_total == a["supervised_tokens"]
    assert pack([5, 4, 3, 2, 6], 8) == [[0, 2], [1, 3], [4]]  # first fit, in record order


def test_stream_positions_restart_per_document_and_resume_exactly(tokdir, tmp_path):
    src = write_jsonl(tmp_path / "chat.jsonl", records(120))
    write_sft([str(src)], tokenizer=str(tokdir), out=tmp_path / "d", seq_len=64, shard_bytes=20 << 10)
    cfg = DataConfig(train=str(tmp_path / "d" / "train"))
    info = validate_data(cfg)
    assert info["kind"] == "sft" and info["seq_len"] == 64
    assert info["vocab_size"] == len(load_chat_tokenizer(str(tokdir)).tok) < 400
    assert info["tokenizer_name"] == "tiny-chat" and 0 < info["supervised_fraction"] < 1
    assert tokenizer_for(cfg).get_vocab_size() == info["vocab_size"]  # the copied tokenizer.json matches the manifest's hash

    def run(stream, n):
        return [next(stream) for _ in range(n)]

    mk = lambda: build_train_stream(cfg, seed=3, rank=0, world_size=1, micro_batch_size=2, grad_accum=2)  # noqa: E731
    ref = run(mk(), 24)
    b = ref[0]
    assert set(b) >= {"input_ids", "targets", "segment_ids", "token_positions", "positions"}
    assert b["positions"].shape == (2,) and b["token_positions"].shape == (2, 64)
    seg, pos = b["segment_ids"].numpy(), b["token_positions"].numpy()
    for row_seg, row_pos in zip(seg, pos, strict=True):
        for s in np.unique(row_seg):
            assert row_pos[row_seg == s].tolist() == list(range(int((row_seg == s).sum())))
    assert segment_positions(np.array([[1, 1, 2, 2, 2, 0]])).tolist() == [[0, 1, 0, 1, 2, 0]]

    first = mk()
    run(first, 10)  # 5 steps of 2 micro-batches
    state = json.loads(json.dumps(first.state_dict()))
    assert state["sft_seq_len"] == 64
    resumed = mk()
    resumed.load_state_dict(state)
    for got, want in zip(run(resumed, 14), ref[10:], strict=True):
        assert got["keys"] == want["keys"]
        assert all(got[k].equal(want[k]) for k in ("input_ids", "targets", "segment_ids", "token_positions"))
    state.pop("sft_seq_len")
    with pytest.raises(DataError, match="no sft_seq_len"):  # a pretraining (tokens) run's state
        mk().load_state_dict({**state, "seq_len": 64})


def test_record_without_assistant_turn_refused_and_nothing_written(tokdir, tmp_path):
    recs = records(5)
    recs[3] = {"messages": [{"role": "user", "content": "hello"}]}
    src = write_jsonl(tmp_path / "chat.jsonl", recs)
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["sft", str(src), "--tokenizer", str(tokdir), "--out", str(out),
                                      "--seq-len", "64"])
    assert result.exit_code == 2
    assert [ln for ln in result.stderr.splitlines() if ln.startswith("error:")] == [
        f"error: input {src} line 4: no assistant turn (nothing to learn from)"]
    assert "Traceback" not in result.output
    assert not out.exists()


def test_overlong_example_refused_or_truncated(tokdir, tmp_path):
    recs = records(6)
    recs[2] = {"prompt": "spell the word", "response": " ".join(["planet"] * 40)}
    src = write_jsonl(tmp_path / "chat.jsonl", recs)
    with pytest.raises(DataError, match=r"line 3: \d+ tokens, longer than --seq-len 56 \(pass --truncate"):
        write_sft([str(src)], tokenizer=str(tokdir), out=tmp_path / "refused", seq_len=56)
    assert not (tmp_path / "refused").exists()
    result = CliRunner().invoke(app, ["sft", str(src), "--tokenizer", str(tokdir), "--out", str(tmp_path / "cut"),
                                      "--seq-len", "56", "--truncate", "--val-fraction", "0.2"])
    assert result.exit_code == 0, result.output
    m = json.loads((tmp_path / "cut" / "train" / "index.json").read_text())
    val = json.loads((tmp_path / "cut" / "val" / "index.json").read_text())
    assert m["truncated_examples"] == 1 and m["examples"] + val["examples"] == 6 and m["truncate"] is True
    assert m["kind"] == "sft" and m["tokens"] == m["samples"] * 56


def test_objective_loss_of_packed_rows_equals_examples_alone(tokdir, tmp_path):
    """`sft` objective: count = supervised targets; the packed loss equals the sum over the examples run
    alone (positions from 0, no attention across segments), with a tiny Llama on reference kernels."""
    from pretrain.models.transformer import Transformer
    from pretrain.objectives import build_objective

    assert "segment_ids" in Transformer.forward.__code__.co_varnames, "Transformer.forward lost segment_ids"
    src = write_jsonl(tmp_path / "chat.jsonl", records(12))
    write_sft([str(src)], tokenizer=str(tokdir), out=tmp_path / "d", seq_len=64)
    cfg = config_from_dict({
        # init_std 0.3: a model whose outputs depend on context, so attention across examples would show.
        "model": {"type": "llama", "n_layers": 2, "d_model": 32, "n_heads": 4, "vocab_size": 400, "max_seq_len": 64,
                  "init_std": 0.3, "kernels": "reference"},
        "objective": {"type": "sft"}, "data": {"train": str(tmp_path / "d" / "train")},
    })
    info = validate_data(cfg.data)
    obj = build_objective(cfg, info)
    obj.check()
    assert obj.seq_len == 64 and obj.units_per_sample() == 64
    stream = build_train_stream(cfg.data, seed=0, rank=0, world_size=1, micro_batch_size=2, grad_accum=1)
    batch = obj.prepare(next(stream), torch.device("cpu"))
    assert set(batch) == {"input_ids", "targets", "positions", "segment_ids"}
    torch.manual_seed(0)
    model = Transformer(cfg.model).eval().requires_grad_(False)
    total, count, _ = obj.loss(model, batch)
    assert count == (batch["targets"] != IGNORE).sum() > 0
    alone = torch.zeros(())
    for r in range(2):
        seg = batch["segment_ids"][r]
        for s in seg.unique():
            if s == 0:
                continue
            at = seg == s
            alone = alone + model(batch["input_ids"][r, at][None], targets=batch["targets"][r, at][None])
    torch.testing.assert_close(total, alone, rtol=1e-5, atol=1e-4)
    assert int(batch["segment_ids"].max()) >= 2  # rows really hold several examples
    unmasked = model(batch["input_ids"], targets=batch["targets"])  # one document per row, positions 0..T-1
    assert abs(float(unmasked - total)) > 0.01 * float(total)


def test_instruction_set_exact_and_disjoint(tokdir, tmp_path):
    """tools/make_instructions.py: answers are right, held-out questions and words unseen in training,
    and the records go through the writer."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_instructions", ROOT / "tools" / "make_instructions.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    train, heldout = tool.make(200, 40, seed=1)
    assert (train, heldout) == tool.make(200, 40, seed=1) and len(train) == 200 and len(heldout) == 40
    question = lambda r: r["messages"][0]["content"]  # noqa: E731
    assert not {question(r) for r in train} & {question(r) for r in heldout}
    assert len({question(r) for r in heldout}) == 40
    words = {tr: {question(r).split()[-1] if r["task"] == "reverse" else question(r).split()[5].rstrip(",")
                  for r in recs if r["task"] != "add"} for tr, recs in (("train", train), ("heldout", heldout))}
    assert words["train"] and words["heldout"] and not words["train"] & words["heldout"]
    for r in train + heldout:
        q, a = question(r), r["messages"][1]["content"]
        assert a == r["answer"]
        if r["task"] == "add":
            x, y = map(int, re.findall(r"\d+", q))
            assert a == str(x + y) and 10 <= min(x, y) and max(x, y) <= 999
        elif r["task"] == "reverse":
            assert a == q.split()[-1][::-1]
        else:
            assert a.replace("-", "") == q.split()[5].rstrip(",")
    assert tool.exact_match(" 432.", "432") and not tool.exact_match("The answer is 432", "432")
    src = write_jsonl(tmp_path / "train.jsonl", train)
    m = write_sft([str(src)], tokenizer=str(tokdir), out=tmp_path / "d", seq_len=128)["train"]
    assert m["examples"] == 200
