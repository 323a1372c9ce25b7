"""Consensus targets: each image's most agreed-upon reference, swapped in at a ratio."""

from __future__ import annotations

import pytest
import torch

from diffusion_captioner.consensus import consensus_indices
from diffusion_captioner.trainer import CaptionPairs, TrainConfig

REFS = {
    1: ("a big red circle", "a large red circle", "a large red circle in the middle",
        "there is a red disk"),
    2: ("a small blue square above a green cross", "a green cross below a small blue square",
        "a small blue square above a small green cross", "a blue box and a green plus sign"),
    3: ("a tiny orange triangle",),
}


def training_pairs() -> CaptionPairs:
    text = torch.arange(9.0)[:, None].repeat(1, 2)  # (P, 2): row p holds p
    return CaptionPairs(torch.eye(3), list(REFS.values()), text)


def test_the_consensus_is_the_reference_the_others_agree_with_most():
    best = consensus_indices(REFS)
    # "a large red circle" shares the most n-grams with the other three; the one-word
    # outlier "there is a red disk" never wins; a lone reference is its own consensus
    assert REFS[1][best[1]] == "a large red circle"
    assert REFS[2][best[2]] == "a small blue square above a green cross"
    assert best[3] == 0


def test_the_ratio_replaces_that_share_and_the_text_features_follow_their_captions():
    train = training_pairs()
    assert train.with_consensus_targets(0.0) is train
    every = train.with_consensus_targets(1.0)
    assert every.captions == [
        ("a large red circle",) * 4, ("a small blue square above a green cross",) * 4,
        ("a tiny orange triangle",)]
    # a replaced pair carries the CLIP text feature of its new caption, row for row
    assert every.text_features[:, 0].tolist() == [1.0] * 4 + [4.0] * 4 + [8.0]
    assert len(every) == 9 and every.batch([0, 4])["captions"] == [
        "a large red circle", "a small blue square above a green cross"]
    # every pair also carries its image's captions (for reference selection)
    assert every.batch([8])["references"] == [("a tiny orange triangle",)]
    assert train.captions == list(REFS.values())  # the pairs given are untouched
    big = CaptionPairs(torch.zeros(300, 2), [("a red circle", "a big red circle", "red")] * 300)
    half = big.with_consensus_targets(0.5)
    moved = sum(c != o for new, old in zip(half.captions, big.captions, strict=True)
                for c, o in zip(new, old, strict=True))
    assert 0.25 < moved / 900 < 0.42  # half of the two non-consensus captions of each image
    with pytest.raises(ValueError, match="consensus_targets must be in"):
        TrainConfig.from_dict({"consensus_targets": 1.5})


def test_the_trainer_applies_consensus_targets_and_refuses_them_where_there_are_no_pairs(
        tmp_path):
    from diffusion_captioner.trainer import Trainer
    from registry import CaptionDecoder

    class Still(CaptionDecoder):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(1))

        def generate_batch(self, features, options):
            return ["a"] * len(features)

    config = TrainConfig.from_dict({"consensus_targets": 1.0, "max_steps": 1})
    trainer = Trainer(Still(), training_pairs(), None, config, tmp_path / "a", progress=False)
    assert trainer.train_data.captions[0] == ("a large red circle",) * 4
    with pytest.raises(ValueError, match="consensus_targets replaces captions"):
        Trainer(Still(), [("an", "image")], None, config, tmp_path / "b", progress=False)
