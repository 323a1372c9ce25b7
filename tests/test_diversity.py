"""Sampling on the decoder contract and the diversity metrics of compare: offline, CPU, tiny."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import helpers  # sorts before torch/transformers: it sets HF_HUB_OFFLINE first
import pytest
import torch
from helpers import CAPTIONS, TINY_DECODER_CONFIGS, tiny_decoder_config
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider

import registry
from diffusion_captioner.comparison import diversity_phase, diversity_settings
from diffusion_captioner.features import SplitFeatures
from diffusion_captioner.report import render_markdown
from diffusion_captioner.run_folder import RunFolder
from eval import diversity as div
from eval.plots import plot_quality_vs_diversity
from registry import Capabilities, CaptionDecoder, CaptionRecord

FEATURE_DIM = 8
#: Four-word captions with no word in common (and none in REFERENCES): every n-gram order
#: non-empty, every idf the same.
DISJOINT = ("red circle left small", "blue square above big", "green triangle below tiny",
            "yellow star right huge", "purple moon near odd")
REFERENCES = {k: [f"a photo number {k}", f"one more photo {k}"] for k in range(6)}


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch):
    helpers.block_network(monkeypatch)


# ------------------------------------------------------------------------------------ metrics
def test_self_cider_is_zero_for_identical_and_one_for_disjoint_samples():
    identical = {0: ["a red circle left of a square"] * 5, 1: [DISJOINT[0]] * 5}
    assert div.self_cider(identical, REFERENCES) == pytest.approx(0.0, abs=1e-6)
    disjoint = {0: list(DISJOINT), 1: list(reversed(DISJOINT))}
    assert div.self_cider(disjoint, REFERENCES) == pytest.approx(1.0, abs=1e-9)
    mixed = {0: [DISJOINT[0], DISJOINT[0], DISJOINT[1], "red circle left big", DISJOINT[2]]}
    assert 0.0 < div.self_cider(mixed, REFERENCES) < 1.0
    for kernel in div.cider_kernels(mixed, REFERENCES).values():  # the matrix is symmetric
        assert (kernel == kernel.T).all() and kernel.shape == (5, 5)


def test_self_cider_of_a_kernel_is_minus_log_n_of_the_largest_singular_share():
    assert div.self_cider_of(torch.ones(4, 4).numpy()) == pytest.approx(0.0, abs=1e-6)
    assert div.self_cider_of(torch.eye(4).numpy() * 10) == pytest.approx(1.0)
    assert div.self_cider_of(torch.zeros(3, 3).numpy()) == 0.0  # no n-gram carries weight
    kernel = torch.diag(torch.tensor([4.0, 1.0])).numpy()  # sqrt: 2 and 1 -> -log_2(2 / 3)
    assert div.self_cider_of(kernel) == pytest.approx(0.5849625, rel=1e-6)


def test_the_kernel_is_pycocoevalcaps_cider_with_the_references_idf():
    samples = {0: ["a red circle", "a red square", "the blue circle"],
               1: ["a big green triangle", "a green triangle", "a triangle"]}
    pairs = {(k, i, j): [c_j] for k, caps in samples.items()
             for i, _ in enumerate(caps) for j, c_j in enumerate(caps)}
    tests = {(k, i, j): [samples[k][i]] for (k, i, j) in pairs}
    _, plain = Cider().compute_score(pairs, tests)  # idf over these very pairs
    expected = plain.reshape(2, 3, 3)  # [k, i, j] = CIDEr-D(s_i; {s_j})
    lower = torch.tril(torch.ones(3, 3, dtype=torch.bool)).numpy()
    expected = [torch.where(torch.from_numpy(lower), torch.from_numpy(m),
                            torch.from_numpy(m.T)).numpy() for m in expected]  # i >= j mirrored
    doubled = {**pairs, **{("again", *key): refs for key, refs in pairs.items()}}
    for corpus in (pairs, doubled):  # scale 1, then 1/2: the same idf
        kernels = div.cider_kernels(samples, corpus)
        for k, kernel in kernels.items():
            assert kernel == pytest.approx(expected[k], abs=1e-9)


def test_mbleu_of_identical_samples_is_one_and_lower_for_different_ones():
    same = {0: ["a big red circle left of a square"] * 4, 1: ["the small blue square above"] * 4}
    assert div.mutual_bleu(same) == pytest.approx(1.0, abs=1e-6)
    assert div.mutual_bleu({0: list(DISJOINT[:4])}) < 1e-3
    with pytest.raises(ValueError, match="at least 2 samples"):
        div.mutual_bleu({0: ["one"]})


def test_distinct_n_counts_distinct_ngrams_per_word_of_an_images_samples():
    assert div.distinct_n({0: list(DISJOINT[:3])}, 1) == 1.0
    assert div.distinct_n({0: ["a red circle"] * 4}, 1) == pytest.approx(3 / 12)
    assert div.distinct_n({0: ["a red circle"] * 4}, 2) == pytest.approx(2 / 12)
    assert div.distinct_n({0: ["", ""], 1: ["a a", "a b"]}, 1) == pytest.approx((0 + 2 / 4) / 2)
    with pytest.raises(ValueError, match="same number of samples"):
        div.distinct_n({0: ["a"], 1: ["a", "b"]}, 1)


def test_sample_cider_is_the_harness_cider_per_sample_and_the_oracle_its_best():
    references = {3: ["a red circle", "a red round circle"], 1: ["a blue square", "blue square"]}
    samples = {3: ["a red circle", "a blue square"], 1: ["a blue square", "a square"]}
    scores = div.sample_cider(samples, references)  # (images, n), rows in samples' order
    for j in range(2):
        _, per_image = Cider().compute_score({k: references[k] for k in samples},
                                             {k: [samples[k][j]] for k in samples})
        assert scores[:, j] == pytest.approx(per_image)
    result = div.diversity_scores(samples, references)
    assert set(result) == set(div.DIVERSITY_SCORES)
    assert result["CIDEr_oracle"] == pytest.approx(scores.max(1).mean())
    assert result["CIDEr_oracle"] >= result["CIDEr_mean"] == pytest.approx(scores.mean())
    first = {k: [v[0]] for k, v in samples.items()}
    others = {k: [v[1]] for k, v in samples.items()}
    bleu_a, _ = Bleu(4).compute_score(others, first, verbose=0)
    bleu_b, _ = Bleu(4).compute_score(first, others, verbose=0)
    assert result["mBLEU_4"] == pytest.approx((bleu_a[3] + bleu_b[3]) / 2)


def test_score_diversity_tokenises_like_the_harness():
    samples = {0: ["A red circle.", "a red circle"], 1: ["A Blue square!", "blue square"]}
    references = {0: ["a red circle"], 1: ["a blue square"]}
    scores = div.score_diversity(samples, references)  # lower-cased, punctuation dropped
    assert scores["distinct_1"] == pytest.approx((3 / 6 + 3 / 5) / 2)
    assert scores["self_CIDEr"] < 0.5  # image 0's two samples are the same once tokenised


# ------------------------------------------------------------------------------------ sampling
def test_draws_follow_the_tempered_truncated_softmax():
    from diffusion_captioner.sampling import draw, truncate

    logits = torch.tensor([2.0, 1.0, 0.0, float("-inf")]).expand(20000, 4)  # (N, V)
    generator = torch.Generator().manual_seed(0)
    counts = torch.bincount(draw(logits, generator), minlength=4).float() / 20000
    assert counts == pytest.approx(logits[0].softmax(-1), abs=0.015)  # -inf never drawn
    hot = torch.bincount(draw(logits, generator, temperature=2.0), minlength=4).float() / 20000
    assert hot == pytest.approx((logits[0] / 2).softmax(-1), abs=0.015)
    argmax = logits.argmax(-1)
    assert torch.equal(draw(logits, generator, temperature=0.0), argmax)
    assert torch.equal(draw(logits, generator, top_k=1), argmax)
    assert torch.equal(draw(logits, generator, top_p=0.5), argmax)  # p(2.0) = 0.67 >= 0.5
    kept = truncate(torch.tensor([[2.0, 1.0, 0.0, -1.0]]), top_p=0.9)  # 0.64, 0.24, 0.09 ...
    assert torch.isfinite(kept).tolist() == [[True, True, True, False]]
    assert torch.isfinite(truncate(torch.tensor([[2.0, 1.0, 0.0]]), top_k=2)).tolist() == [
        [True, True, False]]


SAMPLING = sorted(name for name in TINY_DECODER_CONFIGS
                  if registry.resolve("decoder", name).capabilities.sampling)


def test_every_builtin_decoder_declares_sampling():
    assert SAMPLING == sorted(registry.available("decoder"))


def _tiny(name: str, tmp_path: Path) -> CaptionDecoder:
    """A tiny random-weight decoder that has seen one training batch (nearest memorises it:
    two images with four captions each)."""
    torch.manual_seed(0)
    decoder = registry.build("decoder", tiny_decoder_config(name, FEATURE_DIM, tmp_path))
    features = torch.randn(2, FEATURE_DIM, generator=torch.Generator().manual_seed(5))
    batch = {"features": features.repeat_interleave(4, dim=0), "captions": list(CAPTIONS) * 2,
             "text_features": torch.randn(8, FEATURE_DIM)}
    decoder.train()
    decoder.loss(batch)
    return decoder.eval()


@pytest.mark.parametrize("name", SAMPLING)
def test_sampling_is_seeded_reproducible_and_leaves_the_global_rng_alone(name, tmp_path):
    decoder = _tiny(name, tmp_path)
    features = torch.randn(3, FEATURE_DIM, generator=torch.Generator().manual_seed(2))
    greedy = decoder.generate(features)
    state = torch.get_rng_state()
    first = decoder.generate_samples(features, num_samples=4, seed=0)
    assert torch.equal(torch.get_rng_state(), state)  # a private generator only
    assert len(first) == 3 and all(len(s) == 4 and all(isinstance(c, str) for c in s)
                                   for s in first)
    assert decoder.generate_samples(features, num_samples=4, seed=0) == first
    assert decoder.generate_samples(features, num_samples=4, seed=1) != first
    assert decoder.generate(features) == greedy  # sampling changed nothing
    assert decoder.generate_samples(features[:0], num_samples=4) == []


@pytest.mark.parametrize("name", SAMPLING)
def test_default_generate_ignores_the_sampling_options(name, tmp_path):
    decoder = _tiny(name, tmp_path)
    features = torch.randn(3, FEATURE_DIM, generator=torch.Generator().manual_seed(2))
    sampling = {f: v for f, v in {"sample_temperature": 0.3, "top_k": 2, "top_p": 0.5}.items()
                if f in decoder.Options.names()}
    assert decoder.generate(features, **sampling) == decoder.generate(features)
    if "sample_temperature" in decoder.Options.names():
        with pytest.raises(ValueError, match="sample_temperature must be >= 0"):
            decoder.generate(features, sample_temperature=-1.0)


@pytest.mark.parametrize("name", SAMPLING)
def test_samples_continue_one_stream_over_batches(name, tmp_path):
    from diffusion_captioner.inference import sample_captions

    decoder = _tiny(name, tmp_path)
    features = torch.randn(5, FEATURE_DIM, generator=torch.Generator().manual_seed(3))
    batched, _ = sample_captions(decoder, features, 3, seed=4, batch_size=2)
    again, _ = sample_captions(decoder, features, 3, seed=4, batch_size=2)
    assert batched == again and len(batched) == 5


def test_nearest_draws_its_candidates_without_replacement(tmp_path):
    decoder = _tiny("nearest", tmp_path)
    features = torch.randn(2, FEATURE_DIM, generator=torch.Generator().manual_seed(5))  # memorised
    for samples in decoder.generate_samples(features, num_samples=4, seed=3):
        assert sorted(samples) == sorted(CAPTIONS)  # its four captions, each once
    for samples in decoder.generate_samples(features, num_samples=6, seed=3):
        assert set(samples) == set(CAPTIONS) and len(samples) == 6


# ------------------------------------------------------------------------------- compare phase
class Lookup(CaptionDecoder):
    """A fake retrieval decoder that cannot sample."""

    capabilities = Capabilities(kind="retrieval")

    def generate_batch(self, features, options):
        return ["a red circle"] * len(features)


@dataclass(frozen=True)
class PickOptions(registry.GenerationOptions):
    steps: int = 2


class Picker(CaptionDecoder):
    """A fake iterative decoder that samples: more steps, fewer distinct captions."""

    Options = PickOptions
    capabilities = Capabilities(kind="iterative", step_option="steps", step_sweep=(1, 2),
                                sampling=True)

    def generate_batch(self, features, options):
        return ["a red circle"] * len(features)

    def sample_batch(self, features, options, num_samples, generator):
        pool = ["a red circle", "a blue square", "the green triangle above", "a small circle"]
        return [[pool[int(torch.randint(len(pool) // options.steps, (), generator=generator))]
                 for _ in range(num_samples)] for _ in range(len(features))]


def test_the_phase_scores_samplers_at_each_step_count_and_skips_the_others(tmp_path):
    records = [CaptionRecord(k, "", (f"a red circle {k}", "a blue square"), "test")
               for k in (4, 9, 11)]
    test = SplitFeatures(records, torch.zeros(3, FEATURE_DIM))
    summaries = {name: {"parameters": {"total": 1, "trainable": 1}, "train_steps": 1,
                        "train_seconds": 1.0,
                        "test": {"default": {"options": {}, "scores": {"CIDEr": 1.0},
                                             "skipped": {}}}}
                 for name in ("picker", "lookup")}
    run = RunFolder(tmp_path)
    settings = diversity_settings({"samples": 3, "seed": 0})
    diversity_phase({"picker": Picker().eval(), "lookup": Lookup().eval()},
                    {"picker": {}, "lookup": {}}, test, settings, run, summaries)
    assert "capabilities.sampling is False" in summaries["lookup"]["diversity"]["skipped"]
    runs = summaries["picker"]["diversity"]["runs"]
    assert list(runs) == ["default", "1"] and runs["default"]["options"] == {}
    assert runs["1"]["scores"]["distinct_1"] > runs["default"]["scores"]["distinct_1"]
    samples = json.loads(run.decoder("picker").samples.read_text())
    assert sorted(samples) == ["11", "4", "9"] and all(len(s) == 3 for s in samples.values())
    assert json.loads(run.decoder("picker").summary.read_text())["diversity"]["samples"] == 3

    metrics = {"test_images": 3, "encoder": {"model": "m", "fingerprint": "f"},
               "decoders": summaries, "diversity": {**settings, "seconds": 1.0}}
    report = render_markdown({"command": "dcap compare", "dataset": {}}, metrics)
    section = report[report.index("## Diversity"):]
    assert "| picker | 1 | " in section and "| picker | 2 (default) | " in section
    assert "- lookup: not sampled: Lookup declares no sampling" in section
    assert plot_quality_vs_diversity(summaries, tmp_path / "qd.png").is_file()
    off = render_markdown({"command": "c", "dataset": {}}, {**metrics, "diversity": {"off": True}})
    assert '"diversity": false' in off


def test_the_preset_block_is_checked():
    assert diversity_settings(None) == {"samples": 5, "seed": 0, "sweep": True}
    assert diversity_settings(False) is None
    with pytest.raises(ValueError, match="unknown key.*sampels"):
        diversity_settings({"sampels": 5})
    with pytest.raises(ValueError, match="samples must be an int >= 2"):
        diversity_settings({"samples": 1})
    with pytest.raises(ValueError, match="max_steps must be an int >= 1 or null"):
        diversity_settings({"max_steps": 0})
    assert diversity_settings({"max_steps": 3})["max_steps"] == 3


def test_max_steps_cuts_the_sweep_but_never_the_default_options(tmp_path):
    records = [CaptionRecord(k, "", ("a red circle", "a blue square"), "test") for k in (1, 2)]
    test = SplitFeatures(records, torch.zeros(2, FEATURE_DIM))
    summaries = {"picker": {}}
    for most, expected in ((1, ["default", "1"]), (2, ["default", "1", "2"])):
        diversity_phase({"picker": Picker().eval()}, {"picker": {"steps": 4}}, test,
                        diversity_settings({"samples": 2, "max_steps": most}), RunFolder(tmp_path),
                        summaries)
        assert list(summaries["picker"]["diversity"]["runs"]) == expected  # 4: the default
    assert summaries["picker"]["diversity"]["max_steps"] == 2  # recorded: a change resamples


def test_a_decoder_without_sampling_says_so():
    with pytest.raises(ValueError, match=r"Lookup cannot sample \(capabilities.sampling is False\)"):
        Lookup().generate_samples(torch.zeros(1, FEATURE_DIM))


class Stubborn(CaptionDecoder):
    """A fake trainable decoder that cannot sample (the default capabilities)."""

    def __init__(self, feature_dim: int) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(()))

    def loss(self, batch):
        return {"loss": (self.weight - 1) ** 2}

    def generate_batch(self, features, options):
        return ["a red circle"] * len(features)


def test_compare_reports_diversity_and_skips_a_decoder_that_cannot_sample(
        clean_registry, tiny_clip_dir, tmp_path):
    from conftest import TINY_SHAPES

    from diffusion_captioner.comparison import compare

    clean_registry.CaptionDecoder.register("stubborn")(Stubborn)
    preset = tmp_path / "small.json"
    preset.write_text(json.dumps({"include": ["embedded"], "speed": False,
                                  "diversity": {"samples": 3, "seed": 1, "sweep": False}}))
    train = {"max_steps": 2, "batch_size": 8, "eval_every": 2, "eval_batches": 1,
             "log_every": 1, "warmup_steps": 0, "max_minutes": None}
    metrics = compare(["nearest", "stubborn"], tmp_path / "run", preset=str(preset),
                      dataset=TINY_SHAPES, encoder=f"local-dir:{tiny_clip_dir}",
                      cache_dir=tmp_path / "cache", train_overrides=train, progress=False)
    assert metrics["diversity"]["samples"] == 3
    nearest = metrics["decoders"]["nearest"]["diversity"]
    assert set(nearest["runs"]["default"]["scores"]) == set(div.DIVERSITY_SCORES)
    assert "skipped" in metrics["decoders"]["stubborn"]["diversity"]
    report = (tmp_path / "run" / "report.md").read_text()
    assert "| nearest | - | " in report
    assert "- stubborn: not sampled: Stubborn declares no sampling" in report
    assert (tmp_path / "run" / "nearest" / "samples_test.json").is_file()
    assert (tmp_path / "run" / "quality_vs_diversity.png").is_file()
    rerank = metrics["decoders"]["nearest"]["rerank"]  # its own row, from the same samples
    assert rerank["candidates"] == 4 and "CIDEr" in rerank["scores"]
    assert "stubborn" not in [n for n, s in metrics["decoders"].items() if s.get("rerank")]
    assert "| nearest+rerank | 4 | " in report
    assert (tmp_path / "run" / "nearest" / "results_test_rerank.json").is_file()
