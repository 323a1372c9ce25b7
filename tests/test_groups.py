"""Per-group metrics: groups add up to the overall counts and each equals scoring its subset
alone; the nocaps reader on a small file in the real nocaps layout; shapes' object-count groups;
`dcap evaluate --groups` with a group file (a nocaps annotation file is read as one too)."""

from __future__ import annotations

import json
import shutil

import pytest
from PIL import Image

import registry
from diffusion_captioner.cli import main
from eval.coco_format import EvaluationInputError
from eval.groups import load_groups, record_groups, score_groups
from eval.metrics import score_captions

needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="no `java` on PATH")

REFERENCES = {
    1: ["a red circle", "a small red circle"], 2: ["a blue square", "a big blue square"],
    3: ["a green triangle above a red circle", "a triangle over a circle"],
    4: ["a yellow square left of a blue circle", "a square next to a circle"],
    5: ["a red square", "a small red square"], 6: ["a blue circle below a green square",
                                                   "a circle under a square"],
}
RESULTS = {1: "a red circle", 2: "a blue circle", 3: "a green triangle above a circle",
           4: "a square left of a circle", 5: "a red square", 6: "a blue circle"}
GROUPS = {1: "1 object", 2: "1 object", 5: "1 object", 3: "2 objects", 4: "2 objects",
          6: "2 objects"}
METRICS = ("Bleu", "ROUGE_L", "CIDEr")  # METEOR's Java start-up is not needed to show this


@needs_java
def test_groups_add_up_and_equal_each_subset_scored_alone():
    overall = score_captions(RESULTS, REFERENCES, metrics=METRICS)
    by_group = score_groups(RESULTS, REFERENCES, GROUPS, metrics=METRICS)
    assert list(by_group) == ["1 object", "2 objects"]
    assert sum(r.num_images for r in by_group.values()) == overall.num_images == len(RESULTS)
    for group, report in by_group.items():
        subset = {i: c for i, c in RESULTS.items() if GROUPS[i] == group}
        alone = score_captions(subset, REFERENCES, metrics=METRICS)
        assert report.num_images == len(subset)
        for name in ("Bleu_1", "Bleu_4", "CIDEr", "ROUGE_L"):
            assert report.scores[name] == pytest.approx(alone.scores[name], abs=1e-12), name
        # per-image ROUGE-L and BLEU do not depend on the other images: the same as overall
        for name in ("ROUGE_L", "Bleu_1"):
            for image_id in subset:
                assert report.per_image[name][image_id] == pytest.approx(
                    overall.per_image[name][image_id])
    # ROUGE-L's corpus value is the mean over images, so the groups' image-weighted means add up
    weighted = sum(r.scores["ROUGE_L"] * r.num_images for r in by_group.values()) / len(RESULTS)
    assert weighted == pytest.approx(overall.scores["ROUGE_L"])
    with pytest.raises(EvaluationInputError, match="have no group"):
        score_groups(RESULTS, REFERENCES, {1: "a"}, metrics=METRICS)


def write_nocaps(folder, domains=("in-domain", "near-domain", "out-domain", "out-domain")):
    """A small file in the layout of nocaps_val_4500_captions.json, with its images."""
    images_dir = folder / "val"
    images_dir.mkdir(parents=True)
    images, annotations = [], []
    for index, domain in enumerate(domains):
        name = f"{index:016x}.jpg"
        Image.new("RGB", (40, 30), (60 * index, 90, 120)).save(images_dir / name)
        images.append({"id": index, "file_name": name, "domain": domain,
                       "open_images_id": f"{index:016x}", "height": 30, "width": 40,
                       "coco_url": f"https://nocaps.s3.amazonaws.com/val/{name}", "license": 0,
                       "date_captured": "2018-11-06 11:04:33"})
        for k in range(10):
            annotations.append({"image_id": index, "id": 10 * index + k,
                                "caption": f"a photo number {index} of a thing, take {k}"})
    path = folder / "nocaps_val_4500_captions.json"
    path.write_text(json.dumps({"licenses": [], "info": {"url": "http://nocaps.org"},
                                "images": images, "annotations": annotations}))
    return path, images_dir


def test_nocaps_reader_gives_every_image_its_domain(tmp_path):
    path, images_dir = write_nocaps(tmp_path)
    data = registry.build("dataset", {"type": "nocaps", "annotations": path.name,
                                      "image_dir": "val", "data_dir": str(tmp_path)})
    assert registry.resolve("dataset", "nocaps") is type(data)
    assert data.records("train") == [] and data.records("val") == []
    test = data.records("test")
    assert [r.image_id for r in test] == [0, 1, 2, 3]
    assert [data.group(r) for r in test] == ["in-domain", "near-domain", "out-domain",
                                             "out-domain"]
    assert all(len(r.captions) == 10 and r.split == "test" for r in test)
    assert data.load_image(test[1]).size == (40, 30)
    assert record_groups(data, test) == {0: "in-domain", 1: "near-domain", 2: "out-domain",
                                         3: "out-domain"}
    assert load_groups(path) == record_groups(data, test)  # the file as a --groups file
    assert data.fingerprint.startswith("nocaps-")
    # the intended use: train on another dataset, test on nocaps, grouped by domain
    combined = registry.build("dataset", {"type": "combined", "eval_from": 1, "datasets": [
        {"type": "shapes", "num_train": 3, "num_val": 1, "num_test": 1},
        {"type": "nocaps", "annotations": str(path), "image_dir": str(images_dir)}]})
    assert len(combined.records("train")) == 3 and combined.records("val") == []
    merged = combined.records("test")
    assert record_groups(combined, merged) == {10_000_000 + r.image_id: data.group(r)
                                               for r in test}

    bad = json.loads(path.read_text())
    bad["images"][2]["domain"] = "far-domain"
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="far-domain.*in-domain, near-domain, out-domain"):
        registry.build("dataset", {"type": "nocaps", "annotations": str(tmp_path / "bad.json"),
                                   "image_dir": str(images_dir)}).records("test")
    with pytest.raises(FileNotFoundError, match="nocaps annotation file"):
        registry.build("dataset", {"type": "nocaps", "annotations": str(tmp_path / "none.json"),
                                   "image_dir": str(images_dir)})


def test_shapes_groups_are_object_counts_and_combined_keeps_them():
    shapes = registry.build("dataset", {"type": "shapes", "num_train": 4, "num_val": 0,
                                        "num_test": 30, "seed": 3})
    test = shapes.records("test")
    groups = record_groups(shapes, test)
    assert set(groups.values()) == {"1 object", "2 objects"}
    for record in test:
        count = len(record.meta["scene"]["objects"])
        assert groups[record.image_id] == ("1 object" if count == 1 else "2 objects")
    combined = registry.build("dataset", {"type": "combined", "datasets": [
        {"type": "shapes", "num_train": 2, "num_val": 0, "num_test": 0},
        {"type": "shapes", "num_train": 4, "num_val": 0, "num_test": 30, "seed": 3}]})
    merged = combined.records("test")
    assert [combined.group(r) for r in merged] == [groups[r.image_id] for r in test]

    class Plain(registry.CaptionDataset):
        pass

    assert record_groups(Plain(), test) is None  # no group hook answer: no per-group table


@needs_java
def test_evaluate_groups(tmp_path, capsys):
    """(A nocaps annotation file as --groups: load_groups reads it, see the nocaps test.)"""
    from eval.coco_format import write_annotations, write_results

    write_annotations(tmp_path / "a.json", REFERENCES)
    write_results(tmp_path / "r.json", RESULTS)
    (tmp_path / "g.json").write_text(json.dumps({str(k): v for k, v in GROUPS.items()}))
    code = main(["evaluate", "--results", str(tmp_path / "r.json"), "--annotations",
                 str(tmp_path / "a.json"), "--groups", str(tmp_path / "g.json"),
                 "--out", str(tmp_path / "m.json")])
    out = capsys.readouterr().out
    assert code == 0
    assert "1 object (3 images): Bleu_1" in out and "2 objects (3 images): Bleu_1" in out
    written = json.loads((tmp_path / "m_by_group.json").read_text())
    assert set(written) == {"1 object", "2 objects"}
    assert sum(g["num_images"] for g in written.values()) == 6
    overall = json.loads((tmp_path / "m.json").read_text())
    assert overall["num_images"] == 6 and "groups" not in overall  # M.json keeps its format

    (tmp_path / "partial.json").write_text(json.dumps({"1": "a"}))
    code = main(["evaluate", "--results", str(tmp_path / "r.json"), "--annotations",
                 str(tmp_path / "a.json"), "--groups", str(tmp_path / "partial.json")])
    err = capsys.readouterr().err
    assert code == 2 and "5 of 6 result image ids have no group" in err and "Traceback" not in err
    assert "partial.json must name every image" in err
    (tmp_path / "list.json").write_text("[1, 2]")
    assert main(["evaluate", "--results", str(tmp_path / "r.json"), "--annotations",
                 str(tmp_path / "a.json"), "--groups", str(tmp_path / "list.json")]) == 2
    assert "group file" in capsys.readouterr().err
