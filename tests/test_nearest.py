"""The nearest-neighbour retrieval baseline: memorises, retrieves a training caption, beats a
random training caption, survives a checkpoint round trip, and trains through the trainer."""

from __future__ import annotations

import random

import helpers  # noqa: F401 - sets HF_HUB_OFFLINE before transformers is imported
import torch
from helpers import tiny_decoder_config

from diffusion_captioner.trainer import CaptionPairs, TrainConfig, Trainer
from registry import build

COLOURS = ("red", "blue", "green", "yellow")


def clustered_split(images_per_colour: int, seed: int) -> tuple[torch.Tensor, list[tuple[str, ...]]]:
    """Images near one of four centres, each captioned with its centre's colour."""
    generator = torch.Generator().manual_seed(seed)
    centres = torch.eye(8)[:4] * 5  # (4, 8)
    features, captions = [], []
    for index, colour in enumerate(COLOURS):
        for _ in range(images_per_colour):
            features.append(centres[index] + torch.randn(8, generator=generator) * 0.3)
            captions.append((f"a {colour} circle", f"a {colour} shape", f"the {colour} circle"))
    return torch.stack(features), captions


def overlap(caption: str, references: tuple[str, ...]) -> float:
    from baselines.nearest import ngram_f1

    return max(ngram_f1(caption, r) for r in references)


def test_nearest_retrieves_training_captions_and_beats_a_random_one(tmp_path):
    train_features, train_captions = clustered_split(5, seed=0)
    test_features, test_captions = clustered_split(3, seed=1)
    decoder = build("decoder", tiny_decoder_config("nearest", 8, tmp_path))
    config = TrainConfig.from_dict({"batch_size": 6, "epochs": 2, "eval_every": "epoch"})
    Trainer(decoder, CaptionPairs(train_features, train_captions), None, config,
            tmp_path / "run", progress=False).fit()
    assert len(decoder.rows) == 20 and all(len(c) == 3 for c in decoder.captions)  # no repeats
    captions = decoder.generate(test_features)
    memorised = {c for refs in train_captions for c in refs}
    assert all(c in memorised for c in captions)  # retrieval: every caption is a training caption
    rng = random.Random(0)
    guesses = [rng.choice(sorted(memorised)) for _ in captions]
    retrieved = sum(overlap(c, r) for c, r in zip(captions, test_captions, strict=True))
    random_floor = sum(overlap(c, r) for c, r in zip(guesses, test_captions, strict=True))
    assert retrieved == len(captions) and retrieved > random_floor  # each one an exact reference


def test_consensus_picks_the_caption_the_others_agree_with():
    from baselines.nearest import consensus

    assert consensus(["a red circle", "a red circle left", "the blue square"]) in (
        "a red circle", "a red circle left")
    assert consensus(["only one"]) == "only one"


def test_nearest_checkpoint_round_trip_and_untrained_captions(tmp_path):
    from baselines.nearest import NearestDecoder

    decoder = NearestDecoder(8, k=2)
    assert decoder.generate(torch.randn(2, 8)) == ["", ""]  # untrained: nothing to retrieve
    features, captions = clustered_split(2, seed=0)
    decoder.train()
    decoder.loss({"features": features, "captions": [c[0] for c in captions]})
    decoder.save_pretrained(tmp_path / "ckpt")
    loaded = NearestDecoder.from_pretrained(tmp_path / "ckpt")
    probe = torch.randn(5, 8)
    assert loaded.generate(probe) == decoder.generate(probe)
    assert loaded.config["k"] == 2 and len(loaded.rows) == len(decoder.rows)
