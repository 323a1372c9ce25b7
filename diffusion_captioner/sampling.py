"""Seeded categorical sampling shared by the decoders' ``sample_batch``: temperature, top-k, top-p.

A word is drawn from the tempered, truncated distribution over the vocabulary::

    p_tau(w) = softmax(l / tau)(w)                        tau > 0 (tau = 0: argmax, no draw)
    top-k:  p_tau restricted to the k largest logits, renormalised
    top-p:  p_tau restricted to the smallest set of most probable words whose mass reaches p
            (Holtzman et al. 2020, nucleus sampling; the most probable word is always kept)

by the Gumbel-max trick, ``w = argmax_i (l_i / tau + g_i)`` with ``g_i = -log(-log u_i)``,
``u_i ~ U(0, 1)`` i.i.d., which is an exact draw from p_tau. The uniforms come from a private
CPU ``torch.Generator`` (the caller's), so a seed gives the same draws on any device and the
global RNG is never touched. Logits of -inf (words a decoder forbids) are never drawn.
"""

from __future__ import annotations

import torch


def check_sampling(owner: str, temperature: float, top_k: int | None = None,
                   top_p: float | None = None) -> None:
    """One-line ValueError for a sampling option out of range, naming it."""
    if temperature < 0:
        raise ValueError(f"{owner}: sample_temperature must be >= 0 (0 is argmax), got "
                         f"{temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"{owner}: top_k must be >= 1 (or null for no cut), got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"{owner}: top_p must be in (0, 1] (or null for no cut), got {top_p}")


def truncate(logits: torch.Tensor, top_k: int | None = None,
             top_p: float | None = None) -> torch.Tensor:
    """(..., V) logits with every word outside the top-k / top-p set at -inf (see the module
    docstring); ``top_p`` is taken over ``softmax(logits)``, so pass tempered logits."""
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(int(top_k), dim=-1).values[..., -1:]  # (..., 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))  # (..., V)
    if top_p is not None and top_p < 1:
        ordered, order = logits.sort(dim=-1, descending=True)  # (..., V)
        mass = ordered.softmax(-1).cumsum(-1)  # (..., V) mass up to and including each word
        drop = (mass - ordered.softmax(-1)) >= top_p  # (..., V): the mass before it already reaches p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))  # (..., V)
    return logits


def draw(logits: torch.Tensor, generator: torch.Generator, temperature: float = 1.0,
         top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """(..., V) logits -> (...,) word ids drawn from p_tau truncated by top-k / top-p (module
    docstring); ``temperature`` 0 is the argmax and draws nothing."""
    if temperature == 0:
        return logits.argmax(-1)
    tempered = truncate(logits.float() / temperature, top_k, top_p)  # (..., V)
    u = torch.rand(tempered.shape, generator=generator).to(tempered.device)  # (..., V) on CPU first
    gumbel = -torch.log(-torch.log(u.clamp_min(torch.finfo(u.dtype).tiny)))  # (..., V)
    return (tempered + gumbel).argmax(-1)  # (...,)


def draw_indices(counts: list[int], draws: int, generator: torch.Generator) -> list[list[int]]:
    """For each of len(counts) pools, ``draws`` indices in 0..count-1 drawn uniformly without
    replacement: a random permutation of the pool, then another once it is used up."""
    picked = []
    for count in counts:
        rounds = -(-draws // count)  # ceil
        order = torch.cat([torch.randperm(count, generator=generator) for _ in range(rounds)])
        picked.append(order[:draws].tolist())
    return picked


def regroup(flat: list[str], num_samples: int) -> list[list[str]]:
    """B * n captions, image-major (rows ``b n .. b n + n - 1`` are image b's) -> B lists of n."""
    return [flat[start:start + num_samples] for start in range(0, len(flat), num_samples)]


def draw_log_prob(logits: torch.Tensor, ids: torch.Tensor, temperature: float = 1.0,
                  top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """``log p_tau(w)`` of drawn ids under the tempered, truncated distribution :func:`draw`
    samples from (module docstring): (..., V) logits, (...,) ids -> (...,); differentiable in
    the logits. Temperature 0 draws nothing, so it has no log-probability to give."""
    if temperature <= 0:
        raise ValueError(f"sample_temperature must be > 0 to score samples, got {temperature}")
    tempered = truncate(logits.float() / temperature, top_k, top_p)  # (..., V)
    return tempered.log_softmax(-1).gather(-1, ids[..., None].long())[..., 0]  # (...,)


def through_first_stop(ids: torch.Tensor, stops: tuple[int, ...],
                       valid: torch.Tensor | None = None) -> torch.Tensor:
    """(N, T) ids -> (N, T) bool: the positions up to and including the first of ``stops``
    (all of them when there is none), within ``valid`` when given: the decisions that made a
    caption (what follows its end token never reaches the text)."""
    stop = torch.zeros_like(ids, dtype=torch.bool)  # (N, T)
    for token in stops:
        stop |= ids == token
    before = (stop.long().cumsum(-1) - stop.long()) == 0  # (N, T): no stop strictly before
    return before if valid is None else before & valid
