"""Candidate reranking by CLIPScore (Hessel et al. 2021) with the run's own encoder.

Each image has n candidate captions (a decoder's default caption and its samples); the reranked
caption is the candidate whose CLIP text feature is closest to the image feature::

    c* = argmax_c CLIP-S(c, v) = argmax_c cos(E_text(prompt + c), v)     (the first wins ties)

A reranked decoder is its own row in the report (``<decoder>+rerank``), never the headline: it
spends n candidates and a CLIP text pass per image.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from registry import ImageEncoder


def rerank_by_clipscore(encoder: ImageEncoder, image_features: torch.Tensor,
                        candidates: Sequence[Sequence[str]], prompt: str = "",
                        batch_size: int = 512) -> list[str]:
    """(N, D) image features and N candidate lists -> N captions, each the candidate with the
    highest cosine to its image in CLIP space (ties: the first; identical candidates: that
    candidate)."""
    flat = [prompt + c for row in candidates for c in row]
    with torch.no_grad():
        text = torch.cat([encoder.encode_texts(flat[s:s + batch_size]).cpu().float()
                          for s in range(0, len(flat), batch_size)])  # (sum n_i, D)
    text = F.normalize(text, dim=-1)  # (sum n_i, D)
    images = F.normalize(image_features.cpu().float(), dim=-1)  # (N, D)
    chosen, start = [], 0
    for i, row in enumerate(candidates):
        cosine = text[start:start + len(row)] @ images[i]  # (n_i,)
        chosen.append(row[int(cosine.argmax())])  # argmax returns the first maximum
        start += len(row)
    return chosen
