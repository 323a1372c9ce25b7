"""``dcap bench --preset NAME --random-init``: time a preset's decoders at their real size, untrained.

The speed question of the diffusion paper (fewer sequential steps than an autoregressive decoder)
depends on model size: at the embedded tiny size per-call overhead decides it, at DistilBERT /
GPT-2 / BERT-base size the arithmetic does. This builds every decoder of a preset with random
weights at the preset's architecture (``lm_pretrained: false``: the same compute as the
pretrained model), feeds them random features of the preset encoder's width, and times them side
by side (:func:`diffusion_captioner.analysis.bench_decoders`).

Nothing is downloaded. A tokenizer that is neither local nor cached is replaced by a stand-in
word-level tokenizer with the architecture's vocabulary size (30522 for DistilBERT/BERT, 50257
for GPT-2), so the LM heads cost what they would. A random model never writes its end token, so
an autoregressive decoder is timed at a fixed number of tokens (``tokens``: ``fixed_tokens`` in
its generate options, for the decoders whose capabilities name a ``fixed_tokens_option``).
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

import torch

from diffusion_captioner.encoders import encoder_config
from diffusion_captioner.hub import check_available
from diffusion_captioner.presets import decoder_plan, load_preset
from diffusion_captioner.tokenization import build_word_tokenizer
from registry import ComponentError, available, build, resolve

logger = logging.getLogger(__name__)


def architecture_vocab_size(decoder_class: type, lm: str) -> int:
    """The vocabulary size of ``lm``'s architecture: a built-in config's or a local folder's."""
    configs = getattr(decoder_class, "offline_configs", {})
    if lm in configs:
        return int(configs[lm]().vocab_size)
    if Path(lm).expanduser().is_dir():
        from transformers import AutoConfig

        return int(AutoConfig.from_pretrained(lm).vocab_size)
    raise ComponentError(f"bench --random-init: the architecture of {lm!r} is not built in; "
                         "pass a preset whose lm is a built-in name or a local folder")


def stand_in_tokenizer(size: int, folder: Path) -> str:
    """A word-level tokenizer of exactly ``size`` entries (5 specials + words), saved to
    ``folder``; returns its path."""
    tokenizer = build_word_tokenizer(f"w{i}" for i in range(size - 5))
    tokenizer.save_pretrained(str(folder))
    return str(folder)


def random_init_config(name: str, config: dict[str, Any], scratch: Path) -> dict[str, Any]:
    """``config`` with random weights at the same architecture, and a stand-in tokenizer of the
    architecture's vocabulary size when the real one is not at hand."""
    decoder_class = resolve("decoder", config["type"])
    config = {**config, "lm_pretrained": False}
    lm = str(config.get("lm") or getattr(decoder_class, "default_lm", ""))
    tokenizer = str(config.get("tokenizer") or lm)
    try:
        check_available([(tokenizer, "tokenizer")])
    except ComponentError:
        size = architecture_vocab_size(decoder_class, lm)
        config["tokenizer"] = stand_in_tokenizer(size, scratch / f"{name}-tokenizer")
        logger.warning("%s: tokenizer %r is not available here: timing with a stand-in "
                       "word-level tokenizer of the same size (%d entries, the same compute)",
                       name, tokenizer, size)
    return config


def bench_preset(
    preset: str,
    decoders: list[str] | None = None,
    device: str = "cpu",
    repeats: int = 3,
    warmup: int = 1,
    images: int = 4,
    batch_sizes: tuple[int, ...] = (1, 4, 16, 64),
    steps: tuple[int, ...] | None = None,
    tokens: int | None = 12,
    compile_backend: str | None = None,
) -> dict[str, Any]:
    """Build ``preset``'s decoders (all, or ``decoders``) with random weights at their real size
    and time them side by side; returns :func:`~diffusion_captioner.analysis.bench_decoders`'s
    record plus ``preset``, ``tokens`` and each decoder's parameter count."""
    from diffusion_captioner.analysis import bench_decoders

    plan = load_preset(preset)
    in_preset = plan.get("decoders", {})
    names = list(decoders or [n for n in available("decoder") if n in in_preset])
    if not names:
        raise ValueError(f"preset {preset!r} names no decoders; pass --decoders")
    encoder_cfg = {**encoder_config(plan.get("encoder")), "device": device}
    if not str(encoder_cfg.get("model", "")).startswith("embedded:"):
        encoder_cfg["pretrained"] = None  # the architecture with seeded random weights
    dim = build("encoder", encoder_cfg).dim
    built, options = {}, {}
    with tempfile.TemporaryDirectory(prefix="dcap-bench-") as scratch:
        for name in names:
            entry = decoder_plan(plan, name)
            config = random_init_config(name, entry["decoder"], Path(scratch))
            torch.manual_seed(0)
            logger.info("building %s at the preset's size with random weights", name)
            built[name] = build("decoder", config, feature_dim=dim).to(device).eval()
            fixed = built[name].capabilities.fixed_tokens_option if tokens else None
            options[name] = {**entry["generate"], **({fixed: int(tokens)} if fixed else {})}
        features = torch.randn(images, dim, generator=torch.Generator().manual_seed(0))  # (n, D)
        result = bench_decoders(built, options, features, device, repeats=repeats,
                                batch_sizes=tuple(batch_sizes), images=images,
                                compile_backend=compile_backend, steps=steps, warmup=warmup)
    result.update(preset=preset, tokens=tokens, parameters={
        n: sum(p.numel() for p in d.parameters()) for n, d in built.items()})
    return result
