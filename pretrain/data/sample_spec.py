"""What one sample of a source holds, read from its manifest's kind (`SampleSpec`), and the shard members
each kind is stored in.

Token rows (`input_ids`, and `bytes`, the UTF-8 bytes of text the row's targets cover, where the writer
recorded them: bits per byte), packed supervised rows (`input_ids`, `targets`, `segment_ids`, and
`token_positions` that restart at 0 at each document, derived from the segment ids), or images (`images`
channels-first, uint8 pixels or float32 VAE latents, and `labels`). A shard decodes into one fixed-shape
array per field (`pretrain.data.decode`), so a batch is a gather, whatever the kind.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from pretrain.data.manifest import Source
from pretrain.errors import DataError

TOKEN_DTYPES = {"tokens.u16": "<u2", "tokens.u32": "<u4"}
IMAGE_MEMBERS = {"pixels": "image.npy", "latents": "latent.npy"}  # by the manifest's `encoding`
SFT_MEMBERS = ("input_ids.i32", "segment_ids.i32", "targets.i32")  # little-endian int32 rows (write_sft)
BYTES_MEMBER = "bytes.u32"  # token rows: UTF-8 bytes the targets cover (write_text; absent in older shards)


@dataclass(frozen=True)
class SampleSpec:
    """What one sample of a source holds, read from its manifest: the payload member, the payload's shape
    in the shard, and the shape a batch carries it in (tokens: seq_len + 1; sft: seq_len; images: C, H, W)."""

    kind: str  # "tokens", "sft" or "images"
    member: str  # tokens.u16 | tokens.u32 | input_ids.i32 (sft: one of three) | image.npy | latent.npy
    stored: tuple[int, ...]  # payload shape in the shard (pixels: HxW or HxWxC)
    shape: tuple[int, ...]  # per-sample shape in a batch
    num_classes: int = 0
    text_bytes: bool = False  # token rows carry their text's byte count (`bytes`)

    @property
    def seq_len(self) -> int | None:
        """Tokens the model sees per row: a token row holds one more (its last token is only a target)."""
        return {"tokens": self.shape[0] - 1, "sft": self.shape[0]}.get(self.kind)

    @cached_property
    def fields(self) -> dict[str, tuple[tuple[int, ...], type]]:
        """Batch fields: name -> (per-sample shape, numpy dtype); built once, read per batch."""
        if self.kind == "tokens":
            return {"input_ids": (self.shape, np.int64), **({"bytes": ((), np.int64)} if self.text_bytes else {})}
        if self.kind == "sft":
            return {name: (self.shape, np.int64) for name in ("input_ids", "targets", "segment_ids", "token_positions")}
        return {"images": (self.shape, np.float32 if self.member == "latent.npy" else np.uint8),
                "labels": ((), np.int64)}

    @property
    def nbytes(self) -> int:
        """Bytes of one sample in a batch."""
        return sum(math.prod(s) * np.dtype(d).itemsize for s, d in self.fields.values())

    def state_entry(self) -> tuple[str, object]:
        """The data-state entry that pins the sample format (tokens keep `seq_len`, as older checkpoints;
        sft rows their own key, so a pretraining run's state never loads into a fine-tune's stream)."""
        if self.kind == "tokens":
            return ("seq_len", self.seq_len)
        if self.kind == "sft":
            return ("sft_seq_len", self.seq_len)
        return ("sample_shape", list(self.shape))


def spec_of(src: Source, setting: str) -> SampleSpec:
    """A source's SampleSpec; DataError naming `setting` for a manifest the stream cannot read."""
    m = src.manifest
    if m["kind"] == "tokens":
        if m.get("member") not in TOKEN_DTYPES:
            raise DataError(f"{setting}: {src.path} has unknown token member '{m.get('member')}'")
        n = int(m["seq_len"]) + 1
        return SampleSpec("tokens", m["member"], (n,), (n,), text_bytes=m.get("bytes_member") == BYTES_MEMBER)
    if m["kind"] == "sft":
        if sorted(m.get("members", [])) != list(SFT_MEMBERS) or m.get("dtype") != "int32":
            raise DataError(f"{setting}: {src.path} has sft members {m.get('members')} of {m.get('dtype')}, "
                            f"not {list(SFT_MEMBERS)} of int32")
        n = int(m["seq_len"])
        return SampleSpec("sft", SFT_MEMBERS[0], (n,), (n,))
    if m["kind"] != "images":
        raise DataError(f"{setting}: {src.path} holds {m['kind']} shards, which the stream cannot read")
    encoding = m.get("encoding", "pixels")
    if encoding not in IMAGE_MEMBERS:
        raise DataError(f"{setting}: {src.path} has unknown image encoding '{encoding}' (pixels or latents)")
    shape, classes = m.get("image_shape"), m.get("classes")
    if shape is None:
        raise DataError(f"{setting}: {src.path} holds images of mixed sizes; write them at one size "
                        f"(resize the folder, or `pretrain data latents --size N`)")
    if not isinstance(classes, list) or not classes:
        raise DataError(f"{setting}: manifest of {src.path} lacks 'classes'")
    stored = tuple(int(d) for d in shape)
    if encoding == "latents" and len(stored) == 3:
        chw = stored
    elif encoding == "pixels" and len(stored) in (2, 3):
        chw = (1, *stored) if len(stored) == 2 else (stored[2], stored[0], stored[1])
    else:
        raise DataError(f"{setting}: {src.path} has image_shape {list(stored)}, not one of {encoding} images")
    return SampleSpec("images", IMAGE_MEMBERS[encoding], stored, chw, len(classes))


def common_spec(sources: list[Source], setting: str) -> SampleSpec:
    """The SampleSpec of sources that agree on their kind (`pretrain.data._agree`): the first one's, with
    byte counts only if every source has them (a mix with older shards streams tokens alone)."""
    spec = spec_of(sources[0], setting)
    if spec.text_bytes and not all(s.manifest.get("bytes_member") == BYTES_MEMBER for s in sources[1:]):
        spec = dataclasses.replace(spec, text_bytes=False)
    return spec
