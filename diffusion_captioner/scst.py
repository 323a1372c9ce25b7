"""Self-critical sequence training (SCST; Rennie et al. 2017): the trainer's second phase, for any
decoder that scores its own samples (``capabilities.log_probs``).

For image b with references R_b, n captions c_b1..c_bn are drawn from the decoder's sampling
distribution p_theta(. | z_b) (:meth:`~registry.CaptionDecoder.sample_with_log_probs`) and::

    r_bj = CIDEr-D(c_bj; R_b)                  idf over the training references, precomputed
                                               once (eval.cider_reward.CiderDReward)
    baseline "greedy" (Rennie et al.):  b_bj = CIDEr-D(g_b; R_b), g_b the decoder's own
                                        ``generate`` caption at the run's generation options
    baseline "mean"   (Luo 2020):       b_bj = 1 / (n - 1) sum_{k != j} r_bk
    loss = - sum_bj (r_bj - b_bj) log p_theta(c_bj | z_b) / sum_bj |c_bj|

``|c_bj|`` counts the decisions in the log-probability (tokens, and a drawn length), so the loss
is a mean per decision as in ImageCaptioning.pytorch's ``RewardCriterion``. Its gradient is
REINFORCE with a baseline: it raises the log-probability of every sample that beats its baseline
and lowers that of every sample that does not. The policy is scored without dropout (the
decoder in eval mode for the step; the optimizer still updates it). Logged each step: ``reward``
(mean r), ``baseline`` (mean b), ``beat`` (the share of samples with r > b) and, with the greedy
baseline, ``greedy_reward``. Validation (which picks ``checkpoint/best``) is minus the mean
CIDEr-D of the greedy captions of the validation images (their references, the training idf),
from step 0, the starting weights: ``checkpoint/best`` is never worse on validation than the
first phase's.

The phase is a :class:`~diffusion_captioner.trainer.Trainer` run with the :class:`SelfCritical`
objective on :class:`ImageReferences` (images, not caption pairs), starting from the first
phase's best weights, in its own folder: resumable, logged and checkpointed like the first.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from diffusion_captioner.features import SplitFeatures
from diffusion_captioner.run_folder import DecoderPlan
from diffusion_captioner.trainer import TrainConfig
from eval.cider_reward import CiderDReward
from registry import CaptionDecoder

BaselineName = Literal["greedy", "mean"]

#: The phase's optimisation defaults (any TrainConfig key in the ``scst`` block overrides them):
#: ``batch_size`` counts images, each sampled ``samples`` times. lr 3e-5 is what improved all
#: three built-in decoders on the embedded default (1e-4 and more did not: README).
PHASE_DEFAULTS: dict[str, Any] = {
    "batch_size": 16, "lr": 3e-5, "lr_schedule": "constant", "warmup_steps": 0,
    "max_steps": 1000, "epochs": None, "eval_every": 100, "eval_batches": 32, "log_every": 10,
    "checkpoint_rule": "best_val",
}
#: Keys of the ``scst`` block that are not TrainConfig keys.
OWN_KEYS = ("samples", "baseline", "sample")


@dataclass(frozen=True)
class ScstPlan:
    """A decoder's ``train.scst`` block: samples per image, the baseline, sampling options on
    top of the run's generation options, and the phase's own TrainConfig."""

    samples: int = 5
    baseline: BaselineName = "greedy"
    sample: dict[str, Any] = field(default_factory=dict)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(**PHASE_DEFAULTS))

    @classmethod
    def from_dict(cls, block: dict[str, Any], first_phase: dict[str, Any] | None = None,
                  owner: str = "decoder") -> ScstPlan:
        """Parse a ``scst`` block; the phase's seed, device and precision default to the first
        phase's. A bad key or value fails in one line naming it and the known ones."""
        if not isinstance(block, dict):
            raise ValueError(f"{owner}: train.scst must be a mapping of options, got {block!r}")
        block = dict(block)
        own = {k: block.pop(k) for k in OWN_KEYS if k in block}
        inherited = {k: v for k, v in (first_phase or {}).items()
                     if k in ("seed", "cpu", "mixed_precision")}
        try:
            train = TrainConfig.from_dict({**PHASE_DEFAULTS, **inherited, **block})
        except ValueError as error:
            raise ValueError(f"{owner}: train.scst: {error} (or one of {', '.join(OWN_KEYS)})"
                             ) from None
        if train.consensus_targets:
            raise ValueError(f"{owner}: train.scst.consensus_targets: SCST's reward scores "
                             "against every reference; set consensus_targets for the first "
                             "phase only")
        samples, baseline = own.get("samples", 5), own.get("baseline", "greedy")
        if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
            raise ValueError(f"{owner}: train.scst.samples must be an int >= 1, got {samples!r}")
        if baseline not in ("greedy", "mean"):
            raise ValueError(f"{owner}: train.scst.baseline {baseline!r}: choose greedy "
                             "(Rennie et al. 2017) or mean (Luo 2020)")
        if baseline == "mean" and samples < 2:
            raise ValueError(f"{owner}: train.scst.baseline 'mean' averages the other samples: "
                             f"it needs samples >= 2, got {samples}")
        sample = own.get("sample", {})
        if not isinstance(sample, dict):
            raise ValueError(f"{owner}: train.scst.sample must be a mapping of sampling "
                             f"options, got {sample!r}")
        return cls(samples, baseline, dict(sample), train)

    def to_dict(self) -> dict[str, Any]:
        return {"samples": self.samples, "baseline": self.baseline, "sample": self.sample,
                **dataclasses.asdict(self.train)}


class ImageReferences:
    """The images of a split, one example each: ``batch(indices)`` gives
    ``{"features": (B, D), "keys": [image id] * B}``; the references live in the reward."""

    def __init__(self, features: torch.Tensor, keys: Sequence[Hashable]) -> None:
        if len(features) != len(keys):
            raise ValueError(f"{len(features)} features for {len(keys)} images")
        self.features, self.keys = features, list(keys)  # (N, D)

    def __len__(self) -> int:
        return len(self.keys)

    def batch(self, indices: list[int]) -> dict[str, Any]:
        return {"features": self.features[torch.tensor(indices, dtype=torch.long)],
                "keys": [self.keys[i] for i in indices]}

    @classmethod
    def from_split(cls, split: SplitFeatures) -> ImageReferences:
        return cls(split.features, split.image_ids)


def references_of(split: SplitFeatures) -> dict[int, list[str]]:
    """Image id -> its reference captions."""
    return {r.image_id: list(r.captions) for r in split.records}


def training_rewards(train: SplitFeatures, val: SplitFeatures | None
                     ) -> tuple[CiderDReward, CiderDReward | None]:
    """The training split's CIDEr-D reward (its references, its idf: computed once) and the
    validation split's with the same idf (None without validation images)."""
    reward = CiderDReward(references_of(train))
    has_val = val is not None and len(val.records) > 0
    return reward, reward.with_references(references_of(val)) if has_val else None


#: The name of a decoder's SCST row: ``clipcap`` -> ``clipcap-scst``.
SCST_SUFFIX = "-scst"


def split_scst(plans: dict[str, DecoderPlan]) -> dict[str, DecoderPlan]:
    """Every plan whose ``train`` holds an ``scst`` block becomes two rows: the plain row
    (cross-entropy only, so it reuses a checkpoint trained without SCST) and ``<name>-scst``,
    the SCST phase from it; the SCST rows follow all the plain ones, in the same order."""
    plain: dict[str, DecoderPlan] = {}
    derived: dict[str, DecoderPlan] = {}
    for name, plan in plans.items():
        train = dict(plan.train)
        block = train.pop("scst", None)
        plain[name] = dataclasses.replace(plan, train=train)
        if block is None or block is False:
            continue
        row = name + SCST_SUFFIX
        if row in plans:
            raise ValueError(f"{name} has train.scst, whose row {row!r} is also a decoder of "
                             "this run; rename that decoder")
        derived[row] = dataclasses.replace(plan, train=train, scst=dict(block))
    return {**plain, **derived}


def scst_loss(log_probs: torch.Tensor, rewards: torch.Tensor, baselines: torch.Tensor,
              decisions: torch.Tensor) -> torch.Tensor:
    """``- sum (r - b) log p / sum |c|`` (module docstring): (B, n) each -> scalar; rewards and
    baselines carry no gradient."""
    advantage = (rewards - baselines).detach().to(log_probs.dtype)  # (B, n)
    return -(advantage * log_probs).sum() / decisions.sum().clamp_min(1)


def mean_of_others(rewards: torch.Tensor) -> torch.Tensor:
    """Luo's baseline: (B, n) -> (B, n), entry j the mean of row b's other n - 1 rewards."""
    n = rewards.shape[1]
    return (rewards.sum(1, keepdim=True) - rewards) / (n - 1)


class SelfCritical:
    """The SCST objective (module docstring) for :class:`~diffusion_captioner.trainer.Trainer`.

    ``reward``: CIDEr-D over the training references (idf from them); ``val_reward``: the same
    idf over the validation references; ``generate``: the run's generation options (the greedy
    baseline and validation captions); ``plan``: samples, baseline, sampling options; ``seed``:
    with the micro-batch number it seeds every draw, so a resumed phase draws the same.
    """

    progress_keys = ("reward", "baseline", "beat")
    #: the first phase's best weights are validated as step 0: they stay ``checkpoint/best``
    #: unless SCST beats them on validation
    validate_at_start = True

    def __init__(self, reward: CiderDReward, val_reward: CiderDReward | None,
                 generate: dict[str, Any], plan: ScstPlan) -> None:
        self.reward, self.val_reward = reward, val_reward
        self.generate, self.plan = dict(generate), plan
        self.sample = {**self.generate, **plan.sample}

    def _rewards(self, reward: CiderDReward, keys: Sequence[Hashable],
                 captions: Sequence[str]) -> torch.Tensor:
        return torch.as_tensor(reward(list(keys), list(captions)), dtype=torch.float32)

    def __call__(self, model: torch.nn.Module, batch: dict[str, Any],
                 draw: int) -> dict[str, torch.Tensor]:
        if hasattr(model, "module"):  # a DDP wrapper: its gradients would not be synced
            raise RuntimeError("SCST runs in one process: it calls the decoder's own methods, "
                               "which DDP does not see; run it without `accelerate launch`")
        decoder: CaptionDecoder = model
        n, keys = self.plan.samples, batch["keys"]
        generator = torch.Generator().manual_seed(self.plan.train.seed * 1_000_003 + draw)
        with decoder.evaluating():
            scored = decoder.sample_with_log_probs(batch["features"], n, generator, **self.sample)
        flat = [c for captions in scored.captions for c in captions]
        rewards = self._rewards(self.reward, [k for k in keys for _ in range(n)],
                                flat).view(-1, n)  # (B, n)
        parts: dict[str, torch.Tensor] = {}
        if self.plan.baseline == "greedy":
            greedy = decoder.generate(batch["features"], **self.generate)
            greedy_rewards = self._rewards(self.reward, keys, greedy)  # (B,)
            baselines = greedy_rewards[:, None].expand_as(rewards)  # (B, n)
            parts["greedy_reward"] = greedy_rewards.mean()
        else:
            baselines = mean_of_others(rewards)  # (B, n)
        loss = scst_loss(scored.log_probs, rewards.to(scored.log_probs.device),
                         baselines.to(scored.log_probs.device), scored.decisions)
        return {"loss": loss, "reward": rewards.mean(), "baseline": baselines.mean(),
                "beat": (rewards > baselines).float().mean(), **parts}

    def validation_loss(self, decoder: CaptionDecoder, batch: dict[str, Any]) -> tuple[float, int]:
        """(minus the summed CIDEr-D of the greedy captions, images)."""
        if self.val_reward is None:
            raise ValueError("SCST validation needs the validation references")
        captions = decoder.generate(batch["features"], **self.generate)
        rewards = self._rewards(self.val_reward, batch["keys"], captions)
        return -float(rewards.sum()), len(captions)
