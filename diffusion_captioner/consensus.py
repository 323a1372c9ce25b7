"""Consensus targets: train on each training image's most agreed-upon reference more often.

A parallel decoder fits every position to the average of an image's references; where they
disagree (two objects named in either order, "large" or "big") that average mixes phrasings
(the multimodality of non-autoregressive decoding). Sequence-level distillation
(:mod:`diffusion_captioner.distillation`) removes it with a trained teacher's captions. The
references' own mode does the same without any model: the *consensus reference* of image b is
the one its other references agree with most under CIDEr-D, the idf over the training corpus
(:class:`eval.cider_reward.CiderDReward`)::

    c(b) = argmax_j CIDEr-D(r_bj, R_b minus r_bj)          (leave-one-out; the first wins ties)

and with ``ratio`` r each training pair's caption is replaced by c(b) with probability r::

    caption'(b, j) = r_{b c(b)}  with probability r, else r_bj

(r = 0: nothing changes; r = 1: one caption per image). It is a training option of every
decoder (``train.consensus_targets``): the :class:`~diffusion_captioner.trainer.Trainer`
applies it to the pairs it trains on (``CaptionPairs.with_consensus_targets``) (after distillation, when a ``distill`` block made them),
so only training captions are read; validation, test and SCST's reward keep every reference.
The text feature of a replaced pair is that of its new caption (already in the cache).
"""

from __future__ import annotations

import logging
from collections.abc import Hashable, Mapping, Sequence

import torch

from eval.cider_reward import CiderDReward

logger = logging.getLogger(__name__)


def consensus_indices(references: Mapping[Hashable, Sequence[str]]) -> dict[Hashable, int]:
    """image key -> the index of its consensus reference (module docstring); an image with one
    reference gets 0."""
    reward = CiderDReward(references)
    return {key: int(reward.leave_one_out(key).argmax()) for key in references}


def consensus_targets(captions: Sequence[tuple[str, ...]], ratio: float, seed: int = 0
                      ) -> tuple[list[tuple[str, ...]], list[int]]:
    """Each image's captions (image i: ``captions[i]``) with each one replaced by the image's
    consensus reference with probability ``ratio`` (which ones: seeded by ``seed``), and for
    every new caption, in order, the index of the old caption it is (over all images' captions
    in order: the text-feature row it keeps)."""
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"training option consensus_targets must be in [0, 1], got {ratio}")
    counts = [len(refs) for refs in captions]
    if ratio == 0:
        return [tuple(refs) for refs in captions], list(range(sum(counts)))
    best = consensus_indices(dict(enumerate(captions)))
    generator = torch.Generator().manual_seed(seed)
    replaced = (torch.rand(sum(counts), generator=generator) < ratio).tolist()  # (P,)
    targets, rows, start = [], [], 0
    for image, (refs, count) in enumerate(zip(captions, counts, strict=True)):
        picks = [best[image] if replaced[start + j] else j for j in range(count)]
        targets.append(tuple(refs[j] for j in picks))
        rows.extend(start + j for j in picks)
        start += count
    changed = sum(row != i for i, row in enumerate(rows))
    logger.info("consensus targets: %d of %d training captions are now their image's consensus "
                "reference (ratio %.2f)", changed, len(rows), ratio)
    return targets, rows
