"""Denoising diffusion (DDPM, Ho et al. 2020, https://arxiv.org/abs/2006.11239), as DiT trains it (Peebles &
Xie 2023, https://arxiv.org/abs/2212.09748, on Improved DDPM's code, Nichol & Dhariwal 2021,
https://arxiv.org/abs/2102.09672).

x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps for an integer t uniform in [0, T); the model (called with
t * 1000 / T, DiT's units) predicts eps, or v = sqrt(abar_t) eps - sqrt(1 - abar_t) x0 (Salimans & Ho 2022,
https://arxiv.org/abs/2202.00512). Schedules: DDPM's linear betas (1e-4 to 0.02 at T = 1000, scaled by
1000 / T as in Improved DDPM) and Improved DDPM's cosine abar (s = 0.008, betas clipped at 0.999).

With model.learn_sigma the output's last C channels are v in [-1, 1], and the log-variance is
(v + 1) / 2 log beta_t + (1 - v) / 2 log beta~_t (Improved DDPM eq. 15); the loss is then the hybrid
MSE + L_vlb (in bits per dimension), the variational term computed with the mean's gradient stopped so
it trains the variance only (Improved DDPM section 3.1; DiT's `training_losses`).

Samplers run on a respaced schedule of `steps` timesteps taken evenly from [0, T) (Improved DDPM
section 4, `space_timesteps`), the model seeing the original timesteps: "ddpm", ancestral with the
learned variance or the fixed beta~_t, and "ddim" (Song et al. 2020, https://arxiv.org/abs/2010.02502,
eta = 0). The denoised x0 is clipped to [-1, 1] for pixel data (not for latents). The VLB's t = 0 term is
the likelihood of 256-level data in [-1, 1]; DiT applies it to latents too, and so does this.
"""

from __future__ import annotations

import math
import zlib
from functools import cached_property
from typing import Literal

import numpy as np
import torch
from pydantic import Field, model_validator

from pretrain.objectives.base import ObjectiveError, register
from pretrain.objectives.images import TIME, ImageObjective, ImageSampling, forward, per_image_mean
from pretrain.objectives.sample_rng import uniform


class DDPMConfig(ImageSampling):
    type: Literal["ddpm"] = Field("ddpm", description="denoising diffusion (DiT's training objective)")
    timesteps: int = Field(1000, gt=1, description="diffusion steps T of training")
    schedule: Literal["linear", "cosine"] = Field("linear", description="noise schedule: DDPM's linear betas or "
                                                  "Improved DDPM's cosine")
    prediction: Literal["epsilon", "v"] = Field("epsilon", description="what the model predicts: the noise or v")
    sampler: Literal["ddpm", "ddim"] = Field("ddpm", description="ancestral sampling (DiT's) or deterministic DDIM")

    @model_validator(mode="after")
    def _steps(self) -> DDPMConfig:
        if self.sample_steps > self.timesteps:
            raise ValueError(f"objective.sample_steps ({self.sample_steps}) must not exceed objective.timesteps "
                             f"({self.timesteps})")
        return self


# ----------------------------------------------------------------------------- schedules


def linear_betas(timesteps: int) -> np.ndarray:
    scale = 1000 / timesteps
    return np.linspace(scale * 1e-4, scale * 0.02, timesteps, dtype=np.float64)


def cosine_betas(timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> np.ndarray:
    def abar(t: float) -> float:
        return math.cos((t + s) / (1 + s) * math.pi / 2) ** 2

    return np.array([min(1 - abar((i + 1) / timesteps) / abar(i / timesteps), max_beta) for i in range(timesteps)])


def spaced_timesteps(timesteps: int, steps: int) -> list[int]:
    """`steps` timesteps evenly strided over [0, timesteps), first and last included (Improved DDPM's
    `space_timesteps` with one section)."""
    if not 0 < steps <= timesteps:
        raise ObjectiveError(f"objective.sample_steps ({steps}) must be in [1, objective.timesteps={timesteps}]")
    stride = (timesteps - 1) / (steps - 1) if steps > 1 else 1
    return sorted({round(i * stride) for i in range(steps)})


class Diffusion:
    """The coefficients of one schedule (float64), looked up at integer steps as fp32 (N, 1, 1, 1)."""

    def __init__(self, betas: np.ndarray, timesteps: list[int] | None = None, base_steps: int | None = None):
        self.betas = betas
        self.steps = len(betas)
        self.timesteps = np.asarray(timesteps if timesteps is not None else range(len(betas)), dtype=np.int64)
        self.base_steps = base_steps or len(betas)  # T of the model's timestep units
        self.abar = np.cumprod(1.0 - betas)
        self.abar_prev = np.append(1.0, self.abar[:-1])
        self.posterior_var = betas * (1.0 - self.abar_prev) / (1.0 - self.abar)
        # log beta~_0 is log 0: take beta~_1 there, as Improved DDPM does.
        self.posterior_logvar = np.log(np.append(self.posterior_var[1], self.posterior_var[1:]))
        self.coef_x0 = betas * np.sqrt(self.abar_prev) / (1.0 - self.abar)
        self.coef_xt = (1.0 - self.abar_prev) * np.sqrt(1.0 - betas) / (1.0 - self.abar)

    def respaced(self, steps: int) -> Diffusion:
        """The schedule on `steps` of these timesteps, with the betas that keep abar at those timesteps."""
        keep = spaced_timesteps(self.steps, steps)
        abar = self.abar[keep]
        return Diffusion(1.0 - abar / np.append(1.0, abar[:-1]), [int(self.timesteps[k]) for k in keep],
                         self.base_steps)

    def at(self, values: np.ndarray | str, t: torch.Tensor) -> torch.Tensor:
        arr = getattr(self, values) if isinstance(values, str) else values
        return torch.from_numpy(np.ascontiguousarray(arr)).to(t.device)[t].float().view(-1, 1, 1, 1)

    def model_time(self, t: torch.Tensor) -> torch.Tensor:
        """Steps of this schedule -> the model's units (original timestep * 1000 / T), fp32."""
        return torch.from_numpy(self.timesteps).to(t.device)[t].float() * (1000 / self.base_steps)

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        return self.at(np.sqrt(self.abar), t) * x0 + self.at(np.sqrt(1.0 - self.abar), t) * eps

    def x0_from(self, pred: torch.Tensor, xt: torch.Tensor, t: torch.Tensor, prediction: str) -> torch.Tensor:
        a, b = self.at(np.sqrt(self.abar), t), self.at(np.sqrt(1.0 - self.abar), t)
        return (xt - b * pred) / a if prediction == "epsilon" else a * xt - b * pred

    def eps_from_x0(self, x0: torch.Tensor, xt: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return (xt - self.at(np.sqrt(self.abar), t) * x0) / self.at(np.sqrt(1.0 - self.abar), t)

    def posterior_mean(self, x0: torch.Tensor, xt: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The mean of q(x_{t-1} | x_t, x0)."""
        return self.at("coef_x0", t) * x0 + self.at("coef_xt", t) * xt

    def model_logvar(self, v: torch.Tensor | None, t: torch.Tensor) -> torch.Tensor:
        """log variance of p(x_{t-1} | x_t): learned (v in [-1, 1] between log beta~_t and log beta_t) or
        the fixed log beta~_t when v is None."""
        low = self.at("posterior_logvar", t)
        if v is None:
            return low
        frac = (v + 1) / 2
        return frac * self.at(np.log(self.betas), t) + (1 - frac) * low


def normal_kl(mean1, logvar1, mean2, logvar2) -> torch.Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)), elementwise."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def discretized_gaussian_nll(x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """-log P(x) of data in [-1, 1] quantised to 256 bins under N(mean, e^(2 log_scale)), elementwise (DDPM
    section 3.3; the edge bins take the tails). The exact normal CDF replaces Improved DDPM's tanh one."""
    inv = torch.exp(-log_scale)
    hi, lo = inv * (x - mean + 1 / 255), inv * (x - mean - 1 / 255)
    log_cdf_hi = torch.special.log_ndtr(hi)
    log_sf_lo = torch.special.log_ndtr(-lo)
    log_mid = torch.log((torch.special.ndtr(hi) - torch.special.ndtr(lo)).clamp(min=1e-12))
    return -torch.where(x < -0.999, log_cdf_hi, torch.where(x > 0.999, log_sf_lo, log_mid))


@register
class DDPM(ImageObjective):
    name = "ddpm"
    Config = DDPMConfig
    uses_sigma = True
    samplers = ("ddpm", "ddim")

    @cached_property
    def diffusion(self) -> Diffusion:
        o = self.cfg.objective
        betas = linear_betas(o.timesteps) if o.schedule == "linear" else cosine_betas(o.timesteps)
        return Diffusion(betas)

    @property
    def learn_sigma(self) -> bool:
        return bool(getattr(self.cfg.model, "learn_sigma", False))

    def draw_times(self, positions: np.ndarray) -> torch.Tensor:
        t_max = self.cfg.objective.timesteps
        t = np.floor(uniform(self.cfg.train.seed, positions, 1, TIME)[:, 0] * t_max).astype(np.int64)
        return torch.from_numpy(np.minimum(t, t_max - 1))

    def time_fraction(self, t: torch.Tensor) -> torch.Tensor:
        return t.float() / self.cfg.objective.timesteps

    def time_at(self, fraction: float, like: torch.Tensor) -> torch.Tensor:
        t_max = self.cfg.objective.timesteps
        return torch.full_like(like, min(int(fraction * t_max), t_max - 1), dtype=torch.int64)

    def vb_terms(self, pred: torch.Tensor, v: torch.Tensor, x0: torch.Tensor, xt: torch.Tensor,
                 t: torch.Tensor) -> torch.Tensor:
        """L_vlb of each image in bits per dimension: KL(q(x_{t-1} | x_t, x0) || p(x_{t-1} | x_t)), and at
        t = 0 the decoder's -log p(x0 | x1). `pred` (eps or v) enters detached: only `v` gets a gradient."""
        d = self.diffusion
        mean = d.posterior_mean(d.x0_from(pred.detach(), xt, t, self.cfg.objective.prediction), xt, t)
        logvar = d.model_logvar(v, t)
        kl = per_image_mean(normal_kl(d.posterior_mean(x0, xt, t), d.at("posterior_logvar", t), mean, logvar))
        nll = per_image_mean(discretized_gaussian_nll(x0, mean, 0.5 * logvar))
        return torch.where(t == 0, nll, kl) / math.log(2.0)

    def per_image_loss(self, model, batch: dict):
        x0, eps, t, y = batch["x0"], batch["noise"], batch["t"], batch["y"]
        d, c = self.diffusion, x0.shape[1]
        xt = d.q_sample(x0, t, eps)
        out = forward(model, xt, d.model_time(t), y)
        pred = out[:, :c]
        if self.cfg.objective.prediction == "epsilon":
            target = eps
        else:
            target = d.at(np.sqrt(d.abar), t) * eps - d.at(np.sqrt(1.0 - d.abar), t) * x0
        mse = per_image_mean((pred - target) ** 2)
        if not self.learn_sigma:
            return mse, {}
        vb = self.vb_terms(pred, out[:, c:], x0, xt, t)
        return mse + vb, {"mse": mse, "vb": vb}

    # ------------------------------------------------------------------ samplers
    def _denoise(self, d: Diffusion, model, x, i: int, labels, cfg_scale):
        """(x0 estimate, learned variance channels or None) at step i of the respaced schedule `d`."""
        t = torch.full((x.shape[0],), i, device=x.device, dtype=torch.int64)
        out = self.guided(model, x, d.model_time(t), labels, cfg_scale)
        c = x.shape[1]
        x0 = d.x0_from(out[:, :c], x, t, self.cfg.objective.prediction)
        if not self.latents:
            x0 = x0.clamp(-1, 1)
        return t, x0, (out[:, c:] if self.learn_sigma else None)

    def step_noise(self, noise: torch.Tensor):
        """A source of the fresh noise of ancestral steps, each sample's own: a CPU generator per sample
        seeded with (train.seed, a hash of the sample's initial noise). A sample's path then depends on its
        start only, not on which batch or rank draws it; batches of one start (one generator for all)
        would repeat the same step noise in every batch."""
        rows = noise.detach().float().cpu().numpy().reshape(len(noise), -1)
        gens = [torch.Generator().manual_seed((self.cfg.train.seed % 2**31) << 32 | zlib.crc32(r.tobytes()))
                for r in rows]

        def draw() -> torch.Tensor:
            return torch.stack([torch.randn(noise.shape[1:], generator=g) for g in gens]).to(noise.device)

        return draw

    def sample_ddpm(self, model, labels, noise, steps, cfg_scale):
        """Ancestral sampling, with the learned variance or the fixed beta~_t."""
        d = self.diffusion.respaced(steps)
        draw = self.step_noise(noise)
        x = noise
        for i in reversed(range(d.steps)):
            t, x0, v = self._denoise(d, model, x, i, labels, cfg_scale)
            mean = d.posterior_mean(x0, x, t)
            if i == 0:
                return mean
            x = mean + torch.exp(0.5 * d.model_logvar(v, t)) * draw()
        return x

    def sample_ddim(self, model, labels, noise, steps, cfg_scale):
        d = self.diffusion.respaced(steps)
        x = noise
        for i in reversed(range(d.steps)):
            t, x0, _ = self._denoise(d, model, x, i, labels, cfg_scale)
            eps = d.eps_from_x0(x0, x, t)
            x = d.at(np.sqrt(d.abar_prev), t) * x0 + d.at(np.sqrt(1.0 - d.abar_prev), t) * eps
        return x
