"""Image shards from an image folder and from Debian's Fashion-MNIST files, read back by webdataset."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from typer.testing import CliRunner

from pretrain.cli.data import app
from pretrain.data.write_images import FASHION_MNIST, read_idx, write_images


def _read_back(d: Path) -> list[dict]:
    m = json.loads((d / "index.json").read_text())
    urls = [str(d / s["name"]) for s in m["shards"]]
    return list(wds.WebDataset(urls, shardshuffle=False).decode())


def test_image_folder(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    made = {}
    for c, cls in enumerate(["cat", "dog"]):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        for i in range(5):
            arr = rng.integers(0, 256, (6, 7, 3), dtype=np.uint8)
            Image.fromarray(arr).save(tmp_path / "imgs" / cls / f"{i}.png")
            made[(c, i)] = arr
        (tmp_path / "imgs" / cls / "0.txt").write_text(f"a {cls}\n")
    ms = write_images(str(tmp_path / "imgs"), out=tmp_path / "out", shard_samples=3, val_fraction=0.2)
    assert ms["train"]["samples"] == 8 and ms["val"]["samples"] == 2 and len(ms["train"]["shards"]) == 3
    assert ms["train"]["classes"] == ["cat", "dog"] and ms["train"]["image_shape"] == [6, 7, 3]
    samples = _read_back(tmp_path / "out" / "train") + _read_back(tmp_path / "out" / "val")
    assert sorted(s["label.cls"] for s in samples) == [0] * 5 + [1] * 5
    arrays = [s["image.npy"] for s in samples]
    assert all(a.dtype == np.uint8 for a in arrays)
    assert sorted(a.tobytes() for a in arrays) == sorted(a.tobytes() for a in made.values())
    assert sorted(s["caption.txt"] for s in samples if "caption.txt" in s) == ["a cat", "a dog"]
    # Same inputs, same bytes (fixed tar headers).
    write_images(str(tmp_path / "imgs"), out=tmp_path / "again", shard_samples=3, val_fraction=0.2)
    for p in (tmp_path / "out").rglob("*.tar"):
        assert p.read_bytes() == (tmp_path / "again" / p.relative_to(tmp_path / "out")).read_bytes()


def test_fashion_mnist_files(tmp_path):
    """The Debian package's IDX files: every image and label lands in the shards unchanged."""
    if not (FASHION_MNIST / "t10k-images-idx3-ubyte.gz").is_file():
        pytest.fail("needs the Debian package: apt-get install -y dataset-fashion-mnist")
    # The real files' first 1,500 test images and labels, re-packed as IDX under both split names,
    # keep the test fast; the full sets go through the same reader.
    images = read_idx(FASHION_MNIST / "t10k-images-idx3-ubyte.gz")
    labels = read_idx(FASHION_MNIST / "t10k-labels-idx1-ubyte.gz")
    assert images.shape == (10000, 28, 28) and labels.shape == (10000,) and set(labels.tolist()) == set(range(10))
    images, labels = images[:1500], labels[:1500]
    src = tmp_path / "fm"
    src.mkdir()
    for split in ("train", "t10k"):
        for kind, arr in (("images-idx3-ubyte.gz", images), ("labels-idx1-ubyte.gz", labels)):
            header = bytes([0, 0, 8, arr.ndim]) + b"".join(d.to_bytes(4, "big") for d in arr.shape)
            with gzip.open(src / f"{split}-{kind}", "wb") as f:
                f.write(header + arr.tobytes())
    ms = write_images(str(src), out=tmp_path / "out", shard_samples=600)
    assert ms["val"]["samples"] == 1500 and len(ms["val"]["shards"]) == 3
    assert ms["val"]["image_shape"] == [28, 28] and ms["val"]["classes"][9] == "Ankle boot"
    back = _read_back(tmp_path / "out" / "val")
    assert np.array_equal(np.stack([s["image.npy"] for s in back]), images)
    assert [s["label.cls"] for s in back] == labels.tolist()
    assert [s["__key__"] for s in back[:2]] == ["0000000000", "0000000001"]


def test_cli_images_bad_input(tmp_path):
    (tmp_path / "bad").mkdir()
    with gzip.open(tmp_path / "bad" / "train-images-idx3-ubyte.gz", "wb") as f:
        f.write(b"\x00\x00\x08\x03" + (5).to_bytes(4, "big") + (28).to_bytes(4, "big") * 2 + b"\x00" * 100)
    r = CliRunner().invoke(app, ["images", str(tmp_path / "bad"), "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and "truncated" in r.stderr and "Traceback" not in r.output
    r = CliRunner().invoke(app, ["images", str(tmp_path / "none"), "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and "no such directory" in r.stderr
    assert not (tmp_path / "o" / "train" / "index.json").exists()


def _png(path: Path, width: int, height: int) -> None:
    """A valid 1-bit greyscale PNG of all-black rows, written chunk by chunk: a gigapixel costs kilobytes."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    z = zlib.compressobj(9)
    row = b"\x00" * (1 + -(-width // 8))  # filter byte + packed bits
    idat = b"".join(z.compress(row) for _ in range(height)) + z.flush()
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
                     + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


@pytest.mark.parametrize("bad", ["bomb", "truncated"])
def test_cli_images_undecodable_image_is_one_line(tmp_path, bad):
    """More than 2 x PIL's MAX_IMAGE_PIXELS (PIL raises DecompressionBombError, which is not an OSError) or a
    cut-off file: exit 2 and one line naming the file, no traceback, no manifest."""
    from PIL import Image

    (tmp_path / "imgs" / "a").mkdir(parents=True)
    Image.fromarray(np.zeros((4, 4), dtype=np.uint8)).save(tmp_path / "imgs" / "a" / "0.png")
    f = tmp_path / "imgs" / "a" / "1.png"
    if bad == "bomb":
        width = 1 << 15
        _png(f, width, 2 * Image.MAX_IMAGE_PIXELS // width + 1)
        assert f.stat().st_size < 100_000
    else:
        Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(f)
        f.write_bytes(f.read_bytes()[:1500])
    r = CliRunner().invoke(app, ["images", str(tmp_path / "imgs"), "--out", str(tmp_path / "o")])
    assert r.exit_code == 2, r.output
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    why = "image too large to decode" if bad == "bomb" else "cannot decode image"
    assert len(lines) == 1 and f"input {f}: {why}" in lines[0], r.stderr
    assert "Traceback" not in r.output and not (tmp_path / "o" / "train" / "index.json").exists()
