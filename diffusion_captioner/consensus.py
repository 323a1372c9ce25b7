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

(r = 0: nothing changes; r = 1: one caption per image). Only the training split's references are
read; the validation and test splits, and SCST's reward, keep theirs. The text feature of a
replaced pair is that of its new caption (a reference, so it is already in the cache). It is a
training option of every decoder (``train.consensus_targets``).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Hashable, Mapping, Sequence

import torch

from diffusion_captioner.features import SplitFeatures
from eval.cider_reward import CiderDReward

logger = logging.getLogger(__name__)


def consensus_indices(references: Mapping[Hashable, Sequence[str]]) -> dict[Hashable, int]:
    """image key -> the index of its consensus reference (module docstring); an image with one
    reference gets 0."""
    reward = CiderDReward(references)
    return {key: int(reward.leave_one_out(key).argmax()) for key in references}


def consensus_split(train: SplitFeatures, ratio: float, seed: int = 0) -> SplitFeatures:
    """``train`` with each caption replaced by its image's consensus reference with probability
    ``ratio`` (which pairs: seeded by ``seed``); text features follow their captions."""
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"training option consensus_targets must be in [0, 1], got {ratio}")
    if ratio == 0:
        return train
    best = consensus_indices({r.image_id: list(r.captions) for r in train.records})
    counts = [len(r.captions) for r in train.records]
    generator = torch.Generator().manual_seed(seed)
    replaced = (torch.rand(sum(counts), generator=generator) < ratio).tolist()  # (P,)
    records, rows, start = [], [], 0
    for record, count in zip(train.records, counts, strict=True):
        chosen = best[record.image_id]
        picks = [chosen if replaced[start + j] else j for j in range(count)]
        records.append(dataclasses.replace(
            record, captions=tuple(record.captions[j] for j in picks)))
        rows.extend(start + j for j in picks)
        start += count
    text = train.text_features
    if text is not None:
        text = text[torch.tensor(rows, device=text.device)]  # (P, D), each caption's own row
    changed = sum(r != j for r, j in zip(rows, range(len(rows)), strict=True))
    logger.info("consensus targets: %d of %d training captions are now their image's consensus "
                "reference (ratio %.2f)", changed, len(rows), ratio)
    return dataclasses.replace(train, records=records, text_features=text)
