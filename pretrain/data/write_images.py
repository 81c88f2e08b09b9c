"""`pretrain data images`: image shards (uint8 image, integer label, optional caption) with a manifest.

Inputs:
- an image folder `root/<class>/<image>` (labels are the sorted class directory names; a `<image>.txt`
  beside an image is its caption);
- the IDX files of Debian's `dataset-fashion-mnist` package (`/usr/share/datasets/fashion-mnist`):
  `train-*` goes to `train/`, `t10k-*` to `val/`.

Each sample is `<key>.image.npy` (uint8, HxW or HxWxC), `<key>.label.cls` (the label as decimal text,
webdataset's convention) and optionally `<key>.caption.txt`; webdataset's default decoders read all three.
Like the text writer: fixed tar headers (same inputs, same bytes), shards renamed into place when complete,
and a journal (written with `pretrain.atomic.atomic_write`) so an interrupted run keeps the shards it finished.
"""

from __future__ import annotations

import gzip
import io
import json
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from pretrain.atomic import atomic_write
from pretrain.data.manifest import FORMAT, MANIFEST, write_manifest
from pretrain.data.shards import ShardWriter
from pretrain.data.write_text import JOURNAL, journaled_shards, remove_stale_tmp
from pretrain.errors import DataError, first_line

FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                   "Ankle boot"]
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}

Item = tuple[np.ndarray, int, str | None]  # image, label, caption


def read_idx(path: Path) -> np.ndarray:
    """An IDX array (the MNIST file format: magic, dims, big-endian uint8 data), gzipped or not."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise DataError(f"input {path}: cannot read ({e.strerror or e})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataError(f"input {path}: not an IDX file of unsigned bytes")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise DataError(f"input {path}: {data.size} bytes of data, the header says {dims} (truncated?)")
    return data.reshape(dims)


def fashion_mnist_splits(root: Path) -> dict[str, tuple[list[str], Callable[[int], Iterator[Item]], int]]:
    """{split: (classes, items from index i on, count)} of the Fashion-MNIST IDX files under root."""
    out = {}
    for split, prefix in (("train", "train"), ("val", "t10k")):
        images = read_idx(_idx_file(root, f"{prefix}-images-idx3-ubyte"))
        labels = read_idx(_idx_file(root, f"{prefix}-labels-idx1-ubyte"))
        if len(images) != len(labels):
            raise DataError(f"input {root}: {len(images)} {prefix} images but {len(labels)} labels")

        def items(start: int, images=images, labels=labels) -> Iterator[Item]:
            for i in range(start, len(images)):
                yield images[i], int(labels[i]), None

        out[split] = (FASHION_CLASSES, items, len(images))
    return out


def _idx_file(root: Path, stem: str) -> Path:
    for name in (stem + ".gz", stem):
        if (root / name).is_file():
            return root / name
    raise DataError(f"input {root}: no {stem}(.gz) (apt-get install dataset-fashion-mnist)")


def folder_splits(root: Path, val_fraction: float) -> dict[str, tuple[list[str], Callable[[int], Iterator[Item]], int]]:
    """{split: (classes, items from index i on, count)} of an image folder `root/<class>/<image>`;
    every n-th image goes to val, so each class is represented there."""
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise DataError(f"input {root}: no class subdirectories (expected root/<class>/<image>)")
    files = [(f, c) for c, name in enumerate(classes) for f in sorted((root / name).rglob("*"))
             if f.suffix.lower() in IMAGE_SUFFIXES]
    if not files:
        raise DataError(f"input {root}: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) under its class directories")
    is_val = np.zeros(len(files), dtype=bool)
    n_val = round(len(files) * val_fraction)
    if n_val:
        is_val[np.linspace(0, len(files) - 1, n_val).round().astype(int)] = True
    parts = {"train": [f for f, v in zip(files, is_val, strict=True) if not v]}
    if n_val:
        parts["val"] = [f for f, v in zip(files, is_val, strict=True) if v]
    return {split: (classes, _decoder(part), len(part)) for split, part in parts.items()}


def _decoder(files: list[tuple[Path, int]]) -> Callable[[int], Iterator[Item]]:
    def items(start: int) -> Iterator[Item]:
        for f, label in files[start:]:
            cap = f.with_suffix(".txt")
            try:
                caption = cap.read_text(encoding="utf-8").strip() if cap.is_file() else None
            except (OSError, UnicodeDecodeError) as e:
                raise DataError(f"input {cap}: cannot read the caption ({first_line(e)})") from None
            yield _decode_image(f), label, caption

    return items


def _decode_image(f: Path) -> np.ndarray:
    """One image file as uint8 pixels; a file PIL refuses is a DataError naming it. Besides OSError, PIL
    raises DecompressionBombError above 2 x `Image.MAX_IMAGE_PIXELS` pixels (a few kilobytes of PNG can
    claim gigapixels), and ValueError, SyntaxError or EOFError from some plugins on damaged files."""
    from PIL import Image

    try:
        with Image.open(f) as im:
            return np.asarray(im.convert("L" if im.mode in ("1", "L", "I;16") else "RGB"))
    except Image.DecompressionBombError as e:
        raise DataError(f"input {f}: image too large to decode ({first_line(e)})") from None
    except (OSError, ValueError, SyntaxError, EOFError, MemoryError) as e:  # UnidentifiedImageError is an OSError
        raise DataError(f"input {f}: cannot decode image ({type(e).__name__}: {first_line(e)})") from None


def _npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr, dtype=np.uint8), allow_pickle=False)
    return buf.getvalue()


def _write_split(out: Path, header: dict, items: Callable[[int], Iterator[Item]], count: int, sps: int,
                 progress: Callable[[int], None], member: str = "image.npy",
                 encode: Callable[[np.ndarray], bytes] = _npy) -> dict:
    """Shards of `sps` samples each (the array of each as `<key>.<member>`, written by `encode`); finished
    shards from an interrupted run with the same header are kept. Also writes latent shards."""
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_tmp(out)
    (out / MANIFEST).unlink(missing_ok=True)
    shards: list[dict] = []
    j = out / JOURNAL
    shards.extend(journaled_shards(out, header)[1])
    start = sum(s["samples"] for s in shards)
    progress(start)
    writer, shapes = None, set()
    for index, (image, label, caption) in enumerate(items(start), start=start):
        if writer is None:
            writer = ShardWriter(out / f"shard-{len(shards):06d}.tar")
        members = {member: encode(image), "label.cls": str(label).encode()}
        if caption is not None:
            members["caption.txt"] = caption.encode()
        writer.add(f"{index:010d}", members)
        shapes.add(image.shape)
        progress(1)
        if writer.samples == sps or index == count - 1:
            entry = writer.close()
            entry.update(samples=writer.samples, shapes=sorted(map(list, shapes)))
            shards.append(entry)
            writer, shapes = None, set()
            atomic_write(j, json.dumps({"header": header, "shards": shards}, sort_keys=True))
    shapes_all = sorted({tuple(s) for e in shards for s in e["shapes"]})
    m = dict(header, samples=sum(s["samples"] for s in shards), shards=shards,
             image_shape=list(shapes_all[0]) if len(shapes_all) == 1 else None)
    for stale in sorted(out.glob("shard-*.tar*")):
        if stale.name not in {s["name"] for s in shards}:
            stale.unlink()
    write_manifest(out, m)
    return m


def write_images(source: str, *, out: Path, shard_samples: int = 10_000, val_fraction: float = 0.0,
                 progress: Callable[[int, int], None] | None = None) -> dict[str, dict]:
    """Write `out/train/` (and `out/val/`) from an image folder or `fashion-mnist` (the Debian package's
    files, or a directory holding the same IDX files). Returns the manifests by split."""
    if shard_samples < 1:
        raise DataError(f"--shard-samples must be positive (got {shard_samples})")
    if not 0 <= val_fraction < 1:
        raise DataError(f"--val-fraction must be in [0, 1) (got {val_fraction})")
    root = FASHION_MNIST if source == "fashion-mnist" else Path(source)
    if not root.is_dir():
        hint = " (apt-get install dataset-fashion-mnist)" if source == "fashion-mnist" else ""
        raise DataError(f"input: no such directory: {root}{hint}")
    if any(root.glob("*-images-idx3-ubyte*")):
        splits = fashion_mnist_splits(root)
        origin = "fashion-mnist"
    else:
        splits = folder_splits(root, val_fraction)
        origin = "folder"
    total = sum(n for _, _, n in splits.values())
    done = [0]

    def step(n: int) -> None:
        done[0] += n
        if progress:
            progress(done[0], total)

    manifests = {}
    for split, (classes, items, count) in splits.items():
        header = {"format": FORMAT, "kind": "images", "split": split, "origin": origin, "classes": classes,
                  "members": ["image.npy", "label.cls", "caption.txt?"], "samples_per_shard": shard_samples}
        manifests[split] = _write_split(out / split, header, items, count, shard_samples, step)
    return manifests
