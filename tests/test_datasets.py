"""File-backed datasets: Karpathy splits, COCO annotation files, jsonl, combinations, named configs.

Fixtures are written by the tests: the real COCO photos of ../shared/data/coco-sample when present,
generated images otherwise.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from conftest import SHARED
from PIL import Image

from diffusion_captioner.cli import dataset_config
from registry import build

SAMPLE = SHARED / "data" / "coco-sample"
COLORS = ("red", "green", "blue", "yellow", "purple", "orange")


def sample_photos(folder: Path) -> list[dict]:
    """Six photos ``{"file", "id", "captions"}`` copied into ``folder`` (real ones when present)."""
    folder.mkdir(parents=True, exist_ok=True)
    photos = []
    if (SAMPLE / "captions.json").is_file():
        for name, entry in json.loads((SAMPLE / "captions.json").read_text()).items():
            (folder / name).write_bytes((SAMPLE / name).read_bytes())
            captions = entry.get("captions") or ["a photo"]  # one sample photo comes without any
            photos.append({"file": name, "id": entry["image_id"], "captions": captions})
        return photos
    for index, color in enumerate(COLORS):
        name = f"gen_{index}.jpg"
        Image.new("RGB", (48, 32), color).save(folder / name)
        photos.append({"file": name, "id": 1000 + index,
                       "captions": [f"a {color} picture", f"an image that is all {color}"]})
    return photos


SPLIT_OF = ("train", "train", "val", "test", "restval", "train")


def write_karpathy(folder: Path, photos: list[dict], coco_style: bool, name: str = "flickr8k") -> Path:
    """A Karpathy split file over ``photos`` (COCO style: filepath + cocoid, and a restval image)."""
    images = []
    for index, photo in enumerate(photos):
        split = SPLIT_OF[index] if coco_style else SPLIT_OF[index].replace("restval", "train")
        item = {"filename": photo["file"], "imgid": index, "split": split,
                "sentences": [{"raw": c, "tokens": c.lower().split()} for c in photo["captions"]]}
        if coco_style:
            item.update(filepath="val2014", cocoid=photo["id"])
        images.append(item)
    path = folder / f"dataset_{'coco' if coco_style else name}.json"
    path.write_text(json.dumps({"dataset": "coco" if coco_style else name, "images": images}))
    return path


def write_coco(path: Path, photos: list[dict]) -> Path:
    images = [{"id": p["id"], "file_name": p["file"]} for p in photos]
    annotations = [{"id": 10 * p["id"] + k, "image_id": p["id"], "caption": c}
                   for p in photos for k, c in enumerate(p["captions"])]
    path.write_text(json.dumps({"images": images, "annotations": annotations}))
    return path


@pytest.fixture
def flickr(tmp_path) -> tuple[Path, Path, list[dict]]:
    photos = sample_photos(tmp_path / "Flicker8k_Dataset")
    return write_karpathy(tmp_path, photos, coco_style=False), tmp_path / "Flicker8k_Dataset", photos


def test_karpathy_flickr_splits_records_and_images(flickr):
    annotations, images, photos = flickr
    data = build("dataset", {"type": "karpathy", "annotations": str(annotations),
                             "image_root": str(images)})
    assert [len(data.records(s)) for s in ("train", "val", "test")] == [4, 1, 1]
    first = data.records("train")[0]
    assert first.image_id == 0 and Path(first.image).is_file()
    assert first.captions == tuple(photos[0]["captions"])
    assert data.load_image(data.records("test")[0]).mode == "RGB"
    assert {r.split for r in data.records("val")} == {"val"}
    ids = [r.image_id for r in data.records()]
    assert len(ids) == len(set(ids)) == 6


def test_karpathy_coco_restval_and_cocoid(tmp_path):
    photos = sample_photos(tmp_path / "val2014")
    annotations = write_karpathy(tmp_path, photos, coco_style=True)
    folded = build("dataset", {"type": "karpathy", "annotations": str(annotations),
                               "image_root": str(tmp_path)})
    dropped = build("dataset", {"type": "karpathy", "annotations": str(annotations),
                                "image_root": str(tmp_path), "restval": False})
    assert len(folded.records("train")) == 4 and len(dropped.records("train")) == 3
    assert {r.image_id for r in folded.records()} == {p["id"] for p in photos}
    assert all(Path(r.image).is_file() and "val2014" in r.image for r in folded.records())
    assert folded.fingerprint != dropped.fingerprint
    limited = build("dataset", {"type": "karpathy", "annotations": str(annotations),
                                "image_root": str(tmp_path), "max_images": 1})
    assert [len(limited.records(s)) for s in ("train", "val", "test")] == [1, 1, 1]


def test_fingerprint_follows_file_content_and_is_stable(flickr):
    annotations, images, _ = flickr
    cfg = {"type": "karpathy", "annotations": str(annotations), "image_root": str(images)}
    before = build("dataset", cfg).fingerprint
    assert build("dataset", cfg).fingerprint == before
    data = json.loads(annotations.read_text())
    data["images"][0]["sentences"][0]["raw"] = "a changed caption"
    annotations.write_text(json.dumps(data))
    os.utime(annotations, (time.time() + 5, time.time() + 5))
    after = build("dataset", cfg)
    assert after.fingerprint != before
    assert after.records("train")[0].captions[0] == "a changed caption"


@pytest.mark.parametrize("kind", ["karpathy", "coco", "jsonl"])
def test_missing_file_and_bad_json_are_one_line_errors_naming_the_file(kind, tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    configs = {
        "karpathy": lambda p: {"type": "karpathy", "annotations": str(p), "image_root": str(folder)},
        "coco": lambda p: {"type": "coco", "annotations": str(p), "image_dir": str(folder)},
        "jsonl": lambda p: {"type": "jsonl", "path": str(p)},
    }
    missing = tmp_path / "nope.json"
    with pytest.raises(FileNotFoundError) as error:
        build("dataset", configs[kind](missing))
    assert str(missing) in str(error.value) and "\n" not in str(error.value)
    bad = tmp_path / "bad.json"
    bad.write_text('{"images": [' if kind != "jsonl" else '{"image": "a.jpg", "captions": ["x"]}\n{oops\n')
    with pytest.raises(ValueError) as error:
        build("dataset", configs[kind](bad)).records("train")
    message = str(error.value)
    assert str(bad) in message and "\n" not in message
    assert "JSON" in message and (kind != "jsonl" or "line 2" in message)


def test_coco_annotation_file_split_argument_and_mapping(tmp_path):
    photos = sample_photos(tmp_path / "images")
    file = write_coco(tmp_path / "captions_val2014.json", photos)
    data = build("dataset", {"type": "coco", "annotations": str(file),
                             "image_dir": str(tmp_path / "images"), "split": "val"})
    assert data.records("train") == [] and len(data.records("val")) == 6
    record = data.records("val")[0]
    assert record.image_id == photos[0]["id"] and record.captions == tuple(photos[0]["captions"])
    assert Path(record.image).is_file()
    second = write_coco(tmp_path / "captions_train.json", [{**p, "id": p["id"] + 10**6} for p in photos[:2]])
    both = build("dataset", {"type": "coco", "annotations": {"train": str(second), "test": str(file)},
                             "image_dir": str(tmp_path / "images")})
    assert len(both.records("train")) == 2 and len(both.records("test")) == 6


def test_coco_reads_the_real_reference_annotation_file(shared_dir, tmp_path):
    file = shared_dir / "data" / "coco-caption-reference" / "captions_val2014_1000.json"
    data = build("dataset", {"type": "coco", "annotations": str(file), "image_dir": str(tmp_path)})
    records = data.records("test")
    assert len(records) == 1000 and sum(len(r.captions) for r in records) == 5005


def test_jsonl_explicit_and_seeded_splits(tmp_path):
    photos = sample_photos(tmp_path / "pics")
    lines = [{"image": f"pics/{p['file']}", "captions": p["captions"]} for p in photos]
    lines[0]["split"] = "test"
    lines[1] = {"image": f"pics/{photos[1]['file']}", "caption": "just one caption", "image_id": 77}
    file = tmp_path / "data.jsonl"
    file.write_text("\n".join(json.dumps(line) for line in lines) + "\n\n")
    cfg = {"type": "jsonl", "path": str(file), "val_fraction": 0.3, "test_fraction": 0.3, "seed": 1}
    data = build("dataset", cfg)
    by_id = {r.image_id: r for r in data.records()}
    assert by_id[0].split == "test" and by_id[77].captions == ("just one caption",)
    assert all(Path(r.image).is_file() for r in data.records())
    again = {r.image_id: r.split for r in build("dataset", cfg).records()}
    assert again == {i: r.split for i, r in by_id.items()}  # same seed -> same split
    other = build("dataset", {**cfg, "seed": 2})
    assert other.fingerprint != data.fingerprint
    many = tmp_path / "many.jsonl"
    many.write_text("".join(json.dumps({"image": f"x{i}.jpg", "captions": ["c"]}) + "\n"
                            for i in range(400)))
    counts = {s: len(build("dataset", {"type": "jsonl", "path": str(many)}).records(s))
              for s in ("train", "val", "test")}
    assert 340 <= counts["train"] <= 380 and counts["val"] > 5 and counts["test"] > 5


def test_jsonl_bad_line_names_file_and_line(tmp_path):
    file = tmp_path / "d.jsonl"
    file.write_text('{"image": "a.jpg", "captions": ["x"]}\n\n{"captions": ["no image"]}\n')
    with pytest.raises(ValueError, match=r"d\.jsonl: line 3: no 'image' path"):
        build("dataset", {"type": "jsonl", "path": str(file)}).records()


def test_combined_keeps_ids_unique_and_stable(tmp_path):
    photos8 = sample_photos(tmp_path / "Flicker8k_Dataset")
    photos30 = sample_photos(tmp_path / "flickr30k-images")
    write_karpathy(tmp_path, photos8, coco_style=False, name="flickr8k")
    write_karpathy(tmp_path, photos30, coco_style=False, name="flickr30k")
    cfg = dataset_config("flickr8k+flickr30k", str(tmp_path))
    assert cfg["type"] == "combined" and len(cfg["datasets"]) == 2
    assert cfg["datasets"][1]["image_root"].endswith("flickr30k-images")
    data = build("dataset", cfg)
    ids = [r.image_id for r in data.records()]
    assert len(ids) == len(set(ids)) == 12  # the members' ids 0..5 collide; offsets keep them apart
    assert [r.image_id for r in data.records("train")][:4] == [0, 1, 4, 5]  # member 0 unchanged
    assert build("dataset", cfg).fingerprint == data.fingerprint
    assert [r.image_id for r in build("dataset", cfg).records()] == ids
    second = [r for r in data.records("test") if r.meta["member"] == 1][0]
    assert second.image_id == 10_000_000 + second.meta["member_image_id"]
    assert data.load_image(second).mode == "RGB"
    only8 = build("dataset", {**cfg, "eval_from": 0})
    assert len(only8.records("train")) == 8 and len(only8.records("test")) == 1
    assert only8.fingerprint != data.fingerprint


def test_combined_mixes_kinds_including_shapes(tmp_path):
    photos = sample_photos(tmp_path / "pics")
    file = write_coco(tmp_path / "c.json", photos)
    data = build("dataset", {"type": "combined", "datasets": [
        {"type": "shapes", "num_train": 3, "num_val": 1, "num_test": 1},
        {"type": "coco", "annotations": str(file), "image_dir": str(tmp_path / "pics"), "split": "test"},
    ]})
    test = data.records("test")
    assert len(test) == 7 and len({r.image_id for r in data.records()}) == 11
    assert data.load_image(test[0]).size == (64, 64)  # a shapes image, rendered by its member


def test_named_configs_find_files_and_say_what_is_missing(flickr, tmp_path):
    cfg = dataset_config("flickr8k", str(tmp_path))
    assert cfg["type"] == "karpathy" and cfg["image_root"].endswith("Flicker8k_Dataset")
    with pytest.raises(FileNotFoundError, match="dataset_flickr30k.json"):
        dataset_config("flickr30k", str(tmp_path))
    with pytest.raises(ValueError, match="--data-dir"):
        dataset_config("flickr8k", None)
    relative = dataset_config('{"type": "jsonl", "path": "d.jsonl"}', str(tmp_path))
    assert relative["data_dir"] == str(tmp_path.resolve())
    assert "data_dir" not in dataset_config("shapes", str(tmp_path))


def test_test_split_annotations_round_trip_in_coco_format(flickr, tmp_path):
    from eval.coco_format import load_annotations, write_annotations

    annotations, images, _ = flickr
    data = build("dataset", {"type": "karpathy", "annotations": str(annotations),
                             "image_root": str(images)})
    references = {r.image_id: list(r.captions) for r in data.records("test")}
    path = write_annotations(tmp_path / "annotations_test.json", references)
    assert load_annotations(path) == references


def test_cli_reports_a_missing_annotation_file_in_one_line(tmp_path, capsys):
    from diffusion_captioner.cli import main

    missing = tmp_path / "dataset_flickr8k.json"
    code = main(["extract", "--dataset", json.dumps(
        {"type": "karpathy", "annotations": str(missing), "image_root": str(tmp_path)})])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err == f"dcap: error: Karpathy split file {missing}: no such file"
    assert main(["extract", "--dataset", "flickr8k", "--data-dir", str(tmp_path)]) == 2
    assert "no dataset_flickr8k.json in" in capsys.readouterr().err
