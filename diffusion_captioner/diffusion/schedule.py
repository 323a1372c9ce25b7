"""Noise schedules and the x_0-prediction sampler step: pure tensors, no network.

The forward process corrupts clean caption embeddings x_0 (B, L, E) in closed form::

    q(x_t | x_0) = N(x_t; sqrt(abar_t) x_0, (1 - abar_t) I),   t = 1..T
    x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps,              eps ~ N(0, I)

``abar_t`` (alpha-bar) falls from ~1 at t = 1 to ~0 at t = T; three shapes are provided:

* ``linear``  -- DDPM: beta_t linear in t from 1e-4 to 0.02 (rescaled by 1000 / T, at most 0.999),
  abar_t = prod_{s<=t} (1 - beta_s);
* ``cosine``  -- improved DDPM: abar_t = f(t) / f(0), f(t) = cos^2(pi/2 (t/T + s) / (1 + s)),
  s = 0.008, betas clipped at 0.999;
* ``sqrt``    -- Diffusion-LM: abar_t = 1 - sqrt(t/T + s), s = 1e-4 (much noise early on,
  which suits word embeddings, whose identity survives a lot of Gaussian noise).

The decoder owns the network and calls the schedule, as diffusers' ``DDPMScheduler.step`` and
improved-diffusion's ``training_losses(model, ...)`` do::

    x_t = schedule.q_sample(x0, t, noise)
    x_next = schedule.step(x0_hat, x_t, t, t_next, mode)

Index 0 of every table is t = 0 (abar = 1, no noise) so that ``t`` indexes directly.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch

ScheduleName = Literal["linear", "cosine", "sqrt"]
#: How the sampler moves from its x_0 prediction at t to the input at t_next < t:
#: ``feed``    -- x_next = x0_hat, fed straight back (the original CLIP-DiffusionLM code);
#: ``ddim``    -- deterministic DDIM (eta = 0): x_next = sqrt(abar') x0_hat + sqrt(1 - abar') eps_hat,
#:               with eps_hat = (x_t - sqrt(abar) x0_hat) / sqrt(1 - abar) the implied noise;
#: ``renoise`` -- x_next ~ q(x_t' | x0_hat): x0_hat diffused afresh to t_next (LaDiC).
StepMode = Literal["feed", "ddim", "renoise"]


def _linear_alpha_bar(steps: int) -> torch.Tensor:
    scale = 1000.0 / steps
    betas = torch.linspace(scale * 1e-4, scale * 0.02, steps, dtype=torch.float64)  # (T,)
    return torch.cumprod(1.0 - betas.clamp(max=0.999), dim=0)  # (T,)


def _cosine_alpha_bar(steps: int, s: float = 0.008) -> torch.Tensor:
    t = torch.arange(steps + 1, dtype=torch.float64) / steps  # (T+1,)
    f = torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2  # (T+1,)
    abar = f / f[0]  # (T+1,)
    betas = (1 - abar[1:] / abar[:-1]).clamp(max=0.999)  # (T,)
    return torch.cumprod(1.0 - betas, dim=0)  # (T,)


def _sqrt_alpha_bar(steps: int, s: float = 1e-4) -> torch.Tensor:
    t = torch.arange(1, steps + 1, dtype=torch.float64) / steps  # (T,)
    abar = 1 - torch.sqrt(t + s)  # (T,)
    return abar.clamp(min=1e-5)  # (T,)


_ALPHA_BAR: dict[str, Callable[[int], torch.Tensor]] = {
    "linear": _linear_alpha_bar,
    "cosine": _cosine_alpha_bar,
    "sqrt": _sqrt_alpha_bar,
}
STEP_MODES: tuple[str, ...] = ("feed", "ddim", "renoise")


class NoiseSchedule:
    """The table ``abar_t`` for t = 0..T of one named schedule, and the maths on it.

    Args:
        name: ``"linear"``, ``"cosine"`` or ``"sqrt"``.
        steps: T, the number of noising steps (any T >= 1).
    """

    def __init__(self, name: ScheduleName = "cosine", steps: int = 1000) -> None:
        if name not in _ALPHA_BAR:
            raise ValueError(f"unknown noise schedule {name!r}; choose one of: {', '.join(_ALPHA_BAR)}")
        if int(steps) < 1:
            raise ValueError(f"noise schedule needs steps >= 1, got {steps}")
        self.name, self.steps = name, int(steps)
        abar = _ALPHA_BAR[name](self.steps)  # (T,)
        #: abar_t for t = 0..T (float64 on CPU; cast on use).
        self.alpha_bar = torch.cat([torch.ones(1, dtype=torch.float64), abar])  # (T+1,)

    def __repr__(self) -> str:
        return f"NoiseSchedule({self.name!r}, steps={self.steps})"

    # ------------------------------------------------------------------ tables
    def abar(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """abar_t for integer timesteps ``t`` -- one per row (B,) or one per position (B, L) --
        shaped (B, 1, ..., 1) or (B, L, 1, ...) to broadcast on ``like``."""
        values = self.alpha_bar.to(like.device)[t.to(like.device).long()]  # t's shape
        return values.to(like.dtype).view(*t.shape, *([1] * (like.dim() - t.dim())))

    @property
    def betas(self) -> torch.Tensor:
        """beta_t = 1 - abar_t / abar_{t-1}, t = 1..T (float64, (T,))."""
        return 1 - self.alpha_bar[1:] / self.alpha_bar[:-1]

    def snr(self, t: torch.Tensor) -> torch.Tensor:
        """Signal-to-noise ratio abar_t / (1 - abar_t) of timesteps ``t`` (float64)."""
        abar = self.alpha_bar[t.long().cpu()]
        return abar / (1 - abar).clamp(min=1e-12)

    def sample_timesteps(self, batch: int, device: torch.device | str = "cpu",
                         generator: torch.Generator | None = None) -> torch.Tensor:
        """t ~ Uniform{1..T}, (B,) long."""
        return torch.randint(1, self.steps + 1, (batch,), generator=generator,
                             device="cpu").to(device)

    def inference_timesteps(self, num_steps: int) -> list[int]:
        """K evenly spaced timesteps from T down, ``T, T - T/K, ..., T/K`` (K distinct, all >= 1).

        The sampler predicts x_0 at each and moves to the next; after the last the prediction
        is the output. K must be at most T.
        """
        k = int(num_steps)
        if not 1 <= k <= self.steps:
            raise ValueError(f"inference steps must be in 1..T = 1..{self.steps}, got {num_steps}")
        return [max(1, round(self.steps * (k - i) / k)) for i in range(k)]

    # ------------------------------------------------------------------ forward process
    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None
                 ) -> torch.Tensor:
        """Sample from q(x_t | x_0): ``sqrt(abar_t) x_0 + sqrt(1 - abar_t) noise``.

        ``x0`` (B, ...), ``t`` (B,) integer timesteps in 0..T (or (B, L): one per position),
        ``noise`` like ``x0`` (default: fresh standard normal). t = 0 returns x_0 unchanged.
        """
        if noise is None:
            noise = torch.randn_like(x0)
        abar = self.abar(t, x0)  # (B, 1, ...)
        return abar.sqrt() * x0 + (1 - abar).sqrt() * noise  # (B, ...)

    def predict_noise(self, x_t: torch.Tensor, x0_hat: torch.Tensor, t: torch.Tensor
                      ) -> torch.Tensor:
        """The noise implied by an x_0 prediction: ``(x_t - sqrt(abar_t) x0_hat) / sqrt(1 - abar_t)``,
        0 where t = 0 (a clean position carries no noise; dividing by ~0 would give ~1e6)."""
        abar = self.abar(t, x_t)  # (B, 1, ...)
        eps = (x_t - abar.sqrt() * x0_hat) / (1 - abar).sqrt().clamp(min=1e-6)
        return torch.where(abar < 1, eps, torch.zeros_like(eps))  # (B, ...)

    # ------------------------------------------------------------------ reverse process
    def step(
        self,
        x0_hat: torch.Tensor,
        x_t: torch.Tensor,
        t: torch.Tensor,
        t_next: torch.Tensor,
        mode: StepMode = "ddim",
        noise: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One sampler step for an x_0-predicting model: from (x_t, x0_hat) at t to the input at
        ``t_next`` (< t). See :data:`StepMode`. ``noise`` is used by ``renoise`` (default fresh)."""
        if mode == "feed":
            return x0_hat
        if mode == "ddim":
            eps = self.predict_noise(x_t, x0_hat, t)  # (B, ...)
            return self.q_sample(x0_hat, t_next, eps)
        if mode == "renoise":
            return self.q_sample(x0_hat, t_next, noise)
        raise ValueError(f"unknown sampler step {mode!r}; choose one of: {', '.join(STEP_MODES)}")


def clamp_to_vocabulary(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Replace every vector of ``x`` (..., E) by its nearest row (L2) of ``table`` (V, E).

    Diffusion-LM's clamping trick: snaps a predicted x_0 onto word embeddings between steps.
    """
    flat = x.reshape(-1, x.shape[-1])  # (N, E)
    distances = (
        flat.pow(2).sum(-1, keepdim=True) - 2 * flat @ table.T + table.pow(2).sum(-1)[None]
    )  # (N, V)
    return table[distances.argmin(dim=-1)].view_as(x)  # (..., E)
