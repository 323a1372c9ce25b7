"""The faithful `paper` preset (the original CLIP-DiffusionLM code) and the sampler/training
consistency it rests on: every sampler feeds the denoiser inputs of a kind training produced at
that timestep label; the original's several-timesteps loss, padding mask, start token, per-epoch
LR and checkpoint rule; its BLEU protocol; the README table of every paper choice."""

from __future__ import annotations

import json
import re
from pathlib import Path

import helpers  # noqa: F401 - sets HF_HUB_OFFLINE before transformers is imported
import jsonlines
import pytest
import torch
from helpers import (
    CAPTIONS,
    WORDS,
    build_with_generation_defaults,
    tiny_diffusion_config,
    tiny_word_tokenizer_dir,
)

from diffusion_captioner.presets import decoder_plan, load_preset
from diffusion_captioner.trainer import CaptionPairs, TrainConfig, Trainer

ROOT = Path(__file__).resolve().parents[1]
FEATURE_DIM = 16


def build(tmp_path, **overrides):
    from diffusion_captioner.diffusion.decoder import DiffusionDecoder

    torch.manual_seed(0)
    config = tiny_diffusion_config(FEATURE_DIM, tiny_word_tokenizer_dir(tmp_path),
                                   **{"steps": 3, **overrides})
    return build_with_generation_defaults(DiffusionDecoder, config)


def batch(n: int = len(CAPTIONS)) -> dict:
    generator = torch.Generator().manual_seed(1)
    captions = [CAPTIONS[i % len(CAPTIONS)] for i in range(n)]
    return {"features": torch.randn(n, FEATURE_DIM, generator=generator), "captions": captions}


# --------------------------------------------------------------------------------------------
# What the denoiser receives: training vs every sampler
# --------------------------------------------------------------------------------------------
def spy_on_denoiser(decoder) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Record (x_t, t) of every denoiser call (before the input scaling)."""
    calls: list[tuple[torch.Tensor, torch.Tensor]] = []
    original = decoder.denoise

    def denoise(x_t, t, *args, **kwargs):
        calls.append((x_t.detach().clone(), t.detach().clone()))
        return original(x_t, t, *args, **kwargs)

    decoder.denoise = denoise
    return calls


def input_kinds(decoder, x_t: torch.Tensor, t: torch.Tensor) -> set[tuple[str, str]]:
    """(kind, label) of every position: label ``0``, ``low`` (abar > 0.5), ``mid`` or ``T``;
    kind ``zeros``, ``word`` (exactly a clean word vector), ``noised`` (the variance
    q(x_t | x_0) gives at its t, abar s'^2 + 1 - abar, within a factor 4) or ``other`` (e.g. a
    noise-free estimate at a noisy label). At a ``low`` label the signal, a sampler's own
    estimate, dominates the variance, so only zeros / word / ``signal`` are told apart there."""
    steps = decoder.schedule.steps
    t = t if t.dim() == 2 else t[:, None].expand(x_t.shape[:2])  # (B, L)
    flat, labels = x_t.reshape(-1, x_t.shape[-1]), t.reshape(-1)  # (N, E), (N,)
    table = decoder.diffusion_table()  # (V, E)
    is_word = torch.cdist(flat, table).min(-1).values < 1e-5  # (N,)
    is_zero = flat.abs().amax(-1) == 0  # (N,)
    abar = decoder.schedule.alpha_bar[labels].float()  # (N,)
    expected = abar * float(decoder.x0_std) ** 2 + 1 - abar  # (N,)
    ratio = flat.pow(2).mean(-1) / expected  # (N,)
    kinds = set()
    for i in range(flat.shape[0]):
        label = ("0" if labels[i] == 0 else "T" if labels[i] == steps
                 else "low" if abar[i] > 0.5 else "mid")
        kind = ("zeros" if is_zero[i] else "word" if is_word[i] else "signal" if label == "low"
                else "noised" if 0.25 < ratio[i] < 4 else "other")
        kinds.add((kind, label))
    return kinds


@pytest.mark.parametrize("temperature, samplers", [
    (0.0, ("refine", "renoise")),
    (1.0, ("refine", "renoise", "ddim")),
])
def test_every_sampler_feeds_what_training_showed_at_that_timestep(tmp_path, temperature,
                                                                   samplers):
    decoder = build(tmp_path, embed_scale=0.3, input_scaling=True, mixed_noise=0.5,
                    refine_noise=0.3, length_head=True, x1_loss=True, self_conditioning=False,
                    temperature=temperature, sampler="refine", diffusion_steps=50)
    calls = spy_on_denoiser(decoder)
    decoder.train()
    torch.manual_seed(0)
    for _ in range(40):
        decoder.loss(batch(8))
    trained = set().union(*(input_kinds(decoder, x, t) for x, t in calls))
    assert {("zeros" if temperature == 0 else "noised", "T"), ("word", "0"),
            ("noised", "mid")} <= trained
    features = torch.randn(6, FEATURE_DIM)
    for sampler in samplers:
        for clamp in ((False,) if sampler == "refine" else (False, True)):
            calls.clear()
            decoder.generate(features, steps=4, sampler=sampler, clamp=clamp)
            assert len(calls) == 4
            for step, (x_t, t) in enumerate(calls):
                unseen = input_kinds(decoder, x_t, t) - trained
                assert not unseen, f"{sampler} (clamp={clamp}) step {step + 1}: {unseen}"


def test_samplers_whose_inputs_training_never_shows_are_refused(tmp_path, caplog):
    from diffusion_captioner.diffusion.decoder import DiffusionDecoder

    for bad, why in (({"sampler": "feed", "time_embedding": True}, "time_embedding=False"),
                     ({"sampler": "ddim", "temperature": 0.0}, "temperature 1"),
                     ({"sampler": "refine", "mixed_noise": 0.0, "refine_noise": 0.0},
                      "mixed_noise, refine_noise or policy_noise")):
        sampler, config = bad["sampler"], {k: v for k, v in bad.items() if k != "sampler"}
        with pytest.raises(ValueError, match=why):  # at plan time, before any training
            DiffusionDecoder.check_generate_options({"sampler": sampler},
                                                    {"type": "diffusion", **config})
        caplog.clear()
        legacy = build(tmp_path, **bad)  # a checkpoint trained before the check, its sampler
        with caplog.at_level("WARNING"):  # saved with it: it loads and generates, and says so
            assert len(legacy.generate(torch.randn(1, FEATURE_DIM))) == 1
        assert why in caplog.text
        fresh = build(tmp_path, **config)
        with pytest.raises(ValueError, match=why):  # asked for: refused
            fresh.generate(torch.randn(1, FEATURE_DIM), sampler=sampler)
    DiffusionDecoder.check_generate_options({}, {"type": "diffusion"})  # consistent defaults
    stale = build(tmp_path, sampler="refine", mixed_noise=0.5, temperature=0.0)
    assert len(stale.generate(torch.randn(1, FEATURE_DIM), sampler="ddim", temperature=1.0)) == 1
    # the original: no timestep input, so the fed-back estimate carries no label to contradict
    decoder = build(tmp_path, sampler="feed", time_embedding=False).eval()
    x_t = torch.randn(2, decoder.max_length, decoder.denoiser.dim)
    image = torch.randn(2, FEATURE_DIM)
    torch.testing.assert_close(decoder.denoise(x_t, torch.tensor([3, 90]), image),
                               decoder.denoise(x_t, torch.tensor([100, 1]), image))
    assert len(decoder.generate(image, steps=3)) == 2


def test_the_t_state_is_what_generation_starts_from(tmp_path):
    """At tau = 0 a position at t = T is the zero vector in training as at the start."""
    decoder = build(tmp_path, temperature=0.0, sampler="refine", mixed_noise=0.5)
    x0, noise = torch.randn(3, 5, 4), torch.randn(3, 5, 4)
    t = torch.tensor([[0, 100, 7, 100, 1]] * 3)
    x_t = decoder.t_state(decoder.schedule.q_sample(x0, t, noise), t, noise)
    assert torch.all(x_t[t == 100] == 0)
    torch.testing.assert_close(x_t[t == 0], x0[t == 0])
    assert not torch.all(x_t[t == 7] == 0)


# --------------------------------------------------------------------------------------------
# The original's training loss
# --------------------------------------------------------------------------------------------
def test_several_timesteps_loss_is_the_mean_of_single_timestep_losses(tmp_path):
    decoder = build(tmp_path, time_embedding=False, sampler="feed", self_conditioning=False,
                    text_condition=False, x1_loss=True, restore_loss="l1",
                    rounding_weight=0.3).eval()
    ids = decoder.encode_captions(list(CAPTIONS))  # (B, L)
    b, length = ids.shape
    image = decoder._features(batch()["features"])  # (B, D)
    keep = torch.zeros(b, dtype=torch.bool)
    generator = torch.Generator().manual_seed(3)
    levels = torch.tensor([1, 40, 77, 100])  # (N,)
    noise = torch.randn(b, length, decoder.denoiser.dim, generator=generator)  # one draw
    noise_1 = torch.randn(b, length, decoder.denoiser.dim, generator=generator)
    t = levels.repeat_interleave(b)  # (N B,), shared by the batch
    several = decoder.denoising_loss(ids, image, None, keep, t, noise.repeat(4, 1, 1), noise_1)
    singles = [decoder.denoising_loss(ids, image, None, keep, level.repeat(b), noise, noise_1)
               for level in levels]
    for part in ("loss", "restore_xt", "rounding_xt", "restore_x1", "rounding_x1"):
        expected = torch.stack([s[part] for s in singles]).mean()
        torch.testing.assert_close(several[part], expected, rtol=1e-5, atol=1e-5)


def test_the_original_draws_share_timesteps_and_noise(tmp_path, monkeypatch):
    decoder = build(tmp_path, time_embedding=False, sampler="feed", text_condition=False,
                    self_conditioning=False, timesteps_per_caption=5, shared_timesteps=True,
                    shared_noise=True, x1_loss=False)
    seen = {}
    original = decoder.denoising_loss

    def record(ids, image, text, keep, t, noise, *rest, **kwargs):
        seen.update(t=t, noise=noise)
        return original(ids, image, text, keep, t, noise, *rest, **kwargs)

    monkeypatch.setattr(decoder, "denoising_loss", record)
    parts = decoder.loss(batch(4))
    assert torch.isfinite(parts["loss"])
    t, noise = seen["t"].view(5, 4), seen["noise"].view(5, 4, *seen["noise"].shape[1:])
    assert torch.all(t == t[:, :1])  # one timestep per level for the whole batch
    assert torch.equal(noise[0], noise[3])  # one noise draw per caption, at every level


def test_start_token_and_padding_mask(tmp_path):
    decoder = build(tmp_path, start_token=True, mask_padding=True, time_embedding=False,
                    sampler="feed", self_conditioning=False)
    tokenizer = decoder.tokenizer
    ids = decoder.encode_captions(["a red circle"])[0].tolist()
    assert ids[:5] == [tokenizer.cls_token_id, *tokenizer("a red circle",
                                                          add_special_tokens=False)["input_ids"],
                       decoder.end_token_id]
    assert ids[5:] == [decoder.pad_token_id] * (decoder.max_length - 5)
    # hidden padding: changing a padded position's input leaves the caption positions' outputs alone
    decoder.eval()
    x_t = torch.randn(1, decoder.max_length, decoder.denoiser.dim)
    changed = x_t.clone()
    changed[0, 7:] = torch.randn(decoder.max_length - 7, decoder.denoiser.dim)
    mask = torch.arange(decoder.max_length)[None] < 5
    t, image = torch.tensor([10]), torch.randn(1, FEATURE_DIM)
    hidden = decoder.denoise(x_t, t, image, caption_mask=mask)[0, :5]
    torch.testing.assert_close(decoder.denoise(changed, t, image, caption_mask=mask)[0, :5], hidden)
    assert not torch.allclose(decoder.denoise(changed, t, image)[0, :5],
                              decoder.denoise(x_t, t, image)[0, :5])
    assert decoder.generate(torch.randn(2, FEATURE_DIM), steps=2)[0].split()[:1] != ["[CLS]"]


def test_linear_projection_is_one_layer(tmp_path):
    decoder = build(tmp_path, projection="linear")
    layers = [m for m in decoder.denoiser.image_proj.modules() if isinstance(m, torch.nn.Linear)]
    assert len(layers) == 1 and layers[0].in_features == FEATURE_DIM
    with pytest.raises(ValueError, match="mlp, linear"):
        build(tmp_path, projection="conv")


# --------------------------------------------------------------------------------------------
# The original's optimiser schedule and checkpoint rule
# --------------------------------------------------------------------------------------------
def toy_pairs(n: int = 12, seed: int = 0) -> CaptionPairs:
    generator = torch.Generator().manual_seed(seed)
    captions = [(CAPTIONS[i % 4], CAPTIONS[(i + 1) % 4], CAPTIONS[(i + 2) % 4]) for i in range(n)]
    return CaptionPairs(torch.randn(n, FEATURE_DIM, generator=generator), captions)


def test_linear_per_epoch_lr_is_constant_within_an_epoch(tmp_path):
    config = TrainConfig.from_dict({"batch_size": 6, "lr": 1e-3, "final_lr": 5e-4,
                                    "lr_schedule": "linear_per_epoch", "epochs": 3,
                                    "log_every": 1, "max_grad_norm": None})
    Trainer(build(tmp_path), toy_pairs(), None, config, tmp_path / "run", progress=False).fit()
    with jsonlines.open(tmp_path / "run" / "train_log.jsonl") as log:
        rates = {row["step"]: row["lr"] for row in log if "lr" in row}  # lr of the next step
    assert len(rates) == 18  # 36 pairs / 6 = 6 steps per epoch
    assert [rates[s] for s in range(1, 6)] == pytest.approx([1e-3] * 5)
    assert [rates[s] for s in range(6, 12)] == pytest.approx([7.5e-4] * 6)
    assert [rates[s] for s in range(12, 19)] == pytest.approx([5e-4] * 7)
    with pytest.raises(ValueError, match="needs epochs and final_lr"):
        TrainConfig.from_dict({"lr_schedule": "linear_per_epoch", "epochs": 2})
    with pytest.raises(ValueError, match="best_val, first_overfit"):
        TrainConfig.from_dict({"checkpoint_rule": "lowest"})
    with pytest.raises(ValueError, match="takes no warmup_steps"):  # accepted, then ignored
        TrainConfig.from_dict({"lr_schedule": "linear_per_epoch", "epochs": 2, "final_lr": 1e-5,
                               "warmup_steps": 10})
    with pytest.raises(ValueError, match="final_lr is for"):
        TrainConfig.from_dict({"lr_schedule": "linear", "final_lr": 1e-5})


@pytest.mark.parametrize("ratio, kept_at_first", [(0.0, True), (1e9, False)])
def test_first_overfit_keeps_the_first_overfitting_weights_else_the_last(tmp_path, ratio,
                                                                         kept_at_first):
    from diffusion_captioner.diffusion.decoder import DiffusionDecoder

    config = TrainConfig.from_dict({"batch_size": 6, "lr": 3e-3, "max_steps": 12,
                                    "eval_every": 4, "checkpoint_rule": "first_overfit",
                                    "overfit_ratio": ratio})
    decoder = build(tmp_path)
    trainer = Trainer(decoder, toy_pairs(), toy_pairs(6, 1), config, tmp_path / "run",
                      progress=False)
    state = trainer.fit()
    assert state.overfit_kept is kept_at_first
    best = DiffusionDecoder.from_pretrained(trainer.best_dir)
    final = {k: v for k, v in decoder.state_dict().items()}
    same = all(torch.equal(v, final[k]) for k, v in best.state_dict().items())
    assert same is not kept_at_first  # kept at step 4, or the last weights


# --------------------------------------------------------------------------------------------
# The original's BLEU protocol
# --------------------------------------------------------------------------------------------
def test_paper_bleu_matches_torchmetrics_on_a_hand_made_pair(tmp_path):
    from torchmetrics.text import BLEUScore
    from transformers import AutoTokenizer

    from eval.paper_bleu import paper_bleu

    tokenizer = AutoTokenizer.from_pretrained(tiny_word_tokenizer_dir(tmp_path))
    results = {7: "a red circle above a blue square", 3: "the green triangle"}
    references = {7: ["A red circle above a blue square", "a red circle"],
                  3: ["the green triangle left of the circle "]}
    value = paper_bleu(results, references, tokenizer, max_length=12, batch_size=8)
    # by hand, ids 3 then 7: [CLS] words [SEP] [PAD]...; trailing columns equal in the whole
    # batch collapse to one (cols 10, 11 repeat col 9 in both rows), the rest stays
    hypotheses = ["[CLS] the green triangle [SEP]" + " [PAD]" * 5,
                  "[CLS] a red circle above a blue square [SEP] [PAD]"]
    targets = [["[CLS] the green triangle left of the circle [SEP]"],
               ["[CLS] a red circle above a blue square [SEP]", "[CLS] a red circle [SEP]"]]
    assert value == pytest.approx(float(BLEUScore()(hypotheses, targets)))
    assert 0 < value < 1
    # batches of one: every row's padding collapses to one [PAD]; the mean of per-image BLEUs
    single = paper_bleu(results, references, tokenizer, max_length=12, batch_size=1)
    alone = ["[CLS] the green triangle [SEP] [PAD]", hypotheses[1]]
    per_image = [float(BLEUScore()([h], [r])) for h, r in zip(alone, targets, strict=True)]
    assert single == pytest.approx(sum(per_image) / 2)


def test_paper_bleu_refuses_a_tokenizer_without_cls(tmp_path):
    from eval.paper_bleu import paper_bleu

    class NoCls:
        cls_token_id, sep_token_id, pad_token_id = None, 2, 0

    with pytest.raises(ValueError, match="no cls_token"):
        paper_bleu({1: "a"}, {1: ["a"]}, NoCls())


# --------------------------------------------------------------------------------------------
# The README table of paper choices is the `paper` preset
# --------------------------------------------------------------------------------------------
def readme_paper_table() -> list[dict[str, str]]:
    text = (ROOT / "README.md").read_text()
    start = text.index("<!-- paper-choices -->")
    rows = []
    for line in text[start:].splitlines()[1:]:
        if not line.startswith("|"):
            if rows:
                break
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells[0] in ("choice", "---") or set(cells[0]) <= {"-"}:
            continue
        rows.append(dict(zip(("choice", "key", "text", "code", "paper", "paper_text"), cells,
                             strict=True)))
    return rows


def resolved(preset: str) -> dict[str, dict]:
    plan = decoder_plan(load_preset(preset), "diffusion")
    return {"decoder": plan["decoder"], "train": plan["train"], "generate": plan["generate"]}


def cell_value(cell: str):
    return json.loads(re.fullmatch(r"`(.*)`", cell).group(1))


def test_readme_table_of_paper_choices_is_the_resolved_paper_preset():
    rows = readme_paper_table()
    assert len(rows) >= 25
    paper, text = resolved("paper"), resolved("paper-text")
    covered = set()
    for row in rows:
        section, key = re.fullmatch(r"`(decoder|train|generate)\.(\w+)`", row["key"]).groups()
        covered.add((section, key))
        assert paper[section][key] == cell_value(row["paper"]), row["key"]
        assert text[section][key] == cell_value(row["paper_text"]), row["key"]
    listed = {("decoder", k) for k in paper["decoder"] if k not in ("type", "lm_config",
                                                                   "tokenizer")}
    listed |= {("train", k) for k in paper["train"]}
    assert listed <= covered, sorted(listed - covered)
    assert load_preset("paper")["paper_bleu"]["tokenizer"] == "distilbert-base-uncased"


def test_paper_embedded_preset_builds_and_trains(tmp_path):
    from registry import build as build_component

    plan = decoder_plan(load_preset("paper-embedded"), "diffusion")
    decoder = build_component("decoder", plan["decoder"], feature_dim=FEATURE_DIM)
    assert decoder.config["timesteps_per_caption"] == 100 and decoder.denoiser.time_embed is None
    parts = decoder.loss({"features": torch.randn(2, FEATURE_DIM),
                          "captions": ["a red circle", "a small blue square left of a triangle"]})
    assert torch.isfinite(parts["loss"])
    assert len(decoder.generate(torch.randn(2, FEATURE_DIM), **plan["generate"])) == 2
    assert WORDS  # the tiny vocabulary the other tests share


def test_preset_speed_block_is_checked():
    from diffusion_captioner.comparison import speed_options

    assert speed_options({"batch_sizes": [1], "repeats": 1, "images": 2}, 5) == {
        "repeats": 1, "batch_sizes": (1,), "images": 2}
    assert speed_options({}, 5) == speed_options(None, 5) == {"repeats": 5}
    assert speed_options(False, 5) is None  # the phase switched off
    assert speed_options({"steps": [1, 5], "max_seconds": 60, "warmup": 0}, 5) == {
        "repeats": 5, "steps": (1, 5), "max_seconds": 60.0, "warmup": 0}
    with pytest.raises(ValueError, match="unknown key.*batches.*known: batch_sizes"):
        speed_options({"batches": [1]}, 5)


def test_an_absent_text_token_gives_what_a_masked_one_gave(tmp_path):
    """Without a text feature the concat fusion leaves the text token out instead of masking
    it: one position fewer per denoiser call, the same outputs."""
    decoder = build(tmp_path, text_condition=True, time_embedding=False, sampler="feed",
                    self_conditioning=False).eval()
    x_t = torch.randn(3, decoder.max_length, decoder.denoiser.dim)
    t, image = torch.tensor([4, 50, 99]), torch.randn(3, FEATURE_DIM)
    zeros = torch.zeros(3, FEATURE_DIM)
    image_h, _ = decoder.denoiser.project(decoder._features(image))
    masked = decoder.denoiser(x_t, t, image, zeros, torch.zeros(3, dtype=torch.bool),
                              projected=(image_h, torch.zeros(3, 1, decoder.denoiser.dim)))
    absent = decoder.denoiser(x_t, t, image, None, None, projected=(image_h, None))
    torch.testing.assert_close(absent, masked, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("commit", ["predicted", "gold"])
def test_policy_noise_trains_on_the_refine_samplers_own_second_input(tmp_path, commit):
    """``policy_noise``: a no-grad first call sees what generation's first call sees; the
    training call then gets the least confident span positions restarted (zeros at t = T) and
    the rest committed at t = 0 to the first call's words (or the gold ones), as ``refine``
    would make them after step k of K; the targets stay the gold caption."""
    total = 4
    decoder = build(tmp_path, embed_scale=0.3, input_scaling=True, refine_noise=0.0,
                    mixed_noise=0.0, policy_noise=1.0, policy_commit=commit,
                    policy_steps=total, length_head=True, temperature=0.0, sampler="refine",
                    x1_loss=False, self_conditioning=False,
                    diffusion_steps=50)
    calls = spy_on_denoiser(decoder)
    decoder.train()
    torch.manual_seed(0)
    data = batch(8)
    gold = decoder.encode_captions(data["captions"])  # (B, L)
    span = decoder.end_positions(gold) + 1  # (B,)
    inside = torch.arange(gold.shape[1])[None] < span[:, None]  # (B, L)
    outputs = []
    original = decoder.denoise
    decoder.denoise = lambda *a, **k: outputs.append(original(*a, **k)) or outputs[-1]
    decoder.loss(data)
    assert len(calls) == 2  # the policy's first call, then the trained one
    (x_first, t_first), (x_train, t_train) = calls
    assert (t_first == torch.where(inside, 50, 0)).all()
    assert (x_first[inside] == 0).all()  # the T state at tau = 0, as generation starts
    torch.testing.assert_close(x_first[~inside], decoder.embed(gold)[~inside])
    confidence, predicted = decoder.lm_logits(outputs[0]).softmax(-1).max(-1)  # (B, L)
    restarted = t_train == 50  # (B, L)
    assert (t_train[~restarted] == 0).all() and not restarted[~inside].any()
    assert (x_train[restarted] == 0).all()
    words = predicted if commit == "predicted" else gold
    committed = inside & ~restarted
    torch.testing.assert_close(x_train[committed], decoder.embed(words)[committed])
    for row in range(gold.shape[0]):
        n, redone = int(span[row]), int(restarted[row].sum())
        assert redone in {n * (total - k) // total for k in range(1, total)}
        if 0 < redone < n:  # the least confident were restarted
            sure = confidence[row, :n]
            assert sure[restarted[row, :n]].max() <= sure[committed[row, :n]].min()
    assert commit == "gold" or (predicted[inside] != gold[inside]).any()  # untrained: errors
