"""Tests of the embedded ``shapes`` dataset: determinism, splits, captions' truth, rendering."""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from diffusion_captioner.data.shapes import (
    COLORS,
    NUM_CAPTIONS,
    SHAPE_WORDS,
    SIZE_WORDS,
    ShapesDataset,
    canonical_caption,
    render_scene,
    vocabulary,
)
from registry import CaptionDataset, CaptionRecord, describe

ROOT = Path(__file__).resolve().parents[1]
SMALL = {"num_train": 50, "num_val": 10, "num_test": 20}

#: Noun (first word of its phrase) -> shape; "plus sign" is read from "plus".
NOUNS = {phrase.split()[0]: shape for shape, opts in SHAPE_WORDS.items() for phrase, _ in opts}
SIZE_OF = {word: size for size, opts in SIZE_WORDS.items() for word, _ in opts}
#: Relation words -> how the first-named object relates to the second.
RELATION_OF = {
    "left": "left", "right": "right", "above": "above", "over": "above", "top": "above",
    "below": "below", "under": "below", "beneath": "below", "bottom": "below",
}  # fmt: skip


def make(**overrides: Any) -> ShapesDataset:
    """A tiny dataset (50/10/20 images) with the given constructor overrides."""
    return ShapesDataset(**{**SMALL, **overrides})


def mentions(caption: str) -> list[tuple[str | None, str, str]]:
    """(size or None, colour, shape) of every object a caption names, in order."""
    words = caption.split()
    found = []
    for i, word in enumerate(words):
        if word in COLORS:
            size = SIZE_OF.get(words[i - 1]) if i > 0 else None
            found.append((size, word, NOUNS[words[i + 1]]))
    return found


def digest(dataset: ShapesDataset) -> str:
    """A hash of every caption and every image's pixel bytes."""
    h = hashlib.sha256()
    for record in dataset.records():
        h.update(repr((record.image_id, record.split, record.captions)).encode())
        h.update(dataset.load_image(record).tobytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def dataset() -> ShapesDataset:
    return make()


def test_registered_with_one_line_description() -> None:
    assert CaptionDataset.by_name("shapes") is ShapesDataset
    assert describe(ShapesDataset) and "\n" not in describe(ShapesDataset)


def test_same_args_same_data_and_different_seed_differs(dataset: ShapesDataset) -> None:
    again = make()
    assert [r.captions for r in again.records()] == [r.captions for r in dataset.records()]
    assert [r.meta["scene"] for r in again.records()] == [
        r.meta["scene"] for r in dataset.records()
    ]
    assert digest(again) == digest(dataset)
    other = make(seed=1)
    assert [r.captions for r in other.records()] != [r.captions for r in dataset.records()]
    assert digest(other) != digest(dataset)


def test_same_data_in_another_process(dataset: ShapesDataset) -> None:
    code = (
        "import hashlib\n"
        "from diffusion_captioner.data.shapes import ShapesDataset\n"
        f"d = ShapesDataset(**{SMALL!r})\n"
        "h = hashlib.sha256()\n"
        "for r in d.records():\n"
        "    h.update(repr((r.image_id, r.split, r.captions)).encode())\n"
        "    h.update(d.load_image(r).tobytes())\n"
        "print(h.hexdigest())\n"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345", "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == digest(dataset)


def test_splits_sizes_and_unique_ids(dataset: ShapesDataset) -> None:
    for split, size in (("train", 50), ("val", 10), ("test", 20)):
        records = dataset.records(split)
        assert len(records) == size
        assert all(r.split == split for r in records)
    everything = dataset.records()
    assert everything == dataset.records("train") + dataset.records("val") + dataset.records("test")
    ids = [r.image_id for r in everything]
    assert len(set(ids)) == len(ids) == 80
    assert all(r.image == f"shapes:{r.image_id}" for r in everything)
    with pytest.raises(ValueError, match="unknown split"):
        dataset.records("dev")  # type: ignore[arg-type]


def test_test_split_does_not_depend_on_train_size(dataset: ShapesDataset) -> None:
    bigger = make(num_train=70)
    assert [r.captions for r in bigger.records("test")] == [
        r.captions for r in dataset.records("test")
    ]


def test_one_or_two_shapes_in_both_layouts(dataset: ShapesDataset) -> None:
    scenes = [r.meta["scene"] for r in make(num_train=200).records()]
    counts = [len(s["objects"]) for s in scenes]
    assert set(counts) == {1, 2}
    assert 0.25 < counts.count(1) / len(counts) < 0.55
    assert {s["axis"] for s in scenes if len(s["objects"]) == 2} == {"horizontal", "vertical"}


def test_five_distinct_well_formed_captions(dataset: ShapesDataset) -> None:
    for record in dataset.records():
        assert len(record.captions) == NUM_CAPTIONS == 5
        assert len(set(record.captions)) == 5
        for caption in record.captions:
            assert re.fullmatch(r"[a-z]+( [a-z]+)*", caption), caption


def test_vocabulary_is_complete_sorted_and_unique(dataset: ShapesDataset) -> None:
    vocab = vocabulary()
    assert vocab == sorted(set(vocab))
    used = {w for r in make(num_train=500).records() for c in r.captions for w in c.split()}
    assert used <= set(vocab), used - set(vocab)
    scenes = [r.meta["scene"] for r in dataset.records()]
    assert {w for s in scenes for w in canonical_caption(s).split()} <= set(vocab)


def test_captions_name_exactly_the_objects_in_the_scene(dataset: ShapesDataset) -> None:
    for record in dataset.records():
        objects = record.meta["scene"]["objects"]
        truth = {(o["color"], o["shape"]): o["size"] for o in objects}
        for caption in record.captions:
            named = mentions(caption)
            assert len(named) == len(objects), caption
            assert {(color, shape) for _, color, shape in named} == set(truth), caption
            for size, color, shape in named:
                assert size in (None, truth[(color, shape)]), (caption, objects)


def test_relations_are_true(dataset: ShapesDataset) -> None:
    checked = 0
    for record in make(num_train=200).records():
        scene = record.meta["scene"]
        if len(scene["objects"]) == 1:
            assert scene["relation"] is None
            continue
        first, second = scene["objects"]
        # objects[0] is left of / above objects[1], far apart along the axis, close across it
        along, across = ("x", "y") if scene["relation"] == "left" else ("y", "x")
        assert second[along] - first[along] >= first["r"] + second["r"]
        assert abs(second[across] - first[across]) < 0.5 * (second[along] - first[along])
        where = {(o["color"], o["shape"]): o for o in scene["objects"]}
        for caption in record.captions:
            relation = next((RELATION_OF[w] for w in caption.split() if w in RELATION_OF), None)
            if relation is None:  # "there is a red circle and a blue square"
                continue
            a, b = (where[(color, shape)] for _, color, shape in mentions(caption))
            expected = {"left": a["x"] < b["x"], "right": a["x"] > b["x"],
                        "above": a["y"] < b["y"], "below": a["y"] > b["y"]}  # fmt: skip
            assert expected[relation], (caption, scene)
            checked += 1
    assert checked > 300


def test_canonical_caption_puts_left_or_top_object_first(dataset: ShapesDataset) -> None:
    for record in dataset.records():
        scene = record.meta["scene"]
        caption = canonical_caption(scene)
        named = mentions(caption)
        expected = [(o["size"], o["color"], o["shape"]) for o in scene["objects"]]
        assert named == expected, caption
        if len(named) == 2:
            assert (" to the left of " in caption) == (scene["relation"] == "left")
            assert (" above " in caption) == (scene["relation"] == "above")


def test_images_render_the_scene(dataset: ShapesDataset) -> None:
    for record in dataset.records()[:30]:
        image = dataset.load_image(record)
        assert image.mode == "RGB" and image.size == (64, 64)
        scene = record.meta["scene"]
        assert image.getpixel((0, 0)) == tuple(scene["background"])
        for obj in scene["objects"]:
            pixel = image.getpixel((int(obj["x"] * 64), int(obj["y"] * 64)))
            assert max(abs(p - c) for p, c in zip(pixel, obj["rgb"], strict=True)) <= 8, obj
    big = make(image_size=96)
    assert big.load_image(big.records()[0]).size == (96, 96)
    assert render_scene(scene, 32, antialias=False).size == (32, 32)


def test_load_image_without_meta_looks_up_the_id(dataset: ShapesDataset) -> None:
    record = dataset.records("val")[3]
    bare = CaptionRecord(record.image_id, record.image, record.captions, record.split)
    assert dataset.load_image(bare).tobytes() == dataset.load_image(record).tobytes()
    with pytest.raises(ValueError):
        dataset.load_image(CaptionRecord(10**6, "shapes:1000000", (), "test"))
    with pytest.raises(ValueError):
        dataset.load_image(CaptionRecord(1, "photo.jpg", (), "test"))


def test_fingerprint_and_config(dataset: ShapesDataset) -> None:
    assert dataset.fingerprint == make().fingerprint
    assert ShapesDataset(**dataset.config).fingerprint == dataset.fingerprint
    assert set(dataset.config) == {
        "seed", "num_train", "num_val", "num_test", "image_size", "single_fraction", "antialias",
    }  # fmt: skip
    changes = [
        {"seed": 1}, {"num_train": 51}, {"num_val": 11}, {"num_test": 21}, {"image_size": 32},
        {"single_fraction": 0.5}, {"antialias": False},
    ]  # fmt: skip
    prints = {make(**change).fingerprint for change in changes}
    assert len(prints) == len(changes) and dataset.fingerprint not in prints


def test_bad_arguments_are_rejected() -> None:
    with pytest.raises(ValueError, match="num_train"):
        ShapesDataset(num_train=-1)
    with pytest.raises(ValueError, match="single_fraction"):
        ShapesDataset(single_fraction=2.0)
