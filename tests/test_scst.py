"""Self-critical sequence training: the loss and its baselines, every decoder's scored samples,
the phase on the one trainer (resumable), the -scst rows of compare. Offline, CPU, tiny."""

from __future__ import annotations

import json
from pathlib import Path

import helpers  # sorts before torch/transformers: it sets HF_HUB_OFFLINE first
import jsonlines
import pytest
import torch
import torch.nn.functional as F
from helpers import CAPTIONS, tiny_decoder_config

import registry
from diffusion_captioner.analysis import like_with_like
from diffusion_captioner.run_folder import DecoderPlan
from diffusion_captioner.scst import (
    ImageReferences,
    ScstPlan,
    SelfCritical,
    mean_of_others,
    scst_loss,
    split_scst,
)
from diffusion_captioner.trainer import Trainer
from eval.cider_reward import CiderDReward

FEATURE_DIM = 8
SCORED = ("clipcap", "diffusion", "mnic")


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch):
    helpers.block_network(monkeypatch)


def _tiny(name: str, tmp_path: Path, **overrides) -> registry.CaptionDecoder:
    torch.manual_seed(0)
    config = {**tiny_decoder_config(name, FEATURE_DIM, tmp_path), **overrides}
    return registry.build("decoder", config).eval()


def _features(n: int, seed: int = 2) -> torch.Tensor:
    return torch.randn(n, FEATURE_DIM, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------ the loss
def test_the_gradient_raises_a_sample_that_beats_the_baseline_and_lowers_one_that_loses():
    logits = torch.zeros(3, requires_grad=True)  # a one-decision policy over three words
    before = F.log_softmax(logits, -1).detach()
    drawn = torch.tensor([0, 1])  # two samples: word 0 (reward 1) and word 1 (reward 0)
    log_probs = F.log_softmax(logits, -1)[drawn][None]  # (1, 2)
    rewards, baselines = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.5, 0.5]])
    scst_loss(log_probs, rewards, baselines, torch.ones(1, 2)).backward()
    with torch.no_grad():
        logits -= 0.5 * logits.grad  # one SGD step
    after = F.log_softmax(logits, -1).detach()
    assert after[0] > before[0] and after[1] < before[1]
    assert logits.grad[2] == pytest.approx(0.0)  # the undrawn word: only normalisation moves it


def test_the_loss_is_a_mean_per_decision_and_ignores_gradients_of_the_rewards():
    log_probs = torch.tensor([[-2.0, -4.0]], requires_grad=True)
    rewards = torch.tensor([[3.0, 1.0]], requires_grad=True)
    loss = scst_loss(log_probs, rewards, torch.tensor([[2.0, 2.0]]), torch.tensor([[2.0, 4.0]]))
    assert float(loss.detach()) == pytest.approx(-((1 * -2.0) + (-1 * -4.0)) / 6)
    loss.backward()
    assert rewards.grad is None  # the advantage is a constant


def test_the_mean_baseline_is_the_mean_of_the_other_samples():
    rewards = torch.tensor([[1.0, 2.0, 6.0], [0.0, 0.0, 3.0]])
    expected = torch.tensor([[4.0, 3.5, 1.5], [1.5, 1.5, 0.0]])
    assert torch.allclose(mean_of_others(rewards), expected)
    assert torch.allclose((rewards - mean_of_others(rewards)).sum(1) * 0, torch.zeros(2))


# ------------------------------------------------------------------------- scored samples
def test_every_builtin_decoder_that_samples_scores_its_samples():
    for name in registry.available("decoder"):
        capabilities = registry.resolve("decoder", name).capabilities
        assert capabilities.log_probs == (name in SCORED), name


@pytest.mark.parametrize("name", SCORED)
def test_scored_samples_are_the_samples_with_a_differentiable_log_probability(name, tmp_path):
    decoder = _tiny(name, tmp_path)
    features = _features(3)
    plain = decoder.generate_samples(features, 4, generator=torch.Generator().manual_seed(7))
    scored = decoder.sample_with_log_probs(features, 4, torch.Generator().manual_seed(7))
    assert scored.captions == plain  # the same draws as generate_samples
    assert scored.log_probs.shape == (3, 4) and scored.log_probs.requires_grad
    assert bool((scored.log_probs <= 0).all()) and bool(torch.isfinite(scored.log_probs).all())
    assert bool((scored.decisions >= 1).all())
    scored.log_probs.sum().backward()
    grads = [p.grad for p in decoder.parameters() if p.grad is not None]
    assert grads and sum(float(g.abs().sum()) for g in grads) > 0


def test_clipcaps_log_probability_is_its_teacher_forced_caption_likelihood(tmp_path):
    decoder = _tiny("clipcap", tmp_path)
    features = _features(2)
    scored = decoder.sample_with_log_probs(features, 3, torch.Generator().manual_seed(1))
    for b in range(2):
        for j in range(3):
            tokens = int(scored.decisions[b, j])
            caption = scored.captions[b][j]
            if tokens >= decoder.max_length or not caption:
                continue  # cut at max_length (no eos): the loss would add one
            loss = decoder.loss({"features": features[b:b + 1], "captions": [caption]})["loss"]
            assert float(scored.log_probs[b, j].detach()) == pytest.approx(-float(loss.detach()) * tokens, abs=1e-4)


def test_a_top_1_cut_makes_every_sample_the_greedy_caption_with_log_probability_0(tmp_path):
    decoder = _tiny("clipcap", tmp_path)
    features = _features(3)
    scored = decoder.sample_with_log_probs(features, 2, torch.Generator(), top_k=1)
    assert [c for pair in scored.captions for c in pair] == [
        c for c in decoder.generate(features) for _ in range(2)]
    assert torch.allclose(scored.log_probs, torch.zeros(3, 2), atol=1e-5)


def test_mnics_log_probability_is_the_length_plus_every_token_at_its_one_pass(tmp_path):
    decoder = _tiny("mnic", tmp_path)
    features = _features(2)
    scored = decoder.sample_with_log_probs(features, 3, torch.Generator().manual_seed(3),
                                           steps=1)
    for b in range(2):
        for j in range(3):
            ids = decoder.tokenizer(scored.captions[b][j], add_special_tokens=False)["input_ids"]
            length = torch.tensor([len(ids)])
            masked = torch.full((1, len(ids)), decoder.mask_token_id)
            logits = decoder.token_logits(masked, torch.ones(1, len(ids), dtype=torch.bool),
                                          features[b:b + 1])
            logits = logits.masked_fill(~decoder.allowed_tokens, float("-inf"))
            expected = F.log_softmax(logits, -1)[0, torch.arange(len(ids)), torch.tensor(ids)]
            expected = expected.sum() + F.log_softmax(decoder.length_logits(features[b:b + 1]),
                                                      -1)[0, length[0]]
            assert float(scored.log_probs[b, j].detach()) == pytest.approx(float(expected.detach()), abs=1e-4)
            assert int(scored.decisions[b, j]) == len(ids) + 1


def test_diffusions_log_probability_counts_the_drawn_length_and_its_words(tmp_path):
    decoder = _tiny("diffusion", tmp_path, length_head=True, mixed_noise=0.5)
    features = _features(2)
    scored = decoder.sample_with_log_probs(features, 3, torch.Generator().manual_seed(4),
                                           steps=2, sampler="refine")
    assert scored.captions == decoder.generate_samples(
        features, 3, generator=torch.Generator().manual_seed(4), steps=2, sampler="refine")
    for b in range(2):
        for j in range(3):  # L words (an empty slot decodes to nothing) and the length
            words = len(scored.captions[b][j].split())
            assert words + 1 <= int(scored.decisions[b, j]) <= decoder.max_length + 1


def test_a_decoder_without_log_probabilities_refuses_scst(tmp_path):
    decoder = _tiny("nearest", tmp_path)
    with pytest.raises(ValueError, match="capabilities.log_probs is False"):
        decoder.sample_with_log_probs(_features(2), 2, torch.Generator())


# ------------------------------------------------------------------------- plans and rows
def test_the_scst_block_is_checked_in_one_line():
    plan = ScstPlan.from_dict({"samples": 3, "baseline": "mean", "lr": 1e-5, "max_steps": 9},
                              {"seed": 4, "lr": 1.0})
    assert (plan.samples, plan.baseline, plan.train.lr, plan.train.seed) == (3, "mean", 1e-5, 4)
    assert plan.train.batch_size == 16 and plan.train.max_steps == 9  # the phase's defaults
    for block, message in [({"sampels": 3}, "unknown training option.*sampels"),
                           ({"baseline": "best"}, "choose greedy"),
                           ({"baseline": "mean", "samples": 1}, "samples >= 2"),
                           ({"samples": 0}, "int >= 1"), ({"sample": 3}, "mapping"),
                           ({"consensus_targets": 0.5}, "first phase only")]:
        with pytest.raises(ValueError, match=message):
            ScstPlan.from_dict(block, owner="clipcap")


def test_a_train_scst_block_makes_a_plain_row_and_an_scst_row_after_all_plain_ones():
    plans = {"clipcap": DecoderPlan({"type": "clipcap"}, {"lr": 1.0, "scst": {"samples": 2}}),
             "nearest": DecoderPlan({"type": "nearest"}, {"lr": 2.0})}
    rows = split_scst(plans)
    assert list(rows) == ["clipcap", "nearest", "clipcap-scst"]
    assert rows["clipcap"].train == {"lr": 1.0} and not rows["clipcap"].scst
    assert rows["clipcap-scst"].train == {"lr": 1.0}
    assert rows["clipcap-scst"].scst == {"samples": 2}
    with pytest.raises(ValueError, match="rename that decoder"):
        split_scst({**plans, "clipcap-scst": DecoderPlan({"type": "clipcap"}, {})})


def test_scst_logs_get_their_own_plot_and_stay_off_the_loss_plot(tmp_path):
    from eval.plots import plot_scst_curves, plot_training_curves

    first = [{"step": s, "loss": 2.0 / s} for s in range(1, 5)] + [{"step": 4, "val_loss": 0.6}]
    scst = [{"step": 0, "val_loss": -3.1}] + [
        {"step": s, "loss": -0.1, "reward": 3.0, "baseline": 3.2, "beat": 0.1,
         "greedy_reward": 3.2} for s in range(1, 5)] + [{"step": 4, "val_loss": -3.3}]
    assert plot_scst_curves({"clipcap": first}, tmp_path / "none.png") is None
    assert plot_scst_curves({"clipcap": first, "clipcap-scst": scst}, tmp_path / "s.png")
    assert plot_training_curves({"clipcap-scst": scst}, tmp_path / "t.png") is None
    assert plot_training_curves({"clipcap": first, "clipcap-scst": scst}, tmp_path / "t.png")
    assert (tmp_path / "s.png").is_file() and (tmp_path / "t.png").is_file()


def test_significance_compares_like_with_like():
    names = ["clipcap", "diffusion", "clipcap-scst", "diffusion-scst"]
    assert like_with_like(names) == [
        ("diffusion", "clipcap"), ("diffusion-scst", "clipcap-scst"),
        ("clipcap-scst", "clipcap"), ("diffusion-scst", "diffusion")]


# ------------------------------------------------------------------------- the phase
REFERENCES = {i: [CAPTIONS[i % 4], CAPTIONS[(i + 1) % 4]] for i in range(8)}


def _phase(tmp_path: Path, folder: str, baseline: str = "greedy", stop: int | None = None,
           lr: float = 1e-3):
    decoder = _tiny("clipcap", tmp_path)
    features = _features(8, seed=9)
    reward = CiderDReward(REFERENCES)
    plan = ScstPlan.from_dict({"samples": 3, "baseline": baseline, "batch_size": 4, "lr": lr,
                               "max_steps": 6, "eval_every": 3, "eval_batches": 1,
                               "log_every": 1, "max_grad_norm": None})
    images = ImageReferences(features, list(REFERENCES))
    trainer = Trainer(decoder, images, images, plan.train, tmp_path / folder, progress=False,
                      objective=SelfCritical(reward, reward, {}, plan))
    return trainer, trainer.fit(stop_at_step=stop)


def _logged(folder: Path) -> dict[int, dict]:
    with jsonlines.open(folder / "train_log.jsonl") as log:
        return {row["step"]: row for row in log if "reward" in row}


@pytest.mark.parametrize("baseline", ["greedy", "mean"])
def test_the_phase_logs_reward_baseline_and_share_that_beat_it(tmp_path, baseline):
    trainer, state = _phase(tmp_path, "run", baseline)
    assert state.finished and state.step == 6
    rows = _logged(tmp_path / "run")
    assert sorted(rows) == [1, 2, 3, 4, 5, 6]
    for row in rows.values():
        assert 0 <= row["beat"] <= 1 and row["reward"] >= 0
        assert ("greedy_reward" in row) == (baseline == "greedy")
    with jsonlines.open(tmp_path / "run" / "train_log.jsonl") as log:
        validations = {row["step"]: row["val_loss"] for row in log if "val_loss" in row}
    assert sorted(validations) == [0, 3, 6]  # the starting weights first
    assert all(v <= 0 for v in validations.values())  # minus a CIDEr-D
    assert (tmp_path / "run" / "checkpoint" / "best" / "config.json").is_file()


def test_the_starting_weights_stay_best_unless_scst_beats_them_on_validation(tmp_path):
    class StartIsBest(SelfCritical):  # validation: the start scores best, every update worse
        calls = 0

        def validation_loss(self, decoder, batch):
            self.calls += 1
            return (-1.0 if self.calls == 1 else 0.0), 1

    decoder = _tiny("clipcap", tmp_path)
    start = {k: v.clone() for k, v in decoder.state_dict().items()}
    reward = CiderDReward(REFERENCES)
    plan = ScstPlan.from_dict({"samples": 2, "batch_size": 4, "lr": 1e-2, "max_steps": 4,
                               "eval_every": 2, "eval_batches": 1})
    images = ImageReferences(_features(8, seed=9), list(REFERENCES))
    trainer = Trainer(decoder, images, images, plan.train, tmp_path / "run", progress=False,
                      objective=StartIsBest(reward, reward, {}, plan))
    state = trainer.fit()
    assert state.best_val_loss == -1.0
    best = type(decoder).from_pretrained(trainer.best_dir).state_dict()
    assert all(torch.equal(best[k], start[k]) for k in start)
    trained = trainer.accelerator.unwrap_model(trainer.model).state_dict()
    assert not all(torch.equal(trained[k], start[k]) for k in start)  # it did train


def test_the_phase_resumes_after_a_kill_at_the_same_step(tmp_path):
    _phase(tmp_path, "whole")
    _, state = _phase(tmp_path, "parts", stop=4)
    assert state.step == 4 and not state.finished
    (tmp_path / "parts" / "train_log.jsonl").open("a").write('{"step": 5, "loss": 9.0, "rew')
    torch.manual_seed(1234)  # a fresh process: nothing carries over but the checkpoint
    _, state = _phase(tmp_path, "parts")
    assert state.finished and state.step == 6
    whole, parts = _logged(tmp_path / "whole"), _logged(tmp_path / "parts")
    assert sorted(parts) == sorted(whole)  # the cut line was dropped, no step logged twice
    for step in (5, 6):
        for key in ("loss", "reward", "baseline", "beat"):
            assert parts[step][key] == pytest.approx(whole[step][key], abs=1e-6), (step, key)


# ------------------------------------------------------------------------- compare
def test_compare_writes_a_cross_entropy_row_and_its_scst_row(clean_registry, tiny_clip_dir,
                                                              tmp_path):
    from conftest import TINY_SHAPES

    from diffusion_captioner.comparison import compare

    preset = tmp_path / "small.json"
    scst = {"samples": 2, "batch_size": 4, "max_steps": 2, "eval_every": 2, "eval_batches": 1,
            "log_every": 1}
    preset.write_text(json.dumps({"include": ["embedded"], "speed": False, "diversity": False,
                                  "decoders": {"clipcap": {"train": {"scst": scst}}}}))
    train = {"max_steps": 2, "batch_size": 8, "eval_every": 2, "eval_batches": 1,
             "log_every": 1, "warmup_steps": 0, "max_minutes": None}
    common = dict(preset=str(preset), dataset=TINY_SHAPES, encoder=f"local-dir:{tiny_clip_dir}",
                  cache_dir=tmp_path / "cache", train_overrides=train, progress=False)
    with pytest.raises(ValueError, match="nearest: .*log_probs is False.*drop train.scst"):
        compare(["nearest"], tmp_path / "refused", **{
            **common, "train_overrides": {**train, "scst": scst}})
    assert not (tmp_path / "refused" / "nearest").exists()  # refused before any training
    metrics = compare(["clipcap", "nearest"], tmp_path / "run", **common)
    assert list(metrics["decoders"]) == ["clipcap", "nearest", "clipcap-scst"]
    row = metrics["decoders"]["clipcap-scst"]
    assert row["train_steps"] == 2 and row["scst"]["from"] == "clipcap"
    assert row["scst"]["first_phase_steps"] == 2 and row["scst"]["samples"] == 2
    assert "CIDEr" in row["test"]["default"]["scores"]
    tests = [t for t in metrics["significance"].values() if t["row"] == "clipcap-scst"]
    assert [t["baseline"] for t in tests] == ["clipcap"] and "CIDEr" in tests[0]
    report = (tmp_path / "run" / "report.md").read_text()
    assert "**clipcap-scst** vs **clipcap**: CIDEr" in report
    assert "| clipcap-scst | " in report and "(clipcap " in report and " + SCST " in report
    assert "scst_curves.png" in metrics["plots"] and "![self-critical training]" in report
    plan = json.loads((tmp_path / "run" / "clipcap" / "plan.json").read_text())
    assert "scst" not in plan["train"]  # the plain row is cross-entropy only
    again = compare(["clipcap", "nearest"], tmp_path / "run", **common)  # resumes: nothing new
    assert again["decoders"]["clipcap-scst"]["train_seconds"] == row["train_seconds"]


# ------------------------------------------------------------------------- a plugin
def test_a_plugin_that_scores_its_samples_learns_the_rewarded_caption(clean_registry, tmp_path):
    from dataclasses import dataclass

    from diffusion_captioner.sampling import draw, regroup
    from registry import Capabilities, CaptionDecoder, GenerationOptions, ScoredSamples

    choices = ("a red circle", "a blue square", "a green triangle")

    @dataclass(frozen=True)
    class PickOptions(GenerationOptions):
        sample_temperature: float = 1.0

    class PickOne(CaptionDecoder):  # one categorical decision per caption, nothing else
        Options = PickOptions
        capabilities = Capabilities(sampling=True, log_probs=True)

        def __init__(self, feature_dim: int) -> None:
            super().__init__()
            self.logits = torch.nn.Parameter(torch.zeros(len(choices)))

        def loss(self, batch):
            return {"loss": self.logits.sum() * 0}

        def generate_batch(self, features, options):
            return [choices[int(self.logits.argmax())]] * len(features)

        def scored_sample_batch(self, features, options, num_samples, generator):
            rows = self.logits.expand(len(features) * num_samples, -1)  # (B n, 3)
            ids = draw(rows.detach(), generator, options.sample_temperature)  # (B n,)
            logp = F.log_softmax(rows, -1).gather(1, ids[:, None])[:, 0]  # (B n,)
            shape = (len(features), num_samples)
            return ScoredSamples(regroup([choices[i] for i in ids.tolist()], num_samples),
                                 logp.view(shape), torch.ones(shape))

    clean_registry.CaptionDecoder.register("pick-one")(PickOne)
    references = {i: ["a green triangle"] for i in range(4)}
    reward = CiderDReward({**references, 9: ["a red circle"], 10: ["a blue square"]})
    for baseline in ("greedy", "mean"):
        decoder = PickOne(feature_dim=FEATURE_DIM)
        assert decoder.generate(_features(1)) == ["a red circle"]
        plan = ScstPlan.from_dict({"samples": 4, "baseline": baseline, "batch_size": 4,
                                   "lr": 0.3, "max_steps": 25, "eval_every": 25,
                                   "eval_batches": 1})
        images = ImageReferences(_features(4), list(references))
        trainer = Trainer(decoder, images, images, plan.train, tmp_path / baseline,
                          progress=False, objective=SelfCritical(reward, reward, {}, plan))
        trainer.fit()
        assert decoder.generate(_features(1)) == ["a green triangle"], baseline
