"""Shard fuzzing: hundreds of mutated shards, made deterministically from one small valid shard written by
the project's own ShardWriter (and a pax copy of it, which tarfile reads), go through what a training worker
does with a shard (`read_shard`, then `decode`). Each ends in a one-line DataError naming the shard, or
reads correctly where the mutation is harmless: no other exception, under 5 s, and memory bounded.

Most cases come with a manifest entry (size, sha256) that matches the mutated bytes, as a crafted manifest
would: otherwise the sha256 check would stop every one of them before the tar is parsed. Mutations: bit
flips, truncations, sizes edited in a header (negative, huge, base-256, overlapping the next member, with the
header checksum fixed so that the checksum check passes), pax size records, compressed tars (and a gzip
bomb), other member types, absurd member names, garbage header fields.
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import io
import lzma
import random
import resource
import signal
import tarfile
import time
import tracemalloc
from collections import Counter

import numpy as np
import pytest

from pretrain.data.decode import decode
from pretrain.data.sample_spec import SampleSpec
from pretrain.data.shards import ShardWriter, read_shard
from pretrain.errors import DataError

SAMPLES, TOKENS = 6, 17
SPEC = SampleSpec(kind="tokens", member="tokens.u16", stored=(TOKENS,), shape=(TOKENS,), text_bytes=True)
LIMIT_S, LIMIT_MB = 5.0, 200


def _members(k: int) -> dict[str, bytes]:
    return {"tokens.u16": (np.arange(TOKENS, dtype="<u2") * (k + 1)).tobytes(),
            "bytes.u32": np.uint32(40 + k).tobytes()}


def _ustar_base(tmp_path) -> bytes:
    """What `pretrain data text` writes, in miniature: ShardWriter, 6 token samples of 2 members each."""
    w = ShardWriter(tmp_path / "base.tar")
    for k in range(SAMPLES):
        w.add(f"{k:010d}", _members(k))
    w.close()
    return (tmp_path / "base.tar").read_bytes()


def _pax(pax: dict[int, dict[str, str]] | None = None) -> bytes:
    """The same samples as a pax tar (a pax header before every member, so the walk leaves it to tarfile);
    `pax` adds records to member i's header."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        i = 0
        for k in range(SAMPLES):
            for ext, payload in sorted(_members(k).items()):
                info = tarfile.TarInfo(f"{k:010d}.{ext}")
                info.size, info.pax_headers = len(payload), {"comment": "fuzz", **(pax or {}).get(i, {})}
                tf.addfile(info, io.BytesIO(payload))
                i += 1
    return buf.getvalue()


def _headers(data: bytes) -> list[int]:
    """Offsets of every header block (pax extension headers included) of a valid tar."""
    out = []
    for m in tarfile.open(fileobj=io.BytesIO(data)).getmembers():
        out += sorted({m.offset, m.offset_data - 512})
    return out


def _field(data: bytes, at: int, start: int, value: bytes) -> bytes:
    """`data` with header `at`'s bytes [start, start + len(value)) replaced and its checksum fixed."""
    h = bytearray(data[at:at + 512])
    h[start:start + len(value)] = value
    h[148:156] = b" " * 8
    h[148:156] = b"%06o\0 " % sum(h)
    return data[:at] + bytes(h) + data[at + 512:]


# Size fields (12 bytes): negative octal, huge, base-256 (positive over 8 GiB, -1, very negative), garbage.
SIZES = [b"-1\0", b"-1000\0", b"-0000001000\0", b"-77777777777", b"77777777777\0", b"00000000000\0",
         b"\x80" + (2 ** 80).to_bytes(11, "big"), b"\xff" * 12, b"\xff" + bytes(11), b"zzzzzzzzzzz\0", b" " * 12]
NAMES = [b"../../etc/passwd.tokens.u16", b"/etc/passwd.tokens.u16", b"a\nb.tokens.u16", b"\x1b[31mred.tokens.u16",
         b"\xff\xfe.tokens.u16", b"\0", b".", b"x" * 100, b"__meta__", b"noext", b"a.b.c.d.e",
         "\u202eevil.tokens.u16".encode(), "\U0001f600.tokens.u16".encode(), b"0000000000.tokens.u16"]
TYPES = b"123456789xgLKSVZ"


def _cases(tmp_path) -> list[tuple[str, bytes, bool, str]]:
    """(family, bytes, whether the manifest entry matches the bytes, expected: "error", "read", "same"
    (reads exactly as the valid shard) or "either")."""
    rng = random.Random(25)
    base, pax = _ustar_base(tmp_path), _pax()
    heads, pheads = _headers(base), _headers(pax)
    end = max(tarfile.open(fileobj=io.BytesIO(base)).getmembers(), key=lambda m: m.offset).offset_data + 512
    cases = [("valid", base, True, "same"), ("valid-pax", pax, True, "same")]
    for at in heads:  # sizes in the walk's path
        for size in SIZES:
            negative = size.startswith((b"-", b"\xff")) or size.startswith(b"7")  # or past the end
            cases.append(("size", _field(base, at, 124, size), True, "error" if negative else "either"))
        old = int(base[at + 124:at + 135], 8)
        for delta in (-1, 1, 511, 512, 1024, 4096, len(base)):
            cases.append(("size-overlap", _field(base, at, 124, b"%011o\0" % (old + delta)), True, "either"))
    for at in pheads[::3]:  # sizes in tarfile's path, on pax and real headers
        for size in SIZES:
            cases.append(("size-pax", _field(pax, at, 124, size), True, "either"))
    for record in ("-1000", "-1", "99999999999999999999", "1e3", "0", "20000"):
        for i in (0, 5, 11):
            cases.append(("pax-size-record", _pax({i: {"size": record}}), True, "either"))
    for i in range(120):  # bit flips, half of them in header blocks
        data = bytearray(base)
        for _ in range(rng.randint(1, 4)):
            at = rng.choice(heads) + rng.randrange(512) if i % 2 else rng.randrange(len(base))
            data[at] ^= 1 << rng.randrange(8)
        cases.append(("bitflip", bytes(data), True, "either"))
    for _ in range(30):
        data = bytearray(pax)
        data[rng.choice(pheads) + rng.randrange(512)] ^= 1 << rng.randrange(8)
        cases.append(("bitflip-pax", bytes(data), True, "either"))
    for _ in range(10):  # the manifest's own entry: the sha256 stops them
        data = bytearray(base)
        data[rng.randrange(len(base))] ^= 1 << rng.randrange(8)
        cases.append(("bitflip-manifest", bytes(data), False, "error"))
    for _ in range(10):  # past the first end-of-archive block: nothing reads there
        data = bytearray(base)
        data[rng.randrange(end + 512, len(base))] ^= 0xFF
        cases.append(("bitflip-padding", bytes(data), True, "same"))
    cuts = sorted({0, 1, 100, 511, 512, 513, 1023, 1024, len(base) - 1, len(base) // 2, *heads,
                   *(h + 100 for h in heads), *(h + 600 for h in heads)})
    for cut in cuts:
        cases.append(("truncate", base[:cut], True, "error" if cut < end else "either"))
    for cut in (end + 512, end + 1024, len(base) - 512):
        cases.append(("truncate-padding", base[:cut], True, "same"))
    for cut in sorted({1, 511, 513, len(pax) // 3, len(pax) // 2, *pheads[::2]}):
        cases.append(("truncate-pax", pax[:cut], True, "error"))
    cases += [("truncate-manifest", base[:len(base) // 2], False, "error"),
              ("appended", base + bytes(rng.randrange(256) for _ in range(1000)), True, "same")]
    for data in (base, pax, base[:3000]):
        cases += [("compressed", gzip.compress(data), True, "error"), ("compressed", bz2.compress(data), True, "error"),
                  ("compressed", lzma.compress(data), True, "error")]
    cases += [("compressed", b"\x28\xb5\x2f\xfd" + lzma.compress(base), True, "error"),  # zstd magic
              ("compressed", gzip.compress(bytes(20 << 20), 1), True, "error")]  # a bomb: 20 MB of zeros
    for at in heads[::4]:
        for name in NAMES:
            bad = not name.decode("utf-8", "replace").isprintable() or b"\xff" in name
            cases.append(("name", _field(base, at, 0, name.ljust(100, b"\0")[:100]), True,
                          "error" if bad else "either"))
        cases.append(("name-prefix", _field(base, at, 345, b"../../" + bytes(149)), True, "either"))
    for name in ("a\nb.tokens.u16", "../" * 200 + "x.tokens.u16", "\udcff.x"):
        cases.append(("name-pax", _pax({2: {"path": name}}), True, "error" if "/" not in name else "either"))
    for at in heads[::5]:
        for t in TYPES:
            cases.append(("type", _field(base, at, 156, bytes([t])), True, "either"))
    for _ in range(40):
        at, start = rng.choice(heads), rng.choice([0, 100, 108, 116, 124, 136, 156, 157, 257, 263, 265, 297, 329, 345])
        cases.append(("garbage", _field(base, at, start, bytes(rng.randrange(256) for _ in range(12))), True,
                      "either"))
    return cases


class _Slow(Exception):
    pass


def _alarm(signum, frame):
    raise _Slow(f"over {LIMIT_S} s")


def _run(path, data: bytes, matching: bool, base: bytes):
    """read_shard and decode, as a training worker does; the manifest entry matches `data` or the base."""
    ref = data if matching else base
    path.write_bytes(data)
    samples = read_shard(str(path), sha256=hashlib.sha256(ref).hexdigest(), nbytes=len(ref), label=str(path))
    return decode(samples, SPEC, SAMPLES, str(path))


def test_mutated_shards_end_in_one_line_or_read(tmp_path):
    cases = _cases(tmp_path)
    assert len(cases) >= 300
    base = (tmp_path / "base.tar").read_bytes()
    want_keys, want = decode(read_shard(str(tmp_path / "base.tar"), sha256=hashlib.sha256(base).hexdigest(),
                                        nbytes=len(base), label="base"), SPEC, SAMPLES, "base")
    counts: Counter[tuple[str, str]] = Counter()
    slowest = 0.0
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    old = signal.signal(signal.SIGALRM, _alarm)
    tracemalloc.start()
    try:
        for n, (family, data, matching, expected) in enumerate(cases):
            path = tmp_path / f"case-{n:04d}.tar"
            what = f"case {n} ({family}, expected {expected})"
            tracemalloc.reset_peak()
            floor = tracemalloc.get_traced_memory()[0]
            t = time.perf_counter()
            signal.setitimer(signal.ITIMER_REAL, LIMIT_S)
            try:
                keys, got = _run(path, data, matching, base)
                outcome = "read"
            except DataError as e:
                msg, outcome = str(e), "DataError"
                assert "\n" not in msg and msg.startswith(f"shard {path}: "), f"{what}: {msg!r}"
                assert family != "compressed" or "compressed tar" in msg, f"{what}: {msg!r}"
                assert family != "bitflip-manifest" or "sha256 differs" in msg, f"{what}: {msg!r}"
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
            dt = time.perf_counter() - t
            slowest = max(slowest, dt)
            peak = tracemalloc.get_traced_memory()[1] - floor
            assert dt < LIMIT_S and peak < LIMIT_MB << 20, f"{what}: {dt:.2f} s, {peak >> 20} MB"
            assert expected in ("either", "error" if outcome == "DataError" else "read", "same"), what
            if expected == "same":
                assert outcome == "read" and keys == want_keys, what
                assert all(np.array_equal(got[k], want[k]) for k in want), what
            elif outcome == "read":
                assert got["input_ids"].shape == (SAMPLES, TOKENS) and len(keys) == SAMPLES, what
            counts[(family, outcome)] += 1
            path.unlink()
    finally:
        tracemalloc.stop()
        signal.signal(signal.SIGALRM, old)
    grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) >> 10  # KiB -> MiB (Linux)
    assert grown < LIMIT_MB
    families = sorted({f for f, _ in counts})
    print(f"\n{len(cases)} mutated shards, slowest {slowest * 1000:.0f} ms, peak RSS +{grown} MB")
    for f in families:
        print(f"  {f:18} DataError {counts[(f, 'DataError')]:4}  read {counts[(f, 'read')]:4}")
    total = Counter(o for (_, o), c in counts.items() for _ in range(c))
    print(f"  {'total':18} DataError {total['DataError']:4}  read {total['read']:4}")


@pytest.mark.parametrize("size", [b"-1000\0", b"-1\0", b"\xff" * 12])
def test_negative_size_is_refused_at_once(tmp_path, size):
    """The walk used to jump backwards for ever on a negative size, its memory growing until the OOM killer."""
    base = _ustar_base(tmp_path)
    data = _field(base, 1024, 124, size)
    t = time.perf_counter()
    with pytest.raises(DataError, match=r"^shard .*: corrupt or truncated tar \(member 1 at byte 1024: size -\d+ "
                                        r"is negative\)$"):
        _run(tmp_path / "neg.tar", data, True, base)
    assert time.perf_counter() - t < 1
