"""The `dcap` CLI end to end on a tiny budget, and its one-line errors for bad input."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import TINY_SHAPES
from helpers import assert_one_line_error, run_cli
from test_registry import write_user_module

from diffusion_captioner.cli import as_list

ROOT = Path(__file__).resolve().parents[1]
TINY_TRAIN = {"max_steps": 3, "batch_size": 8, "eval_every": 2, "eval_batches": 1, "log_every": 1,
              "warmup_steps": 0, "max_minutes": None}


def test_fire_list_normalisation():
    assert as_list("a,b") == ["a", "b"]
    assert as_list(("a", "b")) == ["a", "b"]
    assert as_list("a") == ["a"]
    assert as_list(None) == []


def test_list_shows_every_role(capsys):
    code, out, _ = run_cli(["list"], capsys)
    assert code == 0
    for name in ("clipcap", "open_clip", "shapes", "embedded"):
        assert name in out


def test_compare_end_to_end_with_a_user_decoder(tiny_clip_dir, tmp_path, capsys, monkeypatch,
                                                 clean_registry):
    """clipcap and a decoder from a temporary user module, through --include-package."""
    write_user_module(tmp_path, "my_user_decoders", "echo_user")
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "run"
    argv = ["compare", "--decoders", "clipcap,echo_user", "--include-package", "my_user_decoders",
            "--dataset", json.dumps(TINY_SHAPES), "--encoder", f"local-dir:{tiny_clip_dir}",
            "--cache-dir", str(tmp_path / "cache"), "--train", json.dumps(TINY_TRAIN),
            "--out", str(out), "--quiet", "--log-with", "tensorboard"]
    code, stdout, err = run_cli(argv, capsys)
    assert code == 0, err[-2000:]
    assert "| clipcap |" in stdout and "| echo_user |" in stdout
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for name in ("clipcap", "echo_user"):  # each decoder one TensorBoard run under OUT/tracker
        events = EventAccumulator(str(out / "tracker" / name))
        events.Reload()
        assert {"loss", "lr", "val_loss", "test/CIDEr"} <= set(events.Tags()["scalars"]), name
        cider = json.loads((out / name / "metrics.json").read_text())["CIDEr"]
        assert events.Scalars("test/CIDEr")[-1].value == pytest.approx(cider, rel=1e-5)
        groups = json.loads((out / name / "metrics_by_group.json").read_text())
        for group, scores in groups.items():  # and per group
            assert events.Scalars(f"test/{group}/CIDEr")[-1].value == pytest.approx(
                scores["CIDEr"], rel=1e-5)
    config = json.loads((out / "config.json").read_text())
    assert set(config["decoders"]) == {"clipcap", "echo_user"}
    for name in ("clipcap", "echo_user"):
        folder = out / name
        results = json.loads((folder / "results_test.json").read_text())
        assert len(results) == TINY_SHAPES["num_test"]
        assert all(isinstance(r["caption"], str) for r in results)
        metrics = json.loads((folder / "metrics.json").read_text())
        assert {"Bleu_4", "CIDEr", "METEOR", "ROUGE_L"} <= set(metrics)
        assert (folder / "train_log.jsonl").is_file()
        assert (folder / "checkpoint" / "best" / "config.json").is_file()
    top = json.loads((out / "metrics.json").read_text())
    assert set(top["decoders"]) == {"clipcap", "echo_user"}
    report = (out / "report.md").read_text()
    assert "CIDEr" in report and "**echo_user** vs **clipcap**" in report
    assert "## Metrics per group" in report  # shapes groups its images by object count
    groups = json.loads((out / "groups_test.json").read_text())
    assert len(groups) == TINY_SHAPES["num_test"] and set(groups.values()) <= {"1 object",
                                                                                "2 objects"}
    for name in ("clipcap", "echo_user"):
        by_group = json.loads((out / name / "metrics_by_group.json").read_text())
        assert set(by_group) <= {"1 object", "2 objects"}
        assert sum(g["num_images"] for g in by_group.values()) == TINY_SHAPES["num_test"]
        summary = top["decoders"][name]["test_groups"]  # the top-level metrics.json too
        assert {g: v["scores"]["CIDEr"] for g, v in summary.items()} == pytest.approx(
            {g: v["CIDEr"] for g, v in by_group.items()})
        assert f"| 1 object | {by_group['1 object']['num_images']} | {name} |" in report
    for linked in re.findall(r"\]\(([^)]+\.png)\)", report):
        assert (out / linked).is_file(), linked
    assert (out / "report.html").read_text().count("data:image/png;base64,") >= 3
    speed = json.loads((out / "speed.json").read_text())
    assert {row["batch"] for row in speed["decoders"]["clipcap"]} == {1, 4, 16, 64}
    assert "CLIPScore" in json.loads((out / "clipcap" / "clipscore.json").read_text())
    annotations = json.loads((out / "annotations_test.json").read_text())
    assert len(annotations["images"]) == TINY_SHAPES["num_test"]

    # rerunning the same command resumes: nothing is trained again
    before = (out / "clipcap" / "train_log.jsonl").read_text()
    code, _, err = run_cli(argv, capsys)
    assert code == 0, err[-2000:]
    assert (out / "clipcap" / "train_log.jsonl").read_text() == before

    # ... but never with other settings: one line naming what changed
    changed = [*argv[:argv.index("--train") + 1], json.dumps({**TINY_TRAIN, "lr": 0.5}),
               *argv[argv.index("--train") + 2:]]
    code, _, err = run_cli(changed, capsys)
    assert_one_line_error(code, err, "train.lr differ", "new --out")


def test_evaluate_command_writes_metrics(tmp_path, capsys):
    from eval.coco_format import write_annotations, write_results

    write_annotations(tmp_path / "a.json", {1: ["a red circle", "a red disk"], 2: ["a blue square"]})
    write_results(tmp_path / "r.json", {1: "a red circle", 2: "a blue square"})
    code, out, err = run_cli(["evaluate", "--results", str(tmp_path / "r.json"), "--annotations",
                              str(tmp_path / "a.json"), "--out", str(tmp_path / "m.json")], capsys)
    assert code == 0, err
    assert "CIDEr" in out
    assert json.loads((tmp_path / "m.json").read_text())["Bleu_1"] > 0.9


def test_unknown_decoder_is_one_line_error(capsys):
    code, _, err = run_cli(["compare", "--decoders", "no_such_decoder"], capsys)
    assert_one_line_error(code, err, "no_such_decoder", "clipcap")


def test_missing_annotation_file(tmp_path, capsys):
    from eval.coco_format import write_results

    write_results(tmp_path / "r.json", {1: "a cat"})
    code, _, err = run_cli(["evaluate", "--results", str(tmp_path / "r.json"),
                            "--annotations", str(tmp_path / "missing.json")], capsys)
    assert_one_line_error(code, err, "missing.json")


@pytest.mark.parametrize("content", ["{not json", '{"image_id": 1}', '[{"image_id": 1}]'])
def test_malformed_result_json(tmp_path, capsys, content):
    from eval.coco_format import write_annotations

    write_annotations(tmp_path / "a.json", {1: ["a cat"]})
    (tmp_path / "bad.json").write_text(content)
    code, _, err = run_cli(["evaluate", "--results", str(tmp_path / "bad.json"),
                            "--annotations", str(tmp_path / "a.json")], capsys)
    assert_one_line_error(code, err, "bad.json")


def test_result_image_absent_from_annotations(tmp_path, capsys):
    from eval.coco_format import write_annotations, write_results

    write_annotations(tmp_path / "a.json", {1: ["a cat"]})
    write_results(tmp_path / "r.json", {1: "a cat", 777: "a dog"})
    code, _, err = run_cli(["evaluate", "--results", str(tmp_path / "r.json"),
                            "--annotations", str(tmp_path / "a.json")], capsys)
    assert_one_line_error(code, err, "777")


def test_unreadable_image_named_and_the_rest_captioned(tiny_clip_dir, tmp_path, capsys):
    """`dcap caption` captions the good images and names the bad one, exiting non-zero."""
    from PIL import Image

    run = tmp_path / "run"
    code, _, err = run_cli([
        "compare", "--decoders", "clipcap", "--dataset", json.dumps(TINY_SHAPES),
        "--encoder", f"local-dir:{tiny_clip_dir}", "--cache-dir", str(tmp_path / "cache"),
        "--train", json.dumps({**TINY_TRAIN, "max_steps": 1}), "--out", str(run), "--quiet"],
        capsys)
    assert code == 0, err[-2000:]
    good = tmp_path / "good.png"
    Image.new("RGB", (40, 30), (200, 30, 30)).save(good)
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image at all")
    code, out, err = run_cli(["caption", "--run", str(run), "--images", f"{good},{bad}"], capsys)
    assert_one_line_error(code, err, "bad.jpg")
    assert "good.png" in out and "clipcap" in out
    code, out, err = run_cli(["bench", "--run", str(run), "--repeats", "1"], capsys)
    assert code == 0, err[-2000:]
    assert "ms/caption" in out and (run / "speed.json").is_file()
    eager = (run / "speed.json").read_text()
    code, out, err = run_cli(["bench", "--run", str(run), "--repeats", "1", "--compile", "eager"],
                             capsys)
    assert code == 0, err[-2000:]
    assert "torch.compile (eager)" in out and "speed_compiled.json" in out
    compiled = json.loads((run / "speed_compiled.json").read_text())
    assert compiled["compile"] == {"backend": "eager", "decoders": {"clipcap": True}}
    assert (run / "speed.json").read_text() == eager  # the report's figures are left alone


def test_bench_checks_images_before_loading_the_run(tmp_path, capsys):
    code, out, err = run_cli(["bench", "--run", str(tmp_path / "no-such-run"), "--images", "0"],
                             capsys)
    assert_one_line_error(code, err, "--images must be >= 1, got 0")


def test_real_process_exit_code_and_no_traceback():
    completed = subprocess.run(
        [sys.executable, "-m", "diffusion_captioner", "compare", "--decoders", "nope_decoder"],
        capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert completed.returncode == 2
    assert "Traceback" not in completed.stderr
    assert "dcap: error: unknown decoder 'nope_decoder'" in completed.stderr


@pytest.mark.parametrize("command", ["evaluate", "compare"])
def test_missing_java_is_one_line_before_any_work(tmp_path, capsys, monkeypatch, command):
    from eval.coco_format import write_annotations, write_results

    write_annotations(tmp_path / "a.json", {1: ["a cat"]})
    write_results(tmp_path / "r.json", {1: "a cat"})
    empty = tmp_path / "bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    argv = (["evaluate", "--results", str(tmp_path / "r.json"), "--annotations",
             str(tmp_path / "a.json")] if command == "evaluate" else
            ["compare", "--decoders", "clipcap", "--out", str(tmp_path / "run")])
    code, _, err = run_cli(argv, capsys)
    assert_one_line_error(code, err, "Java")
    assert not (tmp_path / "run" / "clipcap").exists()  # nothing trained half way


@pytest.mark.parametrize("command", ["compare", "bench", "evaluate", "extract", "caption", "export",
                                     "serve", "list", "pretrain_clip"])
def test_an_unknown_flag_fails_every_command_before_any_work(command, capsys):
    started = time.perf_counter()
    code, out, err = run_cli([command, "--decoderz", "clipcap"], capsys)
    assert_one_line_error(code, err, f"dcap {command}: unknown flag --decoderz", "accepted: --")
    assert time.perf_counter() - started < 5


def test_known_flag_spellings_pass_the_flag_check():
    from diffusion_captioner.cli import check_flags

    check_flags(["compare", "--decoders=clipcap", "--cache-dir", "x", "--noquiet", "--", "--bogus"])
    check_flags(["no-such-command", "--whatever"])  # fire names the unknown command itself


def test_decoder_config_must_name_decoders_of_the_run(capsys):
    code, out, err = run_cli(["compare", "--decoders", "clipcap", "--decoder-config",
                              '{"mnic": {"max_length": 9}}'], capsys)
    assert_one_line_error(code, err, "--decoder-config", "not run: mnic")


def test_decoder_config_reaches_the_plan(monkeypatch, tmp_path):
    from diffusion_captioner import cli
    from diffusion_captioner import comparison as compare_module

    seen = {}

    def fake_compare(names, out, **kwargs):
        seen.update(kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(compare_module, "compare", fake_compare)
    cli.main(["compare", "--decoders", "mnic", "--out", str(tmp_path), "--decoder-config",
              '{"mnic": {"max_length": 9}}'])
    assert seen["decoder_overrides"] == {"mnic": {"max_length": 9}}


def test_a_decoder_without_parameters_has_a_device():
    import torch

    from registry import CaptionDecoder

    class Empty(CaptionDecoder):
        pass

    assert Empty().device == torch.device("cpu")
