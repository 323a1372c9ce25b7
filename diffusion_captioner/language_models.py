"""Build a transformers language model from a hub name, a local directory or a built-in config.

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
from typing import Any

from transformers import AutoConfig, PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

from diffusion_captioner.hub import hf_access

logger = logging.getLogger(__name__)


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
    offline_configs: Mapping[str, type[PretrainedConfig]] = {}

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
