"""The compare report: side-by-side table, the quality-vs-steps table and plot."""

from __future__ import annotations

from diffusion_captioner.compare import render_report
from eval.plots import plot_quality_vs_steps


def summary(scores_by_steps: dict, default_steps=None) -> dict:
    test = {}
    for steps, cider in scores_by_steps.items():
        options = {} if steps is None else {"steps": steps}
        key = "default" if steps == default_steps else str(steps)
        test[key] = {"options": options, "scores": {"CIDEr": cider, "Bleu_4": cider / 5},
                     "skipped": {"SPICE": "no CoreNLP"}, "ms_per_image": 1.5}
    return {"parameters": {"total": 2_000_000, "trainable": 1_000_000}, "train_steps": 10,
            "train_seconds": 12.0, "test": test}


def test_report_lists_every_decoder_and_the_step_sweep(tmp_path):
    decoders = {
        "clipcap": summary({None: 3.1}),
        "iterative": summary({1: 1.0, 2: 2.0, 5: 2.8, 10: 2.9}, default_steps=5),
    }
    metrics = {"test_images": 4, "encoder": {"model": "m", "fingerprint": "f"},
               "skipped_images": {"train": 0}, "decoders": decoders}
    config = {"command": "dcap compare", "dataset": {"type": "shapes"}}
    report = render_report(config, metrics)
    assert "| clipcap |" in report and "| iterative |" in report
    assert "| iterative | 10 | 2.900 |" in report
    assert "SPICE skipped: no CoreNLP" in report
    png = plot_quality_vs_steps(decoders, tmp_path / "quality_vs_steps.png")
    assert png is not None and png.stat().st_size > 1000
    assert "quality_vs_steps.png" in report
    assert plot_quality_vs_steps({"clipcap": decoders["clipcap"]}, tmp_path / "none.png") is None
