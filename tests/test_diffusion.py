"""The diffusion decoder: schedule maths, loss parts, memorisation, sampling, checkpoints, presets.

Offline and CPU only: tiny random DistilBERTs built from a config, or saved by the test to a temp
directory in Hugging Face format and loaded through the same name-or-path code as a hub name.
"""

from __future__ import annotations

import math

import helpers  # noqa: F401 - sets HF_HUB_OFFLINE before transformers is imported
import pytest
import torch
from helpers import (
    CAPTIONS,
    block_network,
    build_with_generation_defaults,
    tiny_diffusion_config,
    tiny_word_tokenizer_dir,
)

from diffusion_captioner.diffusion.schedule import NoiseSchedule, clamp_to_vocabulary

FEATURE_DIM = 16


def build_tiny(tmp_path, **overrides):
    from diffusion_captioner.diffusion.decoder import DiffusionDecoder

    torch.manual_seed(0)
    config = tiny_diffusion_config(FEATURE_DIM, tiny_word_tokenizer_dir(tmp_path),
                                   **{"steps": 3, **overrides})
    return build_with_generation_defaults(DiffusionDecoder, config)


def fixed_batch(with_text: bool = True) -> dict:
    generator = torch.Generator().manual_seed(1)
    batch = {
        "features": torch.randn(len(CAPTIONS), FEATURE_DIM, generator=generator),
        "captions": list(CAPTIONS),
    }
    if with_text:
        batch["text_features"] = torch.randn(len(CAPTIONS), FEATURE_DIM, generator=generator)
    return batch


# --------------------------------------------------------------------------------------------
# Schedule
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["linear", "cosine", "sqrt"])
@pytest.mark.parametrize("steps", [10, 1000])
def test_alpha_bar_is_monotone_from_one_to_near_zero(name, steps):
    schedule = NoiseSchedule(name, steps)
    abar = schedule.alpha_bar
    assert abar.shape == (steps + 1,)
    assert abar[0] == 1.0
    assert torch.all(abar[1:] < abar[:-1]) or torch.all(abar[1:] <= abar[:-1])
    assert torch.all(abar[1:] < 1) and torch.all(abar > 0)
    assert abar[-1] < 0.05
    assert torch.all((schedule.betas > 0) & (schedule.betas < 1))


@pytest.mark.parametrize("name", ["linear", "cosine", "sqrt"])
def test_q_sample_mean_and_variance_by_monte_carlo(name):
    schedule = NoiseSchedule(name, 1000)
    torch.manual_seed(0)
    x0 = torch.tensor([[1.5, -2.0, 0.5]])  # (1, 3)
    n = 40_000
    for step in (1, 300, 700, 1000):
        t = torch.full((n,), step)
        samples = schedule.q_sample(x0.expand(n, -1), t)  # (n, 3)
        abar = float(schedule.alpha_bar[step])
        expected_mean = math.sqrt(abar) * x0[0]
        expected_std = math.sqrt(1 - abar)
        tolerance = 4 * max(expected_std, 1e-3) / math.sqrt(n) + 1e-4
        assert torch.allclose(samples.mean(0), expected_mean.float(), atol=tolerance)
        assert torch.allclose(samples.std(0), torch.full((3,), expected_std), rtol=0.03, atol=1e-4)


def test_q_sample_at_t0_is_identity_and_uses_given_noise():
    schedule = NoiseSchedule("cosine", 100)
    x0, noise = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    assert torch.equal(schedule.q_sample(x0, torch.zeros(2, dtype=torch.long), noise), x0)
    t = torch.tensor([10, 90])
    abar = schedule.alpha_bar[t].float().view(2, 1, 1)
    expected = abar.sqrt() * x0 + (1 - abar).sqrt() * noise
    assert torch.allclose(schedule.q_sample(x0, t, noise), expected, atol=1e-6)


def test_inference_timesteps_are_k_distinct_and_decreasing():
    schedule = NoiseSchedule("cosine", 1000)
    assert schedule.inference_timesteps(1) == [1000]
    assert schedule.inference_timesteps(5) == [1000, 800, 600, 400, 200]
    for k in (2, 7, 20):
        steps = schedule.inference_timesteps(k)
        assert len(steps) == k and steps == sorted(set(steps), reverse=True) and steps[-1] >= 1
    with pytest.raises(ValueError, match="1..T = 1..3"):
        NoiseSchedule("cosine", 3).inference_timesteps(10)
    with pytest.raises(ValueError):
        schedule.inference_timesteps(0)


def test_implied_noise_is_zero_at_clean_positions():
    """A committed (t = 0) position must not blow up DDIM's implied noise (1 / sqrt(1 - 1))."""
    schedule = NoiseSchedule("cosine", 100)
    x0_hat, x_t = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    t = torch.tensor([[0, 50, 100], [100, 0, 1]])  # (B, L): per-position timesteps
    eps = schedule.predict_noise(x_t, x0_hat, t)  # (B, L, E)
    assert torch.all(eps[t == 0] == 0)
    abar = schedule.alpha_bar[50].float()
    expected = (x_t[0, 1] - abar.sqrt() * x0_hat[0, 1]) / (1 - abar).sqrt()
    assert torch.allclose(eps[0, 1], expected, atol=1e-5)
    step = schedule.step(x0_hat, x_t, t, torch.zeros_like(t), "ddim")
    assert step.abs().max() < 100


def test_sampler_steps_recover_the_forward_process_from_a_perfect_prediction():
    schedule = NoiseSchedule("cosine", 1000)
    x0, noise = torch.randn(3, 5, 8), torch.randn(3, 5, 8)
    t, t_next = torch.full((3,), 800), torch.full((3,), 400)
    x_t = schedule.q_sample(x0, t, noise)
    # DDIM with the true x_0 lands exactly on q_sample(x_0, t_next) with the same noise.
    ddim = schedule.step(x0, x_t, t, t_next, "ddim")
    assert torch.allclose(ddim, schedule.q_sample(x0, t_next, noise), atol=1e-5)
    assert torch.equal(schedule.step(x0, x_t, t, t_next, "feed"), x0)
    fresh = torch.randn(3, 5, 8)
    renoised = schedule.step(x0, x_t, t, t_next, "renoise", fresh)
    assert torch.allclose(renoised, schedule.q_sample(x0, t_next, fresh))
    with pytest.raises(ValueError, match="ddim"):
        schedule.step(x0, x_t, t, t_next, "euler")


def test_per_position_timesteps_broadcast():
    schedule = NoiseSchedule("cosine", 100)
    x0, noise = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    t = torch.tensor([[0, 50, 100], [10, 10, 10]])
    mixed = schedule.q_sample(x0, t, noise)
    for row in range(2):
        for position in range(3):
            one = schedule.q_sample(x0[row:row + 1, position], t[row, position:position + 1],
                                    noise[row:row + 1, position])
            assert torch.allclose(mixed[row, position], one[0], atol=1e-6)


def test_clamp_snaps_to_the_nearest_row_and_unknown_schedule_lists_choices():
    table = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    x = torch.tensor([[[9.0, 1.0], [1.0, 0.5], [2.0, 8.0]]])
    assert torch.equal(clamp_to_vocabulary(x, table), table[[1, 0, 2]][None])
    with pytest.raises(ValueError, match="cosine"):
        NoiseSchedule("exp", 10)


# --------------------------------------------------------------------------------------------
# Loss
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"fusion": "add", "restore_loss": "l1", "dynamic_rounding": 1.0},
        {"time_embedding": False, "self_conditioning": False, "text_condition": False,
         "x1_loss": False},
        {"schedule": "sqrt", "normalize_embeddings": True, "embed_scale": 0.3,
         "input_scaling": True},
        {"mixed_noise": 0.75, "x1_loss": False, "sampler": "refine", "length_head": True,
         "image_tokens": 3},
    ],
    ids=["default", "add-l1-dynamic", "bare", "sqrt-normalised", "mixed-length"],
)
def test_every_loss_part_is_finite(tmp_path, overrides):
    decoder = build_tiny(tmp_path, **overrides)
    for with_text in (True, False):  # absent text features count as dropped
        parts = decoder.loss(fixed_batch(with_text))
        assert {"loss", "restore_xt", "rounding_xt", "l_simple", "l_rounding",
                "rounding_lambda"} <= set(parts)
        if decoder.config["x1_loss"]:
            assert {"restore_x1", "rounding_x1"} <= set(parts)
        if decoder.config["length_head"]:
            assert "length" in parts
        for name, value in parts.items():
            assert value.dim() == 0 and torch.isfinite(value), name
        parts["loss"].backward()
    trainable = [p for p in decoder.parameters() if p.requires_grad]
    assert all(torch.isfinite(p.grad).all() for p in trainable if p.grad is not None)
    assert not decoder.word_embeddings.requires_grad  # frozen embeddings and LM head


@pytest.mark.parametrize("fusion", ["concat", "add"])
def test_text_keep_none_means_every_row_sees_its_text(tmp_path, fusion):
    """None (inference's cond pass: no mask to build) = all True; False drops the text."""
    decoder = build_tiny(tmp_path, fusion=fusion, image_tokens=1).eval()
    torch.manual_seed(0)
    x_t, t = torch.randn(2, decoder.max_length, decoder.denoiser.dim), torch.tensor([5, 40])
    image, text = torch.randn(2, 16), torch.randn(2, 16)
    every = decoder.denoise(x_t, t, image, text, None)
    kept = decoder.denoise(x_t, t, image, text, torch.tensor([True, True]))
    dropped = decoder.denoise(x_t, t, image, text, torch.tensor([True, False]))
    torch.testing.assert_close(every, kept)
    torch.testing.assert_close(dropped[0], every[0])
    assert not torch.allclose(dropped[1], every[1])


def test_embed_is_a_lookup_in_the_diffusion_table(tmp_path):
    decoder = build_tiny(tmp_path, embed_scale=0.3)
    ids = torch.tensor([[0, 3, 3], [5, 1, 2]])
    assert torch.equal(decoder.embed(ids), decoder.diffusion_table()[ids])


def test_mixed_noise_lowers_some_positions_only(tmp_path):
    decoder = build_tiny(tmp_path, mixed_noise=1.0)
    torch.manual_seed(0)
    t = torch.full((200,), 80)
    mixed = decoder._mix_timesteps(t, 12, lambda *shape: torch.rand(shape))
    assert mixed.shape == (200, 12)
    assert torch.all((mixed >= 0) & (mixed <= 80))
    assert (mixed < 80).any() and (mixed == 80).any()
    assert decoder.loss(fixed_batch())["loss"].isfinite()


@pytest.mark.parametrize("sampler", ["refine", "ddim"])
def test_length_head_fixes_the_caption_length(tmp_path, sampler):
    decoder = build_tiny(tmp_path, mixed_noise=0.5, length_head=True, sampler=sampler)
    features = torch.randn(5, FEATURE_DIM)
    lengths = decoder.length_head(decoder._features(features)).argmax(-1)
    captions = decoder.generate(features, steps=3)
    trajectory = decoder.generate_trajectory(features, steps=3)
    for caption, steps, n in zip(captions, trajectory, lengths.tolist(), strict=True):
        assert len(caption.split()) <= n  # cut at the committed end token (or an earlier stop)
        assert steps[-1] == caption and len(steps) == 3


def test_dynamic_lambda_follows_the_loss_ratio(tmp_path):
    decoder = build_tiny(tmp_path, dynamic_rounding=3.0)
    parts = decoder.loss(fixed_batch())
    expected = 3.0 * parts["l_simple"] / parts["l_rounding"]
    assert torch.allclose(parts["rounding_lambda"], expected.detach(), rtol=1e-5)
    decoder.eval()  # validation uses the fixed weight, and is reproducible
    first, second = decoder.loss(fixed_batch()), decoder.loss(fixed_batch())
    assert float(first["rounding_lambda"]) == pytest.approx(decoder.config["rounding_weight"])
    assert torch.equal(first["loss"], second["loss"])


def test_dynamic_lambda_survives_two_losses_before_one_backward(tmp_path):
    decoder = build_tiny(tmp_path, dynamic_rounding=1.0)
    total = decoder.loss(fixed_batch())["loss"] + decoder.loss(fixed_batch())["loss"]
    total.backward()  # the second fill_ of the lambda buffer must not corrupt the first graph
    assert all(p.grad is not None for p in decoder.parameters() if p.requires_grad)


@pytest.mark.parametrize("seed", range(4))  # both branches: with and without the previous x0
def test_every_trainable_parameter_gets_a_gradient_every_step(tmp_path, seed):
    """DistributedDataParallel fails on a parameter left out of a step's graph (self-conditioning
    skipped on half the steps used to leave its layer out)."""
    decoder = build_tiny(tmp_path, self_conditioning=True, x1_loss=True, length_head=True,
                         mixed_noise=0.5)
    torch.manual_seed(seed)
    decoder.loss(fixed_batch())["loss"].backward()
    missing = [n for n, p in decoder.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, missing


def test_more_steps_than_timesteps_runs_t_steps_with_a_warning(tmp_path, caplog):
    decoder = build_tiny(tmp_path, diffusion_steps=4)
    with caplog.at_level("WARNING"):
        trajectory = decoder.generate_trajectory(fixed_batch()["features"][:1], steps=9)
    assert len(trajectory[0]) == 4 and "running 4" in caplog.text


def test_bad_options_fail_with_the_choices(tmp_path):
    with pytest.raises(ValueError, match="concat"):
        build_tiny(tmp_path, fusion="sum")
    with pytest.raises(ValueError, match="mse"):
        build_tiny(tmp_path, restore_loss="huber")
    with pytest.raises(ValueError, match="positions"):
        build_tiny(tmp_path, max_length=40)
    with pytest.raises(ValueError, match="image_tokens"):
        build_tiny(tmp_path, fusion="add", image_tokens=2)


# --------------------------------------------------------------------------------------------
# Training and sampling
# --------------------------------------------------------------------------------------------
def train(decoder, batch, steps: int, lr: float = 3e-3) -> None:
    optimizer = torch.optim.AdamW([p for p in decoder.parameters() if p.requires_grad], lr=lr)
    decoder.train()
    for _ in range(steps):
        loss = decoder.loss(batch)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


@pytest.fixture(scope="module")
def memorised(tmp_path_factory):
    """A tiny decoder trained on one fixed batch of four captions (module-wide, ~10 s)."""
    torch.manual_seed(0)
    decoder = build_tiny(tmp_path_factory.mktemp("memorise"), embed_scale=0.3,
                         input_scaling=True, x1_loss=False, mixed_noise=0.75, length_head=True,
                         temperature=0.0, sampler="refine")
    batch = fixed_batch()
    train(decoder, batch, steps=600)
    return decoder, batch


def test_tiny_model_memorises_a_handful_of_captions(memorised):
    decoder, batch = memorised
    for steps in (1, 5):
        assert decoder.generate(batch["features"], steps=steps) == list(CAPTIONS)
    assert decoder.generate(batch["features"], steps=5, guidance=1.0) == list(CAPTIONS)
    assert decoder.generate(batch["features"], steps=5, sampler="refine") == list(CAPTIONS)


def test_generate_shapes_counts_and_determinism(memorised):
    decoder, batch = memorised
    features = torch.randn(6, FEATURE_DIM)
    decoder.train()
    first = decoder.generate(features, steps=3, seed=7)
    assert decoder.training  # mode restored
    assert len(first) == 6 and all(isinstance(c, str) for c in first)
    assert decoder.generate(features, steps=3, seed=7) == first
    for options in ({"sampler": "renoise"}, {"sampler": "renoise", "clamp": True},
                    {"sampler": "refine"}, {"guidance": 0.3}):
        again = decoder.generate(features, steps=2, seed=3, **options)
        assert again == decoder.generate(features, steps=2, seed=3, **options)
        assert len(again) == 6
    assert decoder.generate(features[:0]) == []
    with pytest.raises(ValueError, match="no generation option num_beams; it takes: steps"):
        decoder.generate(features, num_beams=3)  # clipcap's option: refused, not ignored
    with pytest.raises(ValueError, match="steps must be int"):
        decoder.generate(features, steps="3")
    with pytest.raises(ValueError, match="ddim"):
        decoder.generate(features, sampler="euler")
    with pytest.raises(ValueError, match="time_embedding=False"):  # no label fits an estimate
        decoder.generate(features, sampler="feed")
    with pytest.raises(ValueError, match="temperature 1"):  # trained at temperature 0
        decoder.generate(features, sampler="ddim")


@pytest.mark.parametrize("steps", [1, 4])
@pytest.mark.parametrize("sampler", ["renoise", "refine"])
def test_trajectory_has_k_entries_ending_in_the_caption(memorised, steps, sampler):
    decoder, _ = memorised
    features = torch.randn(3, FEATURE_DIM)
    captions = decoder.generate(features, steps=steps, seed=5, sampler=sampler)
    trajectory = decoder.generate_trajectory(features, steps=steps, seed=5, sampler=sampler)
    assert len(trajectory) == 3
    for per_image, caption in zip(trajectory, captions, strict=True):
        assert len(per_image) == steps
        assert per_image[-1] == caption


def test_save_load_round_trip_is_offline_and_generates_the_same(memorised, tmp_path, monkeypatch):
    from diffusion_captioner.diffusion.decoder import DiffusionDecoder
    from registry import CaptionDecoder

    decoder, batch = memorised
    decoder.save_pretrained(tmp_path / "ckpt")
    assert {"config.json", "model.safetensors", "tokenizer", "lm"} <= {
        p.name for p in (tmp_path / "ckpt").iterdir()}
    block_network(monkeypatch)
    loaded = CaptionDecoder.from_pretrained(tmp_path / "ckpt")
    assert isinstance(loaded, DiffusionDecoder)
    features = torch.cat([batch["features"], torch.randn(3, FEATURE_DIM)])
    for options in ({"steps": 5}, {"steps": 2, "guidance": 1.0, "sampler": "renoise"}):
        assert loaded.generate(features, **options) == decoder.generate(features, **options)
    state, reloaded = decoder.state_dict(), loaded.state_dict()
    assert state.keys() == reloaded.keys()
    assert all(torch.equal(state[k], reloaded[k]) for k in state)


def test_registration_and_step_sweep():
    import registry
    from diffusion_captioner.diffusion.decoder import DiffusionDecoder

    assert registry.resolve("decoder", "diffusion") is DiffusionDecoder
    assert DiffusionDecoder.capabilities.step_sweep == (1, 2, 5, 10, 20)
    assert DiffusionDecoder.capabilities.step_option == "steps"
    assert DiffusionDecoder.capabilities.kind == "iterative"
    assert DiffusionDecoder.needs_text_features
    assert "diffusion" in registry.describe(DiffusionDecoder).lower()


# --------------------------------------------------------------------------------------------
# Presets against a stand-in DistilBERT saved in Hugging Face format
# --------------------------------------------------------------------------------------------
@pytest.fixture
def stand_in_distilbert(tmp_path):
    """A tiny DistilBERT + tokenizer saved where a hub name would be downloaded to."""
    from helpers import WORDS
    from transformers import DistilBertConfig, DistilBertForMaskedLM

    from diffusion_captioner.tokenization import build_word_tokenizer

    tokenizer = build_word_tokenizer(WORDS)
    config = DistilBertConfig(vocab_size=len(tokenizer), dim=32, n_layers=1, n_heads=2,
                              hidden_dim=64, max_position_embeddings=20, pad_token_id=0)
    torch.manual_seed(0)
    model = DistilBertForMaskedLM(config)
    directory = tmp_path / "distilbert-stand-in"
    model.save_pretrained(str(directory))
    tokenizer.save_pretrained(str(directory))
    return directory, model


def test_paper_preset_builds_against_a_stand_in_distilbert(stand_in_distilbert, monkeypatch):
    from diffusion_captioner.presets import decoder_plan, load_preset
    from registry import build

    directory, pretrained = stand_in_distilbert
    block_network(monkeypatch)
    plan = decoder_plan(load_preset("paper"), "diffusion")
    assert plan["decoder"]["lm"] == "distilbert-base-uncased"
    assert load_preset("paper")["encoder"] == "ViT-B-32:openai"
    # one preset for `dcap compare --decoders diffusion,clipcap,mnic --preset paper`
    assert decoder_plan(load_preset("paper"), "clipcap") == decoder_plan(
        load_preset("clipcap-paper"), "clipcap")
    assert decoder_plan(load_preset("paper"), "mnic")["decoder"]["lm"] == "bert-base-uncased"
    assert plan["train"]["lr"] == 1e-4 and plan["train"]["lr_schedule"] == "linear_per_epoch"
    config = {**plan["decoder"], "lm": str(directory), "timesteps_per_caption": 3}
    decoder = build("decoder", config, feature_dim=FEATURE_DIM)
    assert decoder.config["max_length"] == 16 and decoder.schedule.steps == 1000
    assert decoder.schedule.name == "cosine" and decoder.config["rounding_weight"] == 0.3
    # the original: pretrained word embeddings (frozen), a random body, no timestep input
    assert torch.equal(decoder.word_embeddings, pretrained.get_input_embeddings().weight)
    layer = "transformer.layer.0.attention.q_lin.weight"
    assert not torch.equal(decoder.denoiser.mlm.distilbert.state_dict()[layer],
                           pretrained.distilbert.state_dict()[layer])
    assert not decoder.word_embeddings.requires_grad and decoder.denoiser.time_embed is None
    parts = decoder.loss(fixed_batch())
    assert all(torch.isfinite(v) for v in parts.values())
    captions = decoder.generate(torch.randn(2, FEATURE_DIM), **plan["generate"])
    assert len(captions) == 2


def test_random_body_keeps_only_the_pretrained_embeddings(stand_in_distilbert):
    from diffusion_captioner.diffusion.decoder import DiffusionDecoder

    directory, pretrained = stand_in_distilbert
    decoder = DiffusionDecoder(FEATURE_DIM, lm=str(directory), body_pretrained=False)
    assert torch.equal(decoder.word_embeddings, pretrained.get_input_embeddings().weight)
    layer = "transformer.layer.0.attention.q_lin.weight"
    assert not torch.equal(decoder.denoiser.mlm.distilbert.state_dict()[layer],
                           pretrained.distilbert.state_dict()[layer])


def test_embedded_preset_entry_builds(tmp_path):
    from diffusion_captioner.presets import decoder_plan, load_preset
    from registry import build

    plan = decoder_plan(load_preset("embedded"), "diffusion")
    decoder = build("decoder", plan["decoder"], feature_dim=FEATURE_DIM)
    assert decoder.config["tokenizer"] == "embedded:shapes_words"
    assert len(decoder.generate(torch.randn(2, FEATURE_DIM), **plan["generate"])) == 2


@pytest.mark.parametrize("done", [1, 2, 3, 4])
def test_refine_renoises_the_least_confident_share_of_the_span(tmp_path, done):
    """floor(n (K - k) / K) positions of the span restart at t = T, the rest are committed."""
    from diffusion_captioner.diffusion.samplers import RefineSampler, sampler_for

    decoder = build_tiny(tmp_path)
    batch, length = 3, decoder.max_length
    x0_hat = torch.randn(batch, length, decoder.word_embeddings.shape[1])  # (B, L, E)
    spans = torch.tensor([length, 5, 1])  # (B,)
    table = decoder.diffusion_table()
    run = decoder.sampling_run(decoder.schedule.inference_timesteps(5), None, spans,
                               lambda: torch.zeros_like(x0_hat))
    x_t, t = RefineSampler().next_input(run, x0_hat, x0_hat, torch.full((batch,), 1), done)
    noisy = t == decoder.schedule.steps  # (B, L)
    assert noisy.sum(-1).tolist() == [int(n) * (5 - done) // 5 for n in spans]
    for row, span in enumerate(spans.tolist()):
        assert not noisy[row, span:].any()  # nothing after the span is re-noised
        confidence = decoder.lm_logits(x0_hat[row]).softmax(-1).max(-1).values[:span]  # (n,)
        if noisy[row].any() and not noisy[row, :span].all():  # re-noised = the least confident
            assert confidence[noisy[row, :span]].max() <= confidence[~noisy[row, :span]].min()
    committed = ~noisy  # committed positions hold their most probable word's clean vector
    words = decoder.lm_logits(x0_hat).argmax(-1)  # (B, L)
    assert torch.equal(x_t[committed], table[words][committed])
    assert torch.all(x_t[noisy] == 0)  # the run's noise
    with pytest.raises(ValueError, match="feed, ddim, renoise, refine"):
        sampler_for("euler")


def test_image_guidance_halves_share_one_call_and_w_zero_is_unguided(tmp_path):
    decoder = build_tiny(tmp_path, image_dropout=0.5).eval()
    features = fixed_batch()["features"][:2]
    parts = decoder.train().loss(fixed_batch())  # the null image is trained
    parts["loss"].backward()
    assert decoder.null_image.grad is not None and decoder.null_image.grad.abs().sum() > 0
    decoder.eval()
    calls = []
    original = decoder.denoiser.forward
    decoder.denoiser.forward = lambda x, *a, **k: calls.append(x.shape[0]) or original(x, *a, **k)
    decoder.generate(features, steps=3, image_guidance=1.0)
    assert calls == [4, 4, 4]  # one call per step, both halves (2 x B rows) in it
    calls.clear()
    assert decoder.generate(features, steps=3, image_guidance=0.0) == decoder.generate(features,
                                                                                      steps=3)
    assert calls == [2] * 6  # w = 0 is the unguided path
    decoder.denoiser.forward = original
    x_t = torch.randn(2, decoder.max_length, decoder.word_embeddings.shape[1])
    t = torch.full((2,), 50)
    image = decoder._features(features)
    text = decoder._prior(image)
    null = decoder.null_image.expand_as(image)
    pair = decoder.denoiser.project(torch.cat([image, null]), torch.cat([text, text]))

    def guided(w):
        return decoder._guided_x0(x_t, t, image, text, 0.0, None, pair, image_guidance=w)

    unguided = decoder._guided_x0(x_t, t, image, text, 0.0, None)
    # (1 + w) cond - w uncond is linear in w and passes through the unguided output at w = 0
    torch.testing.assert_close(guided(2.0) - guided(1.0), guided(1.0) - unguided,
                               rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="image_dropout > 0"):
        build_tiny(tmp_path).generate(features, image_guidance=1.0)


def test_refine_repeats_restarts_a_repeated_phrase_before_anything_else(tmp_path):
    from diffusion_captioner.diffusion.samplers import RefineSampler, repeated_ngrams

    words = torch.tensor([[1, 2, 3, 4, 9, 1, 2, 3, 0, 0], [1, 2, 3, 4, 5, 6, 7, 8, 0, 0]])
    assert repeated_ngrams(words, 3).long().tolist() == [[0, 0, 0, 0, 0, 1, 1, 1, 0, 0],
                                                         [0] * 10]
    assert repeated_ngrams(torch.tensor([[5, 5, 5]]), 2).tolist() == [[False] * 3]  # overlapping
    decoder = build_tiny(tmp_path)
    length, width = decoder.max_length, decoder.word_embeddings.shape[1]
    ids = torch.tensor([[5, 6, 7, 8, 5, 6, 7] + [decoder.end_token_id]
                        + [decoder.pad_token_id] * (length - 8)])  # (1, L): "w5 w6 w7 w8 w5 w6 w7"
    x0_hat = decoder.embed(ids) * 4  # confidently those words
    for repeats, restarted in ((0, None), (3, {4, 5, 6})):
        run = decoder.sampling_run(decoder.schedule.inference_timesteps(5), None,
                                   torch.tensor([8]), lambda: torch.zeros(1, length, width))
        run = type(run)(**{**run.__dict__, "refine_repeats": repeats})
        _, t = RefineSampler().next_input(run, x0_hat, x0_hat, torch.full((1,), 1), 2)
        noisy = set((t[0] == decoder.schedule.steps).nonzero().flatten().tolist())
        assert len(noisy) == 8 * 3 // 5  # the schedule's count either way
        if restarted is not None:
            assert restarted <= noisy  # the second "w5 w6 w7" goes first


def test_samples_at_rounding_temperature_zero_are_the_deterministic_caption(memorised):
    """Trained at noise temperature 0 (the embedded default), every noise draw is zero, so at
    sample_temperature 0 each sample is the generate caption; above it the words are drawn."""
    decoder, batch = memorised
    features = torch.cat([batch["features"], torch.randn(4, FEATURE_DIM)])  # (8, D)
    captions = decoder.generate(features, steps=5)
    samples = decoder.generate_samples(features, num_samples=3, seed=4, steps=5,
                                       sample_temperature=0.0)
    assert samples == [[caption] * 3 for caption in captions]
    hot = decoder.generate_samples(features, num_samples=3, seed=4, steps=5,
                                   sample_temperature=3.0)
    assert any(len(set(per_image)) > 1 for per_image in hot)
    assert decoder.generate(features, steps=5) == captions


def test_reference_selection_trains_towards_the_reference_the_prediction_is_nearest(tmp_path):
    """``reference_selection``: the target is the image's reference nearest the prediction
    (here made equal to the third one), not the caption the input was made of; rows outside
    the share, and batches without references, keep their own caption."""
    decoder = build_tiny(tmp_path, reference_selection=1.0, x1_loss=False,
                         self_conditioning=False)
    refs = tuple(CAPTIONS[:3])
    candidates = decoder._candidates([refs, refs], lambda *shape: torch.zeros(shape))
    ids, mask = candidates
    assert ids.shape[:2] == (2, 3) and mask.all()
    own = decoder.encode_captions([CAPTIONS[0], CAPTIONS[1]])  # (2, L)
    x0_hat = decoder.embed(ids[:, 2]) + 0.01 * torch.randn(2, *own.shape[1:], decoder.denoiser.dim)
    target, x0 = decoder._select_targets(x0_hat, own, decoder.embed(own), ids, mask)
    assert (target == ids[:, 2]).all()
    torch.testing.assert_close(x0, decoder.embed(ids[:, 2]))
    outside = mask.clone()
    outside[1] = False  # the second row is outside the share: its own caption stays
    target, _ = decoder._select_targets(x0_hat, own, decoder.embed(own), ids, outside)
    assert (target[0] == ids[0, 2]).all() and (target[1] == own[1]).all()
    skipped = decoder._candidates([refs], lambda *shape: torch.ones(shape))[1]
    assert not skipped.any()  # uniform 1 >= the share: not selected
    decoder.train()
    batch = {**fixed_batch(), "references": [refs] * len(CAPTIONS)}
    loss = decoder.loss(batch)["loss"]
    loss.backward()
    assert torch.isfinite(loss)


def test_learn_embeddings_trains_the_word_table_through_the_lm_head_only(tmp_path):
    frozen = build_tiny(tmp_path, x1_loss=False)
    assert not frozen.word_embeddings.requires_grad
    decoder = build_tiny(tmp_path, learn_embeddings=True, x1_loss=False, rounding_weight=0.0)
    assert decoder.word_embeddings.requires_grad
    decoder.train()
    decoder.loss(fixed_batch())["loss"].backward()  # restore loss only: no gradient to the table
    grad = decoder.word_embeddings.grad
    assert grad is None or not grad.any()
    decoder.zero_grad()
    rounded = build_tiny(tmp_path, learn_embeddings=True, x1_loss=False, rounding_weight=1.0)
    rounded.train()
    rounded.loss(fixed_batch())["loss"].backward()
    assert rounded.word_embeddings.grad is not None and rounded.word_embeddings.grad.any()


def test_neighbour_context_starts_as_identity_then_mixes_only_nearby_positions(tmp_path):
    """Zero-initialised, the convolution leaves the denoiser's output unchanged and still gets a
    gradient; once it has weights, a caption position's input carries only its +-w neighbours."""
    plain = build_tiny(tmp_path, x1_loss=False).eval()
    mixed = build_tiny(tmp_path, x1_loss=False, neighbour_context=1).eval()
    missing, unexpected = mixed.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and all(k.startswith("denoiser.neighbours.") for k in missing)
    torch.manual_seed(0)
    x_t = torch.randn(2, plain.max_length, plain.denoiser.dim)  # (B, L, E)
    t, image = torch.tensor([5, 40]), torch.randn(2, FEATURE_DIM)
    torch.testing.assert_close(mixed.denoise(x_t, t, image), plain.denoise(x_t, t, image))
    mixed.train()
    mixed.loss(fixed_batch())["loss"].backward()
    assert mixed.denoiser.neighbours.weight.grad.abs().sum() > 0
    conv = mixed.denoiser.neighbours
    with torch.no_grad():
        conv.weight.normal_()
        changed = x_t.clone()
        changed[:, 5] += 1.0  # one position's input moves
        delta = (conv(changed.transpose(1, 2)) - conv(x_t.transpose(1, 2))).abs().sum((0, 1))
    assert delta[4:7].gt(0).all() and delta[:4].eq(0).all() and delta[7:].eq(0).all()
    with pytest.raises(ValueError, match="neighbour_context"):
        build_tiny(tmp_path, neighbour_context=-1)
