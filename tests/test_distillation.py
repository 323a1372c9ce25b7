"""Sequence-level distillation: teacher captions of training images only, mixed at a ratio."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import TINY_SHAPES

from diffusion_captioner.distillation import DistillPlan, distilled_pairs, teacher_captions
from diffusion_captioner.features import SplitFeatures
from registry import CaptionDecoder, CaptionRecord


class Constant(CaptionDecoder):
    """A teacher that says which row it saw."""

    def generate_batch(self, features, options):
        return [f"caption {int(row[0])}" for row in features]


def split(ids, split_name="train") -> SplitFeatures:
    records = [CaptionRecord(i, f"img{i}", (f"ref {i} a", f"ref {i} b"), split_name) for i in ids]
    features = torch.tensor([[float(i), 0.0] for i in ids])  # (N, 2)
    return SplitFeatures(records=records, features=features, skipped={})


def test_teacher_captions_cover_the_training_images_and_the_ratio_picks_the_share():
    train = split([3, 5, 8])
    captions = teacher_captions(Constant(), train, {})
    assert captions == {3: "caption 3", 5: "caption 5", 8: "caption 8"}
    none = distilled_pairs(train, captions, DistillPlan("t", ratio=0.0))
    assert [c for _, c in none.pairs] == [c for r in train.records for c in r.captions]
    every = distilled_pairs(train, captions, DistillPlan("t", ratio=1.0))
    assert [(row, c) for row, c in every.pairs] == [(0, "caption 3"), (0, "caption 3"),
                                                   (1, "caption 5"), (1, "caption 5"),
                                                   (2, "caption 8"), (2, "caption 8")]
    big = split(list(range(200)))
    half = distilled_pairs(big, teacher_captions(Constant(), big, {}), DistillPlan("t", 0.5))
    share = sum(c.startswith("caption") for _, c in half.pairs) / len(half.pairs)
    assert 0.4 < share < 0.6
    with pytest.raises(ValueError, match="captioned no training image 5"):
        distilled_pairs(train, {3: "x", 8: "y"}, DistillPlan("t"))
    with pytest.raises(ValueError, match="needs a teacher"):
        DistillPlan.from_dict({"ratio": 0.5}, "student")


def test_a_distilled_row_trains_on_its_teachers_captions_of_training_images_only(
        tiny_clip_dir, tmp_path):
    from diffusion_captioner.comparison import compare

    preset = tmp_path / "distill.json"
    preset.write_text(json.dumps({
        "include": ["embedded"], "speed": False,
        "decoders": {"nearest-distilled": {
            "decoder": {"type": "nearest"}, "train": {"epochs": 1, "max_steps": None,
                                                      "eval_every": "epoch"},
            "distill": {"teacher": "nearest", "ratio": 1.0}}}}))
    with pytest.raises(ValueError, match="run the teacher too"):
        compare(["nearest-distilled"], tmp_path / "bad", preset=str(preset), dataset=TINY_SHAPES,
                encoder=f"local-dir:{tiny_clip_dir}", cache_dir=tmp_path / "cache", progress=False)
    compare(["nearest", "nearest-distilled"], tmp_path / "run", preset=str(preset),
            dataset=TINY_SHAPES, encoder=f"local-dir:{tiny_clip_dir}",
            cache_dir=tmp_path / "cache", progress=False)
    from diffusion_captioner.data.shapes import ShapesDataset

    dataset = ShapesDataset(**{k: v for k, v in TINY_SHAPES.items() if k != "type"})
    train_ids = {r.image_id for r in dataset.records("train")}
    test_ids = {r.image_id for r in dataset.records("test")}
    run = tmp_path / "run"
    teacher = {int(k): v for k, v in
               json.loads((run / "nearest-distilled" / "distill_captions.json").read_text()).items()}
    assert set(teacher) == train_ids and not set(teacher) & test_ids
    student = CaptionDecoder.from_pretrained(run / "nearest-distilled" / "checkpoint" / "best")
    memorised = {c for captions in student.captions for c in captions}
    assert memorised <= set(teacher.values())  # ratio 1: the teacher's captions only
    summary = json.loads((run / "nearest-distilled" / "summary.json").read_text())
    assert summary["teacher"]["name"] == "nearest" and summary["teacher"]["ratio"] == 1.0
    assert "nearest teacher" in (run / "report.md").read_text()
