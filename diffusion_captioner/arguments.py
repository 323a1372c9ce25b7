"""Command-line values normalised once (fire turns ``a,b`` into a tuple and ``a`` into a str,
JSON objects into dicts or strings): shared by the CLI and the Python API."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import registry


def as_list(value: Any) -> list[str]:
    """fire gives ``a,b`` as a tuple and ``a`` as a str (or a list from ``[a,b]``): one list."""
    if value is None:
        return []
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    if isinstance(value, int | float):  # `--steps 5`: fire gives the number itself
        return [str(value)]
    return [str(v).strip() for v in value]


_JSON_WORDS = {"null": None, "true": True, "false": False}


def _json_words(value: Any) -> Any:
    """fire parses ``{"a": null}`` with JSON's bare words as strings: map them back."""
    if isinstance(value, dict):
        return {k: _json_words(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_words(v) for v in value]
    return _JSON_WORDS.get(value, value) if isinstance(value, str) else value


def as_dict(value: Any, what: str) -> dict[str, Any] | None:
    """A dict from fire (already parsed) or from a JSON string."""
    if value is None:
        return None
    if isinstance(value, dict):
        return _json_words(value)
    try:
        parsed = json.loads(value)
    except (TypeError, json.JSONDecodeError) as error:
        raise ValueError(f"--{what} must be a JSON object, got {value!r}") from error
    if not isinstance(parsed, dict):
        raise ValueError(f"--{what} must be a JSON object, got {value!r}")
    return parsed


def dataset_config(dataset: Any, data_dir: str | None = None) -> dict[str, Any] | None:
    """``shapes`` -> {"type": "shapes"}; a dict/JSON object passes through.

    The short names ``flickr8k``, ``flickr30k``, ``coco-karpathy`` and ``flickr8k+flickr30k``
    become Karpathy-split configs with their files found under ``data_dir``. Otherwise
    ``data_dir`` is given to a dataset class that takes one (relative paths resolve under it).
    """
    if dataset is None:
        return None
    if isinstance(dataset, str) and not dataset.lstrip().startswith("{"):
        from diffusion_captioner.data.karpathy import COMBINED_NAMES, NAMED, named_config

        if dataset in NAMED or dataset in COMBINED_NAMES:
            return named_config(dataset, data_dir)
        config: dict[str, Any] = {"type": dataset}
    else:
        config = as_dict(dataset, "dataset") or {}
    if data_dir is not None and "data_dir" not in config and "type" in config:
        import inspect

        cls = registry.resolve("dataset", config["type"])
        if "data_dir" in inspect.signature(cls.__init__).parameters:
            config["data_dir"] = str(Path(data_dir).expanduser().resolve())
    return config
