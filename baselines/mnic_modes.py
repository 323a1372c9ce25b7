"""MNIC's two design choices as classes: how the image enters the masked LM, and how the caption
length is decided.

Conditioning (the projected CLIP feature ``c = P(z)``):

* ``prefix`` -- k embeddings ``c_1..c_k`` before the caption tokens, with their own segment id
  when the LM has two (BERT's token types); the caption's logits are read after them.
* ``add``    -- ``c`` added to every caption token's embedding (no extra positions).

Length:

* ``predict`` -- the caption is its n tokens; a classifier p(n | z) is trained beside the LM
  (``L_len = -log p(n | z)``) and decoding runs on the most probable lengths; padding is masked
  out of attention.
* ``fixed``   -- every caption is ``w_1..w_n [SEP] [PAD]...`` in exactly ``max_length`` positions,
  all of them targets and attended to; the predicted end token ends the caption.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar, Literal, Protocol

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

ConditioningName = Literal["prefix", "add"]
LengthModeName = Literal["predict", "fixed"]


class MaskedCaptioner(Protocol):
    """What the modes use of the decoder (``baselines.mnic.MNICDecoder``), without importing it."""

    lm: PreTrainedModel
    max_length: int
    end_token_id: int
    pad_token_id: int
    device: torch.device

    def length_logits(self, features: torch.Tensor) -> torch.Tensor: ...

    def caption_lengths(self, captions: list[str]) -> torch.Tensor: ...


# --------------------------------------------------------------------------------------------
# Conditioning
# --------------------------------------------------------------------------------------------
class Conditioning:
    """Builds the LM's input embeddings from the condition and the caption tokens."""

    name: ClassVar[str]

    def positions(self, prefix_length: int) -> int:
        """How many extra positions the condition takes (k)."""
        raise NotImplementedError

    def lm_inputs(self, decoder: MaskedCaptioner, condition: torch.Tensor, tokens: torch.Tensor,
                  attention: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
        """``condition`` (B, k or 1, E), ``tokens`` (B, T, E), ``attention`` (B, T) long ->
        input embeddings (B, k+T, E), attention (B, k+T), extra LM keyword arguments."""
        raise NotImplementedError


class PrefixConditioning(Conditioning):
    name = "prefix"

    def positions(self, prefix_length: int) -> int:
        return prefix_length

    def lm_inputs(self, decoder: MaskedCaptioner, condition: torch.Tensor, tokens: torch.Tensor,
                  attention: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
        batch, length, k = tokens.shape[0], tokens.shape[1], condition.shape[1]
        inputs = torch.cat([condition, tokens], dim=1)  # (B, k+T, E)
        attention = torch.cat([attention.new_ones((batch, k)), attention], dim=1)  # (B, k+T)
        if getattr(decoder.lm.config, "type_vocab_size", 0) < 2:
            return inputs, attention, {}
        segments = torch.cat([attention.new_zeros((batch, k)), attention.new_ones((batch, length))],
                             dim=1)  # (B, k+T): 0 for the prefix, 1 for the caption
        return inputs, attention, {"token_type_ids": segments}


class AddConditioning(Conditioning):
    name = "add"

    def positions(self, prefix_length: int) -> int:
        return 0

    def lm_inputs(self, decoder: MaskedCaptioner, condition: torch.Tensor, tokens: torch.Tensor,
                  attention: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
        return tokens + condition, attention, {}  # (B, T, E): condition broadcast over positions


CONDITIONINGS: dict[str, type[Conditioning]] = {
    cls.name: cls for cls in (PrefixConditioning, AddConditioning)
}


# --------------------------------------------------------------------------------------------
# Length
# --------------------------------------------------------------------------------------------
class LengthMode:
    """Decides what a caption target looks like and how long a generated caption is."""

    name: ClassVar[str]

    def kept_special_tokens(self, decoder: MaskedCaptioner) -> set[int]:
        """Special tokens that generation may still produce."""
        raise NotImplementedError

    def target_rows(self, decoder: MaskedCaptioner, encoded: list[list[int]]
                    ) -> tuple[list[list[int]], int, bool]:
        """Token rows, their padded width T, and whether every position (padding included) is a
        target."""
        raise NotImplementedError

    def attention(self, valid: torch.Tensor) -> torch.Tensor:
        """(B, T) bool caption positions -> (B, T) positions attended to."""
        raise NotImplementedError

    def length_loss(self, decoder: MaskedCaptioner, features: torch.Tensor, captions: list[str]
                    ) -> dict[str, torch.Tensor]:
        """The length classifier's loss parts (empty when there is none)."""
        raise NotImplementedError

    def lengths(self, decoder: MaskedCaptioner, features: torch.Tensor, beam: int) -> torch.Tensor:
        """The candidate lengths to decode per image, best first: (B, l) long."""
        raise NotImplementedError

    def sample_lengths(self, decoder: MaskedCaptioner, features: torch.Tensor,
                       pick: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """One length per row for sampling, ``pick`` drawing from the length logits: (B,) long."""
        raise NotImplementedError


class PredictedLength(LengthMode):
    name = "predict"

    def kept_special_tokens(self, decoder: MaskedCaptioner) -> set[int]:
        return set()

    def target_rows(self, decoder: MaskedCaptioner, encoded: list[list[int]]
                    ) -> tuple[list[list[int]], int, bool]:
        rows = [ids[: decoder.max_length] for ids in encoded]
        if any(len(row) == 0 for row in rows):
            raise ValueError("mnic: an empty caption has nothing to predict")
        return rows, max(len(row) for row in rows), False

    def attention(self, valid: torch.Tensor) -> torch.Tensor:
        return valid

    def length_loss(self, decoder: MaskedCaptioner, features: torch.Tensor, captions: list[str]
                    ) -> dict[str, torch.Tensor]:
        logits = decoder.length_logits(features)  # (B, max_length+1)
        targets = decoder.caption_lengths(captions)  # (B,)
        accuracy = (logits.argmax(dim=-1) == targets).float().mean()
        return {"length_loss": F.cross_entropy(logits, targets),
                "length_accuracy": accuracy.detach()}

    def lengths(self, decoder: MaskedCaptioner, features: torch.Tensor, beam: int) -> torch.Tensor:
        beam = max(1, min(int(beam), decoder.max_length))
        return decoder.length_logits(features).topk(beam, dim=-1).indices  # (B, l)

    def sample_lengths(self, decoder: MaskedCaptioner, features: torch.Tensor,
                       pick: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        return pick(decoder.length_logits(features))  # (B,), L = 0 is -inf: never drawn


class FixedLength(LengthMode):
    name = "fixed"

    def kept_special_tokens(self, decoder: MaskedCaptioner) -> set[int]:
        return {decoder.end_token_id, decoder.pad_token_id}

    def target_rows(self, decoder: MaskedCaptioner, encoded: list[list[int]]
                    ) -> tuple[list[list[int]], int, bool]:
        rows = [ids[: decoder.max_length - 1] + [decoder.end_token_id] for ids in encoded]
        return rows, decoder.max_length, True

    def attention(self, valid: torch.Tensor) -> torch.Tensor:
        return torch.ones_like(valid)

    def length_loss(self, decoder: MaskedCaptioner, features: torch.Tensor, captions: list[str]
                    ) -> dict[str, torch.Tensor]:
        return {}

    def lengths(self, decoder: MaskedCaptioner, features: torch.Tensor, beam: int) -> torch.Tensor:
        return torch.full((features.shape[0], 1), decoder.max_length, device=decoder.device)

    def sample_lengths(self, decoder: MaskedCaptioner, features: torch.Tensor,
                       pick: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        return self.lengths(decoder, features, 1)[:, 0]  # (B,): the model writes its own end


LENGTH_MODES: dict[str, type[LengthMode]] = {
    cls.name: cls for cls in (PredictedLength, FixedLength)
}
