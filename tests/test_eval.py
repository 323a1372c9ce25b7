"""Tests for the COCO-style evaluation harness (``eval.coco_format`` and ``eval.metrics``).

Offline and CPU-only; Java is needed for the tokenizer and METEOR (tests skip without it,
except the one that checks the missing-Java error). The official-numbers test scores the
coco-caption demo's 1000-image result file once per module and reuses the report.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from eval import java_scorers
from eval import metrics as metrics_module
from eval.coco_format import (
    EvaluationInputError,
    load_annotations,
    load_results,
    write_annotations,
    write_results,
)
from eval.metrics import (
    JavaMissingError,
    MetricReport,
    evaluate_files,
    score_captions,
    spice_unavailable_reason,
)

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
REFERENCE_DIR = SHARED / "data" / "coco-caption-reference"

needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="no `java` on PATH")

REFS = {
    11: ["a brown dog runs across a green field", "a dog running on the grass"],
    22: ["a red car parked next to a tall building", "a car parked on a city street"],
    33: ["two people ride horses along a sandy beach", "riders on horses at the beach"],
}
FAST = ("Bleu", "ROUGE_L", "CIDEr")  # no METEOR JVM: ~1 s per call


def _assert_one_line(err: pytest.ExceptionInfo[BaseException], *needles: str) -> str:
    message = str(err.value)
    assert "\n" not in message and message.strip() == message
    for needle in needles:
        assert needle in message, f"{needle!r} not in {message!r}"
    return message


@pytest.fixture(scope="module")
def reference_files() -> dict[str, Path]:
    if not REFERENCE_DIR.is_dir():
        pytest.skip(f"../shared not present: {REFERENCE_DIR} holds the coco-caption reference data")
    return {
        "results": REFERENCE_DIR / "captions_val2014_fakecap_results.json",
        "annotations": REFERENCE_DIR / "captions_val2014_1000.json",
        "expected": REFERENCE_DIR / "expected_scores.json",
    }


@pytest.fixture(scope="module")
def reference_run(
    reference_files: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> tuple[MetricReport, Path]:
    """Score the demo's fakecap results once (all metrics) and write metrics JSON."""
    if shutil.which("java") is None:
        pytest.skip("no `java` on PATH: the tokenizer and METEOR need it")
    out = tmp_path_factory.mktemp("reference") / "nested" / "metrics.json"
    report = evaluate_files(reference_files["results"], reference_files["annotations"], out)
    return report, out


# ----------------------------------------------------------------------------- official numbers


@needs_java
def test_reproduces_official_coco_caption_scores(
    reference_run: tuple[MetricReport, Path], reference_files: dict[str, Path]
) -> None:
    report, _ = reference_run
    expected = json.loads(reference_files["expected"].read_text())
    for name in ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr"):
        assert round(report.scores[name], 3) == pytest.approx(expected[name], abs=1e-9), name
    if "SPICE" in report.scores:
        assert round(report.scores["SPICE"], 3) == pytest.approx(expected["SPICE"], abs=1e-9)
    else:
        assert report.skipped["SPICE"].strip(), "SPICE skipped without a reason"
    assert report.num_images == 1000
    assert 0 < report.seconds < 600


@needs_java
def test_metrics_json_has_pycocoevalcap_names_at_top_level(
    reference_run: tuple[MetricReport, Path],
) -> None:
    report, out = reference_run
    data = json.loads(out.read_text())
    assert data["num_images"] == 1000
    for name, value in report.scores.items():
        assert data[name] == pytest.approx(value)
    assert set(data["skipped"]) == set(report.skipped)
    assert {"CIDEr", "Bleu_4", "METEOR"} <= set(data["per_image"])
    assert MetricReport.from_dict(data).per_image["CIDEr"] == pytest.approx(
        report.per_image["CIDEr"]
    )
    assert not [p for p in out.parent.iterdir() if p.name != "metrics.json"], "temp file left"


@needs_java
def test_per_image_scores_cover_every_result_image(
    reference_run: tuple[MetricReport, Path], reference_files: dict[str, Path]
) -> None:
    report, _ = reference_run
    result_ids = set(load_results(reference_files["results"]))
    for name in ("CIDEr", "Bleu_4", "METEOR", "ROUGE_L"):
        assert set(report.per_image[name]) == result_ids, name
    # CIDEr and ROUGE-L corpus scores are the means of their per-image scores.
    for name in ("CIDEr", "ROUGE_L"):
        assert np.mean(list(report.per_image[name].values())) == pytest.approx(report.scores[name])


def test_load_reference_annotations(reference_files: dict[str, Path]) -> None:
    references = load_annotations(reference_files["annotations"])
    assert len(references) == 1000
    assert sum(map(len, references.values())) == 5005
    assert all(isinstance(k, int) and v for k, v in references.items())


# ----------------------------------------------------------------------------- round trips


def test_results_round_trip_sorted_and_atomic(tmp_path: Path) -> None:
    captions = {30: "a cat", np.int64(2): "café crème", 7: ""}
    path = write_results(tmp_path / "a" / "b" / "results.json", captions)
    items = json.loads(path.read_text(encoding="utf-8"))
    assert [item["image_id"] for item in items] == [2, 7, 30]
    assert load_results(path) == {2: "café crème", 7: "", 30: "a cat"}
    assert sorted(p.name for p in path.parent.iterdir()) == ["results.json"]


def test_annotations_round_trip_and_pycocotools_reads_them(tmp_path: Path) -> None:
    path = write_annotations(tmp_path / "ann.json", {5: ["x y", "z"], 1: ["only one"]})
    assert load_annotations(path) == {1: ["only one"], 5: ["x y", "z"]}
    coco_module = pytest.importorskip("pycocotools.coco")
    coco = coco_module.COCO(str(path))
    assert sorted(coco.getImgIds()) == [1, 5]
    assert sorted(a["caption"] for a in coco.imgToAnns[5]) == ["x y", "z"]
    assert len({a["id"] for a in coco.dataset["annotations"]}) == 3


def test_report_json_round_trip_maps_nan_to_null() -> None:
    report = MetricReport(
        scores={"CIDEr": 1.5, "SPICE": math.nan},
        per_image={"CIDEr": {3: 1.0, 4: 2.0}},
        skipped={"METEOR": "why"},
        num_images=2,
        seconds=1.25,
    )
    data = json.loads(report.to_json())
    assert data["SPICE"] is None and data["per_image"]["CIDEr"] == {"3": 1.0, "4": 2.0}
    back = MetricReport.from_dict(data)
    assert back.per_image == report.per_image and math.isnan(back.scores["SPICE"])
    assert back.skipped == {"METEOR": "why"} and back.num_images == 2


# ----------------------------------------------------------------------------- scoring behaviour


@needs_java
def test_identical_candidates_score_high_and_wrong_ones_low() -> None:
    single = {image_id: refs[:1] for image_id, refs in REFS.items()}
    same = score_captions({i: refs[0] for i, refs in single.items()}, single, metrics=FAST)
    assert same.scores["Bleu_4"] > 0.99
    assert same.scores["CIDEr"] > 5.0
    assert same.scores["ROUGE_L"] == pytest.approx(1.0)
    shuffled = {11: single[22][0], 22: single[33][0], 33: single[11][0]}
    wrong = score_captions(shuffled, single, metrics=FAST)
    assert wrong.scores["CIDEr"] < 1.0 < same.scores["CIDEr"]
    assert wrong.scores["Bleu_4"] < 0.5
    assert set(wrong.per_image["CIDEr"]) == set(wrong.per_image["Bleu_4"]) == {11, 22, 33}
    assert "METEOR" not in wrong.scores and not wrong.skipped


@needs_java
def test_subset_of_images_scored_and_tokenizer_keeps_alignment() -> None:
    # Line breaks inside captions must not shift the PTB tokenizer's lines.
    refs = {1: ["a dog\r\non grass", "a dog"], 2: ["a cat\u2028on a mat"], 3: ["unused"]}
    report = score_captions({1: "a dog on grass", 2: "a cat on a mat"}, refs, metrics=FAST)
    assert report.num_images == 2
    assert report.per_image["ROUGE_L"][2] == pytest.approx(1.0)
    assert report.per_image["ROUGE_L"][1] == pytest.approx(1.0)


@needs_java
def test_meteor_twice_in_one_process_leaves_no_java_running() -> None:
    results = {i: refs[1] for i, refs in REFS.items()}
    first = score_captions(results, REFS, metrics=("METEOR",))
    second = score_captions(results, REFS, metrics=("METEOR",))
    assert set(first.scores) == {"METEOR"}
    assert first.scores["METEOR"] == pytest.approx(second.scores["METEOR"])
    assert 0.5 < first.scores["METEOR"] <= 1.0
    assert set(first.per_image["METEOR"]) == {11, 22, 33}
    proc = Path("/proc")
    if proc.is_dir():
        children = [
            stat.read_text().split()
            for stat in proc.glob("[0-9]*/stat")
            if _safe_ppid(stat) == os.getpid()
        ]
        assert not [c for c in children if c[2] != "Z" and "java" in c[1]], children


@needs_java
def test_stuck_meteor_is_stopped_not_waited_on(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(metrics_module, "METEOR_TIMEOUT_S", (0.2, 0.0))
    with pytest.raises(metrics_module.ScorerError) as err:
        score_captions({11: "a dog"}, REFS, metrics=("METEOR",))
    _assert_one_line(err, "METEOR took over", "stopped")


def _safe_ppid(stat: Path) -> int | None:
    try:
        return int(stat.read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


# ----------------------------------------------------------------------------- SPICE


@needs_java
def test_spice_without_corenlp_is_skipped_and_never_downloads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spice_dir = tmp_path / "spice"
    (spice_dir / "lib").mkdir(parents=True)
    (spice_dir / "spice-1.0.jar").write_bytes(b"")
    monkeypatch.setattr(java_scorers, "SPICE_DIR", spice_dir)

    def no_network(*args: object, **kwargs: object) -> None:
        raise AssertionError("tried to download")

    monkeypatch.setattr("urllib.request.urlretrieve", no_network)
    report = score_captions({11: "a dog"}, REFS, metrics=("Bleu", "SPICE"))
    assert "SPICE" not in report.scores and "Bleu_4" in report.scores
    reason = report.skipped["SPICE"]
    assert "CoreNLP 3.6.0" in reason and "get_stanford_models" in reason and "\n" not in reason
    assert spice_unavailable_reason(spice_dir) == reason


FAKE_SPICE = """
import json, sys
args = sys.argv[1:]
if "{mode}" == "fail":
    sys.stderr.write("Exception in thread main: boom\\n")
    sys.exit(1)
items = json.load(open(args[0]))
out = [{{"image_id": it["image_id"], "scores": {{"All": {{"f": 0.5 if it["test"] == it["refs"][0] else "NaN"}}}}}}
       for it in items]
json.dump(out, open(args[args.index("-out") + 1], "w"))
"""


@needs_java
@pytest.mark.parametrize("mode", ["ok", "fail"])
def test_spice_output_parsed_or_failure_reported(
    mode: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    script = tmp_path / "fake_spice.py"
    script.write_text(FAKE_SPICE.format(mode=mode))
    monkeypatch.setattr(metrics_module, "spice_unavailable_reason", lambda: None)
    monkeypatch.setattr(java_scorers, "SPICE_DIR", tmp_path)
    monkeypatch.setattr(
        java_scorers,
        "_spice_command",
        lambda java, in_file, out_file: [
            sys.executable,
            str(script),
            str(in_file),
            "-out",
            str(out_file),
        ],
    )
    results = {11: REFS[11][0], 22: "something else"}
    report = score_captions(results, REFS, metrics=("SPICE",))
    if mode == "ok":
        assert report.per_image["SPICE"][11] == 0.5 and math.isnan(report.per_image["SPICE"][22])
        assert math.isnan(report.scores["SPICE"])  # pycocoevalcap: mean over NaN is NaN
        assert not report.skipped
    else:
        assert "SPICE" not in report.scores
        assert "boom" in report.skipped["SPICE"] and "\n" not in report.skipped["SPICE"]


# ----------------------------------------------------------------------------- bad input


def test_missing_annotation_file(tmp_path: Path) -> None:
    results = write_results(tmp_path / "r.json", {1: "a dog"})
    missing = tmp_path / "nope" / "captions.json"
    with pytest.raises(EvaluationInputError) as err:
        evaluate_files(results, missing)
    _assert_one_line(err, str(missing), "not found")


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("{not json", "not valid JSON"),
        ('{"image_id": 1, "caption": "x"}', "expected a list"),
        ('{"annotations": []}', "annotation file"),
        ('[{"image_id": 1, "caption": "x"}, {"image_id": 2}]', "item 1 has no 'caption'"),
        ('[{"image_id": "1", "caption": "x"}]', "not an integer"),
        ('[{"image_id": 1, "caption": 5}]', "not a string"),
        ('[{"image_id": 1, "caption": "x"}, {"image_id": 1, "caption": "y"}]', "appears twice"),
        ("[]", "no captions"),
        ("[3]", "not an object"),
    ],
)
def test_malformed_results_file(tmp_path: Path, text: str, needle: str) -> None:
    path = tmp_path / "R.json"
    path.write_text(text)
    with pytest.raises(EvaluationInputError) as err:
        load_results(path)
    _assert_one_line(err, str(path), needle)


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("not json at all", "not valid JSON"),
        ('[{"image_id": 1, "caption": "x"}]', "results file"),
        ('{"images": []}', "no 'annotations'"),
        ('{"annotations": [{"image_id": 1}]}', "lacks 'image_id' or 'caption'"),
        ('{"annotations": []}', "empty"),
    ],
)
def test_malformed_annotation_file(tmp_path: Path, text: str, needle: str) -> None:
    path = tmp_path / "A.json"
    path.write_text(text)
    with pytest.raises(EvaluationInputError) as err:
        load_annotations(path)
    _assert_one_line(err, str(path), needle)


def test_result_image_absent_from_annotations(tmp_path: Path) -> None:
    results = write_results(tmp_path / "r.json", {11: "a dog", 999: "x", 998: "y"})
    annotations = write_annotations(tmp_path / "a.json", REFS)
    with pytest.raises(EvaluationInputError) as err:
        evaluate_files(results, annotations)
    _assert_one_line(err, str(results), str(annotations), "2 of 3", "998, 999")
    with pytest.raises(EvaluationInputError) as err:
        score_captions({11: "a dog", 999: "x"}, REFS)
    _assert_one_line(err, "999")


def test_unknown_metric_lists_known_names() -> None:
    with pytest.raises(EvaluationInputError) as err:
        score_captions({11: "a dog"}, REFS, metrics=("BLEU",))
    _assert_one_line(err, "'BLEU'", "Bleu, METEOR, ROUGE_L, CIDEr, SPICE")


def test_missing_java_is_one_clear_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(JavaMissingError) as err:
        score_captions({11: "a dog"}, REFS, metrics=("Bleu",))
    assert isinstance(err.value, EvaluationInputError)
    _assert_one_line(err, "Java runtime (>= 8)", "apt-get install default-jre-headless", "openjdk")
