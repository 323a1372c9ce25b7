"""The language-model plumbing every decoder wrapping a transformers LM shares.

- the caption tokenizer: :func:`load_caption_tokenizer` (under the hub guard, with the special
  tokens a decoder needs), :func:`end_token_id`, :func:`caption_rows` and :func:`pad_rows`
  (encode with an end token and padding; decoding until a stop token is
  :func:`~diffusion_captioner.tokenization.decode_until_stop`);
- :class:`FeatureProjection`, a CLIP feature to k tokens of the LM's width;
- the LM itself: :func:`build_language_model` over :data:`OFFLINE_LM_CONFIGS`, the
  position-limit check :func:`check_position_limit`, and :class:`SavesLanguageModel`'s
  checkpoint hooks;
- :data:`IGNORE_INDEX`, the label of positions the loss skips.

Every decoder that wraps a transformers model (GPT-2 in ``clipcap``, BERT in ``mnic``,
DistilBERT in ``diffusion``) builds it the same way:

- ``pretrained=True``: ``AutoConfig.from_pretrained(lm)`` with the overrides applied, then the
  model class's ``from_pretrained(lm, config=config)`` (hub name or directory);
- ``pretrained=False``: random weights over ``lm``'s architecture: a local directory's or hub
  model's ``config.json`` (its vocabulary kept, grown to fit the tokenizer if smaller), or, for a
  name in the decoder's ``offline_configs``, the library's default config (no download) with
  the vocabulary sized to the tokenizer; the tokenizer's special-token ids fill the config's.

``overrides`` (a tiny size, dropout, ...) are applied last in both cases and must be keys the
config has. Loading goes through :func:`diffusion_captioner.hub.hf_access`: offline and
uncached, a hub name fails at once in one line.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from transformers import (
    AutoConfig,
    BertConfig,
    DistilBertConfig,
    GPT2Config,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from diffusion_captioner.errors import ComponentError
from diffusion_captioner.hub import hf_access
from diffusion_captioner.tokenization import load_tokenizer, read_tokenizer, with_special_tokens

logger = logging.getLogger(__name__)

#: The label of positions a cross-entropy loss skips (prefix, padding): never a real token id.
IGNORE_INDEX = -100

#: LM names whose architecture is known without a download, for ``lm_pretrained=False``: the
#: library default configs are the 124M "gpt2", the 110M "bert-base-uncased" and the
#: "distilbert-base-uncased" architectures.
OFFLINE_LM_CONFIGS: dict[str, type[PretrainedConfig]] = {
    "gpt2": GPT2Config, "openai-community/gpt2": GPT2Config,
    "bert-base-uncased": BertConfig, "google-bert/bert-base-uncased": BertConfig,
    "distilbert-base-uncased": DistilBertConfig,
    "distilbert/distilbert-base-uncased": DistilBertConfig,
}

ProjectionName = Literal["mlp", "linear"]


# --------------------------------------------------------------------------------------------
# The caption tokenizer
# --------------------------------------------------------------------------------------------
def load_caption_tokenizer(name: str, owner: str, mask: bool = False,
                           pad: Literal["add", "eos"] = "add") -> PreTrainedTokenizerBase:
    """Any form :func:`~diffusion_captioner.tokenization.read_tokenizer` reads, loaded under the
    hub guard (offline: one line, never a hang), with a pad token (and, ``mask``, a mask token)
    added when missing, as in a GPT-2 BPE folder; ``pad="eos"`` pads with the eos token instead
    (:func:`~diffusion_captioner.tokenization.load_tokenizer`: GPT-2's own way). It needs an end
    token ([SEP], else eos: BERT tokenizers have no eos); ``owner`` names the decoder in the
    error."""
    with hf_access(name, "tokenizer"):
        tokenizer = (load_tokenizer(name) if pad == "eos" else
                     with_special_tokens(read_tokenizer(name), pad=True, mask=mask))
    missing = [what for what, token in (("a mask token", tokenizer.mask_token if mask else ""),
                                        ("a pad token", tokenizer.pad_token),
                                        ("an end token (sep or eos)",
                                         tokenizer.sep_token or tokenizer.eos_token))
               if token is None]
    if missing:
        raise ComponentError(f"{owner}: tokenizer {name!r} has no {' and no '.join(missing)}")
    return tokenizer


def end_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The caption end token: [SEP], else eos."""
    sep = tokenizer.sep_token_id
    return int(sep if sep is not None else tokenizer.eos_token_id)


def caption_rows(tokenizer: PreTrainedTokenizerBase, captions: Sequence[str], words: int,
                 end: int | None = None, start: Sequence[int] = ()) -> list[list[int]]:
    """Each caption's ids without special tokens, cut to ``words``, between ``start`` and the
    ``end`` token (none when None)."""
    encoded = tokenizer(list(captions), add_special_tokens=False)["input_ids"]
    tail = [] if end is None else [int(end)]
    return [[*start, *ids[:words], *tail] for ids in encoded]


def pad_rows(rows: Sequence[Sequence[int]], pad: int, width: int | None = None
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of ids -> right-padded ids (B, T) and the mask of real positions (B, T) bool;
    T = ``width`` or the longest row."""
    width = max(len(row) for row in rows) if width is None else width
    ids = torch.full((len(rows), width), int(pad), dtype=torch.long)  # (B, T)
    valid = torch.zeros((len(rows), width), dtype=torch.bool)  # (B, T)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(list(row), dtype=torch.long)
        valid[i, : len(row)] = True
    return ids, valid


# --------------------------------------------------------------------------------------------
# The image feature as LM input
# --------------------------------------------------------------------------------------------
class FeatureProjection(nn.Module):
    """A CLIP feature (B, D_clip) -> k tokens of the LM's width (B, k, D): an MLP
    ``W_2 GELU(W_1 z)`` with ``hidden`` units (default k D; ClipCap's prefix idea: k > 1 gives
    the image several slots) or, ``kind="linear"``, a single ``W z + b`` (the original
    CLIP-DiffusionLM code's ``nn.Linear(512, 768)``)."""

    def __init__(self, feature_dim: int, dim: int, tokens: int = 1,
                 kind: ProjectionName = "mlp", hidden: int | None = None) -> None:
        super().__init__()
        self.tokens, self.dim = tokens, dim
        hidden = tokens * dim if hidden is None else hidden
        if kind == "linear":
            self.net = nn.Sequential(nn.Linear(feature_dim, tokens * dim))
        elif kind == "mlp":
            self.net = nn.Sequential(nn.Linear(feature_dim, hidden), nn.GELU(),
                                     nn.Linear(hidden, tokens * dim))
        else:
            raise ValueError(f"unknown projection {kind!r}; choose one of: mlp, linear")

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z).view(z.shape[0], self.tokens, self.dim)  # (B, k, D)


# --------------------------------------------------------------------------------------------
# The language model
# --------------------------------------------------------------------------------------------
def check_position_limit(model: PreTrainedModel, needed: int, what: str) -> None:
    """Refuse ``needed`` positions (``what`` says of what) beyond the LM's position table."""
    positions = getattr(model.config, "max_position_embeddings", None)
    if positions is not None and needed > positions:
        raise ValueError(f"{what} exceeds the LM's {positions} positions")


def update_config(config: PretrainedConfig, overrides: Mapping[str, Any], lm: str) -> None:
    """Apply ``overrides`` to ``config``; an unknown key fails naming the model and the keys."""
    unknown = sorted(key for key in overrides if not hasattr(config, key))
    if unknown:
        raise ValueError(f"lm_config for {lm!r}: unknown {config.model_type} config keys {unknown}")
    config.update(dict(overrides))


def random_weights_config(
    lm: str,
    offline_configs: Mapping[str, type[PretrainedConfig]],
    tokenizer: PreTrainedTokenizerBase,
    overrides: Mapping[str, Any] | None = None,
    token_ids: Sequence[str] = ("pad_token_id",),
) -> PretrainedConfig:
    """The config of a randomly initialised ``lm`` (see the module docstring).

    ``token_ids``: config attributes (``pad_token_id``, ``eos_token_id``, ...) set from the
    tokenizer's same-named attribute unless overridden or the tokenizer has none.
    """
    overrides = dict(overrides or {})
    from_file = Path(lm).expanduser().is_dir() or lm not in offline_configs
    config = AutoConfig.from_pretrained(lm) if from_file else offline_configs[lm]()
    if "vocab_size" not in overrides:
        overrides["vocab_size"] = (
            max(config.vocab_size, len(tokenizer)) if from_file else len(tokenizer)
        )
    for key in token_ids:
        value = getattr(tokenizer, key, None)
        if key not in overrides and value is not None:
            overrides[key] = value
    update_config(config, overrides, lm)
    return config


def build_language_model(
    lm: str,
    pretrained: bool,
    overrides: Mapping[str, Any] | None,
    tokenizer: PreTrainedTokenizerBase,
    model_class: Any,
    offline_configs: Mapping[str, type[PretrainedConfig]],
    token_ids: Sequence[str] = ("pad_token_id",),
    from_config: Callable[[PretrainedConfig], PreTrainedModel] | None = None,
    what: str = "language model",
) -> PreTrainedModel:
    """``model_class`` (an ``Auto*`` class or a concrete one) over ``lm``, pretrained or random.

    ``from_config`` builds the random model (default ``model_class.from_config``, which concrete
    classes lack: pass the class itself). ``what`` names the model in errors ("causal LM",
    ...). The embeddings grow to the tokenizer if it is larger;
    the model is returned in float32.
    """
    overrides = dict(overrides or {})
    needs_hub = pretrained or lm not in offline_configs  # else a built-in config: no file at all
    with hf_access(lm, what, download=needs_hub):  # fails fast offline, never hangs
        if pretrained:
            config = AutoConfig.from_pretrained(lm)
            update_config(config, overrides, lm)
            logger.info("loading pretrained %s %s", config.model_type, lm)
            model = model_class.from_pretrained(lm, config=config)
        else:
            config = random_weights_config(lm, offline_configs, tokenizer, overrides, token_ids)
            logger.info("building %s %s with random weights", config.model_type, lm)
            model = (from_config or model_class.from_config)(config)
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer))
    return model.float()


class SavesLanguageModel:
    """Checkpoint hooks for a decoder wrapping a transformers LM built by
    :func:`build_language_model` from the constructor arguments ``lm``, ``lm_pretrained``,
    ``lm_config`` and ``tokenizer``.

    ``save_extra`` keeps the tokenizer files (``tokenizer/``) and the LM's config (``lm/``) beside
    the weights; ``checkpoint_overrides`` rebuilds from them with random weights (then replaced by
    the checkpoint's), so loading a checkpoint never needs the hub. The wrapped model is
    ``self.lm`` unless a subclass overrides :meth:`wrapped_lm`.
    """

    tokenizer: PreTrainedTokenizerBase
    #: The ``lm`` default and the names whose architecture is known without a download.
    default_lm: str = ""
    offline_configs: Mapping[str, type[PretrainedConfig]] = OFFLINE_LM_CONFIGS

    @classmethod
    def hub_models(cls, config: dict[str, Any]) -> list[tuple[str, str]]:
        """The tokenizer (``tokenizer``, else ``lm``) and, when pretrained or its architecture
        is not built in, the LM itself."""
        lm = str(config.get("lm") or cls.default_lm)
        if not lm:  # a plugin that names no default: nothing known to check
            return []
        pretrained = bool(config.get("lm_pretrained", True))
        names = [(str(config.get("tokenizer") or lm), "tokenizer")]
        if pretrained or lm not in cls.offline_configs:
            names.append((lm, "model"))
        return names

    def wrapped_lm(self) -> PreTrainedModel:
        return self.lm  # type: ignore[attr-defined]

    def save_extra(self, directory: str | Path) -> None:
        """Tokenizer files to ``directory/tokenizer``, the LM config to ``directory/lm``."""
        directory = Path(directory)
        self.tokenizer.save_pretrained(str(directory / "tokenizer"))
        self.wrapped_lm().config.save_pretrained(str(directory / "lm"))

    @classmethod
    def checkpoint_overrides(cls, directory: str | Path) -> dict[str, Any]:
        """Rebuild from the checkpoint's own LM config and tokenizer: no network, no download."""
        directory = Path(directory)
        return {"lm": str(directory / "lm"), "lm_pretrained": False, "lm_config": None,
                "tokenizer": str(directory / "tokenizer")}
