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
config has. The caller wraps the call in :func:`diffusion_captioner.hub.hf_access`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from transformers import AutoConfig, PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

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
) -> PreTrainedModel:
    """``model_class`` (an ``Auto*`` class or a concrete one) over ``lm``, pretrained or random.

    ``from_config`` builds the random model (default ``model_class.from_config``, which concrete
    classes lack: pass the class itself). The embeddings grow to the tokenizer if it is larger;
    the model is returned in float32.
    """
    overrides = dict(overrides or {})
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
