"""CLIP-DiffusionLM (Xu 2022) as a :class:`CaptionDecoder`, with LaDiC-style improvements as options.

A caption w_1..w_L (end token, then padding to the fixed length L) is embedded with frozen word
embeddings into x_0 (B, L, E) -- optionally standardised per dimension and scaled by ``s``::

    x_0 = s * (E[w] - mu) / sigma          (normalize_embeddings)     or   x_0 = s * E[w]

Training draws t ~ U{1..T} (N levels per caption with ``timesteps_per_caption``, the original's
``SAMPLE_SIZE``), x_t = q_sample(x_0, t, eps), and the denoiser predicts x0_hat directly
(Diffusion-LM). A position at t = T carries tau * eps (the *T state*, tau = ``temperature``),
exactly what generation starts from and what ``refine`` restarts with, so at tau = 0 it is an
absorbing zero vector. The loss, every part of which is returned for the log::

    L_simple' = sum_pos mean_dim d(x0_hat(x_t), x_0) + [x_1 term] sum_pos mean_dim d(x0_hat(x_1), x_0)
    L_R       = sum_pos CE(w, head(x0_hat(x_t))) + [x_1 term] sum_pos CE(w, head(x0_hat(x_1)))
    loss      = L_simple' + lambda L_R (+ the text prior's MSE)

with d the squared (``mse``) or absolute (``l1``) difference in standardised units (divided by
s), sums over positions and means over the batch (the original code's ``series_sum_sample_mean``),
``head(x) = (x / s * sigma + mu) E^T`` the frozen LM head tied to the word embeddings (bias 0, as in
the original), and ``lambda`` fixed or dynamic: ``lambda = C * L_simple' / L_R`` (detached) every step.

Inference starts from x_T ~ N(0, temperature^2 I) and, at K evenly spaced timesteps, predicts x_0
and moves to the next input with a sampler (:mod:`diffusion_captioner.diffusion.samplers`: x_0
fed straight back, DDIM, re-noised, or refine), optionally clamping x0_hat to the nearest word embeddings;
the last x0_hat goes through the LM head, each position takes its most probable word, and the caption
ends at the first predicted end or pad token (no de-duplication).

Sampling (``generate_samples``, n captions per image) runs the same K steps on n copies of each
image with independent noise draws (x_T and every re-noising or restart, from the caller's
seeded generator) and draws each word the decoder picks from the LM head, the final rounding
(and the refine sampler's commits and the length head's length), from softmax(logits / tau_r)
(``sample_temperature``) instead of taking the argmax. At a noise temperature of 0 (the embedded
default's T state is the zero vector) the noise draws are all zero, so the rounding temperature
is what makes the samples differ.

The ``refine`` sampler is mask-predict in continuous form (LaDiC's "back and refine" taken to every
step): after step k of K, with n the predicted length (first end/pad word), the floor((n + 1)(K - k)
/ K) least confident of the first n + 1 positions (max LM-head probability) restart from pure noise
at t = T (the T state) while all others are committed to their most probable word's clean
embedding (t = 0), so the next call fills the uncertain positions consistently with the committed
ones. It needs a denoiser that has seen per-position noise levels: ``mixed_noise`` > 0, or
``refine_noise`` > 0, which trains on exactly the inputs refine feeds.

Classifier-free guidance. In training the caption's CLIP text feature (``batch["text_features"]``)
fills the text slot and is dropped with probability ``text_dropout`` (absent text features count as
dropped). At inference there is no caption. The original code feeds a zero text feature whose
attention is masked out (so its guided branch never runs at inference); here a linear *text prior*
``z_txt_hat = P(z_img)``, trained alongside (MSE to the caption text features, DALL-E 2's prior in
miniature), fills the slot: ``x0_hat = (1 + w) f(x_t, z_img, z_txt_hat) - w f(x_t, z_img, -)``, so
w = 0 conditions on the predicted text feature and w > 0 pushes away from the image-only output.

Word embeddings without a pretrained model (the embedded default: a tiny DistilBERT over the shapes
word vocabulary) are drawn N(0, 1) and frozen like pretrained ones would be: in E = 128 dimensions
58 random vectors are nearly orthogonal, so no word can collapse onto another (the failure mode of
jointly trained diffusion embeddings that Diffusion-LM fights with its rounding loss), and the LM
head tied to them is a fixed nearest-direction classifier. ``embed_scale`` then sets how much noise
a word survives: at s = 1 a 128-d word is still recognisable at abar ~ 0.01, so almost every
training step would be spent at noise levels where the image does not matter.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

from diffusion_captioner.diffusion.denoiser import Denoiser, FusionName, build_masked_lm
from diffusion_captioner.diffusion.samplers import (
    RefineScheduleName,
    SamplerName,
    SamplingRun,
    least_confident,
    sampler_for,
)
from diffusion_captioner.diffusion.schedule import NoiseSchedule, ScheduleName
from diffusion_captioner.language_models import (
    OFFLINE_LM_CONFIGS,
    ProjectionName,
    SavesLanguageModel,
    caption_rows,
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

RestoreLoss = Literal["mse", "l1"]
PolicyCommit = Literal["predicted", "gold"]


#: Per-caption restore distance of a difference (..., L, E) -> (...,): summed over positions,
#: a mean over the E dimensions.
RESTORE_DISTANCES: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "mse": lambda gap: gap.pow(2).mean(-1).sum(-1),
    "l1": lambda gap: gap.abs().mean(-1).sum(-1),
}


def restore_loss_fn(name: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The restore loss ``d``: its per-caption distance of x_hat - x (B, L, E), meaned over B."""
    distance = RESTORE_DISTANCES[name]
    return lambda x_hat, x: distance(x_hat - x).mean()


@dataclass(frozen=True)
class DiffusionOptions(GenerationOptions):
    """The diffusion decoder's generation options.

    Attributes:
        steps: K, number of denoiser calls; at most T (a larger K runs T steps, with a warning).
        sampler: ``"feed"``, ``"ddim"``, ``"renoise"`` or ``"refine"``; see
            :mod:`diffusion_captioner.diffusion.samplers`.
        clamp: snap x0_hat to the nearest word embeddings between steps.
        guidance: w, classifier-free guidance weight (needs ``text_condition``; doubles the
            cost when non-zero).
        temperature: scale of the starting (and re-noising) Gaussian noise (default: the
            trained one; another value warns).
        seed: seeds the noise (a private generator: deterministic, global RNG untouched); None
            draws from the global RNG. ``generate_samples`` ignores it: its own seed rules.
        sample_temperature: tau_r of ``generate_samples``: every word the decoder picks from
            the LM head (the final rounding, the refine sampler's committed words and the length
            head's length) is drawn from ``softmax(logits / tau_r)`` instead of the argmax
            (0: argmax, the noise draws alone then vary the samples). ``generate`` ignores it.
        image_guidance: w', classifier-free guidance on the image (needs ``image_dropout`` in
            training): ``(1 + w') f(x_t, image) - w' f(x_t, none)``, both halves in one batched
            call.
        refine_repeats: n > 0 makes ``refine`` restart, before any other position, the second
            occurrence of every n-gram its current caption repeats (a parallel decoder naming
            one object twice); 0: off.
        refine_schedule: how many positions ``refine`` restarts after each step: ``linear``
            (mask-predict), ``cosine`` (MaskGIT) or ``threshold`` (those whose confidence is
            under ``refine_threshold``).
    """

    steps: int = 5
    sampler: SamplerName = "ddim"
    clamp: bool = False
    guidance: float = 0.0
    temperature: float | None = None
    seed: int | None = 0
    sample_temperature: float = 1.0
    refine_schedule: RefineScheduleName = "linear"
    refine_threshold: float = 0.9
    refine_repeats: int = 0
    image_guidance: float = 0.0

    def __post_init__(self) -> None:
        check_sampling("diffusion", self.sample_temperature)


@CaptionDecoder.register("diffusion")
class DiffusionDecoder(SavesLanguageModel, CaptionDecoder):
    """CLIP-DiffusionLM: a DistilBERT denoises caption word embeddings by continuous diffusion.

    Args:
        feature_dim: D, the CLIP feature size.
        lm: DistilBERT, a hub name or a local directory (weights or, unpretrained, its config).
        lm_pretrained: load its pretrained weights (word embeddings, body); False builds it from
            its config with random weights and random N(0, 1) word embeddings (frozen like
            pretrained ones: nearly orthogonal in E dims, so words stay far apart).
        body_pretrained: with ``lm_pretrained``, keep the pretrained transformer body; False
            re-initialises it and keeps only the embeddings (the original code).
        lm_config: overrides of the DistilBERT config (a tiny size, dropout, ...).
        tokenizer: tokenizer name/path (``"embedded:NAME"`` for a packaged one); default ``lm``.
        max_length: L, the fixed caption length (words + end token + padding).
        fusion: ``"add"`` (CLIP features added at every position) or ``"concat"`` (two extra
            tokens with a segment embedding).
        image_tokens: k, the image feature's tokens in ``concat`` fusion (an MLP to a k-token
            prefix, as ClipCap's mapper; the paper has 1).
        time_embedding: give the denoiser the timestep (the original code has none).
        self_conditioning: feed the previous x_0 prediction back as input (Chen et al., LaDiC);
            trained on half the batches with a no-grad first pass.
        text_condition: a text-feature slot for classifier-free guidance (and the text prior).
        text_dropout: p_uncond, the probability a row's text feature is dropped in training.
        image_dropout: the probability a training row's image feature is replaced by a learned
            "no image" feature (its text slot dropped too), for classifier-free guidance on the
            image (``image_guidance``; LaDiC uses 0.1).
        schedule: ``"linear"``, ``"cosine"`` or ``"sqrt"``; diffusion_steps: T.
        restore_loss: ``"mse"`` or ``"l1"``; x1_loss: add the x_1 restoring (and rounding) term.
        rounding_weight: lambda; dynamic_rounding: C for lambda = C * L_simple' / L_R (None: fixed).
        normalize_embeddings: standardise every embedding dimension over the vocabulary (LaDiC).
        embed_scale: s, the scale of x_0 (relative to the noise) after that.
        input_scaling: divide x_t by its standard deviation sqrt(abar s'^2 + 1 - abar) before
            the network (s' the per-dimension std of x_0), so every t gives unit-scale inputs.
        normalize_features: L2-normalise the CLIP features first, to norm ``feature_norm``
            (None: sqrt(D), unit scale per element; the original code's features are unit norm).
        projection: ``"mlp"`` or ``"linear"`` (the original's single ``nn.Linear``) from a CLIP
            feature to its tokens.
        start_token: begin every caption with the tokenizer's [CLS] (the original code's
            ``[CLS] words [SEP] [PAD]...``; L counts it).
        timesteps_per_caption: N, noise levels per caption per training step (the original's
            ``SAMPLE_SIZE = 100``): the batch becomes N x B denoiser rows and L_simple', L_R
            their mean; the x_1 term stays once per caption.
        shared_timesteps: the N timesteps are drawn once per step for the whole batch (the
            original); else per caption.
        shared_noise: each caption's one noise draw is reused at its N timesteps (the original).
        mask_padding: hide the padding positions from attention in training (the original; at
            inference every position is attended, as there).
        refine_noise: the fraction of training captions corrupted exactly as the ``refine``
            sampler feeds the denoiser: with a per-caption r ~ U(0, 1), each position of the span
            (words and end token) restarts (the T state, t = T) with probability r, every other
            position is committed (clean, t = 0).
        policy_noise: the fraction of training captions corrupted as the ``refine`` sampler
            itself would after its first step (SMART, Ghazvininejad et al. 2020): a no-grad
            first call on the caption's span at t = T, then with k ~ U{1..K-1} the
            floor(n (K - k) / K) least confident span positions restart at t = T and the others
            are committed at t = 0 (:meth:`_policy_inputs`). Restarting where the model is
            unsure, not at random positions, is what the sampler does; committing its own
            (possibly wrong) words asks it to repair them, which on the embedded default makes
            it distrust every committed word (README, issue 16). Costs one no-grad call over
            those rows.
        policy_commit: ``predicted`` (the first call's words) or ``gold`` (the caption's).
        policy_steps: K of ``policy_noise``, the sampler's step count it imitates.
        reference_selection: the fraction of training captions whose target is, instead of
            the caption their input is made of, whichever of their image's references the
            denoiser's prediction is nearest (least restore + lambda rounding loss; Shao et al.
            2022, "One Reference Is Not Enough"): each position stops being fitted to the
            average of phrasings the input does not pin down.
        learn_embeddings: train the word table (frozen by default, as in the paper) through the
            LM head's rounding loss only; inputs and restore targets read it detached, so the
            restore loss cannot pull words together (Diffusion-LM's collapse).
        neighbour_context: w > 0 adds to each caption position's denoiser input a learnt
            (zero-initialised) convolution of the 2w + 1 nearest positions' inputs
            (:class:`~diffusion_captioner.diffusion.denoiser.Denoiser`); 0: off.
        mixed_noise: the fraction of training captions whose positions get their own noise
            levels: t per caption as usual, then each position, with a per-caption probability
            q ~ U(0, 1), a lower t': 0 (clean) or, for half of them, t' ~ U{0..t-1}. Teaches the
            denoiser to fill noisy positions from cleaner ones, which the ``refine`` sampler
            relies on (0: one t per caption).
        length_head: predict the caption length n from the image (an MLP, cross-entropy part
            ``length``); half the training captions then see their end token and padding clean
            (t = 0), and generation commits the predicted end token and padding from the first
            step (as mask-predict's length prediction), so only the first n positions are
            denoised.
        temperature: tau, the scale of the noise at t = T: the input a position carries at
            t = T is tau * eps, in training (the "T state": at tau = 0 an absorbing zero
            vector, like mask-predict's [MASK]) as in generation (the start and ``refine``'s
            restarts), so the two always agree.

    Generation options (steps, sampler, clamp, guidance, temperature, seed) are
    :class:`DiffusionOptions`. Every sampler hands the denoiser inputs of a kind training produced
    at that timestep label: ``feed`` passes its own clean estimate, which no timestep label
    describes, so it needs ``time_embedding=False`` (the original code); ``refine`` needs
    per-position noise in training (``mixed_noise`` or ``refine_noise``). Other combinations
    fail when the plan is made (:meth:`check_generate_options`).
    """

    Options = DiffusionOptions
    capabilities = Capabilities(kind="iterative", trajectory=True, step_option="steps",
                                step_sweep=(1, 2, 5, 10, 20), sampling=True, log_probs=True)
    needs_text_features = True
    #: Generation options older checkpoints kept in their model config.
    LEGACY_GENERATION_KEYS = ("steps", "sampler", "clamp", "guidance")
    default_lm, offline_configs = "distilbert-base-uncased", OFFLINE_LM_CONFIGS

    @classmethod
    def uses_text_features(cls, config: dict[str, Any]) -> bool:
        """Text features feed the text slot: only with ``text_condition`` (default on)."""
        return bool(config.get("text_condition", True))

    def __init__(
        self,
        feature_dim: int,
        lm: str = "distilbert-base-uncased",
        lm_pretrained: bool = True,
        body_pretrained: bool = True,
        lm_config: dict[str, Any] | None = None,
        tokenizer: str | None = None,
        max_length: int = 16,
        fusion: FusionName = "concat",
        image_tokens: int = 1,
        time_embedding: bool = True,
        self_conditioning: bool = False,
        text_condition: bool = True,
        text_dropout: float = 0.2,
        image_dropout: float = 0.0,
        schedule: ScheduleName = "cosine",
        diffusion_steps: int = 1000,
        restore_loss: RestoreLoss = "mse",
        x1_loss: bool = True,
        rounding_weight: float = 0.3,
        dynamic_rounding: float | None = None,
        normalize_embeddings: bool = False,
        embed_scale: float = 1.0,
        input_scaling: bool = False,
        normalize_features: bool = True,
        mixed_noise: float = 0.0,
        length_head: bool = False,
        feature_norm: float | None = None,
        projection: ProjectionName = "mlp",
        start_token: bool = False,
        timesteps_per_caption: int = 1,
        shared_timesteps: bool = False,
        shared_noise: bool = False,
        mask_padding: bool = False,
        refine_noise: float = 0.0,
        policy_noise: float = 0.0,
        policy_commit: PolicyCommit = "predicted",
        policy_steps: int = 5,
        reference_selection: float = 0.0,
        learn_embeddings: bool = False,
        neighbour_context: int = 0,
        temperature: float = 1.0,
    ) -> None:
        super().__init__()
        if restore_loss not in RESTORE_DISTANCES:
            raise ValueError(f"unknown restore_loss {restore_loss!r}; choose one of: "
                             f"{', '.join(RESTORE_DISTANCES)}")
        if max_length < 2:
            raise ValueError("diffusion: max_length must be >= 2 (a word and the end token)")
        if not 0.0 <= image_dropout < 1.0:
            raise ValueError(f"diffusion: image_dropout must be in [0, 1), got {image_dropout}")
        if not 0.0 <= text_dropout <= 1.0:
            raise ValueError(f"diffusion: text_dropout must be in [0, 1], got {text_dropout}")
        if embed_scale <= 0:
            raise ValueError(f"diffusion: embed_scale must be > 0, got {embed_scale}")
        if int(timesteps_per_caption) < 1:
            raise ValueError("diffusion: timesteps_per_caption must be >= 1, got "
                             f"{timesteps_per_caption}")
        if not 0.0 <= refine_noise <= 1.0:
            raise ValueError(f"diffusion: refine_noise must be in [0, 1], got {refine_noise}")
        if temperature < 0:
            raise ValueError(f"diffusion: temperature must be >= 0, got {temperature}")
        if not 0.0 <= policy_noise <= 1.0:
            raise ValueError(f"diffusion: policy_noise must be in [0, 1], got {policy_noise}")
        if policy_commit not in ("predicted", "gold"):
            raise ValueError(f"diffusion: unknown policy_commit {policy_commit!r}; choose "
                             "predicted or gold")
        if not 0.0 <= reference_selection <= 1.0:
            raise ValueError("diffusion: reference_selection must be in [0, 1], got "
                             f"{reference_selection}")
        if int(policy_steps) < 2:
            raise ValueError(f"diffusion: policy_steps must be >= 2, got {policy_steps}")
        self.max_length = int(max_length)
        self.schedule = NoiseSchedule(schedule, diffusion_steps)
        self.restore_fn = restore_loss_fn(restore_loss)

        tokenizer_name = tokenizer if tokenizer is not None else str(lm)
        self.tokenizer = load_caption_tokenizer(tokenizer_name, "diffusion")
        mlm = build_masked_lm(str(lm), bool(lm_pretrained), lm_config, self.tokenizer,
                              body_pretrained=bool(body_pretrained))
        words = mlm.get_input_embeddings()
        if not lm_pretrained:
            # Random embeddings at unit variance per dimension (pad included), like the noise;
            # positions too, or they would vanish next to x_t in the input LayerNorm.
            with torch.no_grad():
                words.weight.normal_(0.0, 1.0)
                mlm.distilbert.embeddings.position_embeddings.weight.normal_(0.0, 1.0)
        mlm.get_output_embeddings().requires_grad_(False)  # unused: the head is E^T, bias 0
        words.weight.requires_grad_(bool(learn_embeddings))  # (tied to it in DistilBERT)
        self.denoiser = Denoiser(
            mlm, int(feature_dim), self.schedule.steps, fusion=fusion,
            time_embedding=bool(time_embedding), self_conditioning=bool(self_conditioning),
            text_condition=bool(text_condition),
            zero_init=bool(lm_pretrained and body_pretrained), image_tokens=int(image_tokens),
            projection=projection, neighbour_context=int(neighbour_context),
        )
        if start_token and self.tokenizer.cls_token_id is None:
            raise ValueError(f"diffusion: start_token needs a tokenizer with a [CLS] token; "
                             f"{tokenizer_name!r} has none")
        if start_token and self.max_length < 3:
            raise ValueError("diffusion: max_length must be >= 3 with start_token")
        if self.max_length > self.denoiser.max_tokens:
            raise ValueError(
                f"diffusion: max_length {self.max_length} plus the fusion's "
                f"{self.denoiser.fusion.extra_tokens} CLIP tokens exceeds DistilBERT's "
                f"{mlm.config.max_position_embeddings} positions"
            )
        # classifier-free guidance on the image: a learned "no image" feature replaces the
        # image (and the text slot is dropped) in an image_dropout share of training rows
        self.null_image = (torch.nn.Parameter(torch.randn(int(feature_dim)))
                           if image_dropout > 0 else None)
        self.text_prior = (
            torch.nn.Linear(int(feature_dim), int(feature_dim)) if text_condition else None
        )
        self.length_head = (
            torch.nn.Sequential(torch.nn.Linear(int(feature_dim), 256), torch.nn.GELU(),
                                torch.nn.Linear(256, self.max_length))
            if length_head else None
        )
        # Embedding statistics, saved with the weights (they follow the frozen table).
        table = words.weight.detach().float()  # (V, E)
        if normalize_embeddings:
            mean, std = table.mean(0), table.std(0).clamp(min=1e-6)  # (E,), (E,)
        else:
            mean, std = torch.zeros(table.shape[1]), torch.ones(table.shape[1])
        self.register_buffer("emb_mean", mean)
        self.register_buffer("emb_std", std)
        self.register_buffer("x0_std", ((table - mean) / std * embed_scale).std().reshape(()))
        self.register_buffer("rounding_lambda", torch.tensor(float(rounding_weight)))

    @staticmethod
    def sampler_problem(sampler: str, config: dict[str, Any],
                        temperature: float | None = None) -> str | None:
        """Why ``sampler`` would feed this configuration's denoiser inputs training never shows
        (see the class docstring), or None; ``temperature``: the one generation runs at (default
        the config's). An unknown sampler name fails listing the samplers."""
        sampler_for(sampler)
        tau = config["temperature"] if temperature is None else temperature
        if sampler == "feed" and config["time_embedding"]:
            return ("diffusion: the feed sampler hands the denoiser its own clean x_0 estimate, "
                    "which no timestep label matches in training (t = 800 means a noisy input "
                    "there); use time_embedding=False (the original code) or the ddim / renoise "
                    "sampler")
        if sampler == "ddim" and tau != 1:
            return (f"diffusion: DDIM from a start at temperature {tau:g} carries almost no noise "
                    "into its later steps, while training shows unit-variance noise at every "
                    "t < T; use temperature 1, or the renoise / refine sampler")
        if sampler == "refine" and not (config["mixed_noise"] or config["refine_noise"]
                                        or config.get("policy_noise", 0)):
            return ("diffusion: the refine sampler feeds committed words (t = 0) beside restarted "
                    "positions (t = T), which training never shows without per-position noise; "
                    "set mixed_noise, refine_noise or policy_noise > 0, or use another sampler")
        return None

    @classmethod
    def check_generate_options(cls, options: dict[str, Any],
                               config: dict[str, Any] | None = None) -> DiffusionOptions:
        """Parse the options and refuse, before any training, a sampler that would feed the
        configured denoiser inputs training never shows."""
        parsed = super().check_generate_options(options, config)
        defaults = {name: p.default for name, p in inspect.signature(cls.__init__).parameters.items()
                    if p.default is not inspect.Parameter.empty}
        full = {**defaults, **{k: v for k, v in (config or {}).items() if k != "type"}}
        problem = cls.sampler_problem(parsed.sampler, full, parsed.temperature)
        if problem:
            raise ValueError(problem)
        return parsed

    @classmethod
    def upgrade_config(cls, saved: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """Checkpoints written before the generation options left the model config kept
        ``steps``, ``sampler``, ``clamp`` and ``guidance`` in it: they become the loaded
        decoder's generation defaults."""
        arguments = {k: v for k, v in saved.items() if k not in cls.LEGACY_GENERATION_KEYS}
        return arguments, {k: saved[k] for k in cls.LEGACY_GENERATION_KEYS if k in saved}

    # ---------------------------------------------------------------- pieces
    def wrapped_lm(self) -> PreTrainedModel:
        return self.denoiser.mlm

    def step_modules(self) -> list[torch.nn.Module]:
        """The denoiser: called K times (2K with guidance) per ``generate``."""
        return [self.denoiser]

    @property
    def end_token_id(self) -> int:
        return end_token_id(self.tokenizer)

    @property
    def pad_token_id(self) -> int:
        return int(self.tokenizer.pad_token_id)

    @property
    def word_embeddings(self) -> torch.Tensor:
        """The frozen word-embedding table E (V, E)."""
        return self.denoiser.mlm.get_input_embeddings().weight

    @property
    def embed_scale(self) -> float:
        return self.hparams["embed_scale"]

    def diffusion_table(self) -> torch.Tensor:
        """Every word's x_0 vector: ``s (E - mu) / sigma`` (V, E)."""
        return (self.word_embeddings - self.emb_mean) / self.emb_std * self.embed_scale

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids (B, L) -> x_0 (B, L, E): the rows of :meth:`diffusion_table`, normalised
        after the lookup (a 30k-word table is not rebuilt for a few ids)."""
        table = self.word_embeddings.detach()  # (V, E); learnt (if at all) through the head
        return (table[ids] - self.emb_mean) / self.emb_std * self.embed_scale

    def lm_logits(self, x0: torch.Tensor) -> torch.Tensor:
        """The frozen LM head on diffusion-space vectors: ``(x / s * sigma + mu) E^T`` (B, L, V)."""
        raw = x0 / self.embed_scale * self.emb_std + self.emb_mean  # (B, L, E)
        return F.linear(raw, self.word_embeddings)  # (B, L, V); BLAS's addmm, a bit faster than @ E.T

    def encode_captions(self, captions: list[str]) -> torch.Tensor:
        """Captions -> (B, L) ids: words cut to L - 1 (L - 2 after a ``start_token``), the end
        token, then padding to L."""
        start = [int(self.tokenizer.cls_token_id)] if self.hparams["start_token"] else []
        rows = caption_rows(self.tokenizer, captions, self.max_length - 1 - len(start),
                            end=self.end_token_id, start=start)
        ids, _ = pad_rows(rows, self.pad_token_id, self.max_length)  # (B, L)
        return ids.to(self.device)  # (B, L)

    def end_positions(self, ids: torch.Tensor) -> torch.Tensor:
        """(..., L) caption ids -> (...,) the position of each caption's end token (encoded
        captions always have one: :meth:`encode_captions`)."""
        return (ids == self.end_token_id).long().argmax(-1)

    def decode(self, ids: torch.Tensor) -> list[str]:
        """(B, L) ids -> captions, each cut at its first end or pad token, specials dropped."""
        return decode_until_stop(self.tokenizer, ids.tolist(),
                                 (self.end_token_id, self.pad_token_id))

    def _features(self, features: torch.Tensor) -> torch.Tensor:
        """CLIP features, with ``normalize_features`` scaled to norm sqrt(D): unit scale per
        element, like the other inputs of the network (a unit-norm 128-d feature would enter
        at ~0.09 per element and be drowned in the input LayerNorm)."""
        z = features.to(device=self.device, dtype=self.x0_std.dtype)  # (B, D)
        if self.hparams["normalize_features"]:
            z = F.normalize(z, dim=-1) * self._feature_norm(z.shape[-1])  # (B, D)
        return z

    def _feature_norm(self, dim: int) -> float:
        norm = self.hparams["feature_norm"]
        return dim ** 0.5 if norm is None else norm

    def _input_scale(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """c_in(t) = 1 / sqrt(abar_t s'^2 + 1 - abar_t) (1 without ``input_scaling``), (B, 1, 1)
        or (B, L, 1)."""
        if not self.hparams["input_scaling"]:
            return torch.ones((like.shape[0], 1, 1), device=like.device, dtype=like.dtype)
        abar = self.schedule.abar(t, like)  # (B, 1, 1) or (B, L, 1)
        return torch.rsqrt(abar * self.x0_std**2 + 1 - abar)

    def denoise(self, x_t: torch.Tensor, t: torch.Tensor, image: torch.Tensor,
                text: torch.Tensor | None = None, text_keep: torch.Tensor | None = None,
                self_cond: torch.Tensor | None = None,
                projected: tuple[torch.Tensor, torch.Tensor | None] | None = None,
                caption_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x0_hat (B, L, E) from x_t (B, L, E) at timesteps t (B,) or (B, L) (inputs scaled by c_in);
        ``projected``: the denoiser's projections of ``image`` and ``text``, if already made;
        ``caption_mask`` (B, L): the caption positions attended to (None: all)."""
        x_in = x_t * self._input_scale(t, x_t)  # (B, L, E)
        return self.denoiser(x_in, t, image, text, text_keep, self_cond, projected,
                             caption_mask)  # (B, L, E)

    # ---------------------------------------------------------------- training
    def loss(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """The training loss and its parts (see the module docstring)."""
        captions = list(batch["captions"])
        image = self._features(batch["features"])  # (B, D)
        if len(captions) != image.shape[0]:
            raise ValueError(f"diffusion: {image.shape[0]} features but {len(captions)} captions")
        batch_size = image.shape[0]
        ids = self.encode_captions(captions)  # (B, L)

        # Training draws from the global RNG; evaluation from a fixed seed, so validation losses
        # of different steps are comparable (same t, noise and dropout for the same batch).
        generator = None if self.training else torch.Generator().manual_seed(0)

        def uniform(*shape: int) -> torch.Tensor:
            return torch.rand(shape, generator=generator).to(self.device)

        def gaussian(*shape: int) -> torch.Tensor:
            dtype = self.x0_std.dtype
            return torch.randn(shape, generator=generator).to(self.device, dtype)

        text = batch.get("text_features")
        if text is not None and self.denoiser.text_proj is not None:
            text = self._features(text)  # (B, D)
            keep = uniform(batch_size) >= self.hparams["text_dropout"]  # (B,)
        else:
            text = None
            keep = torch.zeros(batch_size, dtype=torch.bool, device=self.device)

        denoiser_image = image
        if self.null_image is not None:  # drop the image (and the text slot) in a share of rows
            image_keep = uniform(batch_size) >= self.hparams["image_dropout"]  # (B,)
            denoiser_image = torch.where(image_keep[:, None], image, self.null_image)  # (B, D)
            keep = keep & image_keep
        t = self._draw_timesteps(ids, uniform, generator)  # (N B,) or (N B, L)
        length, width = ids.shape[1], self.word_embeddings.shape[1]
        input_ids = None
        if self.hparams["policy_noise"] > 0 and t.shape[0] == batch_size:
            t, input_ids = self._policy_inputs(t, ids, denoiser_image, text, keep, uniform,
                                               gaussian)  # (B, L), (B, L)
        if self.hparams["shared_noise"]:  # one draw per caption, at each of its N timesteps
            noise = gaussian(batch_size, length, width).repeat(t.shape[0] // batch_size, 1, 1)
        else:
            noise = gaussian(t.shape[0], length, width)  # (N B, L, E)
        self_condition = self.denoiser.self_cond_proj is not None and bool(uniform(1) < 0.5)
        # the x_1 term's noise is drawn after the x_t forward (dropout draws from the same RNG)
        noise_1 = (lambda: gaussian(batch_size, length, width)) if self.hparams["x1_loss"] else None
        candidates = None
        if (self.hparams["reference_selection"] > 0 and batch.get("references") is not None
                and t.shape[0] == batch_size):
            candidates = self._candidates(batch["references"], uniform)  # (B, R, L), (B, R)
        parts = self.denoising_loss(ids, denoiser_image, text, keep, t, noise, noise_1,
                                    self_condition, input_ids, candidates)
        total = parts["loss"]
        if self.length_head is not None:
            words = self.end_positions(ids)  # (B,)
            parts["length"] = F.cross_entropy(self.length_head(image), words)
            total = total + parts["length"]
        if self.text_prior is not None:
            raw_text = batch.get("text_features")
            if raw_text is not None:
                target = self._features(raw_text)  # (B, D)
                prior = F.mse_loss(self._prior(image.detach()), target)
            else:
                prior = image.new_zeros(())
            parts["prior"] = prior
            total = total + prior
        parts["loss"] = total
        return parts

    def _draw_timesteps(self, ids: torch.Tensor, uniform, generator) -> torch.Tensor:
        """Every training row's timestep(s): (N B,) one per row, or (N B, L) one per position
        (rows n B .. n B + B - 1 hold the batch's captions at their n-th noise level).

        N = ``timesteps_per_caption`` levels t ~ U{1..T} per caption (shared by the whole batch
        with ``shared_timesteps``), then per-position levels: ``refine_noise`` rows as the refine
        sampler feeds them, ``mixed_noise`` rows lowered (:meth:`_mix_timesteps`), and with a
        length head half the rows see their end token and padding clean."""
        batch, length = ids.shape
        levels = self.hparams["timesteps_per_caption"]
        if self.hparams["shared_timesteps"]:
            t = self.schedule.sample_timesteps(levels, self.device, generator)  # (N,)
            t = t.repeat_interleave(batch)  # (N B,)
        else:
            t = self.schedule.sample_timesteps(levels * batch, self.device, generator)  # (N B,)
        ids = ids.repeat(levels, 1)  # (N B, L)
        rows = ids.shape[0]
        if self.hparams["mixed_noise"] > 0:
            t = self._mix_timesteps(t, length, uniform)  # (N B, L)
        if self.hparams["refine_noise"] > 0:
            t = self._refine_timesteps(t, ids, uniform)  # (N B, L)
        if self.length_head is not None:
            words = self.end_positions(ids)  # (N B,)
            positions = torch.arange(length, device=self.device)  # (L,)
            given = (uniform(rows) < 0.5)[:, None] & (positions[None] >= words[:, None])
            t = torch.where(given, 0, t if t.dim() == 2 else t[:, None].expand_as(ids))
        return t

    def _refine_timesteps(self, t: torch.Tensor, ids: torch.Tensor, uniform) -> torch.Tensor:
        """(R,) or (R, L) timesteps -> (R, L): in a ``refine_noise`` fraction of the rows, what
        the refine sampler feeds: each span position (words and end token) at t = T with a
        per-row probability r ~ U(0, 1), every other position clean (t = 0)."""
        rows, length = ids.shape
        chosen = uniform(rows) < self.hparams["refine_noise"]  # (R,)
        r = uniform(rows)  # (R,)
        restart = uniform(rows, length) < r[:, None]  # (R, L)
        words = self.end_positions(ids)  # (R,)
        inside = torch.arange(length, device=self.device)[None] <= words[:, None]  # (R, L)
        refine = torch.where(restart & inside, self.schedule.steps, 0)  # (R, L)
        t = t if t.dim() == 2 else t[:, None].expand(rows, length)  # (R, L)
        return torch.where(chosen[:, None], refine, t)

    def _policy_inputs(self, t: torch.Tensor, ids: torch.Tensor, image: torch.Tensor,
                       text: torch.Tensor | None, keep: torch.Tensor, uniform, gaussian
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """(B,) or (B, L) timesteps and gold ids (B, L) -> per-position timesteps (B, L) and
        input ids (B, L): in a ``policy_noise`` share of the rows, the input the ``refine``
        sampler itself makes after its first step (SMART, Ghazvininejad et al. 2020, in
        continuous form). A no-grad first call sees the span (words + end token) at t = T (the
        T state) and, with a length head, the end token and padding clean, as generation's first
        call does; then with k ~ U{1..K-1} (K = ``policy_steps``) the floor(n (K - k) / K) least
        confident of the n span positions restart at t = T and the others are committed at
        t = 0 to the word the call predicted (``policy_commit: predicted``, so the denoiser
        learns to repair its own wrong commits: every target stays the gold caption) or to the
        gold word (``gold``: only the sampler's choice of positions)."""
        rows, length = ids.shape
        steps = self.schedule.steps
        t = t if t.dim() == 2 else t[:, None].expand(rows, length)  # (B, L)
        chosen = (uniform(rows) < self.hparams["policy_noise"]).nonzero()[:, 0]  # (C,)
        if chosen.numel() == 0:
            return t, ids
        gold = ids[chosen]  # (C, L)
        positions = torch.arange(length, device=self.device)  # (L,)
        span = self.end_positions(gold) + 1  # (C,), words + end token
        inside = positions[None] < span[:, None]  # (C, L)
        first_t = torch.where(inside | (self.length_head is None), steps, 0)  # (C, L)
        noise = gaussian(chosen.numel(), length, self.word_embeddings.shape[1])  # (C, L, E)
        x_first = self.t_state(self.embed(gold), first_t, noise)  # (C, L, E): T state / clean
        with torch.no_grad():
            x0_hat = self.denoise(x_first, first_t, image[chosen],
                                  None if text is None else text[chosen],
                                  keep[chosen])  # (C, L, E)
            confidence, words = self.lm_logits(x0_hat).float().softmax(-1).max(-1)  # (C, L)
        total = int(self.hparams["policy_steps"])
        k = 1 + (uniform(chosen.numel()) * (total - 1)).long().clamp(max=total - 2)  # (C,)
        redo = span * (total - k) // total  # (C,)
        restart = least_confident(confidence, inside, redo)  # (C, L), as refine restarts
        committed = words if self.hparams["policy_commit"] == "predicted" else gold
        row_ids = torch.where(inside, committed, gold)  # (C, L): suffix stays gold
        t = t.clone()
        t[chosen] = torch.where(restart, steps, 0).to(t.dtype)  # (C, L)
        input_ids = ids.clone()  # (B, L)
        input_ids[chosen] = row_ids
        return t, input_ids

    def _candidates(self, references: list[tuple[str, ...]], uniform
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Every row's image's references as targets to select from: ids (B, R, L) and which of
        the R slots take part (B, R): all of the image's references (the row's own caption among
        them) for rows in the ``reference_selection`` share, none for the others, which keep
        their own caption."""
        rows = len(references)
        chosen = (uniform(rows) < self.hparams["reference_selection"]).tolist()  # (B,)
        width = max(len(refs) for refs in references)
        flat = [caption for refs in references for caption in refs]
        encoded = self.encode_captions(flat)  # (sum R_b, L)
        ids = encoded.new_full((rows, width, encoded.shape[1]), self.pad_token_id)  # (B, R, L)
        mask = torch.zeros(rows, width, dtype=torch.bool, device=self.device)  # (B, R)
        start = 0
        for row, refs in enumerate(references):
            ids[row, :len(refs)] = encoded[start:start + len(refs)]
            mask[row, :len(refs) if chosen[row] else 0] = True
            start += len(refs)
        return ids, mask

    def t_state(self, x_t: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Positions at t = T carry ``temperature * eps`` (the T state), as generation's start
        and the refine sampler's restarts do; q_sample's sqrt(abar_T) x_0 there is ~5e-5 x_0."""
        at_end = t == self.schedule.steps  # (R,) or (R, L)
        at_end = at_end.view(*t.shape, *([1] * (x_t.dim() - t.dim())))  # broadcastable
        return torch.where(at_end, self.hparams["temperature"] * noise, x_t)

    def denoising_loss(self, ids: torch.Tensor, image: torch.Tensor, text: torch.Tensor | None,
                       keep: torch.Tensor, t: torch.Tensor, noise: torch.Tensor,
                       noise_1: torch.Tensor | Callable[[], torch.Tensor] | None = None,
                       self_condition: bool = False,
                       input_ids: torch.Tensor | None = None,
                       candidates: tuple[torch.Tensor, torch.Tensor] | None = None,
                       ) -> dict[str, torch.Tensor]:
        """L_simple' + lambda L_R (key ``loss``) and its parts for given draws: ``ids`` (B, L),
        ``image`` (B, D), ``text`` (B, D) or None, ``keep`` (B,), ``t`` (N B,) or (N B, L) and
        ``noise`` (N B, L, E) for N noise levels per caption (row n B + b is caption b at its
        n-th level), ``noise_1`` (B, L, E) for the x_1 term, or a function drawing it when it
        is needed (None: no x_1 term). ``input_ids`` (B, L): the words the x_t inputs are
        made of, when they differ from the gold ``ids`` (the targets; :meth:`_policy_inputs`).
        ``candidates``: (ids (B, R, L), mask (B, R)) of :meth:`_candidates`: a row with any
        candidate is scored against each and trained towards the one its prediction is nearest,
        ``argmin_r d(x0_hat, x_0^r) + lambda CE(w^r, head(x0_hat))`` (reference selection, Shao
        et al. 2022), its input still made of its own caption.

        With N levels the x_t terms are means over the N B rows, i.e. the mean of the N
        single-level losses; the x_1 term is counted once per caption."""
        batch = ids.shape[0]
        levels = t.shape[0] // batch
        x0 = self.embed(ids)  # (B, L, E)
        caption_mask = None
        if self.hparams["mask_padding"]:  # [CLS] words [SEP] attended, padding hidden
            words = self.end_positions(ids)  # (B,)
            caption_mask = torch.arange(ids.shape[1], device=ids.device)[None] <= words[:, None]

        def rows(x: torch.Tensor | None) -> torch.Tensor | None:  # (B, ...) -> (N B, ...)
            if x is None or levels == 1:
                return x
            return x.repeat(levels, *([1] * (x.dim() - 1)))

        ids_n, x0_n, image_n = rows(ids), rows(x0), rows(image)  # (N B, L), (N B, L, E), (N B, D)
        source_n = x0_n if input_ids is None else rows(self.embed(input_ids))  # (N B, L, E)
        text_n, keep_n, mask_n = rows(text), rows(keep), rows(caption_mask)  # (N B, D), (N B,), (N B, L)

        x_t = self.t_state(self.schedule.q_sample(source_n, t, noise), t, noise)  # (N B, L, E)
        self_cond = None  # absent: the denoiser feeds zeros (Chen et al. 2022)
        if self.denoiser.self_cond_proj is not None and self_condition:
            with torch.no_grad():
                self_cond = self.denoise(x_t, t, image_n, text_n, keep_n,
                                         caption_mask=mask_n).detach()  # (N B, L, E)
        x0_hat = self.denoise(x_t, t, image_n, text_n, keep_n, self_cond,
                              caption_mask=mask_n)  # (N B, L, E)
        if candidates is not None and bool(candidates[1].any()):
            ids_n, x0_n = self._select_targets(x0_hat, ids_n, x0_n, *candidates)

        scale = self.embed_scale
        restore_t = self.restore_fn(x0_hat / scale, x0_n / scale)
        logits_t = self.lm_logits(x0_hat).float()  # (N B, L, V)
        rounding_t = self._rounding(logits_t, ids_n)
        with torch.no_grad():
            accuracy = (logits_t.argmax(-1) == ids_n).float().mean()
        del logits_t  # (N B, L, V) not kept alive through the x_1 forward
        parts: dict[str, torch.Tensor] = {"restore_xt": restore_t, "rounding_xt": rounding_t}
        l_simple, l_rounding = restore_t, rounding_t
        if noise_1 is not None:
            noise_1 = noise_1() if callable(noise_1) else noise_1  # (B, L, E)
            ones = torch.ones(batch, dtype=torch.long, device=self.device)  # (B,)
            x_1 = self.schedule.q_sample(x0, ones, noise_1)  # (B, L, E)
            x0_hat_1 = self.denoise(x_1, ones, image, text, keep,
                                    caption_mask=caption_mask)  # (B, L, E)
            restore_1 = self.restore_fn(x0_hat_1 / scale, x0 / scale)
            rounding_1 = self._rounding(self.lm_logits(x0_hat_1).float(), ids)
            parts.update(restore_x1=restore_1, rounding_x1=rounding_1)
            l_simple, l_rounding = l_simple + restore_1, l_rounding + rounding_1
        weight = self.rounding_lambda
        if self.hparams["dynamic_rounding"] is not None:
            if self.training:  # lambda = C * L_simple' / L_R, updated every step
                ratio = (l_simple.detach() / l_rounding.detach().clamp(min=1e-8)).float()
                self.rounding_lambda.fill_(self.hparams["dynamic_rounding"] * float(ratio))
                weight = self.rounding_lambda.clone()  # the next fill_ must not touch this graph
            else:  # validation: the fixed weight, so losses of different steps compare
                weight = torch.tensor(self.hparams["rounding_weight"], device=self.device)
        parts.update(l_simple=l_simple, l_rounding=l_rounding, rounding_lambda=weight.detach(),
                     token_accuracy=accuracy, loss=l_simple + weight * l_rounding)
        return parts

    def _select_targets(self, x0_hat: torch.Tensor, ids: torch.Tensor, x0: torch.Tensor,
                        candidate_ids: torch.Tensor, mask: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor]:
        """The targets (B, L), (B, L, E): for each row with candidates (``mask`` (B, R)), the
        candidate ``candidate_ids`` (B, R, L) of least restore + lambda rounding loss against
        ``x0_hat`` (B, L, E) (no gradient through the choice); the others keep theirs."""
        scale = self.embed_scale
        with torch.no_grad():
            x0_r = self.embed(candidate_ids)  # (B, R, L, E)
            gap = (x0_hat[:, None] - x0_r) / scale  # (B, R, L, E)
            restore = RESTORE_DISTANCES[self.hparams["restore_loss"]](gap)  # (B, R)
            log_p = self.lm_logits(x0_hat).float().log_softmax(-1)  # (B, L, V)
            ce = -log_p[:, None].expand(-1, candidate_ids.shape[1], -1, -1).gather(
                -1, candidate_ids[..., None])[..., 0].sum(-1)  # (B, R)
            total = (restore + self.rounding_lambda * ce).masked_fill(~mask, float("inf"))
            pick = total.argmin(-1)  # (B,)
            rows = torch.arange(ids.shape[0], device=ids.device)  # (B,)
            chosen = mask.any(-1)  # (B,)
            target = torch.where(chosen[:, None], candidate_ids[rows, pick], ids)  # (B, L)
        return target, torch.where(chosen[:, None, None], self.embed(target), x0)

    def _mix_timesteps(self, t: torch.Tensor, length: int, uniform) -> torch.Tensor:
        """(B,) caption timesteps -> (B, L): in a ``mixed_noise`` fraction of the captions each
        position is, with probability q ~ U(0, 1) (one q per caption), lowered to t' = 0 (clean,
        as the refine sampler's committed words) or, for half the captions, t' = floor(u t),
        u ~ U(0, 1), i.e. t' in 0..t - 1."""
        batch = t.shape[0]
        mixed = uniform(batch) < self.hparams["mixed_noise"]  # (B,)
        q = uniform(batch)  # (B,)
        lowered = uniform(batch, length) < q[:, None]  # (B, L)
        graded = uniform(batch) < 0.5  # (B,)
        cleaner = (uniform(batch, length) * t[:, None] * graded[:, None]).long()  # (B, L)
        per_position = t[:, None].expand(batch, length)  # (B, L)
        return torch.where(mixed[:, None] & lowered, cleaner, per_position)

    def _rounding(self, logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """L_R from the frozen LM head's logits (B, L, V) (:meth:`lm_logits`): CE of the gold
        words, summed over positions."""
        ce = F.cross_entropy(logits.flatten(0, 1), ids.flatten(), reduction="none")  # (B*L,)
        return ce.view(ids.shape).sum(-1).mean()

    def _prior(self, image: torch.Tensor) -> torch.Tensor:
        """The text prior's guess of the caption's (normalised) CLIP text feature, (B, D)."""
        z = self.text_prior(image)  # (B, D)
        if self.hparams["normalize_features"]:
            z = F.normalize(z, dim=-1) * self._feature_norm(z.shape[-1])  # (B, D)
        return z

    # ---------------------------------------------------------------- generation
    def sampling_run(self, timesteps: list[int], table: torch.Tensor | None,
                     lengths: torch.Tensor | None, noise: Callable[[], torch.Tensor],
                     temperature: float = 1.0, options: DiffusionOptions | None = None,
                     pick: Callable[[torch.Tensor], torch.Tensor] | None = None) -> SamplingRun:
        """What a sampler needs of this decoder for one ``generate`` call (not the decoder)."""
        options = options or DiffusionOptions()
        return SamplingRun(self.schedule, self.lm_logits, self.embed,
                           (self.end_token_id, self.pad_token_id), timesteps, table, lengths,
                           noise, temperature, pick, options.refine_schedule,
                           options.refine_threshold, options.refine_repeats)

    def _guided_x0(self, x_t: torch.Tensor, t: torch.Tensor, image: torch.Tensor,
                   text: torch.Tensor | None, guidance: float,
                   self_cond: torch.Tensor | None,
                   projected: tuple[torch.Tensor, torch.Tensor | None] | None = None,
                   image_guidance: float = 0.0) -> torch.Tensor:
        """``(1 + w) f(x_t, z_img, z_txt_hat) - w f(x_t, z_img, -)`` (text guidance, two calls);
        f(., z_img, -) without a text slot (or with no text prior). With ``image_guidance`` w'
        instead: ``(1 + w') f(x_t, z_img, z_txt_hat) - w' f(x_t, none)``, both halves in one
        batched call of 2B rows, ``projected`` then holding the 2B rows' projections (image
        rows, then the null image's). ``projected``: :meth:`Denoiser.project`'s output, made
        once per ``generate`` rather than once per step."""
        if image_guidance != 0:
            batch = x_t.shape[0]
            both = lambda x: None if x is None else torch.cat([x, x])  # noqa: E731 - (2B, ...)
            dropped = torch.arange(2 * batch, device=x_t.device) < batch  # (2B,) text kept
            out = self.denoise(both(x_t), both(t), both(image), both(text),
                               dropped if text is not None else None, both(self_cond),
                               projected)  # (2B, L, E)
            cond, uncond = out[:batch], out[batch:]  # (B, L, E) each
            return (1 + image_guidance) * cond - image_guidance * uncond
        projected = self.denoiser.project(image, text) if projected is None else projected
        if text is None:
            return self.denoise(x_t, t, image, None, None, self_cond, projected)
        cond = self.denoise(x_t, t, image, text, None, self_cond, projected)  # (B, L, E)
        if guidance == 0:
            return cond
        dropped = torch.zeros(image.shape[0], dtype=torch.bool, device=image.device)  # (B,)
        uncond = self.denoise(x_t, t, image, text, dropped, self_cond, projected)  # (B, L, E)
        return (1 + guidance) * cond - guidance * uncond

    def _projections(self, image: torch.Tensor, text: torch.Tensor | None,
                     image_guidance: float) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The denoiser's projections of the condition, made once per ``generate``; with image
        guidance those of the guided pair's 2B rows (the images, then the null image's)."""
        if image_guidance == 0:
            return self.denoiser.project(image, text)
        null = self.null_image.to(image.dtype).expand_as(image)  # (B, D)
        return self.denoiser.project(torch.cat([image, null]),
                                     None if text is None else torch.cat([text, text]))

    def generate_batch(self, features: torch.Tensor, options: DiffusionOptions) -> list[str]:
        """(B, D) features -> B captions by K-step diffusion sampling (:class:`DiffusionOptions`)."""
        return self._sample(features, options, trajectory=False)

    def generate_trajectory_batch(self, features: torch.Tensor,
                                  options: DiffusionOptions) -> list[list[str]]:
        """Per image, the K captions after steps 1..K (the last is :meth:`generate_batch`'s)."""
        return self._sample(features, options, trajectory=True)

    def sample_batch(self, features: torch.Tensor, options: DiffusionOptions, num_samples: int,
                     generator: torch.Generator) -> list[list[str]]:
        """Per image ``num_samples`` captions: the K steps on the B n rows (each image repeated
        n times) with noise from ``generator`` and words drawn at ``sample_temperature`` (module
        docstring)."""
        rows = features.repeat_interleave(num_samples, dim=0)  # (B n, D)

        def pick(logits: torch.Tensor) -> torch.Tensor:  # (..., V) -> (...,)
            return draw(logits, generator, options.sample_temperature)

        captions = self._sample(rows, options, trajectory=False, generator=generator, pick=pick)
        return regroup(captions, num_samples)

    def scored_sample_batch(self, features: torch.Tensor, options: DiffusionOptions,
                            num_samples: int, generator: torch.Generator) -> ScoredSamples:
        """:meth:`sample_batch`'s draws with their log-probability at the rounding step: with
        x0_hat the last denoiser call's output and L the drawn length,
        ``log p(c) = log p_tau(L | z) + sum_{i <= L} log softmax(head(x0_hat_i) / tau)(w_i)``
        (the end token at i = L is committed with the length, so it adds nothing). The K steps
        run without gradients; the last denoiser call is made again from its recorded input,
        with them: the gradient reaches the denoiser through its final call only."""
        tau = options.sample_temperature
        rows = features.repeat_interleave(num_samples, dim=0)  # (B n, D)

        def pick(logits: torch.Tensor) -> torch.Tensor:  # (..., V) -> (...,)
            return draw(logits, generator, tau)

        last: dict[str, Any] = {}
        with torch.no_grad():
            captions = self._sample(rows, options, trajectory=False, generator=generator,
                                    pick=pick, last_call=last)
        image = self._features(rows)  # (B n, D)
        text = self._prior(image) if self.text_prior is not None else None
        x0_hat = self._guided_x0(last["x_t"], last["t"], image, text, options.guidance,
                                 last["self_cond"],
                                 self._projections(image, text, options.image_guidance),
                                 options.image_guidance)  # (B n, L, E)
        ids = last["ids"]  # (B n, L)
        logp = draw_log_prob(self.lm_logits(x0_hat), ids, tau)  # (B n, L)
        if last["lengths"] is not None:
            positions = torch.arange(self.max_length, device=self.device)  # (L,)
            made = positions[None] < last["lengths"][:, None]  # (B n, L)
            total = logp.where(made, 0.0).sum(-1) + draw_log_prob(self.length_head(image),
                                                          last["lengths"], tau)  # (B n,)
            decisions = made.sum(-1) + 1  # (B n,)
        else:
            made = through_first_stop(ids, (self.end_token_id, self.pad_token_id))  # (B n, L)
            total, decisions = logp.where(made, 0.0).sum(-1), made.sum(-1)  # (B n,), (B n,)
        shape = (features.shape[0], num_samples)
        return ScoredSamples(regroup(captions, num_samples), total.view(shape),
                             decisions.view(shape))

    def _sample(self, features: torch.Tensor, options: DiffusionOptions, trajectory: bool,
                generator: torch.Generator | None = None,
                pick: Callable[[torch.Tensor], torch.Tensor] | None = None,
                last_call: dict[str, Any] | None = None,
                ) -> list[str] | list[list[str]]:
        """The K steps. ``generator``: the noise's (else one seeded with ``options.seed``);
        ``pick``: (..., V) logits -> (...,) ids in place of every argmax over the LM head and
        the length head (sampling); ``last_call``: a dict that receives the last denoiser
        call's inputs (``x_t``, ``t``, ``self_cond``), the drawn ``lengths`` (or None) and the
        rounded ``ids``."""
        cfg = self.hparams
        k, w, mode, snap = options.steps, options.guidance, options.sampler, options.clamp
        tau = float(cfg["temperature"] if options.temperature is None else options.temperature)
        seed, return_trajectory = options.seed, trajectory
        problem = self.sampler_problem(mode, cfg, tau)
        if problem and self.generation_defaults.get("sampler") != mode:  # asked for: refused
            raise ValueError(problem)
        if problem:  # a checkpoint trained before the check, with its saved sampler: it says so
            logger.warning("%s", problem)
        stepper = sampler_for(mode)
        if tau != cfg["temperature"]:
            logger.warning("diffusion: temperature %.2f differs from the %.2f this denoiser was "
                           "trained with at t = T: its start (and refine's restarts) carry inputs "
                           "training never showed", tau, cfg["temperature"])
        if k < 1:
            raise ValueError(f"diffusion: steps must be >= 1, got {k}")
        if k > self.schedule.steps:
            logger.warning("diffusion: %d steps asked, the schedule has T = %d: running %d", k,
                           self.schedule.steps, self.schedule.steps)
            k = self.schedule.steps
        w_image = options.image_guidance
        if w_image != 0 and self.null_image is None:
            raise ValueError("diffusion: image_guidance needs a model trained with "
                             "image_dropout > 0 (it learns the no-image condition)")
        if w_image != 0 and w != 0:
            raise ValueError("diffusion: use guidance (text) or image_guidance, not both")
        if w != 0 and self.text_prior is None:
            logger.warning("diffusion: guidance %.2f ignored: the model has no text condition "
                           "(text_condition=False)", w)
        batch = features.shape[0]
        image = self._features(features)  # (B, D)
        text = self._prior(image) if self.text_prior is not None else None
        projected = self._projections(image, text, w_image)  # the same for every step
        if generator is None and seed is not None:
            generator = torch.Generator().manual_seed(int(seed))
        choose = pick if pick is not None else (lambda logits: logits.argmax(-1))
        shape = (batch, self.max_length, self.word_embeddings.shape[1])

        def gaussian() -> torch.Tensor:  # unit N(0, I); the T state is tau times it
            return torch.randn(shape, generator=generator).to(self.device, image.dtype)

        table = self.diffusion_table() if snap else None
        timesteps = self.schedule.inference_timesteps(k)
        x_t = tau * gaussian()  # (B, L, E), the T state
        t = torch.full((batch,), timesteps[0], dtype=torch.long, device=self.device)  # (B,)
        lengths, suffix, suffix_ids = None, None, None
        if self.length_head is not None:  # commit the end token and padding up front
            lengths = choose(self.length_head(image))  # (B,)
            positions = torch.arange(self.max_length, device=self.device)  # (L,)
            suffix = positions[None] >= lengths[:, None]  # (B, L)
            suffix_ids = torch.where(positions[None] == lengths[:, None], self.end_token_id,
                                     self.pad_token_id)  # (B, L)
            clean_suffix = self.embed(suffix_ids)  # (B, L, E)
        run = self.sampling_run(timesteps, table, lengths, gaussian, tau, options, pick)
        x0_hat, previous = x_t, None
        per_step: list[list[str]] = []
        for i in range(len(timesteps)):
            if suffix is not None:
                x_t = torch.where(suffix[..., None], clean_suffix, x_t)  # (B, L, E)
                t = torch.where(suffix, 0, t if t.dim() == 2 else t[:, None].expand_as(suffix))
            x0_hat = self._guided_x0(x_t, t, image, text, w, previous, projected,
                                     w_image)  # (B, L, E)
            if return_trajectory:
                step_ids = self.lm_logits(x0_hat).argmax(-1)  # (B, L)
                if suffix is not None:
                    step_ids = torch.where(suffix, suffix_ids, step_ids)
                per_step.append(self.decode(step_ids))
            if i + 1 == len(timesteps):
                break
            previous = x0_hat
            x_t, t = stepper.next_input(run, x0_hat, x_t, t, i + 1)  # (B, L, E), (B[, L])
        ids = choose(self.lm_logits(x0_hat))  # (B, L), the rounding
        if suffix is not None:
            ids = torch.where(suffix, suffix_ids, ids)  # (B, L)
        if last_call is not None:
            last_call.update(x_t=x_t, t=t, self_cond=previous, lengths=lengths, ids=ids)
        if return_trajectory:
            return [list(captions) for captions in zip(*per_step, strict=True)]
        return self.decode(ids)
