"""The compare report: headline with significance, tables, plots, examples, HTML with images."""

from __future__ import annotations

import re

from diffusion_captioner.report import render_html, render_markdown
from eval.plots import plot_latency_vs_batch, plot_quality_vs_steps, plot_training_curves


def summary(scores_by_steps: dict, default_steps=None) -> dict:
    test = {}
    for steps, cider in scores_by_steps.items():
        options = {} if steps is None else {"steps": steps}
        key = "default" if steps == default_steps else str(steps)
        test[key] = {"options": options, "scores": {"CIDEr": cider, "Bleu_4": cider / 5},
                     "skipped": {"SPICE": "no CoreNLP"}, "ms_per_image": 1.5}
    return {"parameters": {"total": 2_000_000, "trainable": 1_000_000}, "train_steps": 10,
            "train_seconds": 12.0, "test": test, "clip_scores": {"CLIPScore": 0.71},
            "caption_stats": {"repeated_word_rate": 0.1, "repeated_token_rate": 0.02,
                              "mean_length": 7.0, "vocabulary": 30, "empty_rate": 0.0,
                              "copied_from_train": 0.5}}


def speed_rows(ms_at_1: float, steps=None) -> list[dict]:
    options = {} if steps is None else {"steps": steps}
    return [{"options": options, "batch": b, "seconds": ms_at_1 * b / 1000 / (b ** 0.5),
             "ms_per_caption": ms_at_1 / (b ** 0.5), "captions_per_second": 1000 * b ** 0.5 / ms_at_1}
            for b in (1, 4, 16, 64)]


def run_metrics() -> dict:
    decoders = {"clipcap": summary({None: 3.1}),
                "iterative": summary({1: 1.0, 2: 2.0, 5: 2.8, 10: 2.9}, default_steps=5)}
    return {
        "test_images": 4, "encoder": {"model": "m", "fingerprint": "f"},
        "skipped_images": {"train": 0}, "decoders": decoders,
        "significance": {"iterative": {"CIDEr": {"difference": -0.3, "low": -0.5, "high": -0.1,
                                                 "significant": True, "images": 4},
                                       "Bleu_4": {"difference": -0.06, "low": -0.1, "high": 0.01,
                                                  "significant": False, "images": 4}}},
        "speed": {"threads": 1, "device": "cpu", "repeats": 3, "crossover": {"iterative": 16},
                  "contrast": {"iterative": {"small_batch": 1, "large_batch": 64,
                                             "latency_ratio": 0.4, "throughput_ratio": 2.5,
                                             "crossover": 16, "batches": [1, 4, 16, 64],
                                             "second_faster_at": [1, 4]}},
                  "decoders": {"clipcap": speed_rows(10.0),
                               "iterative": speed_rows(4.0, 5) + speed_rows(1.0, 1)}},
        "examples": [{"image_id": 7, "image": "examples/7.png", "references": ["a red circle"],
                      "captions": {"clipcap": "a red circle", "iterative": "a red red circle"},
                      "trajectories": {"iterative": ["a a", "a red circle"]}}],
        "plots": ["quality_vs_steps.png"],
    }


def test_markdown_report_answers_the_questions(tmp_path):
    metrics = run_metrics()
    config = {"command": "dcap compare", "dataset": {"type": "shapes"}}
    report = render_markdown(config, metrics)
    assert "**iterative** vs **clipcap**: CIDEr -0.300" in report and "significant" in report
    assert "CIDEr -0.300 (0.903x)" in report  # 2.8 / 3.1, three decimals: not "0.90x"
    assert "batch-1 latency 4.0 ms vs 10.0 ms (0.40x)" in report
    assert "| clipcap |" in report and "| iterative |" in report
    assert "| iterative | 10 | 2.900 |" in report
    assert "SPICE skipped: no CoreNLP" in report
    assert "iterative is faster at batch 1 and 4, clipcap at batch 16 and 64" in report
    assert "iterative vs clipcap: at batch 1 iterative takes 0.40x the latency of clipcap" in report
    assert ("- iterative: each step costs 0.75 ms at batch 1, on top of 0.25 ms per caption "
            "(least-squares line through K = 1, 5)") in report
    assert "clipcap: each step" not in report  # no step counts, no line
    assert "1. a a" in report and "2. a red circle" in report
    assert "repeated" in report and "10.0%" in report
    linked = re.findall(r"\]\(([^)]+\.png)\)", report)
    assert "quality_vs_steps.png" in linked and "examples/7.png" in linked


def test_speed_section_says_how_many_images_small_batches_saw():
    config = {"command": "dcap compare", "dataset": {"type": "shapes"}}
    metrics = run_metrics()
    metrics["speed"].update(images=16, distinct_images=16)
    assert ("batches smaller than 16 are timed over 16 different images, so no single "
            "caption's length sets the latency") in render_markdown(config, metrics)
    metrics["speed"]["distinct_images"] = 4  # a 4-image test split, wrapped round
    assert ("timed over 16 images, of which only 4 are different (the test split is that "
            "small)") in render_markdown(config, metrics)


def test_html_report_inlines_existing_images(tmp_path):
    metrics = run_metrics()
    (tmp_path / "examples").mkdir()
    plot_quality_vs_steps(metrics["decoders"], tmp_path / "quality_vs_steps.png")
    from PIL import Image

    Image.new("RGB", (8, 8), (255, 0, 0)).save(tmp_path / "examples" / "7.png")
    page = render_html(render_markdown({"command": "c", "dataset": {}}, metrics), tmp_path)
    assert page.count("data:image/png;base64,") == 2
    assert "<table>" in page and "<b>iterative</b>" in page


def test_plots_are_written(tmp_path):
    metrics = run_metrics()
    assert plot_quality_vs_steps(metrics["decoders"], tmp_path / "q.png").stat().st_size > 1000
    assert plot_latency_vs_batch(metrics["speed"], tmp_path / "l.png").stat().st_size > 1000
    logs = {"clipcap": [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.0, },
                        {"step": 2, "val_loss": 2.5}]}
    assert plot_training_curves(logs, tmp_path / "t.png").stat().st_size > 1000
    assert plot_quality_vs_steps({"clipcap": metrics["decoders"]["clipcap"]}, tmp_path / "n.png") is None


def test_the_report_states_each_decoders_training_budget_and_what_stopped_it():
    from diffusion_captioner.report import _budget_line

    line = _budget_line({
        "fast": {"train": {"max_steps": 100, "max_minutes": 1.0}, "train_steps": 100,
                 "train_seconds": 20.0},
        "slow": {"train": {"max_steps": 900, "max_minutes": 1.0}, "train_steps": 410,
                 "train_seconds": 60.2}})
    assert "fast 100 steps / 60 s (stopped by the step budget at 100 steps, 20 s)" in line
    assert "slow 900 steps / 60 s (stopped by the clock at 410 steps, 60 s)" in line
