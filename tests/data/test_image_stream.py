"""The training stream over image shards: the same global order at any world size, resume across world
sizes, fixed validation batches, and bad image data refused with one line naming the shard and key."""

from __future__ import annotations

import gzip
import io
import json
from pathlib import Path

import numpy as np
import pytest

from pretrain.config import DataConfig
from pretrain.data import DataError, build_train_stream, build_val_batches, validate_data
from pretrain.data.manifest import FORMAT, write_manifest
from pretrain.data.shards import ShardWriter
from pretrain.data.write_images import FASHION_CLASSES, read_idx, write_images
from tests.data.conftest import write_source

FIELDS = {"images", "labels", "positions", "keys", "source"}


def write_idx_source(root: Path, n_train: int, n_val: int, side: int, seed: int,
                     shard_samples: int = 7) -> Path:
    """Fashion-MNIST-like IDX files (random side x side images, labels 0..9) written into image shards."""
    rng = np.random.default_rng(seed)
    src = root / "idx"
    src.mkdir(parents=True)
    for split, n in (("train", n_train), ("t10k", n_val)):
        for kind, arr in (("images-idx3-ubyte.gz", rng.integers(0, 256, (n, side, side), dtype=np.uint8)),
                          ("labels-idx1-ubyte.gz", rng.integers(0, 10, n, dtype=np.uint8))):
            header = bytes([0, 0, 8, arr.ndim]) + b"".join(d.to_bytes(4, "big") for d in arr.shape)
            with gzip.open(src / f"{split}-{kind}", "wb") as f:
                f.write(header + arr.tobytes())
    write_images(str(src), out=root / "shards", shard_samples=shard_samples)
    return root / "shards"


@pytest.fixture(scope="module")
def fm(tmp_path_factory) -> dict:
    """45 train images (7 shards) and 20 val images (3 shards) of 8x8 grayscale, with their arrays."""
    root = tmp_path_factory.mktemp("image-stream")
    out = write_idx_source(root, 45, 20, 8, seed=0)
    idx = root / "idx"
    arrays = {split: tuple(read_idx(idx / f"{p}-{kind}-ubyte.gz") for kind in ("images-idx3", "labels-idx1"))
              for split, p in (("train", "train"), ("val", "t10k"))}
    return {"train": out / "train", "val": out / "val", "arrays": arrays}


def run_steps(cfg: DataConfig, world: int, mb: int, accum: int, n_steps: int, state: dict | None = None):
    """Per step, every rank's rows in rank order as (position, key, label, image bytes); and the streams."""
    ranks = [build_train_stream(cfg, seed=3, rank=r, world_size=world, micro_batch_size=mb, grad_accum=accum)
             for r in range(world)]
    for s in ranks:
        if state is not None:
            s.load_state_dict(state)
    steps = []
    for _ in range(n_steps):
        rows = []
        for s in ranks:
            for _ in range(accum):
                b = next(s)
                assert set(b) == FIELDS and b["images"].shape == (mb, 1, 8, 8)
                fields = zip(b["positions"], b["keys"], b["labels"], b["images"], strict=True)
                rows += [(int(p), k, int(y), im.numpy().tobytes()) for p, k, y, im in fields]
        steps.append(rows)
    for s in ranks:
        s.close()
    return steps, ranks


def test_batch_format_and_contents(fm):
    cfg = DataConfig(train=str(fm["train"]), val=str(fm["val"]))
    assert validate_data(cfg) == {"kind": "images", "train_samples": 45, "val_samples": 20,
                                  "image_shape": [1, 8, 8], "num_classes": 10, "classes": FASHION_CLASSES,
                                  "encoding": "pixels", "latent_scale": None, "commands": []}
    s = build_train_stream(cfg, seed=0, rank=0, world_size=1, micro_batch_size=5, grad_accum=1)
    b = next(s)
    assert list(b) == ["images", "labels", "positions", "keys", "source"]
    assert str(b["images"].dtype) == "torch.uint8" and b["images"].shape == (5, 1, 8, 8)
    assert str(b["labels"].dtype) == "torch.int64" and b["positions"].tolist() == [0, 1, 2, 3, 4]
    images, labels = fm["arrays"]["train"]
    idx = [int(k) for k in b["keys"]]
    assert np.array_equal(b["images"][:, 0].numpy(), images[idx])
    assert b["labels"].tolist() == labels[idx].tolist()
    assert b["source"] == ["shards"] * 5
    state = json.loads(json.dumps(s.state_dict()))
    assert state["sample_shape"] == [1, 8, 8] and "seq_len" not in state
    assert s.stats() == {"samples/shards": 5, "epoch/shards": pytest.approx(5 / 45),
                         "corrupt_shards_skipped": 0}


def test_rgb_images_are_channels_first(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(1)
    made = {}
    for c, cls in enumerate(["cat", "dog"]):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        for i in range(3):
            made[(c, i)] = rng.integers(0, 256, (6, 5, 3), dtype=np.uint8)
            Image.fromarray(made[(c, i)]).save(tmp_path / "imgs" / cls / f"{i}.png")
    write_images(str(tmp_path / "imgs"), out=tmp_path / "out", shard_samples=4)
    cfg = DataConfig(train=str(tmp_path / "out" / "train"))
    assert validate_data(cfg)["image_shape"] == [3, 6, 5]
    b = next(build_train_stream(cfg, seed=0, rank=0, world_size=1, micro_batch_size=6, grad_accum=1))
    assert b["images"].shape == (6, 3, 6, 5)
    pairs = zip(b["labels"], b["images"], strict=True)
    got = sorted((int(y), im.numpy().transpose(1, 2, 0).tobytes()) for y, im in pairs)
    assert got == sorted((c, a.tobytes()) for (c, _), a in made.items())


def test_same_global_order_at_world_sizes(fm):
    """G = 8 over 12 steps (two epochs and more): one rank, two ranks, two ranks with dataloader workers
    give the same rows in the same position order, images and labels byte for byte."""
    cfg = DataConfig(train=str(fm["train"]))
    one, _ = run_steps(cfg, 1, 4, 2, 12)
    assert [[r[0] for r in step] for step in one] == [list(range(8 * s, 8 * s + 8)) for s in range(12)]
    two, _ = run_steps(cfg, 2, 2, 2, 12)
    assert two == one
    workers, _ = run_steps(DataConfig(train=str(fm["train"]), num_workers=2), 2, 4, 1, 12)
    assert workers == one
    keys = [r[1] for step in one for r in step]
    assert sorted(keys[:45]) == [f"{i:010d}" for i in range(45)] and keys[:45] != sorted(keys[:45])


@pytest.mark.parametrize("w0,w1", [(2, 1), (1, 2)])
def test_resume_at_another_world_size(fm, w0, w1):
    cfg = DataConfig(train=str(fm["train"]))
    ref, ref_ranks = run_steps(cfg, w0, 2, 4 // w0, 11)
    _, first = run_steps(cfg, w0, 2, 4 // w0, 4)
    state = json.loads(json.dumps(first[0].state_dict()))
    got, resumed = run_steps(cfg, w1, 2, 4 // w1, 7, state=state)
    assert got == ref[4:]
    assert resumed[0].stats() == ref_ranks[0].stats() == {
        "samples/shards": 88, "epoch/shards": pytest.approx(88 / 45), "corrupt_shards_skipped": 0}


def test_state_of_other_data_refused(fm, tmp_path):
    tokens = write_source(tmp_path, "prose", seed=1, n_docs=1, words=300) / "train"
    t, i = (build_train_stream(DataConfig(train=str(d)), seed=3, rank=0, world_size=1, micro_batch_size=2,
                               grad_accum=1) for d in (tokens, fm["train"]))
    with pytest.raises(DataError, match="no sample_shape"):
        i.load_state_dict(t.state_dict())
    with pytest.raises(DataError, match="no seq_len"):
        t.load_state_dict(i.state_dict())
    # A token source and an image source together: refused before anything streams.
    with pytest.raises(DataError, match=r"^data.train\[1\]: .* holds images shards, .* tokens shards$"):
        validate_data(DataConfig(train=[str(tokens), str(fm["train"])]))


def test_val_batches_same_at_any_world_size(fm):
    cfg = DataConfig(train=str(fm["train"]), val=str(fm["val"]))
    one = build_val_batches(cfg, rank=0, world_size=1, micro_batch_size=4, max_batches=4)
    per_rank = [build_val_batches(cfg, rank=r, world_size=2, micro_batch_size=2, max_batches=4)
                for r in range(2)]
    assert len(one) == 4 and len(per_rank[0]) == len(per_rank[1]) == 4
    assert all(set(b) == FIELDS for b in one)
    flat_two = [b for pair in zip(*per_rank, strict=True) for b in pair]  # batch b of rank 0, of rank 1, ...
    for name in ("images", "labels", "positions"):
        a = np.concatenate([b[name].numpy() for b in one])
        assert np.array_equal(a, np.concatenate([b[name].numpy() for b in flat_two]))
    images, labels = fm["arrays"]["val"]
    assert np.array_equal(np.concatenate([b["images"][:, 0].numpy() for b in one]), images[:16])
    assert np.concatenate([b["labels"].numpy() for b in one]).tolist() == labels[:16].tolist()


def _npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def _hand_shards(d: Path, shards: list[list[tuple[np.ndarray, int]]], image_shape) -> Path:
    """Image shards written by hand with ShardWriter (what write_images would refuse to write)."""
    d.mkdir(parents=True)
    entries, index = [], 0
    for n, samples in enumerate(shards):
        w = ShardWriter(d / f"shard-{n:06d}.tar")
        for image, label in samples:
            w.add(f"{index:010d}", {"image.npy": _npy(image), "label.cls": str(label).encode()})
            index += 1
        entries.append(dict(w.close(), samples=len(samples)))
    write_manifest(d, {"format": FORMAT, "kind": "images", "split": "train", "classes": FASHION_CLASSES,
                       "image_shape": image_shape, "samples": index, "shards": entries})
    return d


@pytest.mark.parametrize("bad,match", [
    ((np.zeros((4, 4), np.uint8), 10),
     r"shard .*shard-000001\.tar: sample 0000000003 has label 10, outside \[0, 10\)"),
    ((np.zeros((4, 4), np.uint8), -1), r"sample 0000000003 has label -1, outside"),
    ((np.zeros((5, 4), np.uint8), 2),
     r"shard-000001\.tar: sample 0000000003: image.npy of shape \[5, 4\], the manifest's image_shape is "
     r"\[4, 4\]"),
    ((np.zeros((4, 4), np.float32), 2), r"sample 0000000003: image.npy of dtype float32, not uint8"),
])
def test_bad_samples_named(tmp_path, bad, match):
    ok = [(np.full((4, 4), i, np.uint8), i) for i in range(3)]
    d = _hand_shards(tmp_path / "bad", [ok, [bad, *ok]], [4, 4])
    cfg = DataConfig(train=str(d))
    validate_data(cfg)  # the manifest alone cannot tell
    s = build_train_stream(cfg, seed=0, rank=0, world_size=1, micro_batch_size=7, grad_accum=1)
    with pytest.raises(DataError, match=match) as e:
        next(s)
    assert "\n" not in str(e.value)


def test_mixed_sizes_refused(tmp_path):
    from PIL import Image

    (tmp_path / "imgs" / "a").mkdir(parents=True)
    for i, side in enumerate((4, 4, 5)):
        Image.fromarray(np.zeros((side, side), np.uint8)).save(tmp_path / "imgs" / "a" / f"{i}.png")
    write_images(str(tmp_path / "imgs"), out=tmp_path / "out")
    cfg = DataConfig(train=str(tmp_path / "out" / "train"))
    with pytest.raises(DataError, match=r"^data.train: .*out/train holds images of mixed sizes; ") as e:
        validate_data(cfg)
    assert "\n" not in str(e.value)
    with pytest.raises(DataError, match="mixed sizes"):
        build_train_stream(cfg, seed=0, rank=0, world_size=1, micro_batch_size=1, grad_accum=1)


def test_image_sources_must_agree(fm, tmp_path):
    big = write_idx_source(tmp_path / "big", 8, 8, 10, seed=5)
    shape = r"^data.train\[1\]: .* another image_shape than .* \(\[1, 10, 10\] vs \[1, 8, 8\], channels"
    with pytest.raises(DataError, match=shape):
        validate_data(DataConfig(train=[str(fm["train"]), {"path": str(big / "train"), "name": "big"}]))
    with pytest.raises(DataError, match=r"^data.val: .* another image_shape"):
        validate_data(DataConfig(train=str(fm["train"]), val=str(big / "val")))
    renamed = tmp_path / "renamed"
    renamed.mkdir()
    m = json.loads((fm["train"] / "index.json").read_text())
    for s in m["shards"]:
        (renamed / s["name"]).symlink_to(fm["train"] / s["name"])
    write_manifest(renamed, dict(m, classes=[*FASHION_CLASSES[:3], "Jumper", *FASHION_CLASSES[4:]]))
    with pytest.raises(DataError, match=r"^data.train\[1\]: .* other classes than .* \(class 3: 'Jumper' vs"):
        validate_data(DataConfig(train=[str(fm["train"]), str(renamed)]))
    write_manifest(renamed, dict(m, encoding="latents", latent_scale=0.18, image_shape=[1, 8, 8]))
    with pytest.raises(DataError, match=r"another encoding .* \(latents vs pixels\)"):
        validate_data(DataConfig(train=[str(fm["train"]), str(renamed)]))


def test_corrupt_image_shard_skipped(fm, tmp_path):
    import shutil

    d = tmp_path / "copy"
    shutil.copytree(fm["train"], d)
    raw = bytearray((d / "shard-000002.tar").read_bytes())
    raw[700] ^= 0xFF  # inside the first sample's image.npy payload
    (d / "shard-000002.tar").write_bytes(bytes(raw))
    cfg = DataConfig(train=str(d), skip_corrupt=True)
    s = build_train_stream(cfg, seed=0, rank=0, world_size=1, micro_batch_size=5, grad_accum=1)
    keys = [k for _ in range(9) for k in next(s)["keys"]]
    assert not {f"{i:010d}" for i in range(14, 21)} & set(keys)  # shard 2 holds samples 14..20
    assert s.stats()["corrupt_shards_skipped"] == 1
