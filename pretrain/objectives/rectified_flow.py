"""Rectified flow (Liu et al. 2022, https://arxiv.org/abs/2209.03003; as trained in SD3, Esser et al. 2024,
https://arxiv.org/abs/2403.03206, and SiT, Ma et al. 2024, https://arxiv.org/abs/2401.08740).

The straight path x_t = (1 - t) x0 + t eps from data (t = 0) to noise (t = 1); the model predicts the
velocity v = dx_t/dt = eps - x0, with the squared error averaged over each image. The model sees
t * 1000, DiT's timestep units. Times are uniform or logit-normal, t = sigmoid(m + s z) (SD3 section 3.1
found m = 0, s = 1 best of its schedules). Sampling integrates dx/dt = v from t = 1 to t = 0 on a uniform
grid with Euler or Heun's second-order method (Karras et al. 2022, https://arxiv.org/abs/2206.00364,
Algorithm 1: the last step, to t = 0, is an Euler step).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from pydantic import Field

from pretrain.objectives.base import register
from pretrain.objectives.images import (
    TIME,
    TIME_NORMAL,
    ImageObjective,
    ImageSampling,
    forward,
    per_image_mean,
)
from pretrain.objectives.sample_rng import normal, uniform


class RectifiedFlowConfig(ImageSampling):
    type: Literal["rectified_flow"] = Field("rectified_flow", description="velocity prediction on straight paths")
    time_sampling: Literal["uniform", "logit_normal"] = Field(
        "logit_normal", description="distribution of training times t in [0, 1) (SD3: logit-normal)")
    logit_mean: float = Field(0.0, description="logit-normal t: mean of the normal before the sigmoid")
    logit_std: float = Field(1.0, gt=0, description="logit-normal t: std of the normal before the sigmoid")
    sampler: Literal["euler", "heun"] = Field("euler", description="ODE solver of the samples (Heun: 2 forwards a step)")


@register
class RectifiedFlow(ImageObjective):
    name = "rectified_flow"
    Config = RectifiedFlowConfig
    samplers = ("euler", "heun")

    def draw_times(self, positions: np.ndarray) -> torch.Tensor:
        o, seed = self.cfg.objective, self.cfg.train.seed
        if o.time_sampling == "uniform":
            t = uniform(seed, positions, 1, TIME)[:, 0]
        else:
            z = normal(seed, positions, 1, TIME_NORMAL)[:, 0].astype(np.float64)
            t = 1.0 / (1.0 + np.exp(-(o.logit_mean + o.logit_std * z)))
        # In [0, 1) also after rounding to fp32 (which takes 1 - 2^-26 up to 1).
        return torch.from_numpy(np.minimum(t.astype(np.float32), np.nextafter(np.float32(1), np.float32(0))))

    def per_image_loss(self, model, batch: dict):
        x0, eps, t, y = batch["x0"], batch["noise"], batch["t"], batch["y"]
        tb = t.view(-1, 1, 1, 1)
        xt = (1 - tb) * x0 + tb * eps
        v = forward(model, xt, t * 1000, y)
        return per_image_mean((v - (eps - x0)) ** 2), {}

    # ------------------------------------------------------------------ samplers
    def _velocity(self, model, x, t: float, y, cfg_scale):
        tt = torch.full((x.shape[0],), t * 1000, device=x.device, dtype=torch.float32)
        return self.guided(model, x, tt, y, cfg_scale)[:, : x.shape[1]]

    def sample_euler(self, model, labels, noise, steps, cfg_scale):
        x, grid = noise, np.linspace(1.0, 0.0, steps + 1)
        for t, t_next in zip(grid[:-1], grid[1:], strict=True):
            x = x + (t_next - t) * self._velocity(model, x, t, labels, cfg_scale)
        return x

    def sample_heun(self, model, labels, noise, steps, cfg_scale):
        x, grid = noise, np.linspace(1.0, 0.0, steps + 1)
        for t, t_next in zip(grid[:-1], grid[1:], strict=True):
            v = self._velocity(model, x, t, labels, cfg_scale)
            x_euler = x + (t_next - t) * v
            if t_next == 0:
                x = x_euler
            else:
                v_next = self._velocity(model, x_euler, t_next, labels, cfg_scale)
                x = x + (t_next - t) * 0.5 * (v + v_next)
        return x
