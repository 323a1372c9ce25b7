"""Sequence-level knowledge distillation (Kim and Rush 2016), the standard remedy of
non-autoregressive decoders for the multimodality of their targets.

A trained *teacher* of the same run (``clipcap``) captions every **training** image once (its
default generation options); the student trains on the training pairs with each reference
caption replaced, with probability ``ratio``, by the teacher's caption of the same image::

    caption'(image, j) = teacher(image)  with probability r, else reference_j(image)

so at r = 1 every target of an image is the teacher's one caption (a unimodal target), and at
r = 0 nothing changes. Test images never reach the teacher's pass. A distilled decoder is its own
row in the report, with the teacher's training time added to its own.

A preset declares it per decoder::

    "decoders": {"diffusion-distilled": {"decoder": {"type": "diffusion", ...},
                                         "distill": {"teacher": "clipcap", "ratio": 0.5}}}
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from diffusion_captioner.features import SplitFeatures
from diffusion_captioner.inference import generate_captions
from diffusion_captioner.trainer import CaptionPairs
from registry import CaptionDecoder

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistillPlan:
    """``teacher``: the run's decoder whose captions become targets; ``ratio``: the share of
    training pairs whose caption is replaced; ``seed``: which pairs."""

    teacher: str
    ratio: float = 1.0
    seed: int = 0

    @classmethod
    def from_dict(cls, block: dict[str, Any], owner: str) -> DistillPlan:
        unknown = sorted(set(block) - {"teacher", "ratio", "seed"})
        if unknown or "teacher" not in block:
            raise ValueError(f"{owner}: the distill block needs a teacher and takes ratio and "
                             f"seed; got {', '.join(sorted(block)) or 'nothing'}")
        plan = cls(str(block["teacher"]), float(block.get("ratio", 1.0)),
                   int(block.get("seed", 0)))
        if not 0.0 <= plan.ratio <= 1.0:
            raise ValueError(f"{owner}: distill ratio must be in [0, 1], got {plan.ratio}")
        return plan


def teacher_captions(teacher: CaptionDecoder, train: SplitFeatures,
                     options: dict[str, Any]) -> dict[int, str]:
    """The teacher's caption of every training image (``train`` must be the train split)."""
    captions, seconds = generate_captions(teacher, train.features, **options)
    logger.info("teacher captioned %d training images in %.1f s", len(captions), seconds)
    return dict(zip(train.image_ids, captions, strict=True))


def distilled_pairs(train: SplitFeatures, teacher: dict[int, str], plan: DistillPlan,
                    encoder: Any = None) -> CaptionPairs:
    """The training pairs with each caption replaced by the teacher's, with probability
    ``plan.ratio`` (seeded by ``plan.seed``). With text features (one per reference), the
    replaced rows get the CLIP text feature of the teacher's caption from ``encoder``."""
    missing = [r.image_id for r in train.records if r.image_id not in teacher]
    if missing:
        raise ValueError(f"distillation: the teacher captioned no training image {missing[0]} "
                         f"(and {len(missing) - 1} more)")
    counts = [len(r.captions) for r in train.records]
    generator = torch.Generator().manual_seed(plan.seed)
    replaced = (torch.rand(sum(counts), generator=generator) < plan.ratio).tolist()  # (P,)
    captions, index = [], 0
    for record, count in zip(train.records, counts, strict=True):
        captions.append(tuple(teacher[record.image_id] if replaced[index + j] else reference
                              for j, reference in enumerate(record.captions)))
        index += count
    text = train.text_features
    if text is not None and any(replaced):
        if encoder is None:
            raise ValueError("distillation: the student wants text features; pass the encoder")
        rows = [i for i, r in enumerate(replaced) if r]
        texts = [c for row in captions for c in row]
        with torch.no_grad():
            encoded = torch.cat([encoder.encode_texts([texts[i] for i in rows[at:at + 1024]])
                                 for at in range(0, len(rows), 1024)])  # (R, D)
        text = text.clone()
        text[torch.tensor(rows)] = encoded.to(text.device, text.dtype)
    logger.info("distillation: %d of %d training captions are the teacher's (ratio %.2f)",
                sum(replaced), len(replaced), plan.ratio)
    return CaptionPairs(train.features, captions, text)
