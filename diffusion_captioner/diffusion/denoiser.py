"""The denoiser: a DistilBERT body that maps a noisy caption embedding to its x_0 prediction.

Inputs at one timestep: x_t (B, L, E) noisy caption embeddings, t (B,), the image feature
z_img (B, D), optionally the caption's CLIP text feature z_txt (B, D) (classifier-free guidance)
and the previous x_0 prediction (self-conditioning). The network computes::

    h_0   = x_t + W_sc x0_prev + MLP_t(sinusoid(t)) + C * x_t  (the last three optional)
    add:    h = h_0 + MLP_img(z_img) + k * MLP_txt(z_txt)      (k = 0 when the text is dropped)
    concat: h = [h_0 ; MLP_img(z_img) ; MLP_txt(z_txt)] + segment   (text token masked when dropped)
    x0_hat = LN(GELU(W_v DistilBERT(h)[:L]))                   DistilBERT's own vocab_transform + LN

so that for a pretrained DistilBERT the output already lives in its word-embedding space (E = its
``dim``). ``C * x_t`` (``neighbour_context`` w > 0) is a zero-initialised 1-D convolution over
the caption positions, width 2w + 1: each position's input also carries its neighbours' words,
so a masked position next to a committed "red" queries the image with "red" from the first
layer on, the one-hop path an autoregressive decoder has at the word before (measured on the
embedded default: no gain, README). The word embeddings and the LM head are not trained here:
the decoder owns them frozen.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    DistilBertForMaskedLM,
    PreTrainedTokenizerBase,
)

from diffusion_captioner.language_models import (
    OFFLINE_LM_CONFIGS,
    FeatureProjection,
    ProjectionName,
    build_language_model,
)

logger = logging.getLogger(__name__)

FusionName = Literal["add", "concat"]

def build_masked_lm(
    lm: str,
    pretrained: bool,
    overrides: dict[str, Any] | None,
    tokenizer: PreTrainedTokenizerBase,
    body_pretrained: bool = True,
) -> DistilBertForMaskedLM:
    """DistilBERT with its MLM head, from a hub name, a local directory or a config.

    ``pretrained``: load the checkpoint's weights (word embeddings, body, head). Otherwise build
    from ``lm``'s config (a directory's or hub model's ``config.json``, or for the names in
    :data:`OFFLINE_LM_CONFIGS` the library default, no download) with the vocabulary sized to the
    tokenizer and random weights. ``body_pretrained=False`` re-initialises the transformer body
    and head after loading, keeping only the pretrained word embeddings (the original code's
    choice). ``overrides`` are applied to the config in every case (e.g. a tiny size, dropout).
    """
    model = build_language_model(lm, pretrained, overrides, tokenizer, DistilBertForMaskedLM,
                                 OFFLINE_LM_CONFIGS, from_config=DistilBertForMaskedLM,
                                 what="DistilBERT")
    if pretrained and not body_pretrained:
        model = _random_body_with_embeddings_of(model)
    if getattr(model.config, "model_type", None) != "distilbert":
        raise ValueError(f"diffusion: {lm!r} is a {model.config.model_type}, not a DistilBERT")
    return model


def _random_body_with_embeddings_of(model: DistilBertForMaskedLM) -> DistilBertForMaskedLM:
    """A freshly initialised DistilBERT of the same config with ``model``'s word embeddings."""
    fresh = DistilBertForMaskedLM(model.config)
    with torch.no_grad():
        fresh.get_input_embeddings().weight.copy_(model.get_input_embeddings().weight)
    return fresh


class TimestepEmbedding(nn.Module):
    """``MLP(sinusoid(t))``: (B,) integer timesteps -> (B, D), the transformer-style sinusoid
    (frequencies 1 / 10000^(2i/D)) followed by Linear-SiLU-Linear; with ``zero_init`` the last
    layer starts at zero, so a pretrained body sees its usual input at initialisation."""

    def __init__(self, dim: int, steps: int, zero_init: bool = False) -> None:
        super().__init__()
        self.dim, self.steps = dim, steps
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.SiLU(), nn.Linear(4 * dim, dim))
        if zero_init:
            nn.init.zeros_(self.mlp[-1].weight)
            nn.init.zeros_(self.mlp[-1].bias)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        """(N,) timesteps -> (N, D); the MLP runs once per distinct timestep (sampling uses a
        handful: the K timesteps, or 0 and T in the refine sampler)."""
        if torch.compiler.is_compiling():  # a compiled graph wants no data-dependent shapes
            return self._embed(t)  # (N, D)
        distinct, index = torch.unique(t, return_inverse=True)  # (U,), (N,)
        return self._embed(distinct)[index]  # (N, D)

    def _embed(self, t: torch.Tensor) -> torch.Tensor:
        half = self.dim // 2
        frequencies = torch.exp(
            -math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half
        )  # (D/2,)
        angles = t.float()[:, None] * frequencies[None]  # (B, D/2)
        embedding = torch.cat([angles.sin(), angles.cos()], dim=-1)  # (B, 2*(D/2))
        if embedding.shape[-1] < self.dim:
            embedding = F.pad(embedding, (0, self.dim - embedding.shape[-1]))  # (B, D)
        return self.mlp(embedding.to(self.mlp[0].weight.dtype))  # (B, D)


class AddFusion(nn.Module):
    """Element-wise addition: the projected CLIP features are added at every caption position."""

    extra_tokens = 0

    def forward(self, h: torch.Tensor, image: torch.Tensor, text: torch.Tensor | None,
                text_keep: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``text_keep`` (B,) bool, or None: every row sees its text feature."""
        h = h + image.sum(1, keepdim=True)  # (B, L, D)
        if text is not None:
            keep = 1.0 if text_keep is None else text_keep[:, None, None].to(h.dtype)  # (B, 1, 1)
            h = h + keep * text  # (B, L, D)
        return h, None  # every position attended to


class ConcatFusion(nn.Module):
    """Concatenation: the projected CLIP features are extra tokens after the caption (k image
    tokens, one text token), told apart by a segment embedding (0: caption, 1: CLIP); a dropped
    text feature is masked out."""

    def __init__(self, dim: int, image_tokens: int = 1) -> None:
        super().__init__()
        self.segment = nn.Embedding(2, dim)
        self.extra_tokens = image_tokens + 1

    def forward(self, h: torch.Tensor, image: torch.Tensor, text: torch.Tensor | None,
                text_keep: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``text_keep`` (B,) bool, or None: every row sees its text feature (no mask to build,
        the usual case at inference). Without a text feature at all the text token is left out
        rather than masked out (the same outputs: a fully masked key adds nothing; one position
        fewer per call, e.g. 18 -> 17 at the paper's size)."""
        batch, length, _ = h.shape
        parts = [h, image] if text is None else [h, image, text]
        h = torch.cat(parts, dim=1)  # (B, L+k[+1], D)
        extra = h.shape[1] - length
        segments = torch.tensor([0] * length + [1] * extra, device=h.device)
        h = h + self.segment(segments)[None]  # (B, L+k[+1], D)
        if text_keep is None or text is None:
            return h, None
        mask = h.new_ones(h.shape[:2], dtype=torch.long)  # (B, L+k+1)
        mask[:, -1] = text_keep.long()
        return h, mask


def build_fusion(fusion: FusionName, dim: int, image_tokens: int = 1) -> nn.Module:
    """The fusion module named ``fusion``; an unknown name fails with the names that exist."""
    builders = {"add": AddFusion, "concat": lambda: ConcatFusion(dim, image_tokens)}
    if fusion not in builders:
        raise ValueError(f"unknown fusion {fusion!r}; choose one of: {', '.join(builders)}")
    return builders[fusion]()


class Denoiser(nn.Module):
    """DistilBERT x_0 predictor conditioned on CLIP features (see the module docstring).

    Args:
        mlm: the DistilBERT masked LM whose body and ``vocab_transform``/``vocab_layer_norm``
            head are used (its word embeddings and projector are the decoder's, frozen).
        feature_dim: D_clip, CLIP feature size.
        steps: T, for the timestep embedding.
        fusion: ``"add"`` or ``"concat"``.
        time_embedding: add ``MLP_t(sinusoid(t))`` to every position.
        self_conditioning: add ``W_sc x0_prev`` (zero-initialised; x0_prev = 0 when there is
            none) to the input.
        text_condition: have a text-feature slot (classifier-free guidance).
        zero_init: start the timestep MLP's last layer at zero (for a pretrained body).
        image_tokens: k, CLIP image tokens in ``concat`` fusion (a k-token prefix, as ClipCap).
        projection: ``"mlp"`` or ``"linear"``, how CLIP features become tokens.
        neighbour_context: w, add a zero-initialised convolution over the 2w + 1 nearest caption
            inputs to each position's input (0: off).
    """

    def __init__(
        self,
        mlm: DistilBertForMaskedLM,
        feature_dim: int,
        steps: int,
        fusion: FusionName = "concat",
        time_embedding: bool = True,
        self_conditioning: bool = False,
        text_condition: bool = True,
        zero_init: bool = False,
        image_tokens: int = 1,
        projection: ProjectionName = "mlp",
        neighbour_context: int = 0,
    ) -> None:
        super().__init__()
        self.mlm = mlm
        dim = mlm.config.dim
        self.dim = dim
        self.image_proj = FeatureProjection(feature_dim, dim, image_tokens, projection)
        self.text_proj = (FeatureProjection(feature_dim, dim, 1, projection)
                          if text_condition else None)
        self.time_embed = TimestepEmbedding(dim, steps, zero_init) if time_embedding else None
        if self_conditioning:
            self.self_cond_proj = nn.Linear(dim, dim)
            nn.init.zeros_(self.self_cond_proj.weight)
            nn.init.zeros_(self.self_cond_proj.bias)
        else:
            self.self_cond_proj = None
        if int(neighbour_context) < 0:
            raise ValueError(f"neighbour_context must be >= 0, got {neighbour_context}")
        self.neighbours = None
        if neighbour_context:
            width = int(neighbour_context)
            self.neighbours = nn.Conv1d(dim, dim, 2 * width + 1, padding=width)
            nn.init.zeros_(self.neighbours.weight)
            nn.init.zeros_(self.neighbours.bias)
        if image_tokens < 1 or (fusion == "add" and image_tokens != 1):
            raise ValueError(f"image_tokens must be >= 1 (and 1 with add fusion), got {image_tokens}")
        self.fusion = build_fusion(fusion, dim, image_tokens)
        positions = mlm.config.max_position_embeddings
        self.max_tokens = positions - self.fusion.extra_tokens

    def project(self, image: torch.Tensor, text: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """CLIP features -> the fusion's tokens: image (B, D_clip) -> (B, k, D); text (B, D_clip)
        -> (B, 1, D), or None without a text slot or text."""
        image_h = self.image_proj(image)  # (B, k, D)
        text_h = None
        if self.text_proj is not None and text is not None:
            text_h = self.text_proj(text)  # (B, 1, D)
        return image_h, text_h

    def forward(
        self,
        x_t: torch.Tensor,
        t: torch.Tensor,
        image: torch.Tensor,
        text: torch.Tensor | None = None,
        text_keep: torch.Tensor | None = None,
        self_cond: torch.Tensor | None = None,
        projected: tuple[torch.Tensor, torch.Tensor | None] | None = None,
        caption_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x_t (B, L, D), t (B,) or (B, L), image (B, D_clip), text (B, D_clip) or None, text_keep (B,)
        bool (which rows see their text feature; None: all), self_cond (B, L, D) or None -> x0_hat (B, L, D).

        ``projected``: :meth:`project`'s output for these image and text features, reused across
        sampling steps instead of projecting them again. ``caption_mask`` (B, L) bool: the caption
        positions other positions may attend to (None: all; the original code hides padding this
        way in training only). The CLIP tokens are always attended (the text token unless dropped).
        """
        batch, length, _ = x_t.shape
        h = x_t  # (B, L, D)
        if self.neighbours is not None:
            h = h + self.neighbours(x_t.transpose(1, 2)).transpose(1, 2)  # (B, L, D)
        if self.self_cond_proj is not None:  # no previous estimate: zeros (Chen et al. 2022),
            # so the layer is in every graph (DDP requires each parameter to get a gradient)
            previous = self_cond if self_cond is not None else torch.zeros_like(x_t)
            h = h + self.self_cond_proj(previous)  # (B, L, D)
        if self.time_embed is not None:
            if t.dim() == 1:
                h = h + self.time_embed(t)[:, None]  # (B, L, D)
            else:  # one timestep per position
                h = h + self.time_embed(t.flatten()).view(batch, length, -1)  # (B, L, D)
        image_h, text_h = projected if projected is not None else self.project(image, text)
        h, mask = self.fusion(h, image_h, text_h, text_keep)  # (B, L', D), (B, L') or None
        if caption_mask is not None:
            if mask is None:
                mask = h.new_ones(h.shape[:2], dtype=torch.long)  # (B, L')
            mask = mask.clone()
            mask[:, :length] = caption_mask.long()  # (B, L')
        hidden = self.mlm.distilbert(inputs_embeds=h, attention_mask=mask).last_hidden_state
        hidden = hidden[:, :length]  # (B, L, D)
        out = self.mlm.activation(self.mlm.vocab_transform(hidden))  # (B, L, D)
        return self.mlm.vocab_layer_norm(out)  # (B, L, D)
