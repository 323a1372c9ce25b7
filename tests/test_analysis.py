"""Significance, CLIPScore, caption statistics and speed helpers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import tiny_decoder_config

from diffusion_captioner.analysis import bench_decoders
from eval.caption_stats import caption_statistics
from eval.clipscore import clip_scores, score_with_encoder
from eval.significance import paired_bootstrap, paired_scores
from eval.speed import (
    benchmark_decoder,
    compile_step_modules,
    crossover_batch,
    describe_contrast,
    median_seconds,
    speed_contrast,
    step_cost,
)
from registry import build


def test_identical_systems_give_an_interval_around_zero():
    scores = np.random.default_rng(0).uniform(0, 3, size=500)
    result = paired_bootstrap(scores, scores.copy())
    assert result.low <= 0 <= result.high and not result.significant


def test_noisy_equal_systems_are_not_significant():
    rng = np.random.default_rng(1)
    a = rng.uniform(0, 3, size=400)
    b = a + rng.normal(0, 0.5, size=400)  # same mean quality, paired noise
    result = paired_bootstrap(a, b, seed=3)
    assert result.low < 0 < result.high


def test_a_clearly_better_system_excludes_zero():
    rng = np.random.default_rng(2)
    a = rng.uniform(0, 3, size=300)
    b = a + 0.4 + rng.normal(0, 0.3, size=300)
    result = paired_bootstrap(a, b)
    assert result.significant and result.low > 0.3 and result.difference == pytest.approx(
        float((b - a).mean()))


def test_paired_scores_align_on_shared_ids():
    a, b = paired_scores({1: 1.0, 2: 2.0, 3: 3.0}, {3: 30.0, 1: 10.0})
    assert a.tolist() == [1.0, 3.0] and b.tolist() == [10.0, 30.0]
    with pytest.raises(ValueError):
        paired_scores({1: 1.0}, {2: 1.0})


def test_clipscore_matches_a_direct_computation(tiny_encoder):
    from conftest import TINY_SHAPES

    from registry import build

    dataset = build("dataset", TINY_SHAPES)
    records = dataset.records("test")[:3]
    pixels = torch.stack([tiny_encoder.preprocess(dataset.load_image(r)) for r in records])
    images = tiny_encoder.encode_images(pixels)  # (3, D)
    results = {r.image_id: r.captions[0] for r in records}
    references = {r.image_id: list(r.captions[1:]) for r in records}
    scored = score_with_encoder(tiny_encoder, images, [r.image_id for r in records], results,
                                references)
    for row, record in enumerate(records):
        candidate = tiny_encoder.encode_texts([record.captions[0]])[0]
        refs = tiny_encoder.encode_texts(list(record.captions[1:]))
        clip_s = 2.5 * max(float(F.cosine_similarity(images[row], candidate, dim=0)), 0.0)
        ref_s = max(float(F.cosine_similarity(refs, candidate[None], dim=-1).max()), 0.0)
        ref_clip_s = 2 * clip_s * ref_s / (clip_s + ref_s) if clip_s + ref_s else 0.0
        assert scored["per_image"]["CLIPScore"][record.image_id] == pytest.approx(clip_s, abs=1e-5)
        assert scored["per_image"]["RefCLIPScore"][record.image_id] == pytest.approx(ref_clip_s, abs=1e-5)
    assert scored["CLIPScore"] == pytest.approx(np.mean(list(scored["per_image"]["CLIPScore"].values())))


def test_clipscore_clamps_negative_cosine_to_zero():
    image = torch.tensor([[1.0, 0.0]])
    scores = clip_scores(image, torch.tensor([[-1.0, 0.0]]), [torch.tensor([[1.0, 0.0]])])
    assert scores["CLIPScore"].item() == 0.0 and scores["RefCLIPScore"].item() == 0.0


def test_caption_statistics_expose_repeats_and_copies():
    stats = caption_statistics(["a red red circle", "a blue square", ""],
                               training_captions=["a blue square", "a green disk"])
    assert stats["repeated_word_rate"] == pytest.approx(1 / 3)
    assert stats["copied_from_train"] == pytest.approx(1 / 3)
    assert stats["empty_rate"] == pytest.approx(1 / 3)
    assert stats["vocabulary"] == 5
    assert stats["mean_length"] == pytest.approx(7 / 3)


def test_a_repeated_content_phrase_is_one_object_named_twice():
    named_twice = ["a large red circle above a large red circle",
                   "a blue square to the left of a blue square ."]
    two_objects = ["a small red square left of a small red cross",  # shared words, two objects
                   "a red circle and a red circle-like square", "a big blue square", ""]
    stats = caption_statistics(named_twice + two_objects)
    assert stats["repeated_phrase_rate"] == pytest.approx(2 / 6)


def test_crossover_and_median():
    fast_small = [{"batch": b, "captions_per_second": v} for b, v in ((1, 100), (16, 200), (64, 300))]
    fast_large = [{"batch": b, "captions_per_second": v} for b, v in ((1, 50), (16, 250), (64, 900))]
    assert crossover_batch(fast_small, fast_large) == 16
    assert crossover_batch(fast_small, fast_small) is None
    calls = []
    assert median_seconds(lambda: calls.append(1), repeats=3, warmup=2) >= 0
    assert len(calls) == 5


def test_small_batches_are_timed_over_several_images(tmp_path):
    """Batch 1 captions ``images`` different images one by one (an autoregressive decoder's
    latency follows its caption's length), larger batches as many images as the batch."""
    decoder = build("decoder", tiny_decoder_config("clipcap", 16, tmp_path))
    generate, seen = decoder.generate, []

    def recording_generate(features, **options):
        seen.append(features.clone())
        return generate(features, **options)

    decoder.generate = recording_generate
    features = torch.randn(64, 16)
    rows = benchmark_decoder(decoder, features, [{}], batch_sizes=(1, 4, 64), repeats=1,
                             warmup=0, images=8)
    assert [(r["batch"], r["images"]) for r in rows] == [(1, 8), (4, 8), (64, 64)]
    assert [len(f) for f in seen] == [1] * 8 + [4] * 2 + [64]
    assert torch.equal(torch.cat(seen[:8]), features[:8])
    assert torch.equal(torch.cat(seen[8:10]), features[:8])
    for row in rows:
        assert row["ms_per_caption"] == pytest.approx(1000 * row["seconds"] / row["batch"])
    with pytest.raises(ValueError, match="64 feature rows, 96 needed"):
        benchmark_decoder(decoder, features, [{}], batch_sizes=(32,), repeats=1, warmup=0,
                          images=96)
    with pytest.raises(ValueError, match="--images must be >= 1, got 0"):
        benchmark_decoder(decoder, features, [{}], batch_sizes=(1,), repeats=1, images=0)


def test_bench_decoders_wraps_too_few_features_and_says_so(tmp_path):
    """6 images at batch 4 need 8 rows (two calls of 4): 5 test features wrap round, and the
    result says only 5 images were different."""
    decoder = build("decoder", tiny_decoder_config("clipcap", 16, tmp_path))
    speed = bench_decoders({"clipcap": decoder}, {}, torch.randn(5, 16), repeats=1,
                           batch_sizes=(1, 4), images=6)
    assert [(r["batch"], r["images"]) for r in speed["decoders"]["clipcap"]] == [(1, 6), (4, 8)]
    assert speed["images"] == 6 and speed["distinct_images"] == 5


@pytest.mark.parametrize("name", ["diffusion", "clipcap", "mnic"])
def test_compiled_step_modules_caption_as_before(name, tmp_path):
    """``dcap bench --compile`` compiles each decoder's per-step networks in place: the same
    captions, the same state-dict keys (the eager backend: no C++ compiler needed here)."""
    torch.manual_seed(0)
    decoder = build("decoder", tiny_decoder_config(name, 16, tmp_path)).eval()
    features = torch.randn(3, 16)
    before, keys = decoder.generate(features), list(decoder.state_dict())
    assert compile_step_modules(decoder, backend="eager") >= 1
    assert decoder.generate(features) == before
    assert list(decoder.state_dict()) == keys


@pytest.mark.parametrize("fusion", ["concat", "add"])
def test_the_denoiser_compiles_to_one_graph(fusion, tmp_path):
    """No graph break in the diffusion denoiser (``fullgraph=True`` raises at the first), for
    the guided path too (its unconditional half passes a text mask): every sampling step is one
    compiled call."""
    torch.manual_seed(0)
    config = tiny_decoder_config("diffusion", 16, tmp_path)
    config["fusion"] = fusion
    if fusion == "add":
        config["image_tokens"] = 1
    decoder = build("decoder", config).eval()
    features = torch.randn(2, 16)
    before = decoder.generate(features, guidance=0.5)
    torch._dynamo.reset()
    decoder.denoiser.compile(backend="eager", fullgraph=True)
    assert decoder.generate(features, guidance=0.5) == before


def test_step_cost_is_the_least_squares_line_through_the_step_counts():
    """ms(K) = 0.5 + 2 K at batch 1 plus +-0.1 ms noise (the fit lands within 0.01 ms per step);
    rows at other batch sizes or other options stay out of it."""
    def row(steps, ms, batch=1, **options):
        return {"options": {"steps": steps, **options}, "batch": batch, "ms_per_caption": ms}

    rows = [row(1, 2.5 + 0.1), row(2, 4.5 - 0.1), row(5, 10.5 - 0.1), row(10, 20.5 + 0.1),
            row(5, 99.0, batch=64), row(5, 99.0, length_beam=3)]
    cost = step_cost(rows)
    assert cost["steps"] == [1, 2, 5, 10] and cost["batch"] == 1
    assert cost["per_step_ms"] == pytest.approx(2.0, abs=0.02)
    assert cost["fixed_ms"] == pytest.approx(0.5, abs=0.1)
    assert step_cost([row(5, 10.0)]) is None  # one step count: no line
    assert step_cost([{"options": {}, "batch": 1, "ms_per_caption": 3.0}]) is None


def test_speed_contrast_names_the_faster_decoder_and_the_ratios():
    def rows(ms_at_1, per_caption_at_64):
        return [{"batch": 1, "ms_per_caption": ms_at_1, "captions_per_second": 1000 / ms_at_1},
                {"batch": 64, "ms_per_caption": per_caption_at_64,
                 "captions_per_second": 1000 / per_caption_at_64}]

    autoregressive, diffusion = rows(6.0, 0.5), rows(12.0, 2.0)
    contrast = speed_contrast(autoregressive, diffusion)
    assert contrast["latency_ratio"] == pytest.approx(2.0)
    assert contrast["throughput_ratio"] == pytest.approx(0.25)
    assert contrast["crossover"] is None
    line = describe_contrast("clipcap", "diffusion", contrast)
    assert "2.00x the latency" in line and "0.25x clipcap's throughput" in line
    assert "clipcap is faster at every batch size" in line

    flips = speed_contrast(autoregressive, rows(3.0, 1.0))  # faster alone, slower in bulk
    assert flips["latency_ratio"] == pytest.approx(0.5) and flips["crossover"] == 64
    assert flips["second_faster_at"] == [1]
    assert "fast is faster at batch 1, clipcap at batch 64" in describe_contrast("clipcap", "fast", flips)
    assert speed_contrast(autoregressive, []) == {}


def test_the_clipscore_reranker_picks_the_closest_candidate_and_keeps_identical_ones():
    from eval.rerank import rerank_by_clipscore

    class Words:  # a text encoder that maps each caption to a fixed direction
        vectors = {"a red circle": [1.0, 0.0], "a blue square": [0.0, 1.0], "x": [0.7, 0.7]}

        def encode_texts(self, texts):
            return torch.tensor([self.vectors[t] for t in texts])

    images = torch.tensor([[0.0, 2.0], [3.0, 0.1], [1.0, 1.0]])  # (3, D)
    candidates = [["a red circle", "a blue square"], ["a blue square", "a red circle"],
                  ["x", "x", "x"]]
    assert rerank_by_clipscore(Words(), images, candidates) == ["a blue square", "a red circle",
                                                                 "x"]
