"""Consensus targets: each image's most agreed-upon reference, swapped in at a ratio."""

from __future__ import annotations

import pytest
import torch

from diffusion_captioner.consensus import consensus_indices, consensus_split
from diffusion_captioner.features import SplitFeatures
from diffusion_captioner.trainer import CaptionPairs, TrainConfig
from registry import CaptionRecord

REFS = {
    1: ("a big red circle", "a large red circle", "a large red circle in the middle",
        "there is a red disk"),
    2: ("a small blue square above a green cross", "a green cross below a small blue square",
        "a small blue square above a small green cross", "a blue box and a green plus sign"),
    3: ("a tiny orange triangle",),
}


def split() -> SplitFeatures:
    records = [CaptionRecord(i, f"img{i}", refs, "train") for i, refs in REFS.items()]
    features = torch.eye(3)  # (N, D)
    text = torch.arange(9.0)[:, None].repeat(1, 2)  # (P, 2): row p holds p
    return SplitFeatures(records=records, features=features, text_features=text)


def test_the_consensus_is_the_reference_the_others_agree_with_most():
    best = consensus_indices(REFS)
    # "a large red circle" shares the most n-grams with the other three; the one-word
    # outlier "there is a red disk" never wins; a lone reference is its own consensus
    assert REFS[1][best[1]] == "a large red circle"
    assert REFS[2][best[2]] == "a small blue square above a green cross"
    assert best[3] == 0


def test_the_ratio_replaces_that_share_and_the_text_features_follow_their_captions():
    train = split()
    assert consensus_split(train, 0.0) is train
    every = consensus_split(train, 1.0)
    assert [r.captions for r in every.records] == [
        ("a large red circle",) * 4, ("a small blue square above a green cross",) * 4,
        ("a tiny orange triangle",)]
    # a replaced pair carries the CLIP text feature of its new caption, row for row
    assert every.text_features[:, 0].tolist() == [1.0] * 4 + [4.0] * 4 + [8.0]
    pairs = CaptionPairs.from_split(every)
    assert len(pairs) == 9 and pairs.batch([0, 4])["captions"] == [
        "a large red circle", "a small blue square above a green cross"]
    # every pair also carries its image's captions (for reference selection)
    assert pairs.batch([8])["references"] == [("a tiny orange triangle",)]
    # other splits and the split given are untouched
    assert [r.captions for r in train.records] == list(REFS.values())
    big = SplitFeatures(
        records=[CaptionRecord(i, f"i{i}", ("a red circle", "a big red circle", "red"), "train")
                 for i in range(300)], features=torch.zeros(300, 2))
    half = consensus_split(big, 0.5)
    moved = sum(c != o for r, b in zip(half.records, big.records, strict=True)
                for c, o in zip(r.captions, b.captions, strict=True))
    assert 0.25 < moved / 900 < 0.42  # half of the two non-consensus captions of each image
    with pytest.raises(ValueError, match="consensus_targets must be in"):
        TrainConfig.from_dict({"consensus_targets": 1.5})
