"""`pretrain data latents`: image shards encoded by a (tiny, random, real) diffusers AutoencoderKL into
latent shards that the training stream reads as float32 images."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from pretrain.cli.data import app
from pretrain.config import DataConfig
from pretrain.data import build_train_stream, build_val_batches, validate_data
from pretrain.data.write_images import FASHION_CLASSES, read_idx, write_images
from tests.data.test_image_stream import write_idx_source

SCALE = 0.3  # not diffusers' default 0.18215: the manifest must take it from the VAE's config


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16),
                        layers_per_block=1, latent_channels=4, norm_num_groups=8, sample_size=16,
                        scaling_factor=SCALE)
    d = tmp_path_factory.mktemp("vae") / "tiny-vae"
    vae.save_pretrained(d)
    return d


def _encode(vae_dir, x: np.ndarray) -> np.ndarray:
    """The reference: the VAE's latent mean of float images in [-1, 1], N x 3 x H x W."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(vae_dir).eval()
    with torch.no_grad():
        return vae.encode(torch.from_numpy(x)).latent_dist.mean.numpy()


def _latents(args: list[str]):
    r = CliRunner().invoke(app, ["latents", *args])
    assert r.exit_code == 0, r.output
    return r


def test_fashion_like_shards_to_latents(tmp_path, vae_dir):
    shards = write_idx_source(tmp_path, 10, 6, 16, seed=2, shard_samples=4)
    out = tmp_path / "latents"
    _latents([str(shards), "--vae", str(vae_dir), "--out", str(out), "--size", "16", "--batch-size", "3",
              "--shard-samples", "4"])
    m = json.loads((out / "train" / "index.json").read_text())
    from diffusers import AutoencoderKL

    cfg = AutoencoderKL.load_config(vae_dir)
    side = 16 // 2 ** (len(cfg["block_out_channels"]) - 1)
    assert m["image_shape"] == [cfg["latent_channels"], side, side] == [4, 8, 8]
    assert m["encoding"] == "latents" and m["latent_scale"] == SCALE and m["vae"] == "tiny-vae"
    assert m["kind"] == "images" and m["classes"] == FASHION_CLASSES
    assert m["samples"] == 10 and len(m["shards"]) == 3
    assert json.loads((out / "val" / "index.json").read_text())["samples"] == 6

    data = DataConfig(train=str(out / "train"), val=str(out / "val"))
    info = validate_data(data)
    assert (info["encoding"], info["latent_scale"], info["image_shape"]) == ("latents", SCALE, [4, 8, 8])
    b = next(build_train_stream(data, seed=0, rank=0, world_size=1, micro_batch_size=10, grad_accum=1))
    assert b["images"].dtype == torch.float32 and b["images"].shape == (10, 4, 8, 8)

    images = read_idx(tmp_path / "idx" / "train-images-idx3-ubyte.gz")
    labels = read_idx(tmp_path / "idx" / "train-labels-idx1-ubyte.gz")
    idx = [int(k) for k in b["keys"]]
    assert sorted(idx) == list(range(10)) and b["labels"].tolist() == labels[idx].tolist()
    # Grayscale to RGB, [0, 255] to [-1, 1], the latent mean: equal to the stored fp16 within its rounding.
    x = np.repeat(images[idx, None].astype(np.float32) / 127.5 - 1, 3, axis=1)
    want = _encode(vae_dir, x)
    assert np.abs(want).max() > 0.05  # not a degenerate VAE: the comparison below discriminates
    np.testing.assert_allclose(b["images"].numpy(), want, rtol=2e-3, atol=1e-4)
    assert np.abs(b["images"].numpy() - want).max() > 0  # stored as float16, so not bit-equal

    val = build_val_batches(data, rank=0, world_size=1, micro_batch_size=3, max_batches=2)
    val_images = read_idx(tmp_path / "idx" / "t10k-images-idx3-ubyte.gz")[:6]
    want = _encode(vae_dir, np.repeat(val_images[:, None].astype(np.float32) / 127.5 - 1, 3, axis=1))
    np.testing.assert_allclose(np.concatenate([v["images"].numpy() for v in val]), want, rtol=2e-3, atol=1e-4)


def test_resize_and_centre_crop(tmp_path, vae_dir):
    """Images of mixed sizes (refused as pixels) become latents of one size: shorter side to --size
    (bicubic), centre crop."""
    from PIL import Image

    rng = np.random.default_rng(3)
    (tmp_path / "imgs" / "only").mkdir(parents=True)
    wide = rng.integers(0, 256, (12, 20, 3), dtype=np.uint8)
    square = rng.integers(0, 256, (10, 10, 3), dtype=np.uint8)
    Image.fromarray(wide).save(tmp_path / "imgs" / "only" / "0.png")
    Image.fromarray(square).save(tmp_path / "imgs" / "only" / "1.png")
    write_images(str(tmp_path / "imgs"), out=tmp_path / "px")
    out = tmp_path / "lat"
    r = _latents([str(tmp_path / "px" / "train"), "--vae", str(vae_dir), "--out", str(out), "--size", "8"])
    assert "2 latents (4x4x4, scale 0.3)" in r.output
    data = DataConfig(train=str(out / "train"))
    assert validate_data(data)["image_shape"] == [4, 4, 4]
    b = next(build_train_stream(data, seed=0, rank=0, world_size=1, micro_batch_size=2, grad_accum=1))
    got = b["images"][np.argsort([int(k) for k in b["keys"]])].numpy()
    # 20x12 -> 13x8 (shorter side 8), columns 2..9 kept; 10x10 -> 8x8.
    w = np.asarray(Image.fromarray(wide).resize((13, 8), Image.BICUBIC).crop((2, 0, 10, 8)), dtype=np.float32)
    s = np.asarray(Image.fromarray(square).resize((8, 8), Image.BICUBIC), dtype=np.float32)
    x = np.stack([w, s]).transpose(0, 3, 1, 2) / 127.5 - 1
    np.testing.assert_allclose(got, _encode(vae_dir, x), rtol=2e-3, atol=1e-4)


def test_bad_input_is_one_line(tmp_path, vae_dir):
    shards = write_idx_source(tmp_path, 4, 2, 16, seed=4)
    cases = [
        ([str(tmp_path / "nothing"), "--vae", str(vae_dir)], "no such directory"),
        ([str(tmp_path / "idx"), "--vae", str(vae_dir)], "no index.json in it or in its train/ or val/"),
        ([str(shards), "--vae", str(tmp_path / "novae")], "--vae: no such directory"),
        ([str(shards), "--vae", str(tmp_path / "idx")], "is not a VAE directory"),
        ([str(shards), "--vae", str(vae_dir), "--size", "15"], "not a multiple of the VAE's downsampling"),
    ]
    for args, expect in cases:
        r = CliRunner().invoke(app, ["latents", *args, "--out", str(tmp_path / "o")])
        lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
        assert r.exit_code == 2 and len(lines) == 1 and expect in lines[0], r.output
    assert not (tmp_path / "o" / "train" / "index.json").exists()
