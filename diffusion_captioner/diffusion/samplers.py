"""K-step samplers: how the next denoiser input is made from the current x_0 prediction.

``DiffusionDecoder.generate`` starts from x_T ~ N(0, tau^2 I) at the first of K timesteps
``T = t_1 > t_2 > ... > t_K >= 1`` and calls the denoiser K times. Between call k and call k + 1
a sampler turns the prediction x0_hat (B, L, E) into the next input (x_t, t):

* ``feed``    -- x_next = x0_hat at t_{k+1} (the original CLIP-DiffusionLM code);
* ``ddim``    -- deterministic DDIM: x_next = sqrt(abar') x0_hat + sqrt(1 - abar') eps_hat;
* ``renoise`` -- x_next ~ q(x_{t_{k+1}} | x0_hat), fresh unit-variance noise (LaDiC);
* ``refine``  -- mask-predict in continuous form: with n the predicted span (words + end token),
  the floor(n (K - k) / K) least confident positions (max LM-head probability) restart at
  t = T from the T state (tau * eps, what training shows there), every other position is
  committed to its most probable word's clean embedding at t = 0 (needs a denoiser trained
  with ``mixed_noise`` or ``refine_noise`` > 0). Sampling (``generate_samples``) commits a word
  drawn from softmax(logits / tau) instead, its probability the confidence.

Each sampler hands the denoiser only inputs of a kind training produced at that timestep label;
the decoder refuses the combinations that cannot (``feed`` with a timestep input, DDIM away from
temperature 1, refine without per-position noise).

The first three optionally snap x0_hat to the nearest word embedding first (``clamp``,
Diffusion-LM). A sampler is a class registered in :data:`SAMPLERS` under its name.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch

from diffusion_captioner.diffusion.schedule import NoiseSchedule, StepMode, clamp_to_vocabulary

SamplerName = Literal["feed", "ddim", "renoise", "refine"]
#: How many span positions ``refine`` restarts after step k of K: ``linear`` floor(n (K - k) / K)
#: (mask-predict), ``cosine`` floor(n cos(pi k / 2K)) (MaskGIT), ``threshold`` those whose
#: confidence is under ``refine_threshold``.
RefineScheduleName = Literal["linear", "cosine", "threshold"]


@dataclass
class SamplingRun:
    """What one ``generate`` call shares with its sampler (never the decoder itself).

    Attributes:
        schedule: the noise schedule (its ``step`` and T).
        logits: the LM head, x_0 vectors (B, L, E) -> word logits (B, L, V).
        embed: word ids (B, L) -> their clean x_0 vectors (B, L, E).
        stop_ids: the ids that end a caption (end token, pad).
        timesteps: the K timesteps, T first.
        table: (V, E) word vectors in diffusion space when clamping, else None.
        lengths: (B,) predicted caption lengths (length head), or None.
        noise: draws a fresh seeded N(0, I) tensor shaped like x_t (B, L, E).
        temperature: tau; a position at t = T carries tau * eps (the decoder's T state).
        pick: word logits (B, L, V) -> the words committed (B, L); None: the most probable
            (sampling draws them instead: ``generate_samples``).
    """

    schedule: NoiseSchedule
    logits: Callable[[torch.Tensor], torch.Tensor]
    embed: Callable[[torch.Tensor], torch.Tensor]
    stop_ids: tuple[int, ...]
    timesteps: list[int]
    table: torch.Tensor | None
    lengths: torch.Tensor | None
    noise: Callable[[], torch.Tensor]
    temperature: float = 1.0
    pick: Callable[[torch.Tensor], torch.Tensor] | None = None
    refine_schedule: RefineScheduleName = "linear"
    refine_threshold: float = 0.9
    refine_repeats: int = 0


class Sampler:
    """Base class: ``next_input(run, x0_hat, x_t, t, done)`` gives the inputs of call ``done + 1``
    after ``done`` calls (1 <= done < K)."""

    name: ClassVar[str]

    def next_input(self, run: SamplingRun, x0_hat: torch.Tensor, x_t: torch.Tensor,
                   t: torch.Tensor, done: int) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError


class ScheduleStepSampler(Sampler):
    """Moves to the next timestep with :meth:`NoiseSchedule.step` in its ``mode``."""

    mode: ClassVar[StepMode]

    def fresh_noise(self, run: SamplingRun) -> torch.Tensor | None:
        return None

    def next_input(self, run: SamplingRun, x0_hat: torch.Tensor, x_t: torch.Tensor,
                   t: torch.Tensor, done: int) -> tuple[torch.Tensor, torch.Tensor]:
        target = clamp_to_vocabulary(x0_hat, run.table) if run.table is not None else x0_hat
        t_next = torch.full_like(t, run.timesteps[done])  # (B,) or (B, L)
        noise = self.fresh_noise(run)
        x_next = run.schedule.step(target, x_t, t, t_next, self.mode, noise)  # (B, L, E)
        return x_next, t_next


class FeedSampler(ScheduleStepSampler):
    name, mode = "feed", "feed"


class DDIMSampler(ScheduleStepSampler):
    name, mode = "ddim", "ddim"


class RenoiseSampler(ScheduleStepSampler):
    name, mode = "renoise", "renoise"

    def fresh_noise(self, run: SamplingRun) -> torch.Tensor:
        return run.noise()  # (B, L, E), unit variance: what training shows at every t < T


class RefineSampler(Sampler):
    """Mask-predict in continuous form (see the module docstring)."""

    name = "refine"

    def next_input(self, run: SamplingRun, x0_hat: torch.Tensor, x_t: torch.Tensor,
                   t: torch.Tensor, done: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The span n is the predicted lengths when given, else up to the first predicted
        end/pad word (plus that word); positions after it keep their words. Returns x_t
        (B, L, E) and per-position timesteps (B, L)."""
        total = len(run.timesteps)
        restart = run.temperature * run.noise()  # (B, L, E), the T state
        batch, length, _ = x0_hat.shape
        logits = run.logits(x0_hat).float()  # (B, L, V)
        probabilities = logits.softmax(-1)  # (B, L, V)
        if run.pick is None:
            confidence, words = probabilities.max(-1)  # (B, L), (B, L)
        else:  # sampling: the drawn word, and its probability as the confidence
            words = run.pick(logits)  # (B, L)
            confidence = probabilities.gather(-1, words[..., None])[..., 0]  # (B, L)
        if run.refine_repeats:  # a repeated phrase's second occurrence restarts first
            confidence = confidence.masked_fill(repeated_ngrams(words, run.refine_repeats), -1.0)
        positions = torch.arange(length, device=x0_hat.device)  # (L,)
        span = run.lengths
        if span is None:
            stop = words == run.stop_ids[0]  # (B, L)
            for other in run.stop_ids[1:]:
                stop |= words == other  # (B, L)
            first_stop = torch.where(stop, positions, length).min(-1).values  # (B,)
            span = (first_stop + 1).clamp(max=length)  # (B,), words + end token
        inside = positions[None] < span[:, None]  # (B, L)
        if run.refine_schedule == "threshold":
            noisy = inside & (confidence < run.refine_threshold)  # (B, L)
        else:
            if run.refine_schedule == "cosine":
                share = math.cos(math.pi * done / (2 * total))
                redo = (span * share).floor().long()  # (B,)
            else:
                redo = span * (total - done) // total  # (B,)
            noisy = least_confident(confidence, inside, redo)  # (B, L)
        t_next = torch.where(noisy, run.schedule.steps, 0).long()  # (B, L)
        committed = run.embed(words)  # (B, L, E)
        return torch.where(noisy[..., None], restart, committed), t_next


def least_confident(confidence: torch.Tensor, inside: torch.Tensor,
                    count: torch.Tensor) -> torch.Tensor:
    """(B, L) bool: in each row the ``count`` (B,) least confident positions (``confidence``
    (B, L)) among those ``inside`` (B, L) its span; what ``refine`` restarts after a step (and
    what training on its inputs, ``policy_noise``, restarts too)."""
    order = confidence.masked_fill(~inside, 2.0).argsort(dim=-1)  # (B, L), least sure first
    rank = order.argsort(dim=-1)  # (B, L), each position's place in that order
    return rank < count[:, None]


def repeated_ngrams(words: torch.Tensor, n: int) -> torch.Tensor:
    """(B, L) word ids -> (B, L) bool: the positions of every n-gram that already occurred
    earlier in its row without overlapping it (the second "large red circle" of "a large red
    circle above a large red circle" at n = 3)."""
    batch, length = words.shape
    if length < 2 * n:
        return torch.zeros_like(words, dtype=torch.bool)
    grams = words.unfold(1, n, 1)  # (B, W, n), W = L - n + 1
    same = (grams[:, :, None, :] == grams[:, None, :, :]).all(-1)  # (B, W, W): gram i == gram j
    index = torch.arange(grams.shape[1], device=words.device)  # (W,)
    earlier = index[None, :] <= index[:, None] - n  # (W, W): i ends before j starts
    starts = (same & earlier[None]).any(-1)  # (B, W): gram j repeats an earlier one
    marked = torch.zeros_like(words, dtype=torch.bool)  # (B, L)
    for offset in range(n):  # every position the repeated gram covers
        marked[:, offset:offset + grams.shape[1]] |= starts
    return marked


#: Every sampler by name.
SAMPLERS: dict[str, type[Sampler]] = {
    cls.name: cls for cls in (FeedSampler, DDIMSampler, RenoiseSampler, RefineSampler)
}


def sampler_for(name: str) -> Sampler:
    """The sampler called ``name``; an unknown name fails listing the ones that exist."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose one of: {', '.join(SAMPLERS)}")
    return SAMPLERS[name]()
