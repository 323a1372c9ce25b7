"""Decoder checkpoints: ``config.json`` + ``model.safetensors`` + the decoder's own extra files.

Layout of a checkpoint directory::

    config.json          {"type": <registered name>, **decoder.config}
    model.safetensors    the state dict (tied/shared tensors stored once)
    ...                  whatever ``decoder.save_extra(directory)`` writes (tokenizer/, lm/, ...)

Two optional hooks let a decoder take part without this module knowing it:

* ``decoder.save_extra(directory)`` writes extra files (tokenizer files, a wrapped LM's config);
* ``cls.checkpoint_overrides(directory) -> dict`` returns constructor arguments that replace the
  saved config's on load, so a decoder whose config names a hub model (``"gpt2"``) is rebuilt
  from the files in the checkpoint: no network, no pretrained download, weights from the
  safetensors file.

Saving is atomic: everything is written into a temporary sibling directory that then replaces the
target, so a crash never leaves a half-written checkpoint behind.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load_model, save_model

import registry
from registry import CaptionDecoder, ComponentError

logger = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


def save_decoder(decoder: CaptionDecoder, directory: str | Path) -> Path:
    """Write ``decoder`` to ``directory`` (replacing any previous checkpoint there, atomically)."""
    target = Path(directory).expanduser().resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    config = {"type": registry.registered_name(type(decoder)), **decoder.config}
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        staging.chmod(_default_dir_mode())  # mkdtemp makes it 0700; a checkpoint is shared
        (staging / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
        save_model(decoder, str(staging / WEIGHTS_NAME), force_contiguous=True)
        save_extra = getattr(decoder, "save_extra", None)
        if callable(save_extra):
            save_extra(staging)
        _replace_directory(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    logger.info("saved %s decoder to %s", config["type"], target)
    return target


def _default_dir_mode() -> int:
    """The mode ``mkdir`` would give a new directory under the current umask."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o777 & ~umask


def _replace_directory(staging: Path, target: Path) -> None:
    """Move ``staging`` to ``target``; an existing ``target`` is kept until the move succeeded."""
    if not target.exists():
        staging.rename(target)
        return
    backup = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
    backup.rmdir()
    target.rename(backup)
    try:
        staging.rename(target)
    except BaseException:
        backup.rename(target)
        raise
    shutil.rmtree(backup, ignore_errors=True)


def read_config(directory: str | Path) -> dict[str, Any]:
    """The checkpoint's ``config.json`` (with its ``type`` key); one-line errors naming the path."""
    path = Path(directory)
    if not path.is_dir():
        raise ComponentError(f"no decoder checkpoint at {path}: the directory does not exist")
    config_file = path / CONFIG_NAME
    if not config_file.is_file():
        raise ComponentError(f"{path} is not a decoder checkpoint: {CONFIG_NAME} is missing")
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as error:
        raise ComponentError(f"{config_file} is not valid JSON: {error}") from error
    if not isinstance(config, dict) or not isinstance(config.get("type"), str):
        raise ComponentError(f"{config_file} has no 'type' key naming the decoder class")
    return config


def _resolve_decoder(name: str) -> type:
    """An already registered decoder directly (no built-in imports); otherwise the full lookup."""
    if CaptionDecoder.is_registered(name):
        return CaptionDecoder.by_name(name)
    return registry.resolve("decoder", name)


def _build(cls: type, name: str, arguments: dict[str, Any]) -> CaptionDecoder:
    """``cls(**arguments)``; an argument the constructor does not take fails with those it does."""
    signature = inspect.signature(cls.__init__)
    parameters = [p for p in signature.parameters if p != "self"]
    takes_kwargs = any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values())
    unknown = sorted(set(arguments) - set(parameters))
    if unknown and not takes_kwargs:
        raise ComponentError(
            f"decoder {name!r} does not take {', '.join(unknown)}; it takes: {', '.join(parameters)}"
        )
    return cls(**arguments)


def _one_line(error: BaseException, limit: int = 300) -> str:
    text = " ".join(line.strip() for line in str(error).splitlines() if line.strip())
    text = text or type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _summarise(keys: list[str], limit: int = 4) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" (+{len(keys) - limit} more)" if len(keys) > limit else "")


def load_decoder(
    directory: str | Path,
    expected_base: type = CaptionDecoder,
    map_location: str | Any = "cpu",
    **overrides: Any,
) -> CaptionDecoder:
    """Rebuild the decoder saved in ``directory`` and load its weights strictly.

    Constructor arguments are, later ones winning: the saved config, the class's
    ``checkpoint_overrides(directory)`` and the caller's ``overrides``. The decoder is returned
    in eval mode on ``map_location``.
    """
    path = Path(directory).expanduser()
    config = read_config(path)
    name = config.pop("type")
    cls = _resolve_decoder(name)
    if not issubclass(cls, expected_base):
        raise ComponentError(
            f"{path} holds a {name!r} decoder ({cls.__name__}), not a {expected_base.__name__}"
        )
    hook = getattr(cls, "checkpoint_overrides", None)
    hook_overrides = hook(path) if callable(hook) else {}
    decoder = _build(cls, name, {**config, **hook_overrides, **overrides})

    weights = path / WEIGHTS_NAME
    if not weights.is_file():
        raise ComponentError(f"{path} is not a decoder checkpoint: {WEIGHTS_NAME} is missing")
    try:
        missing, unexpected = load_model(decoder, str(weights), strict=False, device="cpu")
    except (SafetensorError, RuntimeError, OSError) as error:
        raise ComponentError(
            f"weights in {weights} do not fit the {name!r} decoder built from its config: "
            f"{_one_line(error)}"
        ) from error
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {_summarise(sorted(missing))}")
        if unexpected:
            parts.append(f"unexpected {_summarise(sorted(unexpected))}")
        raise ComponentError(
            f"weights in {weights} do not match the {name!r} decoder built from its config: "
            + "; ".join(parts)
        )
    decoder.to(map_location)
    decoder.eval()
    logger.info("loaded %s decoder from %s", name, path)
    return decoder
