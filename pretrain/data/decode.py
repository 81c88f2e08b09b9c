"""Decoding a shard's raw samples into its keys and one compact, fixed-shape array per field of the
`SampleSpec`: token rows, packed supervised rows (with the positions their segment ids imply), images
(pixels or latents, channels-first) and labels. Each sample is checked against the manifest; the first
that is wrong is named. Token ids must lie in [0, vocab_size) of the manifest, and supervised targets there
or at the ignore index: an id past the embedding is a device-side assert on a GPU, which Ray would retry as
a lost machine. Nothing read is executed or unpickled: `.npy` payloads go through numpy's header parser
with pickles refused.
"""

from __future__ import annotations

import io
import math

import numpy as np

from pretrain.data.sample_spec import BYTES_MEMBER, SFT_MEMBERS, TOKEN_DTYPES, SampleSpec
from pretrain.data.sft_render import IGNORE
from pretrain.errors import DataError, first_line

Decoded = tuple[list[str], dict[str, np.ndarray]]  # a shard's keys and one array per field, in file order


def decode(samples, spec: SampleSpec, expected: int, label: str, vocab: int | None = None) -> Decoded:
    """Raw samples -> keys and one compact array per field; token ids (and targets) checked against `vocab`,
    the manifest's vocab_size, when given."""
    if len(samples) != expected:
        raise DataError(f"shard {label}: {len(samples)} samples, the manifest says {expected}")
    if spec.kind == "tokens":
        keys, out = _decode_tokens(samples, spec, label)
    elif spec.kind == "sft":
        keys, out = _decode_sft(samples, spec, label)
    else:
        return _decode_images(samples, spec, label)
    if vocab is not None:
        check_ids(keys, out["input_ids"], vocab, label)
        if "targets" in out:
            check_ids(keys, out["targets"], vocab, label, ignore=IGNORE)
    return keys, out


def check_ids(keys: list[str], ids: np.ndarray, vocab: int, label: str, ignore: int | None = None) -> None:
    """DataError naming the first sample (and position) of (R, N) `ids` outside [0, vocab), `ignore` aside.
    One min and one max over the shard decide; only a shard that fails them is searched."""
    if ids.size == 0:
        return
    lo, hi = 0 if ids.dtype.kind == "u" else int(ids.min()), int(ids.max())  # token rows are unsigned
    if lo >= 0 and hi < vocab:
        return
    bad = (ids < 0) | (ids >= vocab)
    if ignore is not None:
        bad &= ids != ignore
    if not bad.any():  # only ignored targets below 0
        return
    r, c = np.unravel_index(int(np.argmax(bad)), bad.shape)
    where = f"shard {label}: sample {keys[r]} has"
    if ignore is None:
        raise DataError(f"{where} token id {int(ids[r, c])} at position {c}, outside [0, {vocab}) of the "
                        f"manifest's vocab_size")
    raise DataError(f"{where} target {int(ids[r, c])} at position {c}, neither {ignore} nor in [0, {vocab}) of "
                    f"the manifest's vocab_size")


def _decode_tokens(samples, spec: SampleSpec, label: str) -> Decoded:
    """Token rows (and byte counts): one frombuffer over the joined payloads of each."""
    member, dtype, n = spec.member, TOKEN_DTYPES[spec.member], spec.shape[0]
    keys, payloads, counts = [], [], []
    for key, members in samples:
        data, nbytes = members.get(member), members.get(BYTES_MEMBER)
        extra = set(members) - {member, BYTES_MEMBER}
        if data is None or extra or len(data) != n * np.dtype(dtype).itemsize:
            raise DataError(f"shard {label}: sample {key} is not one {member} of {n} tokens")
        if spec.text_bytes:
            if nbytes is None or len(nbytes) != 4:
                raise DataError(f"shard {label}: sample {key} lacks its {BYTES_MEMBER} (4 bytes), which the "
                                f"manifest promises")
            counts.append(nbytes)
        keys.append(key)
        payloads.append(data)
    out = {"input_ids": np.frombuffer(b"".join(payloads), dtype=dtype).reshape(len(keys), n)}
    if spec.text_bytes:
        out["bytes"] = np.frombuffer(b"".join(counts), dtype="<u4")
    return keys, out


def _decode_sft(samples, spec: SampleSpec, label: str) -> Decoded:
    """Packed supervised rows: one frombuffer per member over the joined payloads, and the positions
    within each document (segment) that the segment ids imply."""
    n = spec.shape[0]
    keys: list[str] = []
    payloads: dict[str, list[bytes]] = {m: [] for m in SFT_MEMBERS}
    for key, members in samples:
        if sorted(members) != list(SFT_MEMBERS) or any(len(b) != 4 * n for b in members.values()):
            raise DataError(f"shard {label}: sample {key} is not {', '.join(SFT_MEMBERS)} of {n} int32 each")
        keys.append(key)
        for m in SFT_MEMBERS:
            payloads[m].append(members[m])
    out = {m.split(".")[0]: np.frombuffer(b"".join(p), dtype="<i4").reshape(len(keys), n)
           for m, p in payloads.items()}
    out["token_positions"] = segment_positions(out["segment_ids"])
    return keys, out


def segment_positions(segment_ids: np.ndarray) -> np.ndarray:
    """(R, N) positions that restart at 0 wherever the segment id changes (each packed document, and
    the padding after them, counts from 0), int32."""
    idx = np.broadcast_to(np.arange(segment_ids.shape[1], dtype=np.int32), segment_ids.shape)
    start = np.ones(segment_ids.shape, dtype=bool)
    start[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    return idx - np.maximum.accumulate(np.where(start, idx, 0), axis=1)


def _decode_images(samples, spec: SampleSpec, label: str) -> Decoded:
    """Images (pixels or latents) channels-first, and labels checked against the manifest's classes."""
    keys, payloads = [], []
    labels = np.empty(len(samples), dtype=np.int64)
    for n, (key, members) in enumerate(samples):
        data, cls = members.get(spec.member), members.get("label.cls")
        if data is None or cls is None:
            raise DataError(f"shard {label}: sample {key} lacks its {spec.member} or label.cls")
        try:
            y = int(cls.decode("ascii").strip())
        except (UnicodeDecodeError, ValueError):
            msg = f"shard {label}: sample {key} has label {cls[:20]!r}, not a decimal integer"
            raise DataError(msg) from None
        if not 0 <= y < spec.num_classes:
            raise DataError(f"shard {label}: sample {key} has label {y}, outside [0, {spec.num_classes}) "
                            f"of the manifest's classes")
        labels[n] = y
        keys.append(key)
        payloads.append(data)
    images = _npy_stack(keys, payloads, spec, label)
    if spec.member == "image.npy":  # pixels: HxW -> 1xHxW, HxWxC -> CxHxW
        hwc = len(spec.stored) == 3
        images = np.ascontiguousarray(images.transpose(0, 3, 1, 2)) if hwc else images[:, None]
    return keys, {"images": images, "labels": labels}


def _dtype_ok(spec: SampleSpec, dtype: np.dtype) -> bool:
    return dtype == np.uint8 if spec.member == "image.npy" else dtype.kind == "f"


def _npy_stack(keys: list[str], payloads: list[bytes], spec: SampleSpec, label: str) -> np.ndarray:
    """The .npy payloads as one array [n, *stored]. Fast path: every payload has the first one's header
    (same shape and dtype), so the data parts are joined and read with one frombuffer; otherwise each is
    loaded on its own to name the first that is wrong."""
    first = payloads[0]
    f = io.BytesIO(first)
    try:
        version = np.lib.format.read_magic(f)
        fmt = np.lib.format
        read = {(1, 0): fmt.read_array_header_1_0, (2, 0): fmt.read_array_header_2_0}.get(version)
        shape, fortran, dtype = read(f) if read else (None, True, None)
    except ValueError:
        read = None
    if read is not None and not fortran and tuple(shape) == spec.stored and _dtype_ok(spec, dtype):
        head, size = f.tell(), f.tell() + math.prod(spec.stored) * dtype.itemsize
        prefix = first[:head]
        if len(first) == size and all(len(p) == size and p[:head] == prefix for p in payloads):
            joined = b"".join(memoryview(p)[head:] for p in payloads)
            return np.frombuffer(joined, dtype=dtype).reshape(len(payloads), *spec.stored)
    out = np.empty((len(payloads), *spec.stored), np.uint8 if spec.member == "image.npy" else np.float32)
    for n, (key, p) in enumerate(zip(keys, payloads, strict=True)):
        try:
            arr = np.load(io.BytesIO(p), allow_pickle=False)
        except Exception as e:  # a truncated header, an object array: all mean the sample is unusable
            msg = f"shard {label}: sample {key}: {spec.member} is not a readable .npy ({first_line(e)})"
            raise DataError(msg) from None
        if arr.shape != spec.stored:
            raise DataError(f"shard {label}: sample {key}: {spec.member} of shape {list(arr.shape)}, the "
                            f"manifest's image_shape is {list(spec.stored)}")
        if not _dtype_ok(spec, arr.dtype):
            want = "uint8" if spec.member == "image.npy" else "floating point"
            raise DataError(f"shard {label}: sample {key}: {spec.member} of dtype {arr.dtype}, not {want}")
        out[n] = arr
    return out
