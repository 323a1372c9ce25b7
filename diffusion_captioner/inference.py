"""Captioning with trained decoders: batched generation, and loading a `compare` run's models."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from diffusion_captioner.images import BadImageError, load_rgb
from diffusion_captioner.run_folder import DecoderPlan, RunFolder
from registry import CaptionDecoder, ImageEncoder, build, resolve

logger = logging.getLogger(__name__)


@torch.no_grad()
def generate_captions(decoder: CaptionDecoder, features: torch.Tensor, batch_size: int = 100,
                      trajectory: bool = False, **options: Any) -> tuple[list[Any], float]:
    """Captions for (N, D) ``features`` in batches (with ``trajectory``, per image the caption
    after every step: ``decoder.generate_trajectory``); returns them and the seconds it took."""
    decoder.eval()
    generate = decoder.generate_trajectory if trajectory else decoder.generate
    started = time.perf_counter()
    captions: list[Any] = []
    for start in range(0, len(features), batch_size):
        chunk = features[start:start + batch_size].to(decoder.device)  # (b, D)
        captions.extend(generate(chunk, **options))
    return captions, time.perf_counter() - started


@torch.no_grad()
def sample_captions(decoder: CaptionDecoder, features: torch.Tensor, num_samples: int = 5,
                    seed: int = 0, batch_size: int = 100,
                    **options: Any) -> tuple[list[list[str]], float]:
    """Per image ``num_samples`` sampled captions for (N, D) ``features`` in batches of images
    (``decoder.generate_samples``, one seeded generator continued over the batches: the same
    seed and batch size give the same samples); returns them and the seconds it took."""
    decoder.eval()
    generator = torch.Generator().manual_seed(int(seed))
    started = time.perf_counter()
    samples: list[list[str]] = []
    for start in range(0, len(features), batch_size):
        chunk = features[start:start + batch_size].to(decoder.device)  # (b, D)
        samples.extend(decoder.generate_samples(chunk, num_samples, generator=generator,
                                                **options))
    return samples, time.perf_counter() - started


@dataclass
class LoadedRun:
    """The encoder and best checkpoint of every decoder of a ``compare`` run folder."""

    encoder: ImageEncoder
    decoders: dict[str, CaptionDecoder]
    generate_options: dict[str, dict[str, Any]]


def load_run(run: str | Path, names: list[str] | None = None, device: str = "cpu") -> LoadedRun:
    """Load ``run/config.json``'s encoder and each ``run/<name>/checkpoint/best`` decoder.

    ``run`` is a ``compare`` run folder, a folder written by ``dcap export``, or
    ``hf-hub:org/name`` (an export on the Hugging Face hub, through the fail-fast hub guard).
    """
    from diffusion_captioner.sharing import encoder_config_of, resolve_run

    run = resolve_run(run)  # an exported run on the hub (``hf-hub:org/name``) -> its local copy
    folder = RunFolder(run)
    config = folder.read_config()
    encoder = build("encoder", {**encoder_config_of(run, config.to_dict()), "device": device})
    names = names or list(config.decoders)
    unknown = [name for name in names if name not in config.decoders]
    if unknown:
        raise ValueError(f"run {run} has no decoder {unknown[0]!r}; it has: "
                         f"{', '.join(config.decoders)}")
    decoders = {name: load_best(folder, name, config.decoders[name], device) for name in names}
    return LoadedRun(encoder, decoders, {name: config.decoders[name].generate for name in names})


def load_best(folder: RunFolder, name: str, plan: DecoderPlan, device: str = "cpu"
              ) -> CaptionDecoder:
    """Decoder ``name``'s best checkpoint in ``folder``, in eval mode on ``device``."""
    checkpoint = folder.decoder(name).checkpoint
    if not folder.decoder(name).has_checkpoint():
        raise FileNotFoundError(f"decoder {name}: no checkpoint at {checkpoint}; "
                                "rerun the compare command to finish training")
    cls = resolve("decoder", plan.decoder["type"])
    return cls.from_pretrained(checkpoint).to(device).eval()


def caption_pixels(loaded: LoadedRun, pixels: torch.Tensor,
                   options: dict[str, dict[str, Any]] | None = None) -> dict[str, list[str]]:
    """Encode (N, C, H, W) preprocessed ``pixels`` once and caption them with every loaded
    decoder, in :func:`generate_captions`' batches; ``options[name]`` overrides that decoder's
    generation options. Returns ``{decoder: [caption per image]}``."""
    features = loaded.encoder.encode_images(pixels)  # (N, D)
    return {name: generate_captions(decoder, features, **{
                **loaded.generate_options[name], **(options or {}).get(name, {})})[0]
            for name, decoder in loaded.decoders.items()}


def caption_files(
    loaded: LoadedRun, paths: list[str | Path], **overrides: Any
) -> tuple[dict[str, dict[str, str]], dict[str, str]]:
    """Caption image files with every loaded decoder.

    Returns ``{path: {decoder: caption}}`` for the readable images and ``{path: error}`` for the
    others: one bad image never stops the rest.
    """
    pixels, kept, failures = [], [], {}
    for path in paths:
        try:
            pixels.append(loaded.encoder.preprocess(load_rgb(path)))
            kept.append(str(path))
        except BadImageError as error:
            failures[str(path)] = str(error)
            logger.warning("%s", error)
    captions: dict[str, dict[str, str]] = {p: {} for p in kept}
    if kept:
        generated = caption_pixels(loaded, torch.stack(pixels),
                                   {name: overrides for name in loaded.decoders})
        for name, texts in generated.items():
            for path, caption in zip(kept, texts, strict=True):
                captions[path][name] = caption
    return captions, failures
