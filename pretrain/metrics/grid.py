"""Sample grids: uint8 images laid out `nrow` to a row as one picture (a PNG on disk, an array for W&B).

Small images are upscaled by an integer factor with nearest neighbour (no blur: a 28-pixel Fashion-MNIST
sample shows its real pixels at 56 px), separated by white padding. When the caller orders the images by
class with `nrow` per class, each row is one class and `labels` names the rows at the left.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

from pretrain.atomic import atomic_path

MIN_SIDE = 56  # pixels: an image's shorter side is upscaled to at least this
BACKGROUND = 255  # padding and label strip: white, so black-background images stay apart
FONT_SIZE = 12


def _uint8(images) -> np.ndarray:
    if hasattr(images, "detach"):  # a torch tensor, on any device; torch itself is not needed here
        images = images.detach().cpu().numpy()
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1] not in (1, 3) or not len(images):
        raise ValueError(f"grid: images must be uint8 (N, C, H, W) with C 1 or 3 and N >= 1, got "
                         f"{images.dtype} {images.shape}")
    return images


def grid_array(images, nrow: int, *, scale: int | None = None, pad: int = 2,
               labels: list[str] | None = None) -> np.ndarray:
    """The grid as uint8 (H, W) for grayscale or (H, W, 3) for RGB images; `scale` defaults to the
    smallest integer factor giving images a shorter side >= 56 px; `labels`, one per row, are drawn left."""
    x = _uint8(images)
    if nrow < 1 or pad < 0 or (scale is not None and scale < 1):
        raise ValueError(f"grid: nrow and scale must be >= 1 and pad >= 0 (got {nrow}, {scale}, {pad})")
    n, c, h, w = x.shape
    scale = scale or max(1, math.ceil(MIN_SIDE / min(h, w)))
    x = x.repeat(scale, axis=2).repeat(scale, axis=3).transpose(0, 2, 3, 1)  # (N, H, W, C)
    h, w = h * scale, w * scale
    cols, rows = min(nrow, n), math.ceil(n / nrow)
    if labels is not None and len(labels) != rows:
        raise ValueError(f"grid: {len(labels)} labels for {rows} rows")
    out = np.full((rows * h + (rows + 1) * pad, cols * w + (cols + 1) * pad, c), BACKGROUND, dtype=np.uint8)
    for i, img in enumerate(x):
        r, q = divmod(i, nrow)
        top, left = pad + r * (h + pad), pad + q * (w + pad)
        out[top:top + h, left:left + w] = img
    out = out[..., 0] if c == 1 else out
    return _with_labels(out, labels, h, pad) if labels else out


def _with_labels(grid: np.ndarray, labels: list[str], h: int, pad: int) -> np.ndarray:
    """A white strip left of the grid with each row's label, vertically centred on its row."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default(size=FONT_SIZE)
    probe = ImageDraw.Draw(Image.new("L", (1, 1)))
    width = max(math.ceil(probe.textlength(str(s), font=font)) for s in labels) + 2 * pad + 4
    strip = Image.new("L" if grid.ndim == 2 else "RGB", (width, grid.shape[0]), BACKGROUND)
    draw = ImageDraw.Draw(strip)
    ink = 0 if grid.ndim == 2 else (0, 0, 0)
    for r, s in enumerate(labels):
        draw.text((pad + 2, pad + r * (h + pad) + h // 2), str(s), fill=ink, font=font, anchor="lm")
    return np.concatenate([np.asarray(strip), grid], axis=1)


def save_grid(images, path: str | os.PathLike, nrow: int, *, scale: int | None = None, pad: int = 2,
              labels: list[str] | None = None) -> Path:
    """Write `grid_array(...)` as a PNG at `path`, atomically (`pretrain.atomic`); returns the path."""
    from PIL import Image

    arr = grid_array(images, nrow, scale=scale, pad=pad, labels=labels)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        Image.fromarray(arr).save(tmp, format="PNG")
    return path
