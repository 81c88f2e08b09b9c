"""Manifests (`index.json`) and sources: where a source's shards are, what they hold, and checks that
need only the manifest and a `stat` (so `validate_data` answers within seconds for any corpus size).

A source path is one of:
- a local shard directory holding `index.json` and the shards it lists;
- a directory URL (`s3://…/train`, `https://…/train`): the manifest is `<url>/index.json`;
- a brace pattern or `::`-separated URL list of shards, possibly `pipe:` commands
  (`pipe:aws s3 cp s3://b/train/shard-{000000..000009}.tar -`): the manifest is found by replacing the
  first shard's file name with `index.json`, and only the listed shards are used.

What counts as a URL (`scheme://` or `pipe:`) is decided by `pretrain.urls.is_url`, not here.

Trust: a manifest is data, and nothing it says is executed or leaves its source. Every shard name (and the
tokenizer file name) must be a plain file name inside the source directory or prefix (`shard-000000.tar`:
letters, digits, `.`, `_`, `-`, no leading dot or dash, ending `.tar`); anything else (a path separator,
`..`, an absolute path, a scheme, `pipe:`, whitespace, shell metacharacters, control characters, a leading
`-` that a command in a user's `pipe:` source would read as an option) is refused with
one line naming the manifest and the name, wherever a manifest is read (the driver's `validate_data`,
every worker, `data inspect`). Every shard entry must give its byte count and sha256, which every read of
the shard checks (`pretrain.data.shards.read_shard`). A `pipe:` source runs a command only because the user
wrote it in their own config; `commands` lists such sources so the run can say so.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import braceexpand

from pretrain.atomic import atomic_write
from pretrain.errors import DataError
from pretrain.urls import ReadFailed, is_command, is_url, read_bytes

FORMAT = "pretrain-shards/1"
MANIFEST = "index.json"
# A file name inside the source: what the writers produce (shard-000000.tar, tokenizer.json) and nothing that
# a path, URL or shell would read as more than a name. No leading dot, so neither `..` nor hidden files; no
# leading dash: the tokenizer's name replaces the shard's in a `pipe:` command, where `-x.json` is an option.
_FILE_NAME = r"[A-Za-z0-9_][A-Za-z0-9._-]*"
_SHARD_NAME = re.compile(_FILE_NAME + r"\.tar")
_TOKENIZER_NAME = re.compile(_FILE_NAME + r"\.json")
_SHA256 = re.compile(r"[0-9a-fA-F]{64}")


@dataclass
class Source:
    """One resolved data source: its manifest and the URL of each shard it uses."""

    name: str
    path: str
    manifest: dict
    shards: list[dict]  # manifest entries of the shards in use, in manifest order
    urls: list[str] = field(default_factory=list)

    @property
    def samples(self) -> int:
        return sum(s["samples"] for s in self.shards)

    @property
    def local(self) -> bool:
        return not is_url(self.urls[0])

    @property
    def command(self) -> bool:
        """Whether reading this source runs a shell command (a `pipe:` path from the user's config)."""
        return any(is_command(u) for u in self.urls)


def write_manifest(directory: Path, manifest: dict) -> None:
    """Atomically (`pretrain.atomic`) write `index.json`; sorted keys so equal inputs give equal bytes."""
    atomic_write(directory / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True) + "\n")


def _read_manifest_url(url: str, setting: str) -> dict:
    try:
        text = read_bytes(url)
    except ReadFailed as e:
        raise DataError(f"{setting}: manifest {url}: {e}") from None
    return _parse(text, url, setting)


def _parse(text: bytes | str, where: str, setting: str) -> dict:
    try:
        m = json.loads(text)
    except ValueError as e:
        raise DataError(f"{setting}: manifest {where} is not valid JSON ({e})") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT or not isinstance(m.get("shards"), list):
        raise DataError(f"{setting}: {where} is not a pretrain shard manifest (format {FORMAT})")
    for s in m["shards"]:
        if not isinstance(s, dict):
            raise DataError(f"{setting}: manifest {where} lists shard {_shown(s)}, not an entry with a name")
        name = s.get("name")
        if not (isinstance(name, str) and _SHARD_NAME.fullmatch(name) and ".." not in name):
            raise DataError(f"{setting}: manifest {where} lists shard {_shown(name)}, not a file name inside "
                            f"the source (letters, digits, '.', '_', '-', ending .tar)")
        for key in ("samples", "bytes"):
            if not isinstance(s.get(key), int) or isinstance(s[key], bool) or s[key] < 0:
                raise DataError(f"{setting}: manifest {where}: shard {name} has no '{key}' count")
        sha = s.get("sha256")
        if not (isinstance(sha, str) and _SHA256.fullmatch(sha)):  # training would read the shard unchecked
            raise DataError(f"{setting}: manifest {where}: shard {name} has no sha256 (64 hex digits), so its "
                            f"bytes cannot be checked")
    tok = m.get("tokenizer")
    if tok is not None and tok != "gpt2" and not (isinstance(tok, str) and _TOKENIZER_NAME.fullmatch(tok)
                                                  and ".." not in tok):
        raise DataError(f"{setting}: manifest {where} names tokenizer {_shown(tok)}, neither 'gpt2' nor a "
                        f"file name inside the source (letters, digits, '.', '_', '-', not starting with '.' "
                        f"or '-', ending .json)")
    return m


def _shown(name: object) -> str:
    """A name from a manifest as one printable line: repr escapes newlines and control characters."""
    text = repr(name)
    return text if len(text) <= 120 else text[:117] + "..."


def shard_name(url: str) -> str:
    """File name of a shard inside a URL or a `pipe:` command (the token ending in .tar)."""
    for token in reversed(url.replace("/", " ").split()):
        if token.endswith(".tar"):
            return token
    return url.rsplit("/", 1)[-1]


def default_name(path: str) -> str:
    """A source's label: the path's last component, or its parent's for the writer's `train`/`val` dirs
    (`data/shakespeare/train` -> `shakespeare`), so metrics say what the data is."""
    parts = [p for p in path.split("::")[0].replace("\\", "/").split("/") if p and "{" not in p and not p.endswith(".tar")]
    if len(parts) >= 2 and parts[-1] in ("train", "val"):
        return parts[-2]
    return parts[-1] if parts else path


def resolve(path: str, name: str | None, setting: str) -> Source:
    """Manifest and shard URLs of one source; DataError naming `setting` (e.g. "data.train") on any problem."""
    name = name or default_name(path)
    if not is_url(path) and "{" not in path and "::" not in path and not path.endswith(".tar"):
        d = Path(path)
        if not d.is_dir():
            raise DataError(f"{setting}: no such directory: {path}")
        mfile = d / MANIFEST
        if not mfile.is_file():
            raise DataError(f"{setting}: no manifest {mfile} (write shards with `pretrain data text`)")
        m = _parse(mfile.read_bytes(), str(mfile), setting)
        return _check(Source(name, path, m, list(m["shards"]), [str(d / s["name"]) for s in m["shards"]]), setting)
    if is_url(path) and not is_command(path) and "{" not in path and not path.endswith(".tar") and "::" not in path:
        base = path.rstrip("/")
        m = _read_manifest_url(base + "/" + MANIFEST, setting)
        return _check(Source(name, path, m, list(m["shards"]), [base + "/" + s["name"] for s in m["shards"]]), setting)
    urls = [u for part in path.split("::") for u in braceexpand.braceexpand(part)]
    first = shard_name(urls[0])
    murl = urls[0].replace(first, MANIFEST)
    if is_url(murl):
        m = _read_manifest_url(murl, setting)
    else:
        if not Path(murl).is_file():
            raise DataError(f"{setting}: no manifest {murl} beside the shards of {path}")
        m = _parse(Path(murl).read_bytes(), murl, setting)
    by_name = {s["name"]: s for s in m["shards"]}
    shards = []
    for u in urls:
        s = by_name.get(shard_name(u))
        if s is None:
            raise DataError(f"{setting}: shard {u} is not listed in its manifest {murl}")
        shards.append(s)
    return _check(Source(name, path, m, shards, urls), setting)


def _check(src: Source, setting: str) -> Source:
    """Manifest consistency, and for local shards that each exists with the recorded size."""
    m = src.manifest
    needed = {"tokens": ("seq_len", "tokenizer", "tokenizer_sha256", "vocab_size", "member"),
              "sft": ("seq_len", "tokenizer", "tokenizer_sha256", "vocab_size", "members", "dtype")}.get(
        m.get("kind"), ("kind",))
    for key in needed:
        if key not in m:
            raise DataError(f"{setting}: manifest of {src.path} lacks '{key}'")
    if not src.shards:
        raise DataError(f"{setting}: {src.path} lists no shards")
    if src.samples == 0:
        raise DataError(f"{setting}: {src.path} holds no samples")
    if src.local:
        for s, u in zip(src.shards, src.urls, strict=True):
            p = Path(u)
            if not p.is_file():
                raise DataError(f"{setting}: shard {u} listed in the manifest does not exist")
            if p.stat().st_size != s["bytes"]:
                raise DataError(f"{setting}: shard {u} is {p.stat().st_size} bytes, the manifest says {s['bytes']}")
    return src
