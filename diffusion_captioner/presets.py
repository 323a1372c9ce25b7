"""Named presets: JSON files whose stem is the name (``presets/embedded.json`` is ``embedded``).

A preset may set ``dataset``, ``encoder``, a default ``train`` block, and per decoder
``decoders.<name> = {"decoder": {...}, "train": {...}, "generate": {...}}``. ``include`` lists other
presets merged underneath (the including preset wins), so ``paper`` can pull in
``clipcap-paper`` and ``mnic-paper``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

PRESETS_DIR = Path(__file__).resolve().parent / "presets"


def available_presets() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.json"))


def load_preset(name_or_path: str) -> dict[str, Any]:
    """A preset by name (file stem in the packaged presets folder) or by path to a JSON file."""
    path = Path(name_or_path)
    if not path.suffix == ".json":
        path = PRESETS_DIR / f"{name_or_path}.json"
    if not path.is_file():
        raise ValueError(f"preset {name_or_path!r} not found; packaged presets: "
                         f"{', '.join(available_presets())}, or pass a path to a JSON file")
    try:
        preset = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"preset {path}: not valid JSON ({error})") from error
    merged: dict[str, Any] = {}
    for included in preset.pop("include", []):
        merged = merge(merged, load_preset(included))
    return merge(merged, preset)


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """Recursive dict merge; ``over`` wins."""
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def decoder_plan(preset: dict[str, Any], name: str) -> dict[str, Any]:
    """``{"decoder": cfg, "train": cfg, "generate": opts, "distill": block}`` for decoder
    ``name`` under ``preset`` (``distill``: :mod:`diffusion_captioner.distillation`).

    A decoder the preset does not know (a user's plugin) gets ``{"type": name}`` and the preset's
    default ``train`` block.
    """
    entry = preset.get("decoders", {}).get(name, {})
    decoder = {"type": name, **entry.get("decoder", {})}
    train = merge(preset.get("train", {}), entry.get("train", {}))
    return {"decoder": decoder, "train": train, "generate": dict(entry.get("generate", {})),
            "distill": dict(entry.get("distill") or {})}
