"""`pretrain data latents`: image shards encoded by a VAE into latent shards, for latent diffusion (DiT).

Each image of the source shards is resized (shorter side to `size`, bicubic) and centre-cropped to
size x size, as DiT's ImageNet pipeline does (https://arxiv.org/abs/2212.09748), converted to the VAE's
channels, scaled to [-1, 1] and encoded with `diffusers.AutoencoderKL`; the latent distribution's mean
(not a sample: the data stays a pure function of the images) is stored as float16 `latent.npy` (C x h x w)
with the image's `label.cls` (and caption). The manifest says `encoding: latents` and records the VAE's
`scaling_factor` as `latent_scale`, which objectives multiply latents by.

The VAE comes from a local directory only (`from_pretrained(dir, local_files_only=True)`): nothing is
downloaded. Shards, journal and manifest work as in `write_images`: fixed tar headers, shards renamed
into place when complete, and an interrupted run keeps the shards it finished.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from pretrain.data.manifest import FORMAT, MANIFEST, Source, resolve
from pretrain.data.shards import read_shard
from pretrain.data.write_images import _write_split
from pretrain.errors import DataError, first_line

Item = tuple[np.ndarray, int, str | None]  # image (uint8 HxW, HxWxC) or latent (fp16 CxHxW), label, caption


def _splits(source: Path) -> dict[str, Source]:
    """{split: source} of SRC: one shard directory, or a directory holding train/ and/or val/."""
    if not source.is_dir():
        raise DataError(f"input: no such directory: {source}")
    if (source / MANIFEST).is_file():
        src = resolve(str(source), None, "input")
        found = {src.manifest.get("split") or source.name: src}
    else:
        found = {s: resolve(str(source / s), None, "input") for s in ("train", "val")
                 if (source / s / MANIFEST).is_file()}
    if not found:
        raise DataError(f"input {source}: no {MANIFEST} in it or in its train/ or val/ (write image shards "
                        f"with `pretrain data images`)")
    for src in found.values():
        m = src.manifest
        if m["kind"] != "images" or m.get("encoding", "pixels") != "pixels":
            what = m.get("encoding", m["kind"])
            raise DataError(f"input {src.path}: holds {what} shards, not image pixels")
    return found


def _images(src: Source, start: int) -> Iterator[Item]:
    """The source's images in shard order from sample `start` on (earlier shards are not read)."""
    done = 0
    for entry, url in zip(src.shards, src.urls, strict=True):
        if done + entry["samples"] <= start:
            done += entry["samples"]
            continue
        samples = read_shard(url, sha256=entry.get("sha256"), nbytes=entry["bytes"], label=url)
        if len(samples) != entry["samples"]:
            raise DataError(f"shard {url}: {len(samples)} samples, the manifest says {entry['samples']}")
        for key, members in samples:
            if done >= start:
                try:
                    image = np.load(io.BytesIO(members["image.npy"]), allow_pickle=False)
                    label = int(members["label.cls"].decode("ascii").strip())
                except Exception as e:  # a missing member, an object array, a label that is not a number
                    msg = f"shard {url}: sample {key} is not an image.npy with a label.cls ({first_line(e)})"
                    raise DataError(msg) from None
                caption = members.get("caption.txt")
                yield image, label, caption.decode() if caption is not None else None
            done += 1


def _prepare(image: np.ndarray, size: int, channels: int) -> np.ndarray:
    """uint8 HxW / HxWxC -> float32 C x size x size in [-1, 1]: shorter side resized to `size` (bicubic),
    centre crop, grayscale to RGB (or RGB to grayscale) for the VAE's channels."""
    from PIL import Image

    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    im = Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8)).convert("RGB" if channels == 3 else "L")
    w, h = im.size
    scale = size / min(w, h)
    if scale != 1:
        im = im.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BICUBIC)
    left, top = (im.width - size) // 2, (im.height - size) // 2
    x = np.asarray(im.crop((left, top, left + size, top + size)), dtype=np.float32) / 127.5 - 1.0
    return x[None] if x.ndim == 2 else x.transpose(2, 0, 1)


def _encode(vae, items: Iterator[Item], size: int, batch_size: int, device) -> Iterator[Item]:
    """(latent float16 C x h x w, label, caption) per image, encoded `batch_size` at a time."""
    import torch

    channels = vae.config.in_channels

    def flush(batch: list[Item]) -> Iterator[Item]:
        x = torch.from_numpy(np.stack([_prepare(im, size, channels) for im, _, _ in batch])).to(device)
        with torch.no_grad():
            z = vae.encode(x).latent_dist.mean.float().cpu().numpy().astype(np.float16)
        if not np.isfinite(z).all():
            raise DataError("the VAE gave latents that are not finite in float16 (a broken VAE?)")
        for latent, (_, label, caption) in zip(z, batch, strict=True):
            yield latent, label, caption

    batch: list[Item] = []
    for item in items:
        batch.append(item)
        if len(batch) == batch_size:
            yield from flush(batch)
            batch = []
    if batch:
        yield from flush(batch)


def _npy(latent: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(latent, dtype=np.float16), allow_pickle=False)
    return buf.getvalue()


def _fingerprint(vae_dir: Path) -> str:
    """What identifies a VAE directory cheaply for the journal: its config and the size of every file."""
    h = hashlib.sha256()
    for p in sorted(vae_dir.rglob("*")):
        if p.is_file():
            h.update(f"{p.relative_to(vae_dir)}:{p.stat().st_size}\n".encode())
            if p.name == "config.json":
                h.update(p.read_bytes())
    return h.hexdigest()


def load_vae(vae_dir: Path):
    """`diffusers.AutoencoderKL` from a local directory (never downloaded), fp32, eval mode."""
    if not (vae_dir / "config.json").is_file():
        raise DataError(f"--vae: {vae_dir} is not a VAE directory (no config.json; save one with "
                        f"AutoencoderKL.save_pretrained)")
    try:
        from diffusers import AutoencoderKL
    except ImportError:
        raise DataError("--vae: needs diffusers (pip install diffusers)") from None
    try:
        # low_cpu_mem_usage=False: the default wants `accelerate` and warns on stderr without it.
        vae = AutoencoderKL.from_pretrained(str(vae_dir), local_files_only=True, low_cpu_mem_usage=False)
    except Exception as e:  # a config of another model class, missing or mismatched weights
        raise DataError(f"--vae: cannot load an AutoencoderKL from {vae_dir} ({first_line(e)})") from None
    return vae.float().eval()


def write_latents(source: str, *, vae: str | Path, out: Path, size: int = 256, batch_size: int = 32,
                  shard_samples: int = 10_000,
                  progress: Callable[[int, int], None] | None = None) -> dict[str, dict]:
    """Encode the image shards under `source` (one shard directory, or train/ and/or val/ ones) into latent
    shards under `out/<split>/`. Runs on CUDA when available, else the CPU, in fp32. Returns the manifests
    by split."""
    import torch

    if size < 1 or batch_size < 1 or shard_samples < 1:
        raise DataError(f"--size, --batch-size and --shard-samples must be positive (got {size}, "
                        f"{batch_size}, {shard_samples})")
    splits = _splits(Path(source))
    vae_dir = Path(vae)
    if not vae_dir.is_dir():
        raise DataError(f"--vae: no such directory: {vae_dir}")
    model = load_vae(vae_dir)
    factor = 2 ** (len(model.config.block_out_channels) - 1)
    if size % factor:
        raise DataError(f"--size {size} is not a multiple of the VAE's downsampling factor {factor}")
    if model.config.in_channels not in (1, 3):
        raise DataError(f"--vae: {vae_dir} encodes {model.config.in_channels}-channel images; only 1 or 3 "
                        f"are supported")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    total = sum(src.samples for src in splits.values())
    done = [0]

    def step(n: int) -> None:
        done[0] += n
        if progress:
            progress(done[0], total)

    fingerprint = _fingerprint(vae_dir)
    manifests = {}
    for split, src in splits.items():
        m = src.manifest
        inputs = hashlib.sha256("".join(s["sha256"] for s in src.shards).encode()).hexdigest()
        header = {"format": FORMAT, "kind": "images", "split": split, "origin": "latents",
                  "classes": m["classes"], "members": ["latent.npy", "label.cls", "caption.txt?"],
                  "samples_per_shard": shard_samples, "encoding": "latents",
                  "latent_scale": float(model.config.scaling_factor), "vae": vae_dir.resolve().name,
                  "latent_shift": model.config.get("shift_factor"),  # SD3-style VAEs: (z - shift) * scale
                  "size": size, "vae_fingerprint": fingerprint, "input_sha256": inputs}

        def items(start: int, src=src) -> Iterator[Item]:
            return _encode(model, _images(src, start), size, batch_size, device)

        manifests[split] = _write_split(out / split, header, items, src.samples, shard_samples, step,
                                        member="latent.npy", encode=_npy)
    return manifests
