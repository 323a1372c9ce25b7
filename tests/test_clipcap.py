"""ClipCap decoder and the word tokenizer: offline, CPU, tiny random-weight GPT-2 models."""

from __future__ import annotations

from pathlib import Path

import helpers  # sorts before torch/transformers: it sets HF_HUB_OFFLINE first
import pytest
import torch
import torch.nn.functional as F
from helpers import CAPTIONS, TINY_LM_CONFIG, WORDS, tiny_clipcap_config, tiny_word_tokenizer_dir
from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast

from baselines.clipcap import ClipCapDecoder
from diffusion_captioner import tokenization
from diffusion_captioner.tokenization import SPECIAL_TOKENS, build_word_tokenizer, load_tokenizer
from registry import CaptionDecoder, ComponentError, describe, registered_name

FEATURE_DIM = 16


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch):
    helpers.block_network(monkeypatch)


@pytest.fixture
def tokenizer_dir(tmp_path: Path) -> Path:
    return tiny_word_tokenizer_dir(tmp_path)


def make(tokenizer_dir: Path, seed: int = 0, **overrides) -> ClipCapDecoder:
    torch.manual_seed(seed)
    return ClipCapDecoder(**tiny_clipcap_config(FEATURE_DIM, tokenizer_dir, **overrides))


def features(n: int = len(CAPTIONS), seed: int = 1) -> torch.Tensor:
    return torch.randn(n, FEATURE_DIM, generator=torch.Generator().manual_seed(seed))


def batch() -> dict:
    return {"features": features(), "captions": list(CAPTIONS)}


def greedy_without_cache(decoder: ClipCapDecoder, feats: torch.Tensor, max_new: int) -> list[str]:
    """Reference: re-run the whole sequence [prefix ; tokens so far] at every step, no cache."""
    embed = decoder.lm.get_input_embeddings()
    captions = []
    with torch.no_grad():
        for row in range(feats.shape[0]):
            sequence = decoder.prefix_embeddings(feats[row : row + 1])  # (1, k, E)
            ids: list[int] = []
            for _ in range(max_new):
                logits = decoder.lm(inputs_embeds=sequence).logits[0, -1]  # (V,)
                token = int(logits.argmax())
                if token == decoder.eos_token_id:
                    break
                ids.append(token)
                next_embed = embed(torch.tensor([[token]]))  # (1, 1, E)
                sequence = torch.cat([sequence, next_embed], dim=1)
            captions.append(decoder.tokenizer.decode(ids, skip_special_tokens=True).strip())
    return captions


# ------------------------------------------------------------------------------ tokenizer
def test_word_tokenizer_ids_and_decode() -> None:
    tokenizer = build_word_tokenizer(["Red", "circle", "a", "red"])
    assert tokenizer.convert_ids_to_tokens(list(range(5))) == list(SPECIAL_TOKENS)
    assert tokenizer.convert_ids_to_tokens([5, 6, 7]) == ["a", "circle", "red"]
    assert (tokenizer.pad_token_id, tokenizer.unk_token_id) == (0, 1)
    assert (tokenizer.bos_token, tokenizer.eos_token) == ("[CLS]", "[SEP]")
    assert (tokenizer.cls_token, tokenizer.sep_token, tokenizer.mask_token) == (
        "[CLS]", "[SEP]", "[MASK]",
    )  # fmt: skip
    ids = tokenizer("A RED circle", add_special_tokens=False)["input_ids"]
    assert ids == [5, 7, 6]
    assert tokenizer("A red circle")["input_ids"] == ids  # no post-processor adds specials
    assert tokenizer("a blue circle", add_special_tokens=False)["input_ids"] == [5, 1, 6]
    assert tokenizer.decode([2, *ids, 3, 0, 0], skip_special_tokens=True) == "a red circle"


def test_decode_until_stop_cuts_at_the_first_stop_token() -> None:
    from diffusion_captioner.tokenization import decode_until_stop

    tokenizer = build_word_tokenizer(["Red", "circle", "a", "red"])
    rows = [[5, 7, 3, 6, 0], [2, 5, 6], [3, 5]]  # stop after "a red"; none; stop first
    assert decode_until_stop(tokenizer, rows, (3, 0)) == ["a red", "a circle", ""]
    assert decode_until_stop(tokenizer, rows, (0,)) == ["a red circle", "a circle", "a"]


def test_load_tokenizer_saved_dir_and_errors(tokenizer_dir: Path) -> None:
    tokenizer = load_tokenizer(tokenizer_dir)
    assert len(tokenizer) == len(SPECIAL_TOKENS) + len(WORDS)
    assert tokenizer.pad_token_id == 0 and tokenizer.eos_token_id == 3
    with pytest.raises(ComponentError, match="embedded tokenizer 'no_such_name' not found"):
        load_tokenizer("embedded:no_such_name")


def test_load_tokenizer_real_gpt2_files_get_a_pad_token(shared_dir: Path) -> None:
    directory = shared_dir / "tokenizers" / "gpt2"
    tokenizer = load_tokenizer(directory)  # bare vocab.json + merges.txt
    assert isinstance(tokenizer, GPT2TokenizerFast)
    assert tokenizer.eos_token == "<|endoftext|>" and tokenizer.pad_token == tokenizer.eos_token


def test_embedded_tokenizer_is_written_from_the_shapes_vocabulary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shapes = pytest.importorskip("diffusion_captioner.data.shapes")
    packaged = tokenization.embedded_tokenizer_dir("shapes_words")
    monkeypatch.setattr(tokenization, "ASSETS_DIR", tmp_path / "assets")
    written = tokenization.write_embedded_tokenizer()
    assert written == tmp_path / "assets" / "shapes_words"
    tokenizer = load_tokenizer("embedded:shapes_words")
    assert tokenizer.convert_ids_to_tokens(list(range(5))) == list(SPECIAL_TOKENS)
    assert len(tokenizer) == len(SPECIAL_TOKENS) + len(shapes.vocabulary())
    if (packaged / "tokenizer.json").is_file():  # the packaged copy is up to date
        stale = "stale: run `python -m diffusion_captioner.tokenization`"
        assert AutoTokenizer.from_pretrained(str(packaged)).get_vocab() == tokenizer.get_vocab(), (
            stale
        )


# ------------------------------------------------------------------------------ registry/config
def test_registered_and_config_rebuilds(tokenizer_dir: Path) -> None:
    decoder = make(tokenizer_dir)
    assert CaptionDecoder.by_name("clipcap") is ClipCapDecoder
    assert registered_name(ClipCapDecoder) == "clipcap"
    assert describe(ClipCapDecoder) == "ClipCap: CLIP prefix -> mapper -> GPT-2, autoregressive."
    assert ClipCapDecoder.capabilities.step_sweep == ()
    assert ClipCapDecoder.capabilities.kind == "autoregressive"
    assert ClipCapDecoder.capabilities.fixed_tokens_option == "fixed_tokens"
    rebuilt = ClipCapDecoder(**decoder.config)
    assert rebuilt.config == decoder.config
    assert set(decoder.config) == {
        "feature_dim", "lm", "lm_pretrained", "lm_config", "tokenizer", "prefix_length",
        "clip_length", "mapper", "mapper_layers", "finetune_lm", "normalize_prefix", "max_length",
    }  # fmt: skip
    assert decoder.lm.config.vocab_size == len(decoder.tokenizer)  # sized to the word tokenizer


def test_bad_arguments_fail_clearly(tokenizer_dir: Path) -> None:
    with pytest.raises(ValueError, match="unknown mapper 'lstm'"):
        make(tokenizer_dir, mapper="lstm")
    with pytest.raises(ValueError, match="exceeds the LM's 32 positions"):
        make(tokenizer_dir, max_length=40)
    with pytest.raises(ValueError, match="unknown gpt2 config keys"):
        make(tokenizer_dir, lm_config={**TINY_LM_CONFIG, "n_layers": 3})
    with pytest.raises(ValueError, match="max_length 29 must be in 1..28"):
        make(tokenizer_dir).generate(features(1), max_length=29)


# ------------------------------------------------------------------------------ loss
def test_labels_ignore_prefix_and_padding(tokenizer_dir: Path) -> None:
    decoder = make(tokenizer_dir)
    inputs = decoder.build_inputs(batch())
    k = decoder.prefix_length
    labels, mask = inputs["labels"], inputs["attention_mask"]
    lengths = [len(c.split()) + 1 for c in CAPTIONS]  # words + eos
    assert labels.shape == mask.shape == (len(CAPTIONS), k + max(lengths))
    assert inputs["inputs_embeds"].shape == (*labels.shape, TINY_LM_CONFIG["n_embd"])
    assert (labels[:, :k] == -100).all()
    for row, (caption, length) in enumerate(zip(CAPTIONS, lengths, strict=True)):
        expected = decoder.tokenizer(caption, add_special_tokens=False)["input_ids"]
        expected = [*expected, decoder.eos_token_id]
        assert labels[row, k : k + length].tolist() == expected
        assert (labels[row, k + length :] == -100).all()
        assert mask[row].tolist() == [1] * (k + length) + [0] * (labels.shape[1] - k - length)


def test_loss_is_the_shifted_cross_entropy(tokenizer_dir: Path) -> None:
    decoder = make(tokenizer_dir).eval()
    loss = decoder.loss(batch())["loss"]
    assert loss.ndim == 0 and torch.isfinite(loss)
    inputs = decoder.build_inputs(batch())
    logits = decoder.lm(
        inputs_embeds=inputs["inputs_embeds"], attention_mask=inputs["attention_mask"]
    ).logits  # (B, k+T, V)
    manual = F.cross_entropy(
        logits[:, :-1].flatten(0, 1), inputs["labels"][:, 1:].flatten(), ignore_index=-100
    )
    torch.testing.assert_close(loss, manual)
    hf = decoder.lm(**inputs).loss  # the library's own shift
    torch.testing.assert_close(loss, hf)
    loss.backward()
    assert all(p.grad is not None for p in decoder.mapper.parameters())


def test_long_captions_are_cut_to_max_length(tokenizer_dir: Path) -> None:
    decoder = make(tokenizer_dir, max_length=5)
    ids, mask = decoder.encode_captions(["a " * 20, "red"])
    assert ids.shape == (2, 5)
    assert ids[0, -1].item() == decoder.eos_token_id
    assert mask.sum(dim=1).tolist() == [5, 2]


@pytest.mark.parametrize("mapper", ["mlp", "transformer"])
def test_memorises_four_captions(tokenizer_dir: Path, mapper: str) -> None:
    decoder = make(tokenizer_dir, mapper=mapper, mapper_layers=2)
    feats = features()
    optimizer = torch.optim.AdamW(decoder.parameters(), lr=3e-3)
    outputs: list[str] = []
    for step in range(1, 201):
        decoder.train()
        loss = decoder.loss({"features": feats, "captions": list(CAPTIONS)})["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 10 == 0:
            outputs = decoder.generate(feats)
            if outputs == list(CAPTIONS):
                break
    assert outputs == list(CAPTIONS), f"not memorised after {step} steps: {outputs}"
    assert decoder.generate(feats, num_beams=3) == list(CAPTIONS)


# ------------------------------------------------------------------------------ generation
def test_beam_search_valid_and_one_beam_is_greedy(tokenizer_dir: Path) -> None:
    decoder = make(tokenizer_dir, max_length=8).eval()
    feats = features(3)
    greedy = decoder.generate(feats)
    assert decoder.generate(feats, num_beams=1) == greedy
    for beams in (2, 4):
        captions = decoder.generate(feats, num_beams=beams)
        assert len(captions) == 3 and all(isinstance(c, str) for c in captions)
        assert all(len(c.split()) <= 8 for c in captions)
        assert set(" ".join(captions).split()) <= set(WORDS)
    with torch.no_grad():
        prefix = decoder.prefix_embeddings(feats)
        one_beam = decoder._beam_search(prefix, num_beams=1, max_new=8, length_penalty=1.0)
        torch.testing.assert_close(one_beam, decoder._greedy(prefix, 8))


def test_generate_is_deterministic_restores_mode_and_refuses_others_options(
        tokenizer_dir: Path) -> None:
    decoder = make(tokenizer_dir, lm_config={**TINY_LM_CONFIG, "resid_pdrop": 0.5})
    decoder.train()
    feats = features(3)
    first = decoder.generate(feats)
    assert decoder.training  # mode restored
    with pytest.raises(ValueError, match="no generation option schedule, steps; it takes: num_beams"):
        decoder.generate(feats, steps=10, schedule="cosine")  # options of other decoders
    assert decoder.generate(feats) == first
    assert decoder.generate(feats, num_beams=3) == decoder.generate(feats, num_beams=3)
    assert decoder.generate(features(0)) == []


def test_kv_cache_greedy_equals_uncached_reference(tokenizer_dir: Path) -> None:
    decoder = make(tokenizer_dir, max_length=10, seed=3).eval()
    # Sharpen the random LM a little so argmax ties cannot make the comparison flaky.
    feats = features(4, seed=5) * 3
    assert decoder.generate(feats) == greedy_without_cache(decoder, feats, 10)


def test_frozen_lm_gets_no_gradients(tokenizer_dir: Path) -> None:
    decoder = make(tokenizer_dir, finetune_lm=False, mapper="transformer")
    decoder.train()
    assert not decoder.lm.training  # a frozen LM stays in eval mode (no dropout)
    decoder.loss(batch())["loss"].backward()
    assert all(not p.requires_grad and p.grad is None for p in decoder.lm.parameters())
    assert all(p.grad is not None for p in decoder.mapper.parameters())


def test_normalize_prefix_ignores_feature_scale(tokenizer_dir: Path) -> None:
    decoder = make(tokenizer_dir, normalize_prefix=True).eval()
    feats = features(2)
    torch.testing.assert_close(
        decoder.prefix_embeddings(feats), decoder.prefix_embeddings(feats * 7.0)
    )


# ------------------------------------------------------------------------------ local LM dirs
def save_tiny_gpt2(directory: Path, tokenizer, seed: int = 0) -> GPT2LMHeadModel:
    """A tiny GPT-2 with "pretrained" weights and its tokenizer saved as a hub model would be."""
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id, **TINY_LM_CONFIG,
    )  # fmt: skip
    model = GPT2LMHeadModel(config)
    model.save_pretrained(str(directory))
    tokenizer.save_pretrained(str(directory))
    return model


def test_pretrained_lm_from_a_local_directory(tmp_path: Path) -> None:
    lm_dir = tmp_path / "tiny-gpt2"
    saved = save_tiny_gpt2(lm_dir, build_word_tokenizer(WORDS))
    torch.manual_seed(0)
    decoder = ClipCapDecoder(FEATURE_DIM, lm=str(lm_dir), prefix_length=4, max_length=12)
    assert decoder.config["lm_pretrained"] is True and decoder.config["tokenizer"] is None
    for name, tensor in saved.state_dict().items():
        torch.testing.assert_close(decoder.lm.state_dict()[name], tensor)  # the saved weights
    assert torch.isfinite(decoder.loss(batch())["loss"])
    assert len(decoder.generate(features(2), num_beams=2)) == 2


def test_real_gpt2_tokenizer_pads_with_eos_but_trains_on_eos(
    tmp_path: Path, shared_dir: Path
) -> None:
    bpe_dir = shared_dir / "tokenizers" / "gpt2"
    lm_dir = tmp_path / "tiny-gpt2-bpe"
    save_tiny_gpt2(lm_dir, GPT2TokenizerFast.from_pretrained(str(bpe_dir)))
    decoder = ClipCapDecoder(FEATURE_DIM, lm=str(lm_dir), prefix_length=4, max_length=12).eval()
    eos = decoder.tokenizer.eos_token_id
    assert eos == 50256 and decoder.pad_token_id == eos
    inputs = decoder.build_inputs(
        {"features": features(2), "captions": ["A dog.", "A man rides a horse."]}
    )
    labels = inputs["labels"][:, decoder.prefix_length :]
    short = decoder.tokenizer("A dog.", add_special_tokens=False)["input_ids"]
    assert labels[0, : len(short) + 1].tolist() == [*short, eos]  # eos is a target ...
    assert (labels[0, len(short) + 1 :] == -100).all()  # ... padding (same id) is not
    assert torch.isfinite(
        decoder.loss({"features": features(2), "captions": ["A dog.", "A cat."]})["loss"]
    )
    captions = decoder.generate(features(2), max_length=5)
    assert len(captions) == 2 and all("<|endoftext|>" not in c for c in captions)


def test_sampling_cut_to_one_token_is_greedy_and_options_are_checked(tokenizer_dir: Path) -> None:
    decoder = make(tokenizer_dir)
    feats = features(5, seed=3)
    greedy = decoder.generate(feats)
    for cut in ({"sample_temperature": 0.0}, {"top_k": 1}, {"top_p": 1e-6}):
        assert decoder.generate_samples(feats, num_samples=2, seed=1, **cut) == [
            [caption] * 2 for caption in greedy], cut
    wide = decoder.generate_samples(feats, num_samples=3, seed=1, top_k=5, top_p=0.9)
    assert any(len(set(per_image)) > 1 for per_image in wide)
    assert decoder.generate(feats, num_beams=2) == decoder.generate(feats, num_beams=2, top_k=3)
    with pytest.raises(ValueError, match="top_k must be >= 1"):
        decoder.generate_samples(feats, top_k=0)
    with pytest.raises(ValueError, match=r"top_p must be in \(0, 1\]"):
        ClipCapDecoder.check_generate_options({"top_p": 1.5})
