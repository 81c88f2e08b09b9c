"""What every diffusion objective over image shards shares: the data and model checks, the draws of a
prepared batch, the per-quarter-of-t loss metrics, classifier-free guidance and decoding to pixels.

A raw batch holds uint8 images (B, C, H, W) or float latents; `prepare` puts them in model space
(pixels: v / 127.5 - 1, centred in the model's `input_size` square with -1 around them when the data is
smaller, e.g. 28x28 MNIST in a 32x32 DiT; latents: times the VAE's `latent_scale`, as diffusers'
`scaling_factor`). Everything random per image (the noise, the time, dropping the label for
classifier-free guidance, Ho & Salimans 2022, https://arxiv.org/abs/2207.12598) is a pure function of
(train.seed, the image's global position, a stream number) through `sample_rng`, so any rank at any
world size, before or after a resume, draws the same; Gaussians come from pairs of uniforms by
Box-Muller. Losses are computed in fp32 whatever the model's precision.
"""

from __future__ import annotations

from typing import Annotated, ClassVar

import numpy as np
import torch
from pydantic import Field

from pretrain.config import Section
from pretrain.hooks import Hook, StepView
from pretrain.objectives.base import Metrics, Objective, ObjectiveError, add_metrics
from pretrain.objectives.sample_rng import normal, uniform

# Streams of sample_rng (apart from masked_lm's 1-4 and the evaluation's): one per kind of draw, so the
# draws are independent.
DROP, TIME, TIME_NORMAL, NOISE = 11, 12, 13, 14
BUCKETS = 4  # loss metrics per quarter of t: loss_t0 (t in [0, 1/4)) .. loss_t3


class ImageSampling(Section):
    """Fields every image objective's config has: how its samples are drawn (evaluation and grids)."""

    sample_steps: int = Field(50, gt=0, description="sampler steps (model evaluations for Euler/DDPM/DDIM)")
    cfg_scale: float = Field(4.0, ge=0, description="classifier-free guidance scale s: u + s (c - u); 1 is none")
    eval_samples: int = Field(500, ge=0, description="images sampled at each evaluation for the quality numbers")
    grid_samples: int = Field(100, ge=0, description="images in the sample grid written at each evaluation")
    val_times: list[Annotated[float, Field(ge=0, lt=1)]] | None = Field(
        None, min_length=1, description="noise levels (fractions of the time range, in [0, 1)) at which every "
        "validation image is scored, the loss their mean: one fixed set for every run of a scaling ladder; "
        "unset: each image at its own drawn time, as in training")


def per_image_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean over every axis but the first: (B, ...) -> (B,)."""
    return x.flatten(1).mean(1)


def model_dtype(model) -> torch.dtype:
    """The dtype of the model's (first) parameters: bf16 under DeepSpeed's bf16, else fp32."""
    p = next(iter(model.parameters()), None)
    return p.dtype if p is not None and p.is_floating_point() else torch.float32


def forward(model, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """model(x, t, y) with x in the model's dtype and t kept fp32 (bf16 cannot hold t=999: its spacing
    there is 4); the output comes back in fp32."""
    return model(x.to(model_dtype(model)), t.float(), y).float()


class ImageObjective(Objective):
    """The base of `rectified_flow` and `ddpm`. A subclass brings its config (with `ImageSampling`'s
    fields and a `sampler`), `draw_times`, `per_image_loss` and `samplers`."""

    data_kind = "images"
    unit = "images"
    summary_keys = ("fd", "class_agreement")  # from the evaluation hook (`image_eval`)
    uses_sigma: ClassVar[bool] = False  # whether model.learn_sigma (a variance output) is used
    samplers: ClassVar[tuple[str, ...]] = ()

    # ------------------------------------------------------------------ the data and model
    @property
    def data_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the data."""
        c, h, w = (int(v) for v in self.data["image_shape"])
        return c, h, w

    @property
    def shape(self) -> tuple[int, int, int]:
        """(C, S, S) of model space: the data padded to the model's input_size."""
        m = self.cfg.model
        return int(m.in_channels), int(m.input_size), int(m.input_size)

    @property
    def null_label(self) -> int:
        """The label meaning "no class": the model's extra embedding row for classifier-free guidance."""
        return int(self.cfg.model.num_classes)

    @property
    def latents(self) -> bool:
        return self.data.get("encoding", "pixels") == "latents"

    # ------------------------------------------------------------------ the run's hooks
    def scored(self) -> bool:
        """Whether evaluations score samples (pixel data with a validation set, eval_samples > 0)."""
        return bool(self.cfg.objective.eval_samples) and not self.latents and self.cfg.data.val is not None

    def setup(self) -> None:
        """On the driver: train (or load from the run root's cache) the classifier that scores samples."""
        if self.scored():
            from pretrain.objectives.image_eval import judge_for

            judge = judge_for(self.cfg)
            print(f"sample judge: a classifier of the training images, test accuracy {100 * judge.test_accuracy:.1f}% "
                  f"(cached under {self.cfg.run.dir}/classifiers)", flush=True)

    def hooks(self, ctx: StepView) -> list[Hook]:
        """The sample grid and quality numbers at every evaluation and at step 0 (`image_eval`)."""
        from pretrain.objectives.image_eval import evaluate_images

        return [Hook(evaluate_images, every=self.cfg.eval.every, at_start=True)]

    def units_per_sample(self) -> int:
        return 1

    def workload(self) -> dict:
        return {"image_shape": list(self.data_shape)}

    def check(self) -> None:
        super().check()
        m, o, name = self.cfg.model, self.cfg.objective, self.name
        for key in ("in_channels", "input_size", "num_classes"):
            if not hasattr(m, key):
                raise ObjectiveError(f"objective.type={name} needs an image model; model.type={m.type} has no {key}")
        c, h, w = self.data_shape
        if c != m.in_channels:
            raise ObjectiveError(f"model.in_channels ({m.in_channels}) does not match the data's {c} channels")
        if h > m.input_size or w > m.input_size:
            raise ObjectiveError(f"model.input_size ({m.input_size}) is smaller than the data's {h}x{w} images")
        if self.latents and (h, w) != (m.input_size, m.input_size):
            raise ObjectiveError(f"model.input_size ({m.input_size}) must equal the side of the data's {h}x{w} "
                                 "latents (latents are not padded)")
        classes = int(self.data["num_classes"])
        if classes > m.num_classes:
            raise ObjectiveError(f"model.num_classes ({m.num_classes}) is smaller than the data's {classes} classes")
        if getattr(m, "learn_sigma", False) and not self.uses_sigma:
            raise ObjectiveError(f"objective.type={name} does not learn a variance; set model.learn_sigma=false")
        if o.cfg_scale != 1 and not getattr(m, "class_dropout_prob", 0) > 0:
            raise ObjectiveError(f"objective.cfg_scale ({o.cfg_scale}) needs the null label: set "
                                 "model.class_dropout_prob > 0 (e.g. 0.1) or objective.cfg_scale=1")

    # ------------------------------------------------------------------ per micro-batch
    def to_model_space(self, images: torch.Tensor) -> torch.Tensor:
        """Raw images (B, C, H, W) -> fp32 model space (B, C, S, S)."""
        if self.latents:
            return images.float() * float(self.data["latent_scale"] or 1.0)
        x = images.float() / 127.5 - 1.0
        _, s, _ = self.shape
        h, w = x.shape[-2:]
        if (h, w) == (s, s):
            return x
        top, left = (s - h) // 2, (s - w) // 2
        return torch.nn.functional.pad(x, (left, s - w - left, top, s - h - top), value=-1.0)

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Model space (N, C, S, S) -> uint8 images (N, C, H, W) at the data's size: the padding cropped,
        (x + 1) * 127.5 rounded and clamped. Latent data raises ObjectiveError: decoding needs the VAE,
        which the objective does not hold (`latents` says which)."""
        if self.latents:
            raise ObjectiveError(f"objective.type={self.name}: latents need the VAE to decode "
                                 f"({self.data.get('vae') or 'data.vae'}); decode them with diffusers' AutoencoderKL")
        _, h, w = self.data_shape
        s = x.shape[-1]
        top, left = (s - h) // 2, (s - w) // 2
        x = x[..., top:top + h, left:left + w].float()
        return ((x + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)

    def draw_times(self, positions: np.ndarray) -> torch.Tensor:
        """The time of each image (B,) as a pure function of (seed, position)."""
        raise NotImplementedError

    def prepare(self, batch: dict, device: torch.device) -> dict:
        """{"x0": model-space images, "y": labels with dropout applied, "t": times, "noise": N(0, 1) like x0}."""
        pos = batch["positions"].numpy()
        seed = self.cfg.train.seed
        x0 = self.to_model_space(batch["images"])
        y = batch["labels"].to(torch.int64).clone()
        p = float(getattr(self.cfg.model, "class_dropout_prob", 0.0))
        if p > 0:
            y[torch.from_numpy(uniform(seed, pos, 1, DROP)[:, 0] < p)] = self.null_label
        noise = torch.from_numpy(normal(seed, pos, x0[0].numel(), NOISE)).view_as(x0)
        return {"x0": x0.to(device, non_blocking=True), "y": y.to(device, non_blocking=True),
                "t": self.draw_times(pos).to(device, non_blocking=True), "noise": noise.to(device, non_blocking=True)}

    def count(self, batch: dict) -> torch.Tensor:
        return torch.tensor(batch["x0"].shape[0], device=batch["x0"].device)

    def time_fraction(self, t: torch.Tensor) -> torch.Tensor:
        """t as a fraction in [0, 1) (for the buckets)."""
        return t.float()

    def time_at(self, fraction: float, like: torch.Tensor) -> torch.Tensor:
        """The time `fraction` of the way through the time range, for every image of `like` (the inverse of
        time_fraction)."""
        return torch.full_like(like, fraction, dtype=torch.float32)

    def evaluate(self, model, batches: list[tuple[dict, bool]]) -> Metrics:
        """The validation loss: with objective.val_times, every image at each of those noise levels (the same
        images, noise and levels for every run, so runs of a ladder compare on one fixed set); without, each
        image at its own drawn time, as the training loss."""
        levels = self.cfg.objective.val_times
        if not levels:
            return super().evaluate(model, batches)
        out: Metrics = {}
        for batch, counted in batches:
            for fraction in levels:
                total, n, metrics = self.loss(model, dict(batch, t=self.time_at(fraction, batch["t"])))
                add_metrics(out, {"loss": (total, n), **metrics}, 1.0 if counted else 0.0)
        return out

    def per_image_loss(self, model, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(loss of each image (B,) fp32, extra per-image terms by name, logged beside the loss)."""
        raise NotImplementedError

    def loss(self, model, batch: dict) -> tuple[torch.Tensor, torch.Tensor, Metrics]:
        per_image, extra = self.per_image_loss(model, batch)
        n = self.count(batch)
        metrics: Metrics = {k: (v.detach().sum(), n) for k, v in extra.items()}
        bucket = (self.time_fraction(batch["t"]) * BUCKETS).floor().clamp(0, BUCKETS - 1).long()
        d = per_image.detach()
        for k in range(BUCKETS):
            sel = bucket == k
            metrics[f"loss_t{k}"] = (d[sel].sum(), sel.sum())
        return per_image.sum(), n, metrics

    # ------------------------------------------------------------------ sampling
    def guided(self, model, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, cfg_scale: float) -> torch.Tensor:
        """The model's output (N, C_out, S, S) fp32 under classifier-free guidance: for s != 1 one forward
        on the doubled batch ([y, null]) and u + s (c - u) on the first C (prediction) channels; any
        further (variance) channels are the conditional half's, as in DiT's `forward_with_cfg`."""
        if cfg_scale == 1:
            return forward(model, x, t, y)
        n, c = x.shape[0], x.shape[1]
        out = forward(model, torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, self.null_label)]))
        cond, uncond = out[:n], out[n:]
        pred = uncond[:, :c] + cfg_scale * (cond[:, :c] - uncond[:, :c])
        return torch.cat([pred, cond[:, c:]], dim=1)

    def sample(self, model, labels: torch.Tensor, noise: torch.Tensor, steps: int | None = None,
               cfg_scale: float | None = None, sampler: str | None = None) -> torch.Tensor:
        """x0 estimates (N, C, S, S) fp32 in model space from `noise` (N, C, S, S) for `labels` (N,);
        steps, cfg_scale and sampler default to the config's. Collective under ZeRO-3 (every rank runs
        the same number of forwards)."""
        o = self.cfg.objective
        sampler = sampler or o.sampler
        if sampler not in self.samplers:
            raise ObjectiveError(f"objective.sampler={sampler} is not one of {', '.join(self.samplers)}")
        steps = o.sample_steps if steps is None else int(steps)
        cfg_scale = o.cfg_scale if cfg_scale is None else float(cfg_scale)
        with torch.no_grad():
            return getattr(self, f"sample_{sampler}")(model, labels, noise.float(), steps, cfg_scale)
