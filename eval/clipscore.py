"""CLIPScore and RefCLIPScore (Hessel et al. 2021) with the run's own CLIP encoder.

For an image feature v, candidate caption c and references R (CLIP text features, l2-normalised):

    CLIP-S(c, v)       = w * max(cos(c, v), 0),                       w = 2.5
    RefCLIP-S(c, R, v) = H( CLIP-S(c, v), max(max_{r in R} cos(c, r), 0) )

where H is the harmonic mean. Reference-free: CLIP-S needs no reference captions.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F

from registry import ImageEncoder

WEIGHT = 2.5


def clip_scores(
    image_features: torch.Tensor,
    candidate_features: torch.Tensor,
    reference_features: Sequence[torch.Tensor] | None = None,
    weight: float = WEIGHT,
) -> dict[str, torch.Tensor]:
    """Per-image ``CLIPScore`` (N,) and, with references, ``RefCLIPScore`` (N,).

    ``image_features`` (N, D), ``candidate_features`` (N, D), ``reference_features`` N tensors (R_i, D).
    """
    v = F.normalize(image_features.float(), dim=-1)  # (N, D)
    c = F.normalize(candidate_features.float(), dim=-1)  # (N, D)
    clip_s = weight * (v * c).sum(-1).clamp_min(0)  # (N,)
    out = {"CLIPScore": clip_s}
    if reference_features is not None:
        ref_s = torch.stack([
            (F.normalize(r.float(), dim=-1) @ c[i]).max().clamp_min(0)  # scalar
            for i, r in enumerate(reference_features)])  # (N,)
        out["RefCLIPScore"] = 2 * clip_s * ref_s / (clip_s + ref_s).clamp_min(1e-12)  # (N,)
    return out


def score_with_encoder(
    encoder: ImageEncoder,
    image_features: torch.Tensor,
    image_ids: Sequence[int],
    results: Mapping[int, str],
    references: Mapping[int, Sequence[str]],
    prompt: str = "",
    batch_size: int = 256,
) -> dict[str, object]:
    """CLIPScore / RefCLIPScore of ``results`` (one caption per image id) with ``encoder``.

    ``prompt`` is prepended to candidates (Hessel et al. use "A photo depicts " with OpenAI CLIP;
    the embedded shapes CLIP was trained on bare captions, so it uses ""). Returns corpus means
    and per-image values.
    """
    rows = [i for i, image_id in enumerate(image_ids) if image_id in results]
    ids = [image_ids[i] for i in rows]

    def encode(texts: list[str]) -> torch.Tensor:
        return torch.cat([encoder.encode_texts(texts[s:s + batch_size]).cpu()
                          for s in range(0, len(texts), batch_size)])  # (M, D)

    candidates = encode([prompt + results[i] for i in ids])  # (N, D)
    flat = [r for i in ids for r in references[i]]
    encoded_refs = encode(flat)  # (sum R_i, D)
    sizes = [len(references[i]) for i in ids]
    per_ref = list(torch.split(encoded_refs, sizes))
    scores = clip_scores(image_features[rows], candidates, per_ref)
    return {
        **{name: float(values.mean()) for name, values in scores.items()},
        "per_image": {name: dict(zip(ids, values.tolist(), strict=True))
                      for name, values in scores.items()},
    }
