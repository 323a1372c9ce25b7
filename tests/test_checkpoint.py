"""Decoder checkpoints: round trip, atomic writes, one-line errors; offline, CPU, tiny models."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import helpers  # sorts before torch/transformers: it sets HF_HUB_OFFLINE first
import pytest
import torch
from helpers import WORDS, tiny_clipcap_config, tiny_word_tokenizer_dir
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel

from baselines.clipcap import ClipCapDecoder
from diffusion_captioner import checkpoint
from diffusion_captioner.checkpoint import load_decoder, save_decoder
from diffusion_captioner.tokenization import build_word_tokenizer
from registry import CaptionDecoder, ComponentError

FEATURE_DIM = 16


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch):
    helpers.block_network(monkeypatch)


def make(tmp_path: Path, seed: int = 0, **overrides: Any) -> ClipCapDecoder:
    torch.manual_seed(seed)
    config = tiny_clipcap_config(FEATURE_DIM, tiny_word_tokenizer_dir(tmp_path), **overrides)
    return ClipCapDecoder(**config).eval()


def features(n: int = 3) -> torch.Tensor:
    return torch.randn(n, FEATURE_DIM, generator=torch.Generator().manual_seed(7)) * 3


def snapshot(directory: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(directory)): p.read_bytes() for p in directory.rglob("*") if p.is_file()
    }


def assert_same_state(a: nn.Module, b: nn.Module) -> None:
    state_a, state_b = a.state_dict(), b.state_dict()
    assert state_a.keys() == state_b.keys()
    for name in state_a:
        torch.testing.assert_close(state_a[name], state_b[name], rtol=0, atol=0)


def assert_one_line(error: pytest.ExceptionInfo, *fragments: str) -> None:
    message = str(error.value)
    assert "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, message


# ------------------------------------------------------------------------------ round trip
@pytest.mark.parametrize("mapper", ["mlp", "transformer"])
def test_round_trip_same_weights_and_generations(tmp_path: Path, mapper: str) -> None:
    decoder = make(tmp_path, mapper=mapper)
    with torch.no_grad():  # move off the initialisation so a fresh build could not match by luck
        for parameter in decoder.parameters():
            parameter.add_(0.01 * torch.randn_like(parameter))
    target = tmp_path / "ckpt"
    decoder.save_pretrained(target)

    saved = json.loads((target / "config.json").read_text())
    assert saved == {"type": "clipcap", **decoder.config}
    assert (target / "model.safetensors").is_file()
    assert (target / "tokenizer" / "tokenizer.json").is_file()
    assert json.loads((target / "lm" / "config.json").read_text())["n_layer"] == 2

    loaded = ClipCapDecoder.from_pretrained(target)
    assert isinstance(loaded, ClipCapDecoder) and not loaded.training
    assert_same_state(decoder, loaded)
    lm = loaded.lm
    assert (
        lm.get_output_embeddings().weight.data_ptr() == lm.get_input_embeddings().weight.data_ptr()
    )
    feats = features()
    assert loaded.generate(feats) == decoder.generate(feats)
    assert loaded.generate(feats, num_beams=3) == decoder.generate(feats, num_beams=3)
    via_base = CaptionDecoder.from_pretrained(target)  # the class comes from config.json
    assert type(via_base) is ClipCapDecoder


def test_checkpoint_of_a_pretrained_local_lm_loads_without_it(tmp_path: Path) -> None:
    """A config naming an LM (a hub name in real use) is rebuilt from the checkpoint's files."""
    lm_dir = tmp_path / "tiny-gpt2"
    tokenizer = build_word_tokenizer(WORDS)
    config = GPT2Config(vocab_size=len(tokenizer), **helpers.TINY_LM_CONFIG)
    GPT2LMHeadModel(config).save_pretrained(str(lm_dir))
    tokenizer.save_pretrained(str(lm_dir))
    torch.manual_seed(0)
    decoder = ClipCapDecoder(FEATURE_DIM, lm=str(lm_dir), prefix_length=4, max_length=12).eval()
    decoder.save_pretrained(tmp_path / "ckpt")
    shutil.rmtree(lm_dir)  # like a hub model that cannot be downloaded

    loaded = ClipCapDecoder.from_pretrained(tmp_path / "ckpt")
    assert loaded.config["lm"] == str(tmp_path / "ckpt" / "lm")
    assert loaded.config["lm_pretrained"] is False
    assert_same_state(decoder, loaded)
    assert loaded.generate(features()) == decoder.generate(features())


def test_overrides_and_map_location(tmp_path: Path) -> None:
    make(tmp_path).save_pretrained(tmp_path / "ckpt")
    loaded = load_decoder(tmp_path / "ckpt", CaptionDecoder, map_location="cpu", max_length=6)
    assert loaded.config["max_length"] == 6 and loaded.device == torch.device("cpu")
    assert all(len(c.split()) <= 6 for c in loaded.generate(features()))
    with pytest.raises(ComponentError) as error:
        load_decoder(tmp_path / "ckpt", CaptionDecoder, beams=3)
    assert_one_line(error, "'clipcap' does not take beams", "feature_dim")


def test_saving_again_replaces_the_checkpoint(tmp_path: Path) -> None:
    target = tmp_path / "ckpt"
    make(tmp_path, seed=0).save_pretrained(target)
    second = make(tmp_path, seed=1)
    second.save_pretrained(target)
    assert_same_state(second, ClipCapDecoder.from_pretrained(target))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "word_tokenizer"]  # no leftovers


# ------------------------------------------------------------------------------ atomic writes
def test_failed_save_leaves_the_previous_checkpoint_untouched(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "ckpt"
    make(tmp_path, seed=0).save_pretrained(target)
    before = snapshot(target)

    def crash(self: ClipCapDecoder, directory: Path) -> None:
        (Path(directory) / "tokenizer").mkdir()
        (Path(directory) / "tokenizer" / "half-written").write_text("x")
        raise RuntimeError("disk full")

    monkeypatch.setattr(ClipCapDecoder, "save_extra", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        make(tmp_path, seed=1).save_pretrained(target)
    assert snapshot(target) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "word_tokenizer"]

    with pytest.raises(RuntimeError, match="disk full"):
        make(tmp_path, seed=1).save_pretrained(tmp_path / "new")
    assert not (tmp_path / "new").exists()  # a failed first save leaves nothing behind


def test_failed_swap_restores_the_previous_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "ckpt"
    make(tmp_path, seed=0).save_pretrained(target)
    before = snapshot(target)
    original_rename = Path.rename

    def rename(self: Path, destination: Path) -> Path:
        if Path(destination) == target and ".tmp-" in self.name:
            raise OSError("rename failed")
        return original_rename(self, destination)

    monkeypatch.setattr(Path, "rename", rename)
    with pytest.raises(OSError, match="rename failed"):
        make(tmp_path, seed=1).save_pretrained(target)
    monkeypatch.undo()
    assert snapshot(target) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "word_tokenizer"]


# ------------------------------------------------------------------------------ errors
def test_missing_directory_and_config_are_one_line_errors(tmp_path: Path) -> None:
    with pytest.raises(ComponentError) as error:
        load_decoder(tmp_path / "nowhere", CaptionDecoder)
    assert_one_line(error, str(tmp_path / "nowhere"), "does not exist")

    (tmp_path / "empty").mkdir()
    with pytest.raises(ComponentError) as error:
        ClipCapDecoder.from_pretrained(tmp_path / "empty")
    assert_one_line(error, str(tmp_path / "empty"), "config.json is missing")

    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text("{not json")
    with pytest.raises(ComponentError) as error:
        load_decoder(tmp_path / "bad", CaptionDecoder)
    assert_one_line(error, "config.json is not valid JSON")

    (tmp_path / "untyped").mkdir()
    (tmp_path / "untyped" / "config.json").write_text('{"feature_dim": 3}')
    with pytest.raises(ComponentError) as error:
        load_decoder(tmp_path / "untyped", CaptionDecoder)
    assert_one_line(error, "no 'type' key")


def test_missing_or_mismatched_weights_are_one_line_errors(tmp_path: Path) -> None:
    target = tmp_path / "ckpt"
    make(tmp_path).save_pretrained(target)
    with pytest.raises(ComponentError) as error:  # shapes differ: prefix 4 -> 6
        load_decoder(target, CaptionDecoder, prefix_length=6)
    assert_one_line(error, str(target / "model.safetensors"), "do not fit", "mapper")

    with pytest.raises(ComponentError) as error:  # keys differ: mlp weights, transformer model
        load_decoder(target, CaptionDecoder, mapper="transformer")
    assert_one_line(error, "do not match", "missing mapper.", "unexpected mapper.net")

    (target / "model.safetensors").unlink()
    with pytest.raises(ComponentError) as error:
        load_decoder(target, CaptionDecoder)
    assert_one_line(error, str(target), "model.safetensors is missing")


def test_wrong_role_subclass_is_refused(tmp_path: Path) -> None:
    class OtherDecoder(CaptionDecoder):
        pass

    make(tmp_path).save_pretrained(tmp_path / "ckpt")
    with pytest.raises(ComponentError) as error:
        OtherDecoder.from_pretrained(tmp_path / "ckpt")
    assert_one_line(error, "decoder 'clipcap' (ClipCapDecoder) is not a OtherDecoder")


# ------------------------------------------------------------------------------ generic path
class TiedDecoder(CaptionDecoder):
    """A decoder without hooks whose two layers share one weight matrix."""

    def __init__(self, feature_dim: int, width: int = 4) -> None:
        super().__init__()
        self.feature_dim, self.width = feature_dim, width
        self.encode = nn.Linear(feature_dim, width, bias=False)
        self.tied = nn.Linear(feature_dim, width, bias=False)
        self.tied.weight = self.encode.weight  # shared tensor

    @property
    def config(self) -> dict[str, Any]:
        return {"feature_dim": self.feature_dim, "width": self.width}


def test_decoder_without_hooks_and_with_shared_weights(tmp_path: Path, clean_registry) -> None:
    CaptionDecoder.register("test-tied")(TiedDecoder)  # clean_registry removes it afterwards
    decoder = TiedDecoder(FEATURE_DIM, width=3)
    save_decoder(decoder, tmp_path / "tied")
    assert json.loads((tmp_path / "tied" / "config.json").read_text()) == {
        "type": "test-tied", "feature_dim": FEATURE_DIM, "width": 3,
    }  # fmt: skip
    loaded = checkpoint.load_decoder(tmp_path / "tied", CaptionDecoder)
    assert isinstance(loaded, TiedDecoder)
    assert_same_state(decoder, loaded)
    assert loaded.tied.weight is loaded.encode.weight
