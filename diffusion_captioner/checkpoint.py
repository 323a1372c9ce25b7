"""Decoder checkpoints: ``config.json`` + ``model.safetensors`` + the decoder's own extra files.

Layout of a checkpoint directory::

    config.json          {"type": <registered name>, **decoder.config}
    model.safetensors    the state dict (tied/shared tensors stored once)
    generation.json      the decoder's ``generation_defaults``, when it has any
    ...                  whatever ``decoder.save_extra(directory)`` writes (tokenizer/, lm/, ...)

Three hooks of the decoder base class (no-ops there) let a decoder take part without this module
knowing it:

* ``decoder.save_extra(directory)`` writes extra files (tokenizer files, a wrapped LM's config);
* ``cls.checkpoint_overrides(directory) -> dict`` returns constructor arguments that replace the
  saved config's on load, so a decoder whose config names a hub model (``"gpt2"``) is rebuilt
  from the files in the checkpoint: no network, no pretrained download, weights from the
  safetensors file;
* ``cls.upgrade_config(saved) -> (arguments, generation defaults)`` maps an older checkpoint's
  config to today's constructor arguments.

This module imports nothing of the registry: the base class it is handed resolves names
(``class_for``) and builds (``from_config``).

Saving is atomic: everything is written into a temporary sibling directory that then replaces the
target, so a crash never leaves a half-written checkpoint behind.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load_model, save_model
from torch import nn

from diffusion_captioner.errors import ComponentError

#: A ``registry.CaptionDecoder`` (typed loosely here: this module must not import the registry).
Decoder = nn.Module

logger = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
GENERATION_NAME = "generation.json"


def save_decoder(decoder: Decoder, directory: str | Path) -> Path:
    """Write ``decoder`` to ``directory`` (replacing any previous checkpoint there, atomically)."""
    target = Path(directory).expanduser().resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    config = {"type": type(decoder).registered_name(), **decoder.config}
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        staging.chmod(_default_dir_mode())  # mkdtemp makes it 0700; a checkpoint is shared
        (staging / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
        save_model(decoder, str(staging / WEIGHTS_NAME), force_contiguous=True)
        if decoder.generation_defaults:
            (staging / GENERATION_NAME).write_text(json.dumps(decoder.generation_defaults) + "\n")
        decoder.save_extra(staging)
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


def _one_line(error: BaseException, limit: int = 300) -> str:
    text = " ".join(line.strip() for line in str(error).splitlines() if line.strip())
    text = text or type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _summarise(keys: list[str], limit: int = 4) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" (+{len(keys) - limit} more)" if len(keys) > limit else "")


def load_decoder(
    directory: str | Path,
    expected_base: type[Decoder],
    map_location: str | Any = "cpu",
    **overrides: Any,
) -> Decoder:
    """Rebuild the decoder saved in ``directory`` (a subclass of ``expected_base``) and load its
    weights strictly.

    Constructor arguments are, later ones winning: the saved config (through the class's
    ``upgrade_config``), the class's ``checkpoint_overrides(directory)`` and the caller's
    ``overrides``. The decoder is returned in eval mode on ``map_location``, with the generation
    defaults an older config carried as its ``generation_defaults``.
    """
    path = Path(directory).expanduser()
    config = read_config(path)
    name = config.pop("type")
    try:
        cls = expected_base.class_for(name)
    except ComponentError as error:
        raise ComponentError(f"{path}: {error}") from error
    arguments, generation_defaults = cls.upgrade_config(config)
    decoder = cls.from_config({**arguments, **cls.checkpoint_overrides(path), **overrides})
    saved_defaults = path / GENERATION_NAME
    if saved_defaults.is_file():
        generation_defaults = {**generation_defaults, **json.loads(saved_defaults.read_text())}
    decoder.generation_defaults = dict(generation_defaults)

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
