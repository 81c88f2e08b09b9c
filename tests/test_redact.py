"""Credentials masked wherever the project writes a URL or a command (pretrain/redact.py): properties of the helper
on generated URLs and commands, and the config a run writes (config.yaml, W&B, summary.json) holding no secret."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from pretrain.redact import MASK, leaked, redact, redact_yaml, redacted_tree

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "gpt-tiny.yaml"

# A secret is long and of its own alphabet, so "not in the output" cannot pass by luck or fail by coincidence.
secrets_ = st.text("QWXZ0123456789", min_size=12, max_size=30).map(lambda s: f"SECRET{s}")
words = st.text("abcdefghijklmnopqrstuvwxy", min_size=1, max_size=10)
hosts = st.lists(words, min_size=1, max_size=3).map(".".join)
paths = st.lists(words, min_size=0, max_size=3).map("/".join)
schemes = st.sampled_from(["https", "http", "s3", "gs", "ftp", "az"])
params = st.sampled_from(["X-Amz-Signature", "X-Amz-Credential", "X-Amz-Security-Token", "X-Goog-Signature",
                          "Signature", "sig", "token", "access_token", "key", "api_key", "password",
                          "client_secret", "sessionToken"])


def random_case(draw, name: str) -> str:
    flips = draw(st.lists(st.booleans(), min_size=len(name), max_size=len(name)))
    return "".join(c.upper() if f else c.lower() for c, f in zip(name, flips, strict=True))


@st.composite
def secret_urls(draw) -> tuple[str, str, list[str]]:
    """(url, secret, parts that must survive)."""
    secret, scheme, host, path = draw(secrets_), draw(schemes), draw(hosts), draw(paths)
    kind = draw(st.sampled_from(["userinfo", "user-only", "param"]))
    if kind == "userinfo":
        user = draw(words)
        return f"{scheme}://{user}:{secret}@{host}/{path}", secret, [f"{user}:{MASK}@{host}", path]
    if kind == "user-only":
        return f"{scheme}://{secret}@{host}/{path}", secret, [f"{MASK}@{host}", path]
    name = random_case(draw, draw(params))
    before, after = draw(st.booleans()), draw(st.booleans())
    query = "&".join([*(["versionId=7"] * before), f"{name}={secret}", *(["X-Amz-Date=20240101"] * after)])
    keep = [f"{name}={MASK}", *(["versionId=7"] * before), *(["X-Amz-Date=20240101"] * after)]
    return f"{scheme}://{host}/{path}?{query}", secret, keep


@given(secret_urls())
def test_a_url_keeps_its_place_and_loses_its_secret(case):
    url, secret, keep = case
    out = redact(url)
    assert secret not in out
    for part in keep:
        assert part in out, (url, out)
    assert redact(out) == out  # idempotent


@given(secret_urls(), secrets_, st.sampled_from(["Bearer", "bearer", "Basic", "token"]),
       st.sampled_from(["'", '"']))
def test_a_pipe_command_keeps_its_shape_and_loses_its_secrets(case, header_secret, scheme, q):
    url, secret, _ = case
    cmd = f"pipe:curl -s -L -H {q}Authorization: {scheme} {header_secret}{q} {url} | zcat"
    out = redact(cmd)
    assert secret not in out and header_secret not in out
    assert f"-H {q}Authorization: {scheme} {MASK}{q}" in out and out.endswith(" | zcat")
    assert redact(out) == out


@given(st.sampled_from(["s3://bucket/shards/train", "/fsx/shards/{000..099}.tar", "data/shakespeare-bpe/val",
                        "https://host/x.tar?versionId=3&partNumber=2", "gpt2", "tokenizer: gpt2 (sha 1234)",
                        "pipe:aws s3 cp s3://b/x.tar -", "--tokenizer gpt2", "ssh git@github.com",
                        "https://host/p?email=me@host.org", "cluster.storage=s3://b/ckpt"]))
def test_text_without_credentials_is_left_alone(text):
    assert redact(text) == text


@pytest.mark.parametrize("text, secret, expect", [
    ("pipe:curl -H 'X-Api-Key: SECRET1' https://h/x", "SECRET1", "-H 'X-Api-Key: ***'"),
    ("pipe:curl -H 'PRIVATE-TOKEN: SECRET1' https://h/x", "SECRET1", "PRIVATE-TOKEN: ***"),
    ("pipe:curl -u alice:SECRET1 https://h/x", "SECRET1", "-u alice:***"),
    ("pipe:wget --password=SECRET1 -O - http://h/x", "SECRET1", "--password=***"),
    ("pipe:AWS_SECRET_ACCESS_KEY=S3CR3T1 HF_TOKEN=S3CR3T1 aws s3 cp s3://b/x -", "S3CR3T1", "HF_TOKEN=***"),
    ("pipe:curl -H 'Cookie: session=SECRET1' https://h/x", "SECRET1", "Cookie: ***"),
    ("https://h/x?SAS=1&sv=2024&sig=SECRET1&se=2030", "SECRET1", "sv=2024&sig=***&se=2030"),
    ("read https://u:p@ss:SECRET1@h/x failed", "SECRET1", "https://u:***@h/x failed"),
])
def test_command_forms(text, secret, expect):
    out = redact(text)
    assert secret not in out and expect in out, out


def test_trees_keep_keys_and_non_strings():
    tree = {"a": ["s3://b/x?token=SECRET", 3, None, {"b": "https://u:SECRET@h"}], "n": 1.5, "ok": "plain"}
    out = redacted_tree(tree)
    assert out == {"a": ["s3://b/x?token=***", 3, None, {"b": "https://u:***@h"}], "n": 1.5, "ok": "plain"}
    assert leaked(tree) == [("a[0]", "s3://b/x?token=***"), ("a[3].b", "https://u:***@h")]
    assert leaked(out) == []
    text = "# a comment\nk: v\n"
    assert redact_yaml(text) == text  # nothing to mask: the text as written


# ----------------------------------------------------------------------------- where the project writes them

SIGNED = "s3://bucket/x?X-Amz-Signature=SECRET&X-Amz-Date=20240101"
USERINFO = "https://user:SECRET@host/x"


@pytest.fixture(scope="module")
def cfg():
    from pretrain.load import load_config

    return load_config(TINY, [f"data.train={SIGNED}", f"data.val={USERINFO}"])


def test_config_yaml_holds_no_secret_and_still_loads(cfg):
    from pretrain.config import dump_config
    from pretrain.load import config_from_dict

    text = redact_yaml(dump_config(cfg))  # what `pretrain train` and the final weights write
    assert "SECRET" not in text
    back = config_from_dict(yaml.safe_load(text))
    assert back.data.train[0].path == "s3://bucket/x?X-Amz-Signature=***&X-Amz-Date=20240101"
    assert back.data.val.path == "https://user:***@host/x"
    assert back.model == cfg.model and back.train == cfg.train  # what the readers of config.yaml use


def test_ladder_compares_redacted_configs(cfg, tmp_path):
    """A ladder resumed over its redacted config.yaml finds the same config, not another one."""
    from pretrain.config import dump_config
    from pretrain.scaling.books import _config_change

    (tmp_path / "config.yaml").write_text(redact_yaml(dump_config(cfg)))
    assert _config_change(tmp_path, cfg) is None


def test_wandb_gets_a_redacted_config(cfg, tmp_path, monkeypatch):
    import wandb

    from pretrain.metrics.sinks import WandbSink

    seen = {}

    class FakeRun:
        def define_metric(self, *a, **k):
            pass

    def init(**kwargs):
        seen.update(kwargs)
        return FakeRun()

    monkeypatch.setattr(wandb, "init", init)
    WandbSink(tmp_path, "p", "n", cfg.model_dump(mode="json"))
    assert "SECRET" not in repr(seen["config"])
    assert seen["config"]["data"]["val"]["path"] == "https://user:***@host/x"


def test_summary_identity_holds_no_secret(cfg):
    from pretrain.train.loop import fit_fields

    fields = fit_fields(cfg, 10, 1.0, "tokens")
    assert "SECRET" not in repr(fields) and "X-Amz-Signature=***" in fields["data"]


def test_retry_log_and_read_error_hold_no_secret(monkeypatch, caplog):
    from pretrain.urls import ReadFailed, read_bytes

    monkeypatch.setenv("PRETRAIN_READ_ATTEMPTS", "2")
    with caplog.at_level(logging.WARNING, logger="pretrain.urls"), pytest.raises(ReadFailed) as e:
        read_bytes("pipe:false -H 'Authorization: Bearer SECRET' https://u:SECRET@h/x?sig=SECRET")
    assert caplog.records and "SECRET" not in caplog.text and "SECRET" not in str(e.value)
    assert "Bearer ***" in caplog.text


# Text built from the pieces the patterns look for, in any order: masking twice changes nothing.
pieces = st.sampled_from(["https://", "s3://", "u", ":", "@", "/", "?", "&", "=", "token", "sig", "Bearer ",
                          "Authorization: ", "-H '", "'", '"', " ", "-u ", "--password=", "HF_TOKEN=", "x", ")",
                          MASK, "\n", "pipe:", "#", ";"])


@settings(max_examples=300)
@given(st.lists(pieces, max_size=30).map("".join))
def test_redaction_is_idempotent(text):
    assert redact(redact(text)) == redact(text)
