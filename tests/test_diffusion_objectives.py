"""Diffusion objectives (rectified flow, DDPM): their draws are pure functions of (seed, sample position),
images go into model space and back exactly, the per-quarter-of-t metrics add up to the loss, and every
sampler, driven by the exact (analytic) denoiser of a known data distribution, reproduces that
distribution: a single point, or a Gaussian N(m, s^2) per pixel.

Oracles. Flow, x_t = (1 - t) x0 + t eps: for x0 = x*, eps = (x_t - (1 - t) x*) / t, so v = eps - x* =
(x_t - x*) / t. For x0 ~ N(m, s^2): x_t ~ N((1 - t) m, S^2) with S^2 = (1 - t)^2 s^2 + t^2, and
E[x0 | x_t] = m + (1 - t) s^2 (x_t - (1 - t) m) / S^2, E[eps | x_t] = t (x_t - (1 - t) m) / S^2.
DDPM, x_t = a x0 + b eps (a = sqrt(abar_t), b = sqrt(1 - abar_t)): the same with (a, b) for (1 - t, t),
and v = a eps - b x0.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from pretrain.config import ConfigError
from pretrain.load import config_from_dict
from pretrain.objectives import ObjectiveError, build_objective
from pretrain.objectives.ddpm import Diffusion, cosine_betas, linear_betas, spaced_timesteps

NUM_CLASSES = 10


def data_info(shape=(1, 28, 28), classes=NUM_CLASSES, kind="images", encoding="pixels", scale=None) -> dict:
    """What `validate_data` returns for image shards."""
    return {"kind": kind, "train_samples": 1000, "val_samples": 100, "image_shape": list(shape),
            "num_classes": classes, "classes": [str(i) for i in range(classes)], "encoding": encoding,
            "latent_scale": scale}


def objective(kind: str = "rectified_flow", data: dict | None = None, seed: int = 1234, objective_cfg=None, **model):
    model = {"type": "dit", "input_size": 32, "patch_size": 4, "in_channels": 1, "num_classes": NUM_CLASSES,
             "class_dropout_prob": 0.1, "learn_sigma": False, **model}
    cfg = config_from_dict({"model": model, "objective": {"type": kind, **(objective_cfg or {})},
                            "data": {"train": "unused"}, "train": {"seed": seed}})
    return build_objective(cfg, data or data_info())


def raw_batch(positions, shape=(1, 28, 28), seed=0) -> dict:
    g = torch.Generator().manual_seed(seed)
    n = len(positions)
    return {"images": torch.randint(0, 256, (n, *shape), generator=g, dtype=torch.uint8),
            "labels": torch.randint(0, NUM_CLASSES, (n,), generator=g), "positions": torch.as_tensor(positions),
            "keys": [str(p) for p in positions], "source": ["s"] * n}


class TinyNet(nn.Module):
    """A small real network with DiT's call signature: model(x, t, y) -> (B, C_out, H, W)."""

    def __init__(self, c: int = 1, c_out: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(c, c_out, 3, padding=1)
        self.label = nn.Embedding(NUM_CLASSES + 1, c_out)
        self.time = nn.Linear(1, c_out)

    def forward(self, x, t, y):
        return self.conv(x) + (self.label(y) + self.time(t[:, None] / 1000))[:, :, None, None]


class FlowOracle(nn.Module):
    """The exact velocity of data N(m, s^2) per element (s = 0: the single point m)."""

    def __init__(self, m, s: float = 0.0):
        super().__init__()
        self.m, self.s = m, s

    def forward(self, x, t, y):
        t = (t / 1000).view(-1, 1, 1, 1).double()
        x = x.double()
        var = (1 - t) ** 2 * self.s**2 + t**2
        r = x - (1 - t) * self.m
        return (t * r / var - (self.m + (1 - t) * self.s**2 * r / var)).float()


class DDPMOracle(nn.Module):
    """The exact eps (or v) of data N(m, s^2) per element under the schedule `abar` (T = len(abar))."""

    def __init__(self, abar, m, s: float = 0.0, prediction: str = "epsilon", sigma_channels: bool = False):
        super().__init__()
        self.abar, self.m, self.s = torch.as_tensor(abar, dtype=torch.float64), m, s
        self.prediction, self.sigma_channels = prediction, sigma_channels

    def forward(self, x, t, y):
        step = (t * len(self.abar) / 1000).round().long()
        a2 = self.abar[step].view(-1, 1, 1, 1)
        a, b = a2.sqrt(), (1 - a2).sqrt()
        x = x.double()
        var = a2 * self.s**2 + b**2
        r = x - a * self.m
        eps, x0 = b * r / var, self.m + a * self.s**2 * r / var
        out = eps if self.prediction == "epsilon" else a * eps - b * x0
        if self.sigma_channels:  # learned-variance channels v = 0: halfway between beta~ and beta
            out = torch.cat([out, torch.zeros_like(out)], dim=1)
        return out.float()


# ----------------------------------------------------------------------------- draws


@pytest.mark.parametrize("kind", ["rectified_flow", "ddpm"])
def test_draws_depend_on_seed_and_position_only(kind):
    obj = objective(kind)
    pos = np.arange(100, 116)
    raw = raw_batch(pos)
    whole = obj.prepare(raw, torch.device("cpu"))
    # The same samples split over two micro-batches (another world size), in the other order: same draws.
    parts = [obj.prepare({k: v[s] for k, v in raw.items()}, torch.device("cpu")) for s in (slice(8, 16), slice(0, 8))]
    for key in ("x0", "y", "t", "noise"):
        assert whole[key].shape[0] == 16
        torch.testing.assert_close(torch.cat([parts[1][key], parts[0][key]]), whole[key], rtol=0, atol=0)
    other_pos = obj.prepare({**raw, "positions": raw["positions"] + 16}, torch.device("cpu"))
    other_seed = objective(kind, seed=99).prepare(raw, torch.device("cpu"))
    for other in (other_pos, other_seed):
        assert (other["noise"] != whole["noise"]).float().mean() > 0.99
        assert (other["t"] != whole["t"]).any()
    assert whole["noise"].dtype == torch.float32 and whole["x0"].shape == (16, 1, 32, 32)
    assert obj.count(whole).item() == 16


def test_noise_is_standard_normal():
    obj = objective()
    raw = raw_batch(np.arange(300))
    z = obj.prepare(raw, torch.device("cpu"))["noise"].double().flatten(1).numpy()  # 300 x 1024
    assert abs(z.mean()) < 0.005 and abs(z.std() - 1) < 0.005
    assert abs((np.abs(z) > 1.96).mean() - 0.05) < 0.002  # the tails too, not just two moments
    # Neighbouring elements and samples are uncorrelated.
    assert abs(np.corrcoef(z[:, :-1].ravel(), z[:, 1:].ravel())[0, 1]) < 0.01
    assert abs(np.corrcoef(z[:-1].ravel(), z[1:].ravel())[0, 1]) < 0.01


def test_time_distributions():
    pos = np.arange(20000)
    t = objective(objective_cfg={"time_sampling": "logit_normal", "logit_mean": 0.5, "logit_std": 1.5}).draw_times(pos)
    t = t.numpy()
    sig = lambda v: 1 / (1 + math.exp(-v))  # noqa: E731
    assert abs(np.median(t) - sig(0.5)) < 0.01
    assert abs(np.quantile(t, 0.25) - sig(0.5 - 0.6745 * 1.5)) < 0.01  # the normal's quartile through the sigmoid
    assert 0 <= t.min() and t.max() < 1
    u = objective(objective_cfg={"time_sampling": "uniform"}).draw_times(pos).numpy()
    assert abs(u.mean() - 0.5) < 0.01 and abs(np.quantile(u, 0.1) - 0.1) < 0.01
    d = objective("ddpm").draw_times(pos).numpy()
    assert d.dtype == np.int64 and d.min() == 0 and d.max() == 999
    assert abs(np.bincount(d, minlength=1000).std() - math.sqrt(20)) < 1.5  # counts ~ Poisson(20) per step


@pytest.mark.parametrize("p", [0.0, 0.1, 0.3])
def test_label_dropout_rate(p):
    # Tiny 2x2 images in a 2x2 model: the labels are what is looked at here.
    obj = objective(data=data_info((1, 2, 2)), input_size=2, patch_size=2, class_dropout_prob=p,
                    objective_cfg={"cfg_scale": 1.0})
    raw = raw_batch(np.arange(20000), shape=(1, 2, 2))
    y = obj.prepare(raw, torch.device("cpu"))["y"]
    dropped = y == NUM_CLASSES
    assert abs(dropped.float().mean().item() - p) < 0.01
    assert (y[~dropped] == raw["labels"][~dropped]).all()


# ----------------------------------------------------------------------------- model space


def test_padding_and_decode_round_trip_uint8_exactly():
    obj = objective()
    raw = raw_batch(np.arange(4))
    raw["images"][0, 0].view(-1)[:256] = torch.arange(256, dtype=torch.uint8)  # every value appears
    x0 = obj.prepare(raw, torch.device("cpu"))["x0"]
    assert x0.shape == (4, 1, 32, 32)
    inner = torch.zeros(32, 32, dtype=torch.bool)
    inner[2:30, 2:30] = True  # 28 centred in 32
    assert (x0[:, :, ~inner] == -1).all()
    torch.testing.assert_close(x0[:, :, 2:30, 2:30], raw["images"].float() / 127.5 - 1)
    back = obj.decode(x0)
    assert back.dtype == torch.uint8 and back.shape == (4, 1, 28, 28)
    assert torch.equal(back, raw["images"])
    assert torch.equal(obj.decode(torch.full((1, 1, 32, 32), 3.0)), torch.full((1, 1, 28, 28), 255, dtype=torch.uint8))


def test_latents_are_scaled_not_padded_and_not_decoded():
    obj = objective(data=data_info((4, 32, 32), encoding="latents", scale=0.18215), in_channels=4)
    obj.check()
    lat = torch.randn(2, 4, 32, 32).half()
    raw = {**raw_batch([0, 1]), "images": lat}
    x0 = obj.prepare(raw, torch.device("cpu"))["x0"]
    torch.testing.assert_close(x0, lat.float() * 0.18215)
    with pytest.raises(ObjectiveError, match="latents need the VAE to decode"):
        obj.decode(x0)


# ----------------------------------------------------------------------------- losses


def _bucket_check(obj, batch, total, n, metrics, t_frac):
    assert n.item() == batch["x0"].shape[0]
    sums = sum(metrics[f"loss_t{k}"][0] for k in range(4))
    counts = sum(metrics[f"loss_t{k}"][1] for k in range(4))
    torch.testing.assert_close(sums, total.detach(), rtol=1e-6, atol=1e-6)
    assert counts.item() == n.item()
    expect = np.bincount(np.minimum((t_frac * 4).astype(int), 3), minlength=4)
    assert [metrics[f"loss_t{k}"][1].item() for k in range(4)] == expect.tolist()


def test_flow_loss_is_per_image_velocity_mse_and_buckets_add_up():
    obj = objective(objective_cfg={"time_sampling": "uniform"})
    batch = obj.prepare(raw_batch(np.arange(64)), torch.device("cpu"))
    model = TinyNet()
    total, n, metrics = obj.loss(model, batch)
    # Independently: x_t on the straight path, the velocity eps - x0, the model at t * 1000.
    x0, eps, t = batch["x0"].double(), batch["noise"].double(), batch["t"].double().view(-1, 1, 1, 1)
    xt = ((1 - t) * x0 + t * eps).float()
    pred = model(xt, batch["t"] * 1000, batch["y"]).double()
    want = ((pred - (eps - x0)) ** 2).mean(dim=(1, 2, 3)).sum()
    assert total.item() == pytest.approx(want.item(), rel=1e-5)
    _bucket_check(obj, batch, total, n, metrics, batch["t"].numpy())
    total.backward()
    assert model.conv.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("prediction", ["epsilon", "v"])
@pytest.mark.parametrize("learn_sigma", [False, True])
def test_ddpm_loss_and_buckets_add_up(prediction, learn_sigma):
    obj = objective("ddpm", learn_sigma=learn_sigma, objective_cfg={"prediction": prediction})
    batch = obj.prepare(raw_batch(np.arange(64)), torch.device("cpu"))
    model = TinyNet(c_out=2 if learn_sigma else 1)
    total, n, metrics = obj.loss(model, batch)
    abar = torch.as_tensor(linear_betas(1000)).neg().add(1).cumprod(0)[batch["t"]].view(-1, 1, 1, 1)
    x0, eps = batch["x0"].double(), batch["noise"].double()
    xt = (abar.sqrt() * x0 + (1 - abar).sqrt() * eps).float()
    pred = model(xt, batch["t"].float(), batch["y"])[:, :1].double()
    target = eps if prediction == "epsilon" else abar.sqrt() * eps - (1 - abar).sqrt() * x0
    mse = ((pred - target) ** 2).mean(dim=(1, 2, 3)).sum()
    if learn_sigma:
        assert metrics["mse"][0].item() == pytest.approx(mse.item(), rel=1e-4)
        assert metrics["vb"][0].item() > 0
        assert total.item() == pytest.approx(metrics["mse"][0].item() + metrics["vb"][0].item(), rel=1e-5)
    else:
        assert total.item() == pytest.approx(mse.item(), rel=1e-4) and "vb" not in metrics
    _bucket_check(obj, batch, total, n, metrics, batch["t"].numpy() / 1000)


def test_learned_sigma_vlb_is_finite_nonnegative_and_trains_the_variance_only():
    obj = objective("ddpm", learn_sigma=True)
    d = obj.diffusion
    g = torch.Generator().manual_seed(3)
    x0 = torch.rand(6, 1, 8, 8, generator=g) * 2 - 1
    eps = torch.randn(6, 1, 8, 8, generator=g)
    t = torch.tensor([0, 1, 10, 500, 998, 999])
    xt = d.q_sample(x0, t, eps)
    pred = torch.randn(6, 1, 8, 8, generator=g, requires_grad=True)
    v = (torch.rand(6, 1, 8, 8, generator=g) * 2 - 1).requires_grad_()
    vb = obj.vb_terms(pred, v, x0, xt, t)
    assert torch.isfinite(vb).all() and (vb >= 0).all()
    vb.sum().backward()
    assert pred.grad is None  # the mean enters detached
    assert v.grad.abs().sum() > 0
    # The exact posterior (true noise, variance beta~: v = -1) has zero KL; the decoder NLL at t = 0 stays > 0.
    exact = obj.vb_terms(eps, -torch.ones_like(v), x0, xt, t)
    assert exact[1:].abs().max() < 1e-4 and exact[0] > 0
    # Through loss(): gradients of the VLB reach the variance channels, the MSE the prediction channels.
    batch = obj.prepare(raw_batch(np.arange(8)), torch.device("cpu"))
    out = torch.zeros(8, 2, 32, 32, requires_grad=True)

    class Fixed(nn.Module):
        def forward(self, x, t, y):
            return out

    per_image, extra = obj.per_image_loss(Fixed(), batch)
    grad_mean_vb, = torch.autograd.grad(extra["vb"].sum(), out, retain_graph=True)
    assert grad_mean_vb[:, :1].abs().max() == 0 and grad_mean_vb[:, 1:].abs().max() > 0


@pytest.mark.parametrize("kind,learn_sigma", [("rectified_flow", False), ("ddpm", True)])
def test_the_real_dit_trains_on_the_loss_and_bf16_agrees(kind, learn_sigma):
    """Ten AdamW steps of a one-block DiT on one batch lower the loss; the same weights in bf16 (as
    DeepSpeed's bf16 casts them) give the loss in fp32 within bf16's error."""
    import copy

    from pretrain.models import get_family

    obj = objective(kind, learn_sigma=learn_sigma, d_model=32, n_layers=1, n_heads=2, patch_size=8,
                    kernels="reference")
    obj.check()
    model = get_family("dit").build(obj.cfg.model)
    batch = obj.prepare(raw_batch(np.arange(8)), torch.device("cpu"))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(10):
        total, n, _ = obj.loss(model, batch)
        opt.zero_grad()
        (total / n).backward()
        opt.step()
        losses.append(total.item() / n.item())
    assert losses[-1] < 0.8 * losses[0]
    total = obj.loss(model, batch)[0]
    low = obj.loss(copy.deepcopy(model).bfloat16(), batch)[0]
    assert low.dtype == torch.float32 and low.item() == pytest.approx(total.item(), rel=2e-2)
    x = obj.sample(model, torch.arange(4), torch.randn(4, 1, 32, 32), steps=2)
    assert x.shape == (4, 1, 32, 32) and torch.isfinite(x).all()


# ----------------------------------------------------------------------------- schedules


def test_schedules_match_their_formulas():
    lin = Diffusion(linear_betas(1000))
    assert lin.betas[0] == pytest.approx(1e-4) and lin.betas[-1] == pytest.approx(0.02)
    assert lin.abar[999] == pytest.approx(4.036e-5, rel=1e-3)
    f = [math.cos((t / 1000 + 0.008) / 1.008 * math.pi / 2) ** 2 for t in (0, 1, 500)]
    cos = Diffusion(cosine_betas(1000))
    assert cos.betas[0] == pytest.approx(1 - f[1] / f[0], rel=1e-9)
    assert cos.betas[0] == pytest.approx(4.128e-5, rel=1e-3)
    assert cos.abar[499] == pytest.approx(f[2] / f[0], rel=1e-6)  # abar_t = f(t) / f(0) away from the clip
    assert cos.betas.max() == pytest.approx(0.999) and (cos.betas <= 0.999).all()
    # Respacing keeps abar at the kept timesteps, and starts and ends where the full schedule does.
    keep = spaced_timesteps(1000, 50)
    assert len(keep) == 50 and keep[0] == 0 and keep[-1] == 999
    sub = lin.respaced(50)
    np.testing.assert_allclose(sub.abar, lin.abar[keep], rtol=1e-12)
    assert sub.model_time(torch.tensor([0, 49])).tolist() == [0.0, 999.0]
    assert Diffusion(linear_betas(250)).model_time(torch.tensor([249])).item() == pytest.approx(996.0)


# ----------------------------------------------------------------------------- samplers


def _point(shape=(8, 1, 32, 32), seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(shape[1:], generator=g) * 1.6 - 0.8, torch.randn(shape, generator=torch.Generator().manual_seed(seed + 1))


@pytest.mark.parametrize("sampler", ["euler", "heun"])
def test_flow_samplers_recover_a_single_point(sampler):
    obj = objective()
    x_star, noise = _point()
    out = obj.sample(FlowOracle(x_star), torch.zeros(8, dtype=torch.long), noise, steps=8, cfg_scale=1.0,
                     sampler=sampler)
    assert (out - x_star).abs().max() < 1e-4


# Data N(0.1, 0.3^2) per element, inside [-1, 1] (x0 estimates of pixel data are clipped there); 32,768
# samples put the standard error of the std near 0.0012. Too few steps shrink the std (by 0.03 for Euler
# at 20 steps): the tolerances see a sampler that is off by a step.
M, S = 0.1, 0.3


@pytest.mark.parametrize("sampler,steps,tol", [("euler", 200, 0.005), ("heun", 20, 0.005)])
def test_flow_samplers_reproduce_gaussian_data(sampler, steps, tol):
    obj = objective()
    _, noise = _point((32, 1, 32, 32))
    out = obj.sample(FlowOracle(M, S), torch.zeros(32, dtype=torch.long), noise, steps=steps, cfg_scale=1.0,
                     sampler=sampler)
    assert out.mean().item() == pytest.approx(M, abs=tol)
    assert out.std().item() == pytest.approx(S, abs=tol)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
@pytest.mark.parametrize("schedule,prediction,learn_sigma", [("linear", "epsilon", False), ("linear", "v", True),
                                                              ("cosine", "epsilon", True), ("cosine", "v", False)])
def test_ddpm_samplers_recover_a_single_point(sampler, schedule, prediction, learn_sigma):
    obj = objective("ddpm", learn_sigma=learn_sigma, objective_cfg={"schedule": schedule, "prediction": prediction})
    x_star, noise = _point()
    oracle = DDPMOracle(obj.diffusion.abar, x_star, prediction=prediction, sigma_channels=learn_sigma)
    out = obj.sample(oracle, torch.zeros(8, dtype=torch.long), noise, steps=20, cfg_scale=1.0, sampler=sampler)
    assert (out - x_star).abs().max() < 1e-3


@pytest.mark.parametrize("sampler,steps,tol", [("ddpm", 1000, 0.01), ("ddim", 200, 0.01)])
def test_ddpm_samplers_reproduce_gaussian_data(sampler, steps, tol):
    obj = objective("ddpm")
    _, noise = _point((32, 1, 32, 32))
    out = obj.sample(DDPMOracle(obj.diffusion.abar, M, S), torch.zeros(32, dtype=torch.long), noise,
                     steps=steps, cfg_scale=1.0, sampler=sampler)
    assert out.mean().item() == pytest.approx(M, abs=tol)
    assert out.std().item() == pytest.approx(S, abs=tol)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_v_and_epsilon_oracles_sample_the_same(sampler):
    objs = {p: objective("ddpm", objective_cfg={"prediction": p}) for p in ("epsilon", "v")}
    _, noise = _point((16, 1, 32, 32))
    out = {p: o.sample(DDPMOracle(o.diffusion.abar, M, S, prediction=p), torch.zeros(16, dtype=torch.long),
                       noise, steps=50, cfg_scale=1.0, sampler=sampler) for p, o in objs.items()}
    assert (out["epsilon"] - out["v"]).abs().max() < 1e-3
    assert out["epsilon"].std() > 0.2  # samples of the distribution, not a collapse to one value


def test_ancestral_step_noise_is_each_samples_own():
    """A sample's path depends on its start only: the same images come out of one batch or of two in
    another order (another rank split or batch size), and no two samples share their step noise."""
    obj = objective("ddpm")
    _, noise = _point((8, 1, 32, 32))
    labels = torch.arange(8)
    oracle = DDPMOracle(obj.diffusion.abar, M, S)
    whole = obj.sample(oracle, labels, noise, steps=20, cfg_scale=1.0, sampler="ddpm")
    halves = [obj.sample(oracle, labels[s], noise[s], steps=20, cfg_scale=1.0, sampler="ddpm")
              for s in (slice(4, 8), slice(0, 4))]
    torch.testing.assert_close(torch.cat([halves[1], halves[0]]), whole, rtol=0, atol=0)
    z = obj.step_noise(noise)()
    assert z.shape == noise.shape and torch.equal(obj.step_noise(noise)(), z)
    assert torch.corrcoef(z.flatten(1)).fill_diagonal_(0).abs().max() < 0.1  # rows independent
    assert (whole - obj.sample(oracle, labels, noise, steps=20, cfg_scale=1.0, sampler="ddim")).abs().mean() > 0.01


class Guided(nn.Module):
    """Conditional and unconditional outputs that differ: c = y + 1, u = -2 on the prediction channel
    (and the variance channel 10 * y); records the batches it is called with."""

    def __init__(self, c_out=1):
        super().__init__()
        self.c_out, self.calls = c_out, []

    def forward(self, x, t, y):
        self.calls.append(y.clone())
        pred = torch.where(y == NUM_CLASSES, -2.0, y.float() + 1)[:, None, None, None].expand(-1, 1, *x.shape[2:])
        return torch.cat([pred, 10 * y.float()[:, None, None, None].expand_as(pred)], 1)[:, : self.c_out]


def test_classifier_free_guidance_is_u_plus_s_c_minus_u():
    obj = objective("ddpm", learn_sigma=True)
    model = Guided(c_out=2)
    y = torch.tensor([0, 3, 7])
    x = torch.zeros(3, 1, 32, 32)
    out = obj.guided(model, x, torch.full((3,), 500.0), y, 4.0)
    assert len(model.calls) == 1 and model.calls[0].tolist() == [0, 3, 7, NUM_CLASSES, NUM_CLASSES, NUM_CLASSES]
    c, u = (y.float() + 1).view(-1, 1, 1), -2.0
    torch.testing.assert_close(out[:, 0], (u + 4.0 * (c - u)).expand(-1, 32, 32))
    torch.testing.assert_close(out[:, 1], (10 * y.float()).view(-1, 1, 1).expand(-1, 32, 32))  # the conditional's
    assert obj.guided(model, x, torch.full((3,), 500.0), y, 1.0)[:, 0, 0, 0].tolist() == [1.0, 4.0, 8.0]
    # Through a sampler: one Euler step of a flow from t = 1 to 0 moves x by -(u + s (c - u)); one forward a step.
    flow = objective()
    model = Guided()
    out = flow.sample(model, y, torch.zeros(3, 1, 32, 32), steps=1, cfg_scale=2.5, sampler="euler")
    torch.testing.assert_close(out[:, 0], -(u + 2.5 * (c - u)).expand(-1, 32, 32))
    assert len(model.calls) == 1


# ----------------------------------------------------------------------------- checks and config


def test_check_refuses_data_and_models_that_do_not_fit():
    cases = [
        (dict(data=data_info(kind="tokens")), "reads images shards, but data.train holds tokens"),
        (dict(in_channels=3), r"model.in_channels \(3\) does not match the data's 1 channels"),
        (dict(input_size=16), r"model.input_size \(16\) is smaller than the data's 28x28"),
        (dict(num_classes=5), r"model.num_classes \(5\) is smaller than the data's 10 classes"),
        (dict(learn_sigma=True), "does not learn a variance"),
        (dict(class_dropout_prob=0.0), "needs the null label"),
        (dict(data=data_info((4, 16, 16), encoding="latents", scale=0.18), in_channels=4), "latents are not padded"),
    ]
    for kw, msg in cases:
        with pytest.raises(ObjectiveError, match=msg) as e:
            objective(**kw).check()
        assert "\n" not in str(e.value)
    objective().check()  # 28x28 data padded into a 32x32 model is fine
    objective("ddpm", learn_sigma=True).check()
    with pytest.raises(ConfigError, match=r"objective.sample_steps \(2000\) must not exceed objective.timesteps"):
        objective("ddpm", objective_cfg={"sample_steps": 2000})
    cfg = config_from_dict({"objective": {"type": "ddpm"}, "data": {"train": "unused"}})  # model.type gpt2
    with pytest.raises(ObjectiveError, match="needs an image model; model.type=gpt2 has no in_channels"):
        build_objective(cfg, data_info()).check()


def test_config_defaults_and_sampler_choice():
    flow, ddpm = objective().cfg.objective, objective("ddpm").cfg.objective
    for o in (flow, ddpm):
        assert (o.sample_steps, o.cfg_scale, o.eval_samples, o.grid_samples) == (50, 4.0, 500, 100)
    assert (flow.sampler, flow.time_sampling, ddpm.sampler, ddpm.timesteps) == ("euler", "logit_normal", "ddpm", 1000)
    with pytest.raises(ObjectiveError, match="objective.sampler=ddim is not one of euler, heun"):
        objective().sample(TinyNet(), torch.zeros(1, dtype=torch.long), torch.zeros(1, 1, 32, 32), sampler="ddim")


@pytest.mark.parametrize("kind", ["rectified_flow", "ddpm"])
def test_validation_at_fixed_noise_levels_scores_every_image_at_each(kind):
    """objective.val_times: the validation loss is every image's loss at each listed level (the same images,
    noise and levels whatever the run), not at the drawn times; unset, it is the training loss's draws."""
    levels = [0.1, 0.5, 0.9]
    obj = objective(kind, objective_cfg={"val_times": levels})
    drawn = objective(kind)
    batches = [(obj.prepare(raw_batch(np.arange(i, i + 16), seed=i), torch.device("cpu")), True) for i in (0, 16)]
    model = TinyNet()
    got = obj.evaluate(model, batches)
    total, count = (v.item() for v in got["loss"])
    assert count == 2 * 16 * len(levels)
    want = 0.0
    for batch, _ in batches:
        for f in levels:
            t = torch.full_like(batch["t"], f) if kind == "rectified_flow" else torch.full_like(batch["t"], int(f * 1000))
            want += obj.loss(model, dict(batch, t=t))[0].item()
    assert total == pytest.approx(want, rel=1e-6)
    assert got["loss_t0"][1].item() == 2 * 16 and got["loss_t1"][1].item() == 0  # 0.1 -> [0, 1/4), 0.5 -> [1/2, 3/4)
    plain = drawn.evaluate(model, batches)
    assert plain["loss"][1].item() == 2 * 16 and plain["loss"][0].item() != pytest.approx(total / len(levels))
    with pytest.raises(ConfigError, match="val_times"):
        objective(kind, objective_cfg={"val_times": [0.5, 1.0]})
