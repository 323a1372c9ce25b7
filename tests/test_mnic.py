"""MNIC decoder (masked non-autoregressive BERT, mask-predict): offline, CPU, tiny random BERTs."""

from __future__ import annotations

import json
from pathlib import Path

import helpers  # sorts before torch/transformers: it sets HF_HUB_OFFLINE first
import pytest
import torch
from helpers import CAPTIONS, TINY_BERT_CONFIG, tiny_mnic_config, tiny_word_tokenizer_dir
from transformers import BertConfig, BertForMaskedLM, BertTokenizerFast

from baselines.mnic import (
    IGNORE_INDEX,
    MNICDecoder,
    least_confident,
    remask_counts,
    sample_mask,
)
from diffusion_captioner.presets import decoder_plan, load_preset
from registry import CaptionDecoder, build, describe, registered_name

FEATURE_DIM = 16


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch):
    helpers.block_network(monkeypatch)


@pytest.fixture
def tokenizer_dir(tmp_path: Path) -> Path:
    return tiny_word_tokenizer_dir(tmp_path)


def make(tokenizer_dir: Path, seed: int = 0, **overrides) -> MNICDecoder:
    torch.manual_seed(seed)
    return MNICDecoder(**tiny_mnic_config(FEATURE_DIM, tokenizer_dir, **overrides))


def features(n: int = len(CAPTIONS), seed: int = 1) -> torch.Tensor:
    return torch.randn(n, FEATURE_DIM, generator=torch.Generator().manual_seed(seed))


def batch() -> dict:
    return {"features": features(), "captions": list(CAPTIONS)}


def train(decoder: MNICDecoder, steps: int, lr: float = 3e-3, seed: int = 0) -> list[dict]:
    """AdamW on the fixed batch; returns every step's loss parts as floats."""
    torch.manual_seed(seed)
    optimizer = torch.optim.AdamW(decoder.parameters(), lr=lr)
    decoder.train()
    history = []
    for _ in range(steps):
        parts = decoder.loss(batch())
        optimizer.zero_grad()
        parts["loss"].backward()
        optimizer.step()
        history.append({name: float(value.detach()) for name, value in parts.items()})
    return history


# ------------------------------------------------------------------------------ registry/config
def test_registered_and_config_rebuilds(tokenizer_dir: Path) -> None:
    decoder = make(tokenizer_dir)
    assert CaptionDecoder.by_name("mnic") is MNICDecoder
    assert registered_name(MNICDecoder) == "mnic"
    assert describe(MNICDecoder).startswith("MNIC: ")
    assert MNICDecoder.capabilities.step_sweep == (1, 2, 4, 8)
    assert MNICDecoder.capabilities.trajectory and MNICDecoder.capabilities.kind == "iterative"
    assert MNICDecoder(**decoder.config).config == decoder.config
    assert set(decoder.config) == {
        "feature_dim", "lm", "lm_pretrained", "lm_config", "tokenizer", "conditioning",
        "prefix_length", "length_mode", "max_length", "length_loss_weight", "normalize_features",
    }  # fmt: skip
    assert decoder.lm.config.vocab_size == len(decoder.tokenizer)  # sized to the word tokenizer
    assert decoder.lm.config.hidden_size == TINY_BERT_CONFIG["hidden_size"]


def test_bad_arguments_fail_clearly(tokenizer_dir: Path) -> None:
    with pytest.raises(ValueError, match="unknown conditioning 'concat'"):
        make(tokenizer_dir, conditioning="concat")
    with pytest.raises(ValueError, match="unknown length_mode 'oracle'"):
        make(tokenizer_dir, length_mode="oracle")
    with pytest.raises(ValueError, match="exceeds the LM's 32 positions"):
        make(tokenizer_dir, max_length=32)
    with pytest.raises(ValueError, match="unknown bert config keys"):
        make(tokenizer_dir, lm_config={**TINY_BERT_CONFIG, "n_layer": 3})
    with pytest.raises(ValueError, match="steps must be >= 1"):
        make(tokenizer_dir).generate(features(1), steps=0)


# ------------------------------------------------------------------------------ masking
def test_sample_mask_masks_between_one_and_all_valid_positions() -> None:
    lengths = torch.tensor([1, 2, 5, 9])
    valid = torch.arange(9)[None, :] < lengths[:, None]  # (4, 9)
    generator = torch.Generator().manual_seed(0)
    seen: dict[int, set[int]] = {int(n): set() for n in lengths}
    for _ in range(400):
        mask = sample_mask(valid, generator)
        assert not (mask & ~valid).any()  # padding is never masked
        counts = mask.sum(dim=1)
        assert ((counts >= 1) & (counts <= lengths)).all()
        for length, count in zip(lengths.tolist(), counts.tolist(), strict=True):
            seen[length].add(count)
    # the count ceil(r L), r ~ U(0, 1], is uniform over 1..L: every count shows up
    assert all(seen[n] == set(range(1, n + 1)) for n in seen)


def test_masked_labels_are_minus_100_except_at_masked_positions(tokenizer_dir: Path) -> None:
    decoder = make(tokenizer_dir)
    ids, valid = decoder.encode_captions(list(CAPTIONS))
    lengths = [len(c.split()) for c in CAPTIONS]
    assert ids.shape == (len(CAPTIONS), max(lengths))
    assert valid.sum(dim=1).tolist() == lengths
    inputs, labels = decoder.mask_inputs(ids, valid, torch.Generator().manual_seed(3))
    masked = labels != IGNORE_INDEX
    assert (masked.sum(dim=1) >= 1).all() and not (masked & ~valid).any()
    assert torch.equal(labels[masked], ids[masked])  # masked positions keep their token as label
    assert (inputs[masked] == decoder.mask_token_id).all()
    assert torch.equal(inputs[~masked], ids[~masked])  # the rest is shown unchanged
    assert decoder.mask_token_id == 4 and decoder.pad_token_id == 0


def test_fixed_length_targets_end_and_pad(tokenizer_dir: Path) -> None:
    decoder = make(tokenizer_dir, length_mode="fixed")
    ids, valid = decoder.encode_captions(["a red circle"])
    assert ids.shape == (1, decoder.max_length) and valid.all()  # every position is a target
    words = decoder.tokenizer("a red circle", add_special_tokens=False)["input_ids"]
    expected = words + [decoder.end_token_id] + [decoder.pad_token_id] * (12 - 4)
    assert ids[0].tolist() == expected
    assert decoder.decode(ids) == ["a red circle"]
    parts = decoder.loss(batch())
    assert set(parts) == {"loss", "token_loss"} and torch.isfinite(parts["loss"])


def test_loss_parts_and_validation_masks_are_fixed(tokenizer_dir: Path) -> None:
    decoder = make(tokenizer_dir)
    parts = decoder.loss(batch())
    assert set(parts) == {"loss", "token_loss", "length_loss", "length_accuracy"}
    expected = parts["token_loss"] + decoder.length_loss_weight * parts["length_loss"]
    assert torch.allclose(parts["loss"], expected)
    decoder.eval()  # validation: fixed-seed masks, global RNG untouched
    state = torch.get_rng_state()
    first, second = decoder.loss(batch())["loss"], decoder.loss(batch())["loss"]
    assert torch.equal(first, second) and torch.equal(state, torch.get_rng_state())


# ------------------------------------------------------------------------------ training
def test_length_head_trains(tokenizer_dir: Path) -> None:
    decoder = make(tokenizer_dir)
    with torch.no_grad():
        before = decoder.loss(batch())
    history = train(decoder, steps=60)
    assert history[-1]["length_loss"] < 0.2 * float(before["length_loss"])
    assert history[-1]["length_accuracy"] == 1.0 > float(before["length_accuracy"])
    lengths = decoder.predict_lengths(features()).squeeze(1)
    assert lengths.tolist() == [len(c.split()) for c in CAPTIONS]


@pytest.mark.parametrize(
    ("conditioning", "length_mode"), [("prefix", "predict"), ("add", "fixed")]
)
def test_memorises_a_handful_of_captions(
    tokenizer_dir: Path, conditioning: str, length_mode: str
) -> None:
    decoder = make(tokenizer_dir, conditioning=conditioning, length_mode=length_mode)
    history = train(decoder, steps=250)
    assert history[-1]["token_loss"] < 0.1
    assert decoder.generate(features(), steps=4) == list(CAPTIONS)


# ------------------------------------------------------------------------------ mask-predict
def test_remask_schedule_decays_linearly() -> None:
    assert remask_counts(10, 4).tolist() == [10, 7, 5, 2]  # floor(10 (4 - t) / 4)
    assert remask_counts(7, 1).tolist() == [7]
    assert remask_counts(3, 8).tolist() == [3, 2, 2, 1, 1, 1, 0, 0]
    counts = remask_counts(torch.tensor([5, 8]), 3)
    assert counts.shape == (3, 2) and counts.tolist() == [[5, 8], [3, 5], [1, 2]]
    with pytest.raises(ValueError, match="steps must be >= 1"):
        remask_counts(5, 0)


def test_least_confident_picks_the_lowest_valid_scores() -> None:
    scores = torch.tensor([[-0.1, -2.0, -0.5, -3.0], [-1.0, -1.0, -0.2, -9.0]])
    valid = torch.tensor([[True, True, True, True], [True, True, True, False]])
    picked = least_confident(scores, valid, torch.tensor([2, 2]))
    assert picked.tolist() == [[False, True, False, True], [True, True, False, False]]


@pytest.mark.parametrize("length_mode", ["predict", "fixed"])
def test_mask_predict_remasks_the_scheduled_count(
    tokenizer_dir: Path, monkeypatch: pytest.MonkeyPatch, length_mode: str
) -> None:
    decoder = make(tokenizer_dir, length_mode=length_mode).eval()
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    original = decoder.token_logits

    def spy(ids, attention, feats):
        logits = original(ids, attention, feats)
        seen.append((ids.clone(), logits.clone()))
        return logits

    monkeypatch.setattr(decoder, "token_logits", spy)
    steps = 5
    lengths = torch.tensor([3, 7, 10, 12])
    history, scores, valid = decoder.mask_predict(features(), lengths, steps)
    assert len(seen) == len(history) == steps
    expected = remask_counts(lengths, steps)  # (K, B)
    reference = torch.zeros(valid.shape)  # per-position log p_i, replayed from the logits
    for t, (ids, logits) in enumerate(seen):
        masked = (ids == decoder.mask_token_id) & valid
        assert masked.sum(dim=1).tolist() == expected[t].tolist()
        assert not (ids[~valid] == decoder.mask_token_id).any()
        if t == 0:
            assert torch.equal(masked, valid)  # everything masked at the start
        else:  # the least confident are re-masked, the rest is kept from the previous pass
            assert torch.equal(masked, least_confident(reference, valid, expected[t]))
            assert torch.equal(ids[~masked & valid], history[t - 1][~masked & valid])
        logp = torch.log_softmax(logits.masked_fill(~decoder.allowed_tokens, float("-inf")), -1)
        best_logp, best = logp.max(dim=-1)
        reference = torch.where(masked, best_logp, reference)  # others keep their probability
        assert torch.equal(history[t][masked], best[masked])
    assert torch.allclose(scores, reference)
    assert (history[-1][valid] != decoder.mask_token_id).all()  # nothing left masked


def test_generate_is_deterministic_and_refuses_unknown_options(tokenizer_dir: Path) -> None:
    first, second = make(tokenizer_dir, seed=5), make(tokenizer_dir, seed=5)
    feats = features(6, seed=2)
    with pytest.raises(ValueError, match="no generation option num_beams; it takes: steps"):
        first.generate(feats, steps=3, num_beams=4)  # num_beams is clipcap's option
    captions = first.generate(feats, steps=3)
    assert len(captions) == 6 and all(isinstance(c, str) for c in captions)
    assert first.generate(feats, steps=3) == captions == second.generate(feats, steps=3)
    assert first.generate(feats[:0]) == []
    first.train()
    first.generate(feats)
    assert first.training  # mode restored
    beam = first.generate(feats, steps=3, length_beam=3)
    assert len(beam) == 6


def test_same_seed_same_training(tokenizer_dir: Path) -> None:
    a = train(make(tokenizer_dir, seed=1), steps=5, seed=7)
    b = train(make(tokenizer_dir, seed=1), steps=5, seed=7)
    assert a == b


@pytest.mark.parametrize("steps", [1, 3])
def test_trajectory_has_k_entries_ending_in_the_caption(tokenizer_dir: Path, steps: int) -> None:
    decoder = make(tokenizer_dir)
    train(decoder, steps=30)
    feats = features()
    for beam in (1, 2):
        captions = decoder.generate(feats, steps=steps, length_beam=beam)
        trajectory = decoder.generate_trajectory(feats, steps=steps, length_beam=beam)
        assert len(trajectory) == len(captions)
        assert all(len(entries) == steps for entries in trajectory)
        assert [entries[-1] for entries in trajectory] == captions


# ------------------------------------------------------------------------------ checkpoints
def test_save_load_round_trip(tokenizer_dir: Path, tmp_path: Path) -> None:
    decoder = make(tokenizer_dir, conditioning="add")
    train(decoder, steps=20)
    decoder.save_pretrained(tmp_path / "ckpt")
    assert {"config.json", "model.safetensors", "tokenizer", "lm"} <= {
        p.name for p in (tmp_path / "ckpt").iterdir()
    }
    loaded = CaptionDecoder.from_pretrained(tmp_path / "ckpt")
    assert isinstance(loaded, MNICDecoder) and not loaded.training
    assert loaded.config["conditioning"] == "add"
    assert json.loads((tmp_path / "ckpt" / "config.json").read_text())["type"] == "mnic"
    feats = features(5, seed=4)
    for steps in (1, 4):
        assert loaded.generate(feats, steps=steps, length_beam=2) == decoder.generate(
            feats, steps=steps, length_beam=2
        )
    for name, tensor in decoder.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[name]), name


# ------------------------------------------------------------------------------ presets
def test_embedded_preset_entry_builds() -> None:
    plan = decoder_plan(load_preset("embedded"), "mnic")
    decoder = build("decoder", plan["decoder"], feature_dim=FEATURE_DIM)
    assert isinstance(decoder, MNICDecoder)
    assert plan["generate"]["steps"] <= 5
    assert len(decoder.generate(features(2), **plan["generate"])) == 2


@pytest.fixture
def tiny_bert_dir(tmp_path: Path, shared_dir: Path) -> Path:
    """A stand-in for bert-base-uncased: the real vocabulary, a tiny random BERT, HF format."""
    vocab = shared_dir / "tokenizers" / "bert-base-uncased" / "vocab.txt"
    if not vocab.is_file():
        pytest.skip(f"no bert-base-uncased vocab at {vocab}")
    directory = tmp_path / "bert-base-uncased"
    tokenizer = BertTokenizerFast.from_pretrained(str(vocab.parent))  # reads vocab.txt
    config = BertConfig(vocab_size=len(tokenizer), **TINY_BERT_CONFIG)
    torch.manual_seed(0)
    BertForMaskedLM(config).save_pretrained(str(directory))
    tokenizer.save_pretrained(str(directory))
    return directory


def test_paper_preset_builds_against_a_stand_in_bert(tiny_bert_dir: Path, tmp_path: Path) -> None:
    plan = decoder_plan(load_preset("mnic-paper"), "mnic")
    assert plan["decoder"]["lm"] == "bert-base-uncased" and plan["decoder"]["lm_pretrained"]
    assert plan["generate"]["steps"] <= 5
    cfg = {**plan["decoder"], "lm": str(tiny_bert_dir)}  # the same name-or-path code as a hub name
    decoder = build("decoder", cfg, feature_dim=FEATURE_DIM)
    saved = BertForMaskedLM.from_pretrained(str(tiny_bert_dir))
    assert torch.equal(  # pretrained weights were loaded, not re-initialised
        decoder.lm.get_input_embeddings().weight, saved.get_input_embeddings().weight
    )
    assert decoder.mask_token_id == decoder.tokenizer.mask_token_id == 103
    assert decoder.end_token_id == decoder.tokenizer.sep_token_id
    parts = decoder.loss({"features": features(2), "captions": ["A dog runs.", "two cats"]})
    assert torch.isfinite(parts["loss"])
    captions = decoder.generate(features(2), **plan["generate"])
    assert len(captions) == 2 and all(isinstance(c, str) for c in captions)
    decoder.save_pretrained(tmp_path / "ckpt")  # reloads offline from its own files
    loaded = CaptionDecoder.from_pretrained(tmp_path / "ckpt")
    assert loaded.generate(features(2), **plan["generate"]) == captions


def test_samples_at_temperature_zero_are_the_argmax_caption(tokenizer_dir: Path) -> None:
    decoder = make(tokenizer_dir, seed=5)
    feats = features(6, seed=2)
    captions = decoder.generate(feats, steps=3)
    zero = decoder.generate_samples(feats, num_samples=2, seed=0, steps=3, sample_temperature=0.0)
    assert zero == [[caption] * 2 for caption in captions]
    hot = decoder.generate_samples(feats, num_samples=3, seed=0, steps=3, sample_temperature=2.0)
    assert any(len(set(per_image)) > 1 for per_image in hot)
    fixed = make(tokenizer_dir, seed=5, length_mode="fixed")
    assert [len(s) for s in fixed.generate_samples(feats, num_samples=2, steps=2)] == [2] * 6
