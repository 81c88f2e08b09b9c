"""The image-quality judge (Fréchet distance on a small classifier's features, class agreement) on real
Fashion-MNIST shards, its cache, and sample grids."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch

from pretrain.data.write_images import FASHION_MNIST, read_idx, write_images
from pretrain.errors import DataError
from pretrain.metrics.grid import grid_array, save_grid
from pretrain.metrics.image_quality import (
    Judge,
    frechet_distance,
    gaussian,
    load_image_arrays,
    train_classifier,
)

N_TRAIN, N_TEST = 2000, 1000  # a 3,000-image subset of the real files keeps the module fast
RECIPE = {"epochs": 1, "batch_size": 32, "threads": 2}  # one epoch of small batches: ~60 steps


def _write_idx(path: Path, arr: np.ndarray) -> None:
    header = bytes([0, 0, 8, arr.ndim]) + b"".join(d.to_bytes(4, "big") for d in arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.tobytes())


@pytest.fixture(scope="module")
def fm(tmp_path_factory) -> dict:
    """train/ (2,000 of the real training images) and val/ (1,000 of the real test images) shards."""
    if not (FASHION_MNIST / "t10k-images-idx3-ubyte.gz").is_file():
        pytest.fail("needs the Debian package: apt-get install -y dataset-fashion-mnist")
    tmp = tmp_path_factory.mktemp("fm")
    (tmp / "idx").mkdir()
    out = {}
    for split, prefix, n in (("train", "train", N_TRAIN), ("val", "t10k", N_TEST)):
        images = read_idx(FASHION_MNIST / f"{prefix}-images-idx3-ubyte.gz")[:n]
        labels = read_idx(FASHION_MNIST / f"{prefix}-labels-idx1-ubyte.gz")[:n]
        _write_idx(tmp / "idx" / f"{prefix}-images-idx3-ubyte.gz", images)
        _write_idx(tmp / "idx" / f"{prefix}-labels-idx1-ubyte.gz", labels)
        out[split] = (images[:, None], labels.astype(np.int64))
    write_images(str(tmp / "idx"), out=tmp / "shards", shard_samples=700)
    return {"train_dir": tmp / "shards" / "train", "test_dir": tmp / "shards" / "val", **out}


@pytest.fixture(scope="module")
def trained(fm, tmp_path_factory) -> tuple[Judge, Path]:
    cache = tmp_path_factory.mktemp("cache")
    return Judge.load_or_train(cache, fm["train_dir"], fm["test_dir"], **RECIPE), cache


def test_frechet_distance():
    rng = np.random.default_rng(0)
    f = rng.normal(size=(2000, 6)) @ rng.normal(size=(6, 6))
    mu, sigma = gaussian(f)
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-8
    # Shifting the mean by d in every coordinate adds exactly 6 d^2; the distance grows with the shift.
    fds = [frechet_distance(*gaussian(f + d), mu, sigma) for d in (0.25, 0.5, 1.0, 2.0)]
    assert np.allclose(fds, [6 * d * d for d in (0.25, 0.5, 1.0, 2.0)], rtol=1e-8)
    # Diagonal covariances by hand: |mu1 - mu2|^2 + sum((sqrt(a) - sqrt(b))^2), also with a singular one.
    a, b = np.array([1.0, 0.0, 4.0, 2.5]), np.array([0.0, 0.0, 9.0, 0.5])
    m1, m2 = np.array([0.0, 1.0, 2.0, 3.0]), np.array([1.0, 1.0, 0.0, 3.0])
    want = ((m1 - m2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert frechet_distance(m1, np.diag(a), m2, np.diag(b)) == pytest.approx(want, rel=1e-6)
    with pytest.raises(ValueError, match="shapes differ"):
        frechet_distance(m1, np.diag(a), m2[:3], np.diag(b[:3]))


def test_load_image_arrays(fm):
    images, labels, classes = load_image_arrays(fm["test_dir"])
    assert images.dtype == np.uint8 and images.shape == (N_TEST, 1, 28, 28) and labels.dtype == np.int64
    assert np.array_equal(images, fm["val"][0]) and np.array_equal(labels, fm["val"][1])
    assert len(classes) == 10 and classes[0] == "T-shirt/top"
    with pytest.raises(DataError, match="no such directory"):
        load_image_arrays(fm["test_dir"].parent / "missing")


def test_judge_on_real_images(fm, trained):
    judge, _ = trained
    xt, yt = fm["val"]
    # Held-out images (the real test split, never trained on): far above the 10% of chance after one epoch.
    assert judge.test_accuracy > 0.5
    assert judge.info["train_samples"] == N_TRAIN and judge.info["test_samples"] == N_TEST
    pred = judge.predict(torch.from_numpy(xt.copy()))  # a torch tensor works like an array
    assert pred.dtype == np.int64 and (pred == yt).mean() == judge.test_accuracy
    real = judge.score(xt, yt)
    assert real["class_agreement"] == judge.test_accuracy
    assert abs(real["fd"]) < 1e-6  # the test split against its own statistics
    feats = judge.features(xt[:10])
    assert feats.shape == (10, 128) and feats.dtype == np.float64 and (feats >= 0).all()
    # Other real images (training ones) are close; uniform noise is far, and of no class in particular.
    other = judge.score(*fm["train"])
    noise = np.random.default_rng(0).integers(0, 256, xt.shape, dtype=np.uint8)
    bad = judge.score(noise, yt)
    assert bad["fd"] > 20 * other["fd"] and bad["fd"] > 10
    assert bad["class_agreement"] < 0.3 < other["class_agreement"]
    with pytest.raises(ValueError, match="trained on"):
        judge.score(np.zeros((4, 3, 28, 28), np.uint8), [0, 1, 2, 3])


def _snapshot(d: Path) -> dict:
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(d.iterdir())}


def test_cache_reused_and_crash_leftovers_ignored(fm, trained, tmp_path, capsys):
    judge, cache = trained
    (entry,) = (cache / "classifiers").iterdir()  # one complete entry, no temporary left behind
    assert sorted(p.name for p in entry.iterdir()) == ["info.json", "model.safetensors", "stats.npz"]
    before = _snapshot(entry)
    again = Judge.load_or_train(cache, fm["train_dir"], fm["test_dir"], **RECIPE)
    assert "classifier epoch" not in capsys.readouterr().out  # loaded, not trained
    assert _snapshot(entry) == before  # nothing rewritten
    assert again.test_accuracy == judge.test_accuracy
    assert np.array_equal(again.features(fm["val"][0]), judge.features(fm["val"][0]))
    # A run that crashed mid-write left a half temporary directory under the same key: it is not loaded
    # (the next run trains and renames its own complete one into place) and later loads ignore it too.
    other = tmp_path / "cache"
    stale = other / "classifiers" / f".{entry.name}.tmp-crashed"
    stale.mkdir(parents=True)
    (stale / "model.safetensors").write_bytes(b"\x00" * 10)
    fresh = Judge.load_or_train(other, fm["train_dir"], fm["test_dir"], **RECIPE)
    assert capsys.readouterr().out.count("classifier epoch") == 1
    assert fresh.test_accuracy == judge.test_accuracy  # same seed, same data: the same classifier
    assert sorted(p.name for p in (other / "classifiers").iterdir()) == sorted([entry.name, stale.name])
    Judge.load_or_train(other, fm["train_dir"], fm["test_dir"], **RECIPE)
    assert "classifier epoch" not in capsys.readouterr().out
    # Another recipe is another entry, not a hit on this one.
    assert Judge.load_or_train(other, fm["train_dir"], fm["test_dir"], **{**RECIPE, "seed": 1}) is not None
    assert len([p for p in (other / "classifiers").iterdir() if not p.name.startswith(".")]) == 2


def test_train_classifier_is_deterministic(fm):
    x, y = fm["train"][0][:512], fm["train"][1][:512]
    kw = dict(epochs=1, batch_size=64, threads=2)
    state = torch.get_rng_state()
    a, b = train_classifier(x, y, 10, seed=3, **kw), train_classifier(x, y, 10, seed=3, **kw)
    c = train_classifier(x, y, 10, seed=4, **kw)
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is untouched
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())
    assert not torch.equal(a.state_dict()["head.weight"], c.state_dict()["head.weight"])


def test_save_grid(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    gray = rng.integers(0, 256, (20, 1, 28, 28), dtype=np.uint8)
    p = save_grid(gray, tmp_path / "g" / "grid.png", nrow=10)
    with Image.open(p) as im:
        assert im.format == "PNG" and im.mode == "L" and im.size == (10 * 56 + 11 * 2, 2 * 56 + 3 * 2)
        arr = np.asarray(im)
    # Nearest-neighbour upscaling: each source pixel is a 2x2 block; row-major placement, white padding.
    assert np.array_equal(arr[2:58, 2:58], gray[0, 0].repeat(2, 0).repeat(2, 1))
    assert np.array_equal(arr[60:116, 60:116], gray[11, 0].repeat(2, 0).repeat(2, 1))
    assert (arr[:2] == 255).all() and (arr[:, 58:60] == 255).all()
    assert not list((tmp_path / "g").glob(".*tmp*"))
    # Row labels widen the picture on the left, with dark text there; the images are unchanged.
    labelled = grid_array(gray, 10, labels=["T-shirt/top", "Ankle boot"])
    assert labelled.shape[0] == arr.shape[0] and labelled.shape[1] > arr.shape[1] + 40
    assert labelled[:, : labelled.shape[1] - arr.shape[1]].min() < 128
    assert np.array_equal(labelled[:, -arr.shape[1]:], arr)
    # RGB, a last row that is not full, an explicit scale.
    rgb = grid_array(rng.integers(0, 256, (5, 3, 32, 32), dtype=np.uint8), 4, scale=3, pad=1)
    assert rgb.shape == (2 * 96 + 3, 4 * 96 + 5, 3)
    assert (rgb[97:, 98:] == 255).all()  # the empty cells of the second row
    with pytest.raises(ValueError, match="labels for 2 rows"):
        grid_array(gray, 10, labels=["one"])
    with pytest.raises(ValueError, match="uint8"):
        grid_array(gray.astype(np.float32), 10)
