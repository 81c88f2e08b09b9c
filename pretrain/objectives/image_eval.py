"""What people look at while a diffusion model trains: a fixed-noise sample grid and two quality numbers.

At every evaluation (and at step 0) the model samples with its EMA weights (the raw ones when the run
keeps no EMA):
- a grid of `objective.grid_samples` images, one row per class, from noise that is the same at every
  evaluation (so the grids of one run show the same images sharpening), written to
  `runs/<name>/samples/step-<N>.png` and sent to W&B;
- `objective.eval_samples` class-balanced images that a classifier trained on the real training images
  (`pretrain.metrics.image_quality.Judge`, trained once on the driver and cached under the run root)
  scores: the Fréchet distance between its penultimate features of the samples and of the real
  validation images (`fd`), and how often it recognises the class the sample was asked for
  (`class_agreement`). Both land in metrics.jsonl and, first and last values, in summary.json.

Sampling is a collective (under ZeRO-3 every forward gathers parameters): each rank samples an equal
share, and rank 0 gathers the images. `pretrain sample` draws grids from a finished run the same way.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from pretrain.hooks import StepView
from pretrain.objectives.sample_rng import normal

# sample_rng streams of the evaluation draws, apart from the training ones.
_GRID_NOISE, _EVAL_NOISE = 101, 102


def grid_labels(n: int, num_classes: int) -> tuple[torch.Tensor, int]:
    """Labels of a grid of about n images with one row per class: (labels, images per row)."""
    cols = max(1, math.ceil(n / num_classes))
    return torch.arange(num_classes).repeat_interleave(cols), cols


def noise_for(objective, n: int, seed: int, stream: int) -> torch.Tensor:
    """Fixed Gaussian noise for n samples in the model's input shape (a function of seed and index only)."""
    m = objective.cfg.model
    shape = (m.in_channels, m.input_size, m.input_size)
    return torch.from_numpy(normal(seed, np.arange(n), int(np.prod(shape)), stream).reshape(n, *shape)).float()


@torch.no_grad()
def sample_images(objective, model, labels: torch.Tensor, noise: torch.Tensor, *, steps: int, cfg_scale: float,
                  sampler: str | None = None, batch: int = 64, device=None, progress=None) -> torch.Tensor:
    """uint8 images (N, C, H, W) at the data's size, sampled in batches of `batch`."""
    device = device or torch.device("cpu")
    out = []
    for i in range(0, len(labels), batch):
        x = objective.sample(model, labels[i:i + batch].to(device), noise[i:i + batch].to(device), steps=steps,
                             cfg_scale=cfg_scale, sampler=sampler)
        out.append(objective.decode(x).cpu())
        if progress:
            progress(min(i + batch, len(labels)), len(labels))
    return torch.cat(out)


def _sample_shared(s: StepView, model, labels: torch.Tensor, noise: torch.Tensor) -> torch.Tensor | None:
    """Every rank samples an equal slice; rank 0 gets all images back (None elsewhere). Collective."""
    o = s.cfg.objective
    n, per = len(labels), math.ceil(len(labels) / s.world)
    idx = torch.arange(s.rank * per, (s.rank + 1) * per).clamp(max=n - 1)  # the last slice repeats to stay equal
    mine = sample_images(s.objective, model, labels[idx], noise[idx], steps=o.sample_steps, cfg_scale=o.cfg_scale,
                         batch=s.cfg.train.micro_batch_size * 4, device=s.device)
    parts = [torch.empty_like(mine) for _ in range(s.world)]
    dist.all_gather(parts, mine.contiguous())
    return torch.cat(parts)[:n] if s.rank == 0 else None


def evaluate_images(s: StepView) -> None:
    """The hook: grid and quality numbers at this step (see the module docstring)."""
    o = s.cfg.objective
    classes = s.objective.data.get("classes") or [str(i) for i in range(s.objective.data["num_classes"])]
    labels, cols = grid_labels(o.grid_samples, len(classes))
    grid_noise = noise_for(s.objective, len(labels), s.cfg.train.seed, _GRID_NOISE)
    decodable = not s.objective.latents
    scored = s.objective.scored()
    if not (scored or (decodable and o.grid_samples)):
        return
    with s.eval_model(ema=True) as model:  # the EMA weights, when the run keeps them
        grid = _sample_shared(s, model, labels, grid_noise) if decodable and o.grid_samples else None
        if scored:
            eval_labels = torch.arange(o.eval_samples) % len(classes)
            samples = _sample_shared(s, model, eval_labels, noise_for(s.objective, o.eval_samples, s.cfg.train.seed,
                                                                      _EVAL_NOISE))
    if s.rank != 0:
        return
    if grid is not None:
        from pretrain.metrics.grid import save_grid

        path = s.rdir / "samples" / f"step-{s.step}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        save_grid(grid.numpy(), path, nrow=cols, labels=classes)
        s.image(s.step, "samples", path)
    if scored:
        judge = judge_for(s.cfg)
        score = judge.score(samples.numpy(), eval_labels.numpy())
        s.log({"step": s.step, **score, s.unit: s.units})
        s.summary({"judge_test_accuracy": judge.test_accuracy})


def judge_for(cfg):
    """The cached classifier of this run's data (trained on first use; the driver does that before launch)."""
    from pretrain.metrics.image_quality import Judge

    return Judge.load_or_train(Path(cfg.run.dir), cfg.data.train[0].path, cfg.data.val.path)


def sample_run(run: Path, *, n: int, cfg_scale: float, steps: int, out: Path, sampler: str | None = None,
               weights: str = "ema", seed: int | None = None, progress=None) -> dict:
    """`pretrain sample`: a grid (one row per class) from a finished run's final weights. Raises
    FileNotFoundError / ValueError / ObjectiveError with one line on bad input; `out` appears only complete."""
    import json

    from pretrain.config import read_config
    from pretrain.hub.run_weights import load_final_model
    from pretrain.metrics.grid import save_grid
    from pretrain.objectives.base import ObjectiveError, build_objective

    final = run / "final"
    if not (final / "config.yaml").is_file() or not (final / "model.yaml").is_file():
        raise FileNotFoundError(f"{run}: not a finished run (no final/config.yaml and final/model.yaml)")
    cfg = read_config(final / "config.yaml")  # the registries are loaded: this is an objective
    data = json.loads((final / "data.json").read_text()) if (final / "data.json").is_file() else None
    if data is None or data.get("kind") != "images":
        raise ObjectiveError(f"{run}: not an image model's run (objective.type={cfg.objective.type})")
    if data.get("encoding", "pixels") != "pixels":
        raise ObjectiveError(f"{run}: the model generates latents; decoding them needs the VAE, which sampling "
                             "does not load yet")
    objective = build_objective(cfg, data)
    model = load_final_model(final, weights)
    classes = data.get("classes") or [str(i) for i in range(data["num_classes"])]
    labels, cols = grid_labels(n, len(classes))
    noise = noise_for(objective, len(labels), cfg.train.seed if seed is None else seed, _GRID_NOISE)
    images = sample_images(objective, model, labels, noise, steps=steps, cfg_scale=cfg_scale, sampler=sampler,
                           progress=progress)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_grid(images.numpy(), out, nrow=cols, labels=classes)
    return {"images": len(labels), "rows": len(classes), "cols": cols, "weights": weights}
