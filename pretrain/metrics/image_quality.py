"""A quality number for generated images: a small classifier trained on the real data is the judge.

FID (Heusel et al. 2017, https://arxiv.org/abs/1706.08500) compares Inception-v3 features of generated and
real images; Inception weights cannot be fetched here and know nothing of 28-pixel grayscale clothes, so the
features come from a small CNN trained on the data's own training split instead (the usual practice for
MNIST-like sets). Two numbers come out of `Judge.score`:

- `fd`: the Fréchet distance between the Gaussians fitted to the classifier's 128-d penultimate features of
  the generated images and of the real test split (0 for the same distribution; grows with the gap);
- `class_agreement`: the fraction of generated images the classifier assigns to the class they were
  conditioned on (how well class conditioning works; the judge's own test accuracy is the ceiling).

The trained judge is cached under `cache_root/classifiers/<key>/`, keyed by the shards' sha256s, the
architecture version and the training recipe, and written as a temporary directory renamed into place, so
a crash or two concurrent runs never leave a half cache and a later run loads it instead of training.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from scipy import linalg
from torch import nn

from pretrain.atomic import atomic_path, atomic_write, rename_if_absent
from pretrain.data.manifest import Source, resolve
from pretrain.data.shards import read_shard
from pretrain.errors import DataError, first_line

# Bump when Classifier or the training recipe changes: old caches then stop matching instead of loading.
ARCH_VERSION = 1
FEATURES = 128
EVAL_BATCH = 500  # fixed, so the same images always go through in the same batches (bit-equal features)


def _source(path: str | os.PathLike) -> Source:
    src = resolve(str(path), None, "image_quality")
    m = src.manifest
    if m.get("kind") != "images":
        raise DataError(f"image_quality: {path} holds {m.get('kind')!r} shards, not images")
    if m.get("encoding", "pixels") != "pixels":
        raise DataError(f"image_quality: {path} holds {m.get('encoding')} shards; the judge needs pixels")
    return src


def load_image_arrays(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(images uint8 (N, C, H, W), labels int64 (N,), class names) of every sample of a pixel image shard
    directory (or URL), in manifest order; shards are checked against the manifest's sizes and sha256s."""
    src = _source(path)
    images, labels = [], []
    for url, entry in zip(src.urls, src.shards, strict=True):
        for key, members in read_shard(url, sha256=entry.get("sha256"), nbytes=entry["bytes"], label=url):
            if "image.npy" not in members or "label.cls" not in members:
                raise DataError(f"shard {url}: sample {key} lacks image.npy or label.cls")
            arr = np.load(io.BytesIO(members["image.npy"]), allow_pickle=False)
            if arr.dtype != np.uint8 or arr.ndim not in (2, 3):
                raise DataError(f"shard {url}: sample {key} is {arr.dtype} {arr.shape}, not uint8 HxW(xC)")
            images.append(arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1))
            labels.append(int(members["label.cls"]))
    if not images:
        raise DataError(f"image_quality: {path} has no samples")
    if len({a.shape for a in images}) > 1:
        raise DataError(f"image_quality: {path} mixes image shapes {sorted({a.shape for a in images})}")
    return np.stack(images), np.asarray(labels, dtype=np.int64), list(src.manifest.get("classes") or [])


def _uint8(images) -> np.ndarray:
    """numpy uint8 (N, C, H, W) from a numpy array or a torch tensor (on any device)."""
    if isinstance(images, torch.Tensor):
        images = images.detach().cpu().numpy()
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(f"image_quality: images must be uint8 (N, C, H, W), got {images.dtype} "
                         f"{images.shape}")
    return images


def _to_input(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 -> float in [-1, 1], the model space of the pixel objectives."""
    x = images.float() if isinstance(images, torch.Tensor) else torch.from_numpy(images.astype(np.float32))
    return x.div_(127.5).sub_(1.0)


class Classifier(nn.Module):
    """Three conv blocks (3x3 conv, batch norm, ReLU, 2x2 max-pool), an adaptive pool to 3x3, a 128-d
    penultimate layer (the features) and a linear head. Any (C, H, W) with H, W >= 8; ~0.1M parameters, so
    two epochs of Fashion-MNIST train in well under a minute on two CPU cores and reach ~91% test accuracy."""

    def __init__(self, in_channels: int, num_classes: int, widths: tuple[int, ...] = (16, 32, 64)):
        super().__init__()
        layers, c = [], in_channels
        for w in widths:
            layers += [nn.Conv2d(c, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(),
                       nn.MaxPool2d(2)]
            c = w
        self.body = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(3), nn.Flatten())
        self.penultimate = nn.Linear(c * 9, FEATURES)
        self.head = nn.Linear(FEATURES, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 128) non-negative features of images in [-1, 1]."""
        return F.relu(self.penultimate(self.body(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


@contextlib.contextmanager
def _threads(n: int | None) -> Iterator[None]:
    old = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def train_classifier(images, labels, num_classes: int, *, epochs: int = 2, seed: int = 0,
                     batch_size: int = 256, lr: float = 3e-3, threads: int | None = None) -> Classifier:
    """A Classifier trained with Adam under a one-cycle schedule (Smith & Topin 2017,
    https://arxiv.org/abs/1708.07120: it reaches in 2 epochs what a constant rate needs ~5 for). The
    same seed (and thread count) gives the same weights; the global RNG is left as it was. Returns it in
    eval mode."""
    x = torch.from_numpy(np.array(_uint8(images)))  # a copy: torch wants writable memory, shards are not
    y = torch.as_tensor(np.asarray(labels), dtype=torch.int64)
    n, c, h, w = x.shape
    if len(y) != n:
        raise ValueError(f"image_quality: {n} images but {len(y)} labels")
    if min(h, w) < 8:
        raise ValueError(f"image_quality: images of {h}x{w} are too small for the classifier (needs >= 8x8)")
    batch_size = min(batch_size, n)
    with _threads(threads), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Classifier(c, num_classes)
        order = np.random.default_rng(seed)
        steps = n // batch_size  # whole batches only: batch norm statistics of a tiny last batch are noise
        opt = torch.optim.Adam(model.parameters(), lr=lr)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * steps)
        t0 = time.perf_counter()
        for epoch in range(epochs):
            model.train()
            perm = torch.from_numpy(order.permutation(n))
            loss_sum = correct = 0.0
            for i in range(steps):
                idx = perm[i * batch_size:(i + 1) * batch_size]
                logits = model(_to_input(x[idx]))
                loss = F.cross_entropy(logits, y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                loss_sum += loss.item()
                correct += (logits.argmax(1) == y[idx]).sum().item()
            print(f"classifier epoch {epoch + 1}/{epochs}: loss {loss_sum / steps:.4f}, "
                  f"train accuracy {correct / (steps * batch_size):.2%}, {time.perf_counter() - t0:.1f} s",
                  flush=True)
    return model.eval()


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     eps: float = 1e-6) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)), the squared 2-Wasserstein distance of two Gaussians,
    computed as pytorch-fid does: when the product is singular (its root not finite) eps*I is added to both
    covariances; the root's imaginary part (numerical noise of sqrtm) is dropped."""
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    sigma1, sigma2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (len(mu1), len(mu1)):
        raise ValueError(f"frechet_distance: shapes differ: mu {mu1.shape} {mu2.shape}, "
                         f"sigma {sigma1.shape} {sigma2.shape}")
    diff = mu1 - mu2
    with warnings.catch_warnings():  # a singular product (dead features) is expected; handled below
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(sigma1 @ sigma2)
        if not np.isfinite(covmean).all():
            offset = np.eye(len(mu1)) * eps
            covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    covmean = np.real(covmean)
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def gaussian(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean, covariance) of (N, F) features, in float64."""
    f = np.asarray(features, dtype=np.float64)
    if len(f) < 2:
        raise ValueError(f"image_quality: a covariance needs at least 2 images, got {len(f)}")
    return f.mean(0), np.cov(f, rowvar=False)


def _cache_key(train: Source, test: Source, recipe: dict) -> str:
    def digests(src: Source) -> list[str]:
        return [s.get("sha256") or f"{s['name']}:{s.get('bytes')}" for s in src.shards]

    blob = json.dumps({"arch": ARCH_VERSION, "train": digests(train), "test": digests(test),
                       "recipe": recipe}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


class Judge:
    """A trained Classifier plus the real test split's feature statistics (mu, sigma)."""

    def __init__(self, model: Classifier, mu: np.ndarray, sigma: np.ndarray, info: dict):
        self.model, self.mu, self.sigma, self.info = model.eval(), mu, sigma, info
        self.image_shape = tuple(info["image_shape"])

    @property
    def test_accuracy(self) -> float:
        return float(self.info["test_accuracy"])

    @classmethod
    def load_or_train(cls, cache_root: str | os.PathLike, train_dir: str | os.PathLike,
                      test_dir: str | os.PathLike, *, epochs: int = 2, seed: int = 0, batch_size: int = 256,
                      threads: int | None = None) -> Judge:
        """The judge of (train_dir, test_dir) from `cache_root/classifiers/<key>/`, trained and cached there
        first when absent. Leftover `.tmp-*` directories of a crashed run are ignored."""
        train, test = _source(train_dir), _source(test_dir)
        recipe = {"epochs": epochs, "seed": seed, "batch_size": batch_size}
        final = Path(cache_root) / "classifiers" / _cache_key(train, test, recipe)
        if final.is_dir():
            return cls.load(final)
        t0 = time.perf_counter()
        x, y, classes = load_image_arrays(train_dir)
        xt, yt, _ = load_image_arrays(test_dir)
        if xt.shape[1:] != x.shape[1:]:
            raise DataError(f"image_quality: test images are {list(xt.shape[1:])}, "
                            f"training images {list(x.shape[1:])}")
        num_classes = max(len(classes), int(y.max()) + 1, int(yt.max()) + 1)
        model = train_classifier(x, y, num_classes, epochs=epochs, seed=seed, batch_size=batch_size,
                                 threads=threads)
        info = {"arch_version": ARCH_VERSION, "image_shape": list(x.shape[1:]), "num_classes": num_classes,
                "classes": classes, "train_samples": len(x), "test_samples": len(xt),
                "train_dir": str(train_dir), "test_dir": str(test_dir), **recipe, "test_accuracy": 0.0}
        judge = cls(model, np.zeros(FEATURES), np.eye(FEATURES), info)
        with _threads(threads):
            feats, pred = judge._run(xt)
        judge.mu, judge.sigma = gaussian(feats)
        judge.info.update(test_accuracy=float((pred == yt).mean()),
                          seconds=round(time.perf_counter() - t0, 1))
        judge._save(final)
        return judge

    @classmethod
    def load(cls, directory: str | os.PathLike) -> Judge:
        """A judge saved by load_or_train (safetensors weights, numpy-only stats, JSON info: nothing is
        unpickled)."""
        d = Path(directory)
        try:
            info = json.loads((d / "info.json").read_text())
            model = Classifier(info["image_shape"][0], info["num_classes"])
            model.load_state_dict(load_file(str(d / "model.safetensors")))
            with np.load(d / "stats.npz", allow_pickle=False) as stats:
                mu, sigma = stats["mu"], stats["sigma"]
        except (OSError, ValueError, KeyError, RuntimeError) as e:
            raise DataError(f"image_quality: cannot load the classifier cache {d} ({first_line(e)}); delete it "
                            "to retrain") from None
        return cls(model, mu, sigma, info)

    def _save(self, final: Path) -> None:
        """Write into a fresh temporary directory beside `final`, then rename it into place; if another run
        got there first, keep theirs (same key, same inputs) and drop ours."""
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.tmp-"))
        try:
            tensors = {k: v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()}
            with atomic_path(tmp / "model.safetensors") as p:
                save_file(tensors, str(p))
            with atomic_path(tmp / "stats.npz") as p, open(p, "wb") as f:
                np.savez(f, mu=self.mu, sigma=self.sigma)
            atomic_write(tmp / "info.json", json.dumps(self.info, indent=1, sort_keys=True) + "\n")
            rename_if_absent(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def _run(self, images) -> tuple[np.ndarray, np.ndarray]:
        """(features float64 (N, 128), predicted labels int64 (N,)) in fixed batches."""
        x = _uint8(images)
        if tuple(x.shape[1:]) != self.image_shape:
            raise ValueError(f"image_quality: images are {list(x.shape[1:])}, the judge was trained on "
                             f"{list(self.image_shape)}")
        feats, preds = [], []
        with torch.no_grad():
            for i in range(0, len(x), EVAL_BATCH):
                f = self.model.features(_to_input(x[i:i + EVAL_BATCH]))
                feats.append(f.double().numpy())
                preds.append(self.model.head(f).argmax(1).numpy())
        return np.concatenate(feats), np.concatenate(preds).astype(np.int64)

    def features(self, images) -> np.ndarray:
        """(N, 128) float64 penultimate features of uint8 (N, C, H, W) images."""
        return self._run(images)[0]

    def predict(self, images) -> np.ndarray:
        """(N,) int64 predicted class of each uint8 (N, C, H, W) image."""
        return self._run(images)[1]

    def score(self, images, labels) -> dict[str, float]:
        """{"fd": Fréchet distance to the real test split's features, "class_agreement": fraction of images
        classified as their label}."""
        feats, pred = self._run(images)
        labels = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels, dtype=np.int64)
        if labels.shape != pred.shape:
            raise ValueError(f"image_quality: {len(pred)} images but labels of shape {labels.shape}")
        mu, sigma = gaussian(feats)
        return {"fd": frechet_distance(mu, sigma, self.mu, self.sigma),
                "class_agreement": float((pred == labels).mean())}
