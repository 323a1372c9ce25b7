"""Shared test helpers: tiny decoder configs, tiny tokenizers, a network guard.

Import this module before anything that imports ``transformers`` (it sets ``HF_HUB_OFFLINE=1``).
Extend :data:`TINY_DECODER_CONFIGS` with a builder for each new decoder so tests parametrised
over every registered decoder can build a tiny one with :func:`tiny_decoder_config`.
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import functools
import socket
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

#: Words of the tiny word tokenizer (every word of :data:`CAPTIONS` is in it).
WORDS: tuple[str, ...] = (
    "a", "the", "red", "blue", "green", "yellow", "circle", "square", "triangle", "small",
    "big", "on", "left", "right", "of", "above", "below", "next", "to", "and", ".",
)  # fmt: skip

#: Four distinct captions of different lengths (for memorisation and padding tests).
CAPTIONS: tuple[str, ...] = (
    "a red circle",
    "a big blue square left of a small triangle .",
    "the green triangle above the circle",
    "a small yellow square",
)

#: A GPT-2 small enough for CPU tests in seconds; dropout off so training is deterministic.
TINY_LM_CONFIG: dict[str, Any] = {
    "n_layer": 2,
    "n_embd": 32,
    "n_head": 2,
    "n_positions": 32,
    "resid_pdrop": 0.0,
    "embd_pdrop": 0.0,
    "attn_pdrop": 0.0,
}


def tiny_word_tokenizer_dir(tmp_path: Path, words: tuple[str, ...] = WORDS) -> Path:
    """Save a word tokenizer over ``words`` to ``tmp_path/word_tokenizer`` and return the dir."""
    from diffusion_captioner.tokenization import build_word_tokenizer

    directory = Path(tmp_path) / "word_tokenizer"
    if not (directory / "tokenizer.json").is_file():
        build_word_tokenizer(words).save_pretrained(str(directory))
    return directory


@functools.lru_cache(maxsize=1)
def _session_tokenizer_dir() -> Path:
    return tiny_word_tokenizer_dir(Path(tempfile.mkdtemp(prefix="dcap-test-tokenizer-")))


def tiny_clipcap_config(feature_dim: int, tokenizer_dir: str | Path, **overrides: Any) -> dict:
    """Constructor arguments (no ``type``) of a tiny random-weight ClipCap decoder."""
    config = {
        "feature_dim": feature_dim,
        "lm": "gpt2",
        "lm_pretrained": False,
        "lm_config": dict(TINY_LM_CONFIG),
        "tokenizer": str(tokenizer_dir),
        "prefix_length": 4,
        "clip_length": 4,
        "mapper": "mlp",
        "mapper_layers": 1,
        "max_length": 12,
    }
    config.update(overrides)
    return config


#: A BERT small enough for CPU tests in seconds; dropout off so training is deterministic.
TINY_BERT_CONFIG: dict[str, Any] = {
    "num_hidden_layers": 2,
    "hidden_size": 32,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "max_position_embeddings": 32,
    "hidden_dropout_prob": 0.0,
    "attention_probs_dropout_prob": 0.0,
}


def tiny_mnic_config(feature_dim: int, tokenizer_dir: str | Path, **overrides: Any) -> dict:
    """Constructor arguments (no ``type``) of a tiny random-weight MNIC decoder."""
    config = {
        "feature_dim": feature_dim,
        "lm": "bert-base-uncased",
        "lm_pretrained": False,
        "lm_config": dict(TINY_BERT_CONFIG),
        "tokenizer": str(tokenizer_dir),
        "conditioning": "prefix",
        "prefix_length": 1,
        "length_mode": "predict",
        "max_length": 12,
    }
    config.update(overrides)
    return config


#: A DistilBERT small enough for CPU tests in seconds; dropout off so training is deterministic.
TINY_DISTILBERT_CONFIG: dict[str, Any] = {
    "dim": 32,
    "n_layers": 2,
    "n_heads": 2,
    "hidden_dim": 64,
    "max_position_embeddings": 24,
    "dropout": 0.0,
    "attention_dropout": 0.0,
}


def tiny_diffusion_config(feature_dim: int, tokenizer_dir: str | Path, **overrides: Any) -> dict:
    """Constructor arguments (no ``type``) of a tiny random-weight diffusion decoder."""
    config = {
        "feature_dim": feature_dim,
        "lm": "distilbert-base-uncased",
        "lm_pretrained": False,
        "lm_config": dict(TINY_DISTILBERT_CONFIG),
        "tokenizer": str(tokenizer_dir),
        "max_length": 12,
        "fusion": "concat",
        "time_embedding": True,
        "self_conditioning": True,
        "text_condition": True,
        "diffusion_steps": 100,
    }
    config.update(overrides)
    return config


def build_with_generation_defaults(decoder_class: type, config: dict) -> Any:
    """``decoder_class`` built from ``config``, whose generation keys (the diffusion decoder's
    steps, sampler, clamp, guidance) become the decoder's ``generation_defaults``, as an
    older checkpoint's do (``upgrade_config``)."""
    arguments, defaults = decoder_class.upgrade_config(config)
    decoder = decoder_class(**arguments)
    decoder.generation_defaults = dict(defaults)
    return decoder


#: decoder name -> (feature_dim, tmp_path) -> constructor arguments of a tiny instance.
TINY_DECODER_CONFIGS: dict[str, Callable[[int, Path], dict]] = {
    "diffusion": lambda feature_dim, tmp_path: tiny_diffusion_config(
        feature_dim, tiny_word_tokenizer_dir(tmp_path)
    ),
    "clipcap": lambda feature_dim, tmp_path: tiny_clipcap_config(
        feature_dim, tiny_word_tokenizer_dir(tmp_path)
    ),
    "mnic": lambda feature_dim, tmp_path: tiny_mnic_config(
        feature_dim, tiny_word_tokenizer_dir(tmp_path)
    ),
    "nearest": lambda feature_dim, tmp_path: {"feature_dim": feature_dim, "k": 1},
}


def tiny_decoder_config(name: str, feature_dim: int, tmp_path: Path | None = None) -> dict:
    """``{"type": name, ...}`` for a tiny decoder; files it needs go to ``tmp_path`` (or a
    session-wide temporary directory)."""
    if name not in TINY_DECODER_CONFIGS:
        raise KeyError(f"no tiny config for decoder {name!r}; add one to tests/helpers.py")
    directory = Path(tmp_path) if tmp_path is not None else _session_tokenizer_dir().parent
    return {"type": name, **TINY_DECODER_CONFIGS[name](feature_dim, directory)}


def write_untrained_run(run: Path, encoder_spec: str, decoders: list[str] | None = None,
                        seed: int = 0) -> Path:
    """A run folder in the layout `dcap compare` writes (``config.json`` +
    ``<decoder>/checkpoint/best``) with the embedded preset's decoders untrained over
    ``encoder_spec``: seconds, where training and scoring them through `compare` take minutes.
    Default: every registered decoder the preset configures."""
    import json

    import torch

    import registry
    from diffusion_captioner.encoders import encoder_config
    from diffusion_captioner.presets import decoder_plan, load_preset

    encoder_cfg = encoder_config(encoder_spec)
    dim = registry.build("encoder", {**encoder_cfg, "device": "cpu"}).dim
    preset = load_preset("embedded")
    plans = {}
    for name in decoders or [n for n in registry.available("decoder") if n in preset["decoders"]]:
        plans[name] = decoder_plan(preset, name)
        torch.manual_seed(seed)
        decoder = registry.build("decoder", plans[name]["decoder"], feature_dim=dim)
        decoder.save_pretrained(Path(run) / name / "checkpoint" / "best")
    (Path(run) / "config.json").write_text(json.dumps(
        {"command": "write_untrained_run", "preset": "embedded", "encoder": encoder_cfg,
         "decoders": plans, "device": "cpu"}, indent=2))
    return Path(run)


def block_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make any socket connection fail loudly, so a test that would touch the network fails."""

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise OSError("tests must not use the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def write_colour_images(folder: Path, colours: Sequence[tuple[int, int, int]]) -> list[Path]:
    """One small solid-colour PNG per colour in ``folder``: images to caption."""
    from PIL import Image

    paths = []
    for k, colour in enumerate(colours):
        path = folder / f"image{k}.png"
        Image.new("RGB", (48, 40), colour).save(path)
        paths.append(path)
    return paths


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    """``dcap`` in process: its exit code, stdout and stderr."""
    from diffusion_captioner.cli import main

    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(code: int, err: str, *needles: str) -> str:
    """A failed command printed exactly one ``dcap: error:`` line (no traceback) holding every
    needle; returns it."""
    assert code != 0
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("dcap: error:")]
    assert len(errors) == 1, err
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])
    return errors[0]
