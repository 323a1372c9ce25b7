"""Encoder and feature cache: hit, miss, invalidation when the encoder changes, bad images."""

from __future__ import annotations

import shutil

import pytest
import torch
from conftest import TINY_SHAPES

from diffusion_captioner.encoders import OpenClipEncoder, encoder_config
from diffusion_captioner.features import FeatureCache
from registry import CaptionRecord, build


class CountingEncoder:
    """Wraps a real encoder and counts how many images it encodes."""

    def __init__(self, encoder):
        self.inner, self.encoded, self.texts = encoder, 0, 0
        self.dim, self.fingerprint = encoder.dim, encoder.fingerprint

    def preprocess(self, image):
        return self.inner.preprocess(image)

    def encode_images(self, pixels):
        self.encoded += len(pixels)
        return self.inner.encode_images(pixels)

    def encode_texts(self, texts):
        self.texts += len(texts)
        return self.inner.encode_texts(texts)


def test_encoder_config_parses_cli_specs():
    assert encoder_config("ViT-B-32:openai") == {
        "type": "open_clip", "model": "ViT-B-32", "pretrained": "openai"}
    assert encoder_config(None)["model"] == "embedded:shapes_clip"
    assert encoder_config("local-dir:/x/y") == {"type": "open_clip", "model": "local-dir:/x/y"}


def test_encoder_shapes_and_text_space(tiny_encoder):
    dataset = build("dataset", TINY_SHAPES)
    record = dataset.records("test")[0]
    pixels = tiny_encoder.preprocess(dataset.load_image(record)).unsqueeze(0)
    image = tiny_encoder.encode_images(pixels)
    text = tiny_encoder.encode_texts(list(record.captions))
    assert image.shape == (1, tiny_encoder.dim)
    assert text.shape == (5, tiny_encoder.dim)
    assert torch.isfinite(image).all() and torch.isfinite(text).all()


def test_cache_miss_then_hit_encodes_nothing(tiny_encoder, tmp_path):
    dataset = build("dataset", TINY_SHAPES)
    cache = FeatureCache(tmp_path)
    counting = CountingEncoder(tiny_encoder)
    first = cache.get(dataset, "val", counting, progress=False)
    assert not first.from_cache and counting.encoded == len(dataset.records("val"))
    second = cache.get(dataset, "val", counting, progress=False)
    assert second.from_cache and counting.encoded == len(dataset.records("val"))
    assert torch.equal(first.features, second.features)
    assert second.image_ids == [r.image_id for r in dataset.records("val")]


def test_cache_invalidated_when_encoder_weights_change(tiny_clip_dir, tmp_path):
    dataset = build("dataset", TINY_SHAPES)
    cache = FeatureCache(tmp_path / "cache")
    original = OpenClipEncoder(f"local-dir:{tiny_clip_dir}")
    changed_dir = tmp_path / "changed_clip"
    shutil.copytree(tiny_clip_dir, changed_dir)
    from safetensors.torch import load_file, save_file

    weights = changed_dir / "open_clip_model.safetensors"
    state = load_file(str(weights))
    state["logit_scale"] = state["logit_scale"] + 1.0
    save_file(state, str(weights))
    changed = OpenClipEncoder(f"local-dir:{changed_dir}")
    assert original.fingerprint != changed.fingerprint
    assert cache.path(dataset, "val", original) != cache.path(dataset, "val", changed)
    cache.get(dataset, "val", original, progress=False)
    counting = CountingEncoder(changed)
    assert not cache.get(dataset, "val", counting, progress=False).from_cache
    assert counting.encoded > 0
    other_split = cache.path(dataset, "test", original)
    assert other_split != cache.path(dataset, "val", original)


def test_bad_image_is_skipped_and_named(tiny_encoder, tmp_path, caplog):
    """One unreadable image never loses the rest of the split."""
    dataset = build("dataset", TINY_SHAPES)
    records = dataset.records("val")[:3]
    good = tmp_path / "good.png"
    dataset.load_image(records[0]).save(good)
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    from registry import CaptionDataset

    class Files(CaptionDataset):
        fingerprint = "files-test"

        def records(self, split=None):
            return [CaptionRecord(1, str(good), ("a",), "test"),
                    CaptionRecord(2, str(broken), ("b",), "test"),
                    CaptionRecord(3, str(tmp_path / "missing.png"), ("c",), "test")]

    features = FeatureCache(tmp_path / "cache").get(Files(), "test", tiny_encoder, progress=False)
    assert features.image_ids == [1]
    assert set(features.skipped) == {2, 3}
    assert "broken.jpg" in caplog.text and "missing.png" in caplog.text


def test_unknown_open_clip_model_is_one_line_error():
    from registry import ComponentError

    with pytest.raises(ComponentError, match="could not be loaded") as error:
        OpenClipEncoder("Not-A-Model-9000")
    assert "\n" not in str(error.value)


def test_text_features_cached_and_batched(tiny_encoder, tmp_path):
    from diffusion_captioner.trainer import CaptionPairs

    dataset = build("dataset", TINY_SHAPES)
    cache = FeatureCache(tmp_path)
    split = cache.add_text_features(dataset, "val", tiny_encoder,
                                    cache.get(dataset, "val", tiny_encoder, progress=False),
                                    progress=False)
    captions = [c for r in split.records for c in r.captions]
    assert split.text_features.shape == (len(captions), tiny_encoder.dim)
    direct = tiny_encoder.encode_texts(captions[:3])
    assert torch.allclose(split.text_features[:3], direct, atol=1e-5)
    pairs = CaptionPairs.from_split(split)
    batch = pairs.batch([0, 6])
    assert batch["captions"] == [captions[0], captions[6]]
    assert torch.equal(batch["text_features"][1], split.text_features[6])
    assert torch.equal(batch["features"][1], split.features[1])  # caption 6 belongs to image 1
    counting = CountingEncoder(tiny_encoder)
    again = FeatureCache(tmp_path).add_text_features(
        dataset, "val", counting, cache.get(dataset, "val", tiny_encoder, progress=False),
        progress=False)
    assert torch.equal(again.text_features, split.text_features)
    assert counting.texts == 0  # read back from the cache, nothing encoded
