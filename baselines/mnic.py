"""MNIC (Gao et al., 2019): masked non-autoregressive captioning, decoded with mask-predict.

A BERT masked language model fills in caption tokens conditioned on the projected image feature
z in R^D. The caption w_1..w_L is a sequence of L positions; training hides a random subset M of
them behind ``[MASK]`` and minimises the cross entropy of the hidden tokens only::

    r ~ U(0, 1],  |M| = clamp(ceil(r * L), 1, L),  M uniform among the L positions
    L_tok = - 1/|M| sum_{i in M} log p(w_i | z, w_{not M})          (other labels -100)

(``ceil(r L)`` for r uniform in (0, 1] is uniform over 1..L: the mask-predict scheme). The
length is predicted from the image feature by a classifier ``p(L | z)`` trained jointly,
``loss = L_tok + lambda_len * CE(p(L | z), L)``, or, with ``length_mode="fixed"``, every caption
is written into ``max_length`` positions as ``w_1..w_n [SEP] [PAD] ... [PAD]`` and the model
learns to predict the end and padding tokens at the tail itself.

The image conditions the LM either as ``prefix_length`` prefix embeddings ``P(z)`` before the
caption positions (``conditioning="prefix"``, with segment id 0 for the prefix and 1 for the
caption when the LM has two segment embeddings) or added to the input embedding of every caption
position (``conditioning="add"``: ``e_i = emb(w_i) + P(z)``). Both choices, and the two length
modes, are classes in :mod:`baselines.mnic_modes`.

Decoding is mask-predict (Ghazvininejad et al., 2019) with K passes. Pass 0 starts fully masked
at length L and predicts every position, keeping each position's probability
``p_i = max_w p(w | z, y)``. Pass t = 1..K-1 re-masks the ``n_t = floor(L (K - t) / K)`` positions
with the lowest ``p_i`` and predicts only those: their tokens and probabilities are replaced,
the others keep theirs. With ``length_beam=l`` the l most probable lengths are decoded in
parallel and the candidate with the highest mean log-probability ``1/L sum_i log p_i`` wins.

Sampling (``generate_samples``) draws instead of taking the argmax: the length
``L ~ softmax(length logits / tau)`` (``"predict"`` mode) and, at every pass, each re-masked
position's token ``w_i ~ softmax(logits_i / tau)``, with ``p_i`` the model's probability of the
drawn token (what the next pass re-masks by); no length beam.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModelForMaskedLM, PreTrainedModel, PreTrainedTokenizerBase

from baselines.mnic_modes import (
    CONDITIONINGS,
    LENGTH_MODES,
    ConditioningName,
    LengthModeName,
)
from diffusion_captioner.language_models import (
    IGNORE_INDEX,
    OFFLINE_LM_CONFIGS,
    FeatureProjection,
    SavesLanguageModel,
    build_language_model,
    check_position_limit,
    end_token_id,
    load_caption_tokenizer,
    pad_rows,
)
from diffusion_captioner.sampling import (
    check_sampling,
    draw,
    draw_log_prob,
    regroup,
    through_first_stop,
)
from diffusion_captioner.tokenization import decode_until_stop
from registry import Capabilities, CaptionDecoder, GenerationOptions, ScoredSamples

logger = logging.getLogger(__name__)




# --------------------------------------------------------------------------------------------
# Pure functions: training masks and the mask-predict schedule
# --------------------------------------------------------------------------------------------
def sample_mask(valid: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Random training mask: per row, ``clamp(ceil(r * L), 1, L)`` of its L valid positions.

    ``valid`` (B, T) bool marks the caption positions that may be masked (padding False). The
    ratio r is drawn per row uniformly in (0, 1]; the masked positions are a uniformly random
    subset of the valid ones. Rows with no valid position get no mask. Random numbers are drawn on
    the CPU (from ``generator``, or torch's default one) so a seed gives the same mask on any
    device. Returns (B, T) bool.
    """
    batch, width = valid.shape
    valid_cpu = valid.detach().to("cpu", torch.bool)  # (B, T)
    lengths = valid_cpu.sum(dim=1)  # (B,)
    ratio = 1.0 - torch.rand(batch, generator=generator)  # (B,) in (0, 1]
    count = torch.minimum(torch.ceil(ratio * lengths).long().clamp_min(1), lengths)  # (B,)
    scores = torch.rand(batch, width, generator=generator).masked_fill(~valid_cpu, 2.0)  # (B, T)
    ranks = scores.argsort(dim=1).argsort(dim=1)  # (B, T) rank of each position's score
    return ((ranks < count[:, None]) & valid_cpu).to(valid.device)  # (B, T)


def remask_counts(lengths: torch.Tensor | int, steps: int) -> torch.Tensor:
    """Mask-predict's schedule: how many positions are (re-)masked at each of K passes.

    ``n_0 = L`` (everything masked at the start), ``n_t = floor(L (K - t) / K)`` for
    t = 1..K-1, decaying linearly. ``lengths`` is an int or a (B,) tensor; returns (K,) or (K, B)
    long.
    """
    if int(steps) < 1:
        raise ValueError(f"mnic: steps must be >= 1, got {steps}")
    scalar = not torch.is_tensor(lengths)
    lengths = torch.as_tensor(lengths, dtype=torch.long).reshape(-1)  # (B,)
    t = torch.arange(int(steps), dtype=torch.long)[:, None]  # (K, 1)
    counts = torch.div(lengths[None, :] * (int(steps) - t), int(steps), rounding_mode="floor")
    return counts[:, 0] if scalar else counts  # (K,) or (K, B)


def least_confident(
    scores: torch.Tensor, valid: torch.Tensor, count: torch.Tensor
) -> torch.Tensor:
    """(B, T) bool: per row the ``count[b]`` valid positions with the lowest ``scores``.

    Ties are broken by position (lower index first), so the choice is deterministic.
    """
    width = scores.shape[1]
    ranked = scores.masked_fill(~valid, float("inf"))  # (B, T)
    order = torch.sort(ranked, dim=1, stable=True).indices  # (B, T)
    ranks = torch.empty_like(order)
    positions = torch.arange(width, device=scores.device).expand_as(order)  # (B, T)
    ranks.scatter_(1, order, positions)  # (B, T) rank of each position
    return (ranks < count[:, None].to(scores.device)) & valid  # (B, T)


# --------------------------------------------------------------------------------------------
# Tokenizer and language model
# --------------------------------------------------------------------------------------------
def build_mlm(
    lm: str,
    pretrained: bool,
    overrides: dict[str, Any] | None,
    tokenizer: PreTrainedTokenizerBase,
) -> PreTrainedModel:
    """The masked LM: pretrained weights from ``lm`` (hub name or directory), or random weights.

    Random weights (``pretrained=False``) use the config of ``lm``: a local directory's or hub
    model's ``config.json`` (its vocabulary kept, grown to fit the tokenizer if smaller), or, for
    the names in :data:`OFFLINE_LM_CONFIGS`, the library default config with no download and the
    vocabulary sized to the tokenizer. ``overrides`` are applied last in both cases.
    """
    return build_language_model(
        lm, pretrained, overrides, tokenizer, AutoModelForMaskedLM, OFFLINE_LM_CONFIGS,
        what="masked LM")


# --------------------------------------------------------------------------------------------
# The decoder
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MNICOptions(GenerationOptions):
    """MNIC's generation options.

    Attributes:
        steps: K, mask-predict passes.
        length_beam: l, the most probable lengths decoded; per image the candidate with the
            highest mean log-probability ``1/L sum_i log p_i`` is kept.
        sample_temperature: tau of ``generate_samples``: the length is drawn from
            ``softmax(length logits / tau)`` and, at every pass, each re-masked position's token
            from ``softmax(logits / tau)`` (0: argmax). ``generate`` ignores it.
    """

    steps: int = 4
    length_beam: int = 1
    sample_temperature: float = 1.0

    def __post_init__(self) -> None:
        check_sampling("mnic", self.sample_temperature)


@CaptionDecoder.register("mnic")
class MNICDecoder(SavesLanguageModel, CaptionDecoder):
    """MNIC: image-conditioned BERT, masked non-autoregressive, mask-predict refinement.

    Training masks a random fraction r ~ U(0, 1] of the caption tokens and minimises the cross
    entropy of the masked ones, ``-sum_{i in M} log p(w_i | z, w_{not M})``, plus
    ``length_loss_weight`` times the length classifier's cross entropy ``-log p(L | z)``.
    ``generate(features, steps=K)`` runs K mask-predict passes.

    Args:
        feature_dim: D, the image feature size.
        lm: masked LM (BERT family), a hub name or a local directory.
        lm_pretrained: load the LM's pretrained weights; False builds it from its config with
            random weights (the tiny embedded default).
        lm_config: overrides applied to the LM config (e.g. ``{"num_hidden_layers": 2}``).
        tokenizer: tokenizer name/path (``"embedded:NAME"`` for a packaged one); defaults to ``lm``.
        conditioning: ``"prefix"`` (k projected feature tokens before the caption) or ``"add"``
            (the projected feature added to every caption position's input embedding).
        prefix_length: k, number of prefix tokens (``"prefix"`` only).
        length_mode: ``"predict"`` (the length classifier picks L) or ``"fixed"`` (always
            ``max_length`` positions; the model predicts ``[SEP]`` then ``[PAD]`` at the tail).
        max_length: most caption positions (the end token included in ``"fixed"`` mode).
        length_loss_weight: lambda_len, weight of the length classifier's loss.
        normalize_features: L2-normalise z before the projections and the length classifier.
    """

    Options = MNICOptions
    capabilities = Capabilities(kind="iterative", trajectory=True, step_option="steps",
                                step_sweep=(1, 2, 4, 8), sampling=True,
                                log_probs=True)
    default_lm, offline_configs = "bert-base-uncased", OFFLINE_LM_CONFIGS

    def __init__(
        self,
        feature_dim: int,
        lm: str = "bert-base-uncased",
        lm_pretrained: bool = True,
        lm_config: dict[str, Any] | None = None,
        tokenizer: str | None = None,
        conditioning: ConditioningName = "prefix",
        prefix_length: int = 1,
        length_mode: LengthModeName = "predict",
        max_length: int = 24,
        length_loss_weight: float = 0.1,
        normalize_features: bool = False,
    ) -> None:
        super().__init__()
        if conditioning not in CONDITIONINGS:
            raise ValueError(
                f"mnic: unknown conditioning {conditioning!r}; choose one of: "
                f"{', '.join(CONDITIONINGS)}"
            )
        if length_mode not in LENGTH_MODES:
            raise ValueError(
                f"mnic: unknown length_mode {length_mode!r}; choose one of: "
                f"{', '.join(LENGTH_MODES)}"
            )
        if int(prefix_length) < 1 or int(max_length) < 2:
            raise ValueError("mnic: prefix_length must be >= 1 and max_length >= 2")
        self.conditioning = CONDITIONINGS[conditioning]()
        self.length_mode = LENGTH_MODES[length_mode]()
        self.prefix_length = self.conditioning.positions(int(prefix_length))
        self.max_length = int(max_length)
        self.length_loss_weight = float(length_loss_weight)
        self.normalize_features = bool(normalize_features)

        self.tokenizer = load_caption_tokenizer(tokenizer if tokenizer is not None else lm,
                                                "mnic", mask=True)
        self.lm = build_mlm(str(lm), bool(lm_pretrained), lm_config, self.tokenizer)
        self.embed_dim = self.lm.get_input_embeddings().embedding_dim
        self.project = FeatureProjection(int(feature_dim), self.embed_dim,
                                         self.prefix_length if self.prefix_length else 1,
                                         hidden=self.embed_dim)
        # p(L | z) over L = 0..max_length; L = 0 is never a target and never predicted.
        self.length_head = nn.Sequential(
            nn.Linear(int(feature_dim), self.embed_dim),
            nn.GELU(),
            nn.Linear(self.embed_dim, self.max_length + 1),
        )
        check_position_limit(self.lm, self.prefix_length + self.max_length,
                             f"mnic: prefix_length {self.prefix_length} + max_length "
                             f"{self.max_length}")
        vocab = self.lm.get_output_embeddings().out_features
        allowed = torch.zeros(vocab, dtype=torch.bool)  # (V,)
        allowed[: len(self.tokenizer)] = True
        kept = self.length_mode.kept_special_tokens(self)
        for special in self.tokenizer.all_special_ids:
            if special not in kept and special < vocab:
                allowed[special] = False
        self.register_buffer("allowed_tokens", allowed, persistent=False)

    # ---------------------------------------------------------------- pieces
    def step_modules(self) -> list[nn.Module]:
        """The BERT masked LM: called once per mask-predict pass."""
        return [self.lm]

    @property
    def mask_token_id(self) -> int:
        return int(self.tokenizer.mask_token_id)

    @property
    def pad_token_id(self) -> int:
        return int(self.tokenizer.pad_token_id)

    @property
    def end_token_id(self) -> int:
        """The caption end token of the fixed-length mode: ``[SEP]`` (else eos)."""
        return end_token_id(self.tokenizer)

    def _features(self, features: torch.Tensor) -> torch.Tensor:
        dtype = next(self.project.parameters()).dtype
        z = features.to(device=self.device, dtype=dtype)  # (B, D)
        return F.normalize(z, dim=-1) if self.normalize_features else z

    def length_logits(self, features: torch.Tensor) -> torch.Tensor:
        """``log p(L | z)`` up to a constant: (B, D) -> (B, max_length + 1); L = 0 is -inf."""
        logits = self.length_head(self._features(features)).float()  # (B, max_length+1)
        return logits.index_fill(1, torch.tensor([0], device=logits.device), float("-inf"))

    def encode_captions(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Captions -> target ids (B, T) and the positions that are caption tokens (B, T) bool.

        ``"predict"``: the tokens (no special tokens), cut to ``max_length``, right-padded with
        pad to the longest (T <= max_length); padding is not part of the caption (False).
        ``"fixed"``: ``w_1..w_n [SEP] [PAD]...`` in exactly ``max_length`` positions (n cut to
        ``max_length - 1``), every position a target (all True).
        """
        encoded = self.tokenizer(list(captions), add_special_tokens=False)["input_ids"]
        rows, width, all_targets = self.length_mode.target_rows(self, encoded)
        ids, valid = pad_rows(rows, self.pad_token_id, width)  # (B, T), (B, T)
        if all_targets:
            valid[:] = True
        return ids.to(self.device), valid.to(self.device)

    def caption_lengths(self, captions: list[str]) -> torch.Tensor:
        """Target lengths of the length classifier: token counts cut to ``max_length``, (B,)."""
        encoded = self.tokenizer(list(captions), add_special_tokens=False)["input_ids"]
        lengths = [min(max(len(ids), 1), self.max_length) for ids in encoded]
        return torch.tensor(lengths, dtype=torch.long, device=self.device)  # (B,)

    def mask_inputs(
        self, ids: torch.Tensor, valid: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Masked inputs (B, T) and labels (B, T): the masked positions' ids, -100 elsewhere."""
        masked = sample_mask(valid, generator)  # (B, T)
        inputs = ids.masked_fill(masked, self.mask_token_id)  # (B, T)
        labels = ids.masked_fill(~masked, IGNORE_INDEX)  # (B, T)
        return inputs, labels

    def token_logits(
        self, ids: torch.Tensor, attention: torch.Tensor, features: torch.Tensor
    ) -> torch.Tensor:
        """``log p(w_i | z, y)`` up to a constant at every caption position: (B, T, V).

        ``ids`` (B, T) may contain ``[MASK]``; ``attention`` (B, T) marks the positions that
        exist (length padding is 0); ``features`` (B, D).
        """
        z = self._features(features)  # (B, D)
        condition = self.project(z)  # (B, k or 1, E)
        tokens = self.lm.get_input_embeddings()(ids).to(condition.dtype)  # (B, T, E)
        inputs, attention, extra = self.conditioning.lm_inputs(
            self, condition, tokens, attention.long())  # (B, k+T, E), (B, k+T)
        logits = self.lm(inputs_embeds=inputs, attention_mask=attention, **extra).logits
        return logits[:, self.prefix_length:].float()  # (B, T, V)

    # ---------------------------------------------------------------- training
    def loss(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """``loss = L_tok + lambda_len L_len`` with every part (and the length accuracy).

        ``L_tok``: mean cross entropy over the masked caption positions only (labels -100
        elsewhere). ``L_len = -log p(L | z)`` (``"predict"`` mode; 0 in ``"fixed"`` mode).
        Outside training mode (validation) the masks come from a fixed-seed generator, so
        validation losses of different evaluations are comparable and the global RNG is untouched.
        """
        features = batch["features"]
        captions = list(batch["captions"])
        if len(captions) != features.shape[0]:
            raise ValueError(f"mnic: {features.shape[0]} features but {len(captions)} captions")
        generator = None if self.training else torch.Generator().manual_seed(0)
        ids, valid = self.encode_captions(captions)  # (B, T), (B, T)
        inputs, labels = self.mask_inputs(ids, valid, generator)  # (B, T), (B, T)
        attention = self.length_mode.attention(valid)  # (B, T)
        logits = self.token_logits(inputs, attention, features)  # (B, T, V)
        picked = labels != IGNORE_INDEX  # (B, T)
        token_loss = F.cross_entropy(logits[picked], labels[picked])  # masked positions only
        parts = {"token_loss": token_loss, **self.length_mode.length_loss(self, features, captions)}
        total = token_loss
        if "length_loss" in parts:
            total = total + self.length_loss_weight * parts["length_loss"]
        return {"loss": total, **parts}

    # ---------------------------------------------------------------- generation
    def predict_lengths(self, features: torch.Tensor, beam: int = 1) -> torch.Tensor:
        """The ``beam`` most probable lengths per image, best first: (B, l) long.

        ``"fixed"`` mode: ``max_length`` for every image (l = 1).
        """
        return self.length_mode.lengths(self, features, beam)  # (B, l)

    def mask_predict(
        self, features: torch.Tensor, lengths: torch.Tensor, steps: int,
        pick: Callable[[torch.Tensor], torch.Tensor] | None = None,
        inputs: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
    ) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
        """K mask-predict passes for N rows of given lengths.

        ``features`` (N, D), ``lengths`` (N,). Returns the tokens after every pass (K tensors of
        (N, T)), the final per-position log-probabilities (N, T) and the positions that exist
        (N, T) bool. Pass 0 masks everything; pass t re-masks the ``remask_counts`` least
        confident positions and only those get new tokens and probabilities. ``pick`` replaces
        the argmax, (N, T, V) logits -> (N, T) ids (sampling); ``p_i`` is then the drawn token's.
        ``inputs``: a list that receives every pass's (masked input (N, T), re-masked (N, T)).
        """
        rows, width = lengths.shape[0], int(lengths.max())
        positions = torch.arange(width, device=self.device)  # (T,)
        valid = positions[None, :] < lengths[:, None]  # (N, T)
        tokens = torch.full((rows, width), self.pad_token_id, device=self.device)  # (N, T)
        scores = torch.zeros((rows, width), device=self.device)  # (N, T) log p_i
        counts = remask_counts(lengths.cpu(), steps).to(self.device)  # (K, N)
        attention = self.length_mode.attention(valid)  # (N, T)
        history: list[torch.Tensor] = []
        for t in range(int(steps)):
            remask = valid if t == 0 else least_confident(scores, valid, counts[t])  # (N, T)
            tokens = tokens.masked_fill(remask, self.mask_token_id)  # (N, T)
            if inputs is not None:
                inputs.append((tokens, remask))
            logits = self.token_logits(tokens, attention, features)  # (N, T, V)
            logits = logits.masked_fill(~self.allowed_tokens, float("-inf"))  # (N, T, V)
            if pick is None:
                best_logp, best = F.log_softmax(logits, dim=-1).max(dim=-1)  # (N, T), (N, T)
            else:
                best = pick(logits)  # (N, T)
                best_logp = F.log_softmax(logits, dim=-1).gather(-1, best[..., None])[..., 0]
            tokens = torch.where(remask, best, tokens)  # (N, T)
            scores = torch.where(remask, best_logp, scores)  # (N, T)
            history.append(tokens)
        return history, scores, valid

    def decode(self, ids: torch.Tensor) -> list[str]:
        """(B, T) ids -> captions: cut at the first end/pad token, special tokens dropped."""
        return decode_until_stop(self.tokenizer, ids.tolist(),
                                 (self.end_token_id, self.pad_token_id))

    def generate_batch(self, features: torch.Tensor, options: MNICOptions) -> list[str]:
        """(B, D) features -> B captions by K = ``steps`` mask-predict passes (argmax:
        deterministic)."""
        return self._passes(features, options)[-1]

    def sample_batch(self, features: torch.Tensor, options: MNICOptions, num_samples: int,
                     generator: torch.Generator) -> list[list[str]]:
        """Per image ``num_samples`` captions: the B n rows (each image repeated n times) draw
        a length and then, at each of the K passes, the re-masked tokens (module docstring)."""
        _, _, history, _ = self._draw(features, options, num_samples, generator)
        return regroup(self.decode(history[-1]), num_samples)

    def _draw(self, features: torch.Tensor, options: MNICOptions, num_samples: int,
              generator: torch.Generator,
              passes: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
              ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor], torch.Tensor]:
        """The draws of :meth:`sample_batch`: the B n feature rows (B n, D), their drawn lengths
        (B n,), the tokens after every pass and the caption positions (:meth:`mask_predict`;
        ``passes`` receives every pass's input)."""
        if options.steps < 1:
            raise ValueError(f"mnic: steps must be >= 1, got {options.steps}")
        rows = features.to(self.device).repeat_interleave(num_samples, dim=0)  # (B n, D)

        def pick(logits: torch.Tensor) -> torch.Tensor:  # (..., V) -> (...,)
            return draw(logits, generator, options.sample_temperature)

        lengths = self.length_mode.sample_lengths(self, rows, pick)  # (B n,)
        history, _, valid = self.mask_predict(rows, lengths, options.steps, pick, passes)
        return rows, lengths, history, valid

    def scored_sample_batch(self, features: torch.Tensor, options: MNICOptions,
                            num_samples: int, generator: torch.Generator) -> ScoredSamples:
        """:meth:`sample_batch`'s draws with their log-probability: the drawn length's
        ``log p_tau(L | z)`` plus, for every position up to the end token, ``log p_tau(w_i |
        z, y^(p))`` at the pass p that wrote its final token (the last pass that re-masked it;
        with K = 1 the one pass). The K passes' inputs are known after the draw (made without
        gradients), so the log-probabilities come from one batched pass over all K of them, with
        gradients."""
        tau = options.sample_temperature
        passes: list[tuple[torch.Tensor, torch.Tensor]] = []
        with torch.no_grad():
            rows, lengths, history, valid = self._draw(features, options, num_samples,
                                                       generator, passes)
        final = history[-1]  # (B n, T)
        count, width = len(passes), final.shape[1]
        stacked = torch.cat([tokens for tokens, _ in passes])  # (K B n, T)
        attention = self.length_mode.attention(valid).repeat(count, 1)  # (K B n, T)
        logits = self.token_logits(stacked, attention, rows.repeat(count, 1))  # (K B n, T, V)
        logits = logits.masked_fill(~self.allowed_tokens, float("-inf")).view(
            count, -1, width, logits.shape[-1])  # (K, B n, T, V)
        remasked = torch.stack([mask for _, mask in passes])  # (K, B n, T)
        order = torch.arange(count, device=self.device)[:, None, None]  # (K, 1, 1)
        writer = torch.where(remasked, order, -1).amax(0)  # (B n, T): the pass that wrote it
        chosen = logits.gather(0, writer.clamp_min(0)[None, ..., None].expand(
            1, -1, -1, logits.shape[-1]))[0]  # (B n, T, V)
        logp = draw_log_prob(chosen, final, tau)  # (B n, T)
        made = through_first_stop(final, (self.end_token_id, self.pad_token_id), valid)
        total = logp.where(made, 0.0).sum(-1)  # (B n,)
        decisions = made.sum(-1)  # (B n,)
        if self.length_mode.name == "predict":
            total = total + draw_log_prob(self.length_logits(rows), lengths, tau)
            decisions = decisions + 1
        shape = (features.shape[0], num_samples)
        return ScoredSamples(regroup(self.decode(final), num_samples), total.view(shape),
                             decisions.view(shape))

    def generate_trajectory_batch(self, features: torch.Tensor,
                                  options: MNICOptions) -> list[list[str]]:
        """Per image the K captions after each pass (the last is :meth:`generate_batch`'s)."""
        return [list(captions) for captions in zip(*self._passes(features, options), strict=True)]

    def _passes(self, features: torch.Tensor, options: MNICOptions) -> list[list[str]]:
        """The captions after each of the K passes, K x B, of the best length candidate."""
        if options.steps < 1:
            raise ValueError(f"mnic: steps must be >= 1, got {options.steps}")
        batch = features.shape[0]
        lengths = self.predict_lengths(features, options.length_beam)  # (B, l)
        beam = lengths.shape[1]
        expanded = features.to(self.device).repeat_interleave(beam, dim=0)  # (B*l, D)
        history, scores, valid = self.mask_predict(expanded, lengths.reshape(-1), options.steps)
        mean_logp = (scores * valid).sum(dim=1) / valid.sum(dim=1)  # (B*l,)
        choice = mean_logp.view(batch, beam).argmax(dim=1)  # (B,)
        rows = torch.arange(batch, device=self.device) * beam + choice  # (B,)
        return [self.decode(tokens[rows]) for tokens in history]  # K x B
