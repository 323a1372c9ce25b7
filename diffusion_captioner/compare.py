"""``dcap compare``: train every decoder on the same cached features and split, score them alike.

Steps: encode each split once (feature cache) -> for each decoder: train (resumable) ->
generate on the test split (at every step count it sweeps) -> COCO result JSON ->
pycocoevalcap -> ``metrics.json``; then the side-by-side ``report.md`` and ``metrics.json``.
Each phase is skipped when its output already exists, so rerunning with the same ``--out``
resumes an interrupted run.
"""

from __future__ import annotations

import json
import logging
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from diffusion_captioner.encoders import encoder_config
from diffusion_captioner.features import FeatureCache, SplitFeatures
from diffusion_captioner.inference import generate_captions
from diffusion_captioner.presets import decoder_plan, load_preset
from diffusion_captioner.trainer import CaptionPairs, TrainConfig, Trainer
from eval.coco_format import write_annotations, write_results
from eval.metrics import ALL_METRICS, MetricReport, score_captions
from eval.plots import plot_quality_vs_steps, step_curves
from registry import build, registered_name, resolve

logger = logging.getLogger(__name__)

REPORT_METRICS = ("Bleu_1", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr", "SPICE")
SWEEP_METRICS = ("Bleu", "ROUGE_L", "CIDEr")


@dataclass
class Workspace:
    """The shared inputs of a comparison: dataset, encoder and each split's cached features."""

    dataset: Any
    encoder: Any
    splits: dict[str, SplitFeatures]


def prepare_features(dataset_cfg: dict, encoder_cfg: dict, cache_dir: str | Path | None,
                     device: str = "cpu", progress: bool = True,
                     text_features: bool = False) -> Workspace:
    """Build dataset and encoder and load (or extract once) train/val/test features; with
    ``text_features`` also the CLIP text features of the train and val captions."""
    dataset = build("dataset", dataset_cfg)
    encoder = build("encoder", {**encoder_cfg, "device": device})
    cache = FeatureCache(cache_dir)
    splits = {split: cache.get(dataset, split, encoder, progress=progress)
              for split in ("train", "val", "test")}
    if text_features:
        for split in ("train", "val"):
            cache.add_text_features(dataset, split, encoder, splits[split], progress=progress)
    return Workspace(dataset, encoder, splits)


def count_parameters(decoder: torch.nn.Module) -> dict[str, int]:
    return {"total": sum(p.numel() for p in decoder.parameters()),
            "trainable": sum(p.numel() for p in decoder.parameters() if p.requires_grad)}


def run_decoder(name: str, plan: dict[str, Any], work: Workspace, out: Path,
                progress: bool = True) -> dict[str, Any]:
    """Train, generate and score one decoder into ``out/<name>``; returns its summary."""
    folder = out / name
    folder.mkdir(parents=True, exist_ok=True)
    train_cfg = TrainConfig.from_dict(plan["train"])
    train, val, test = work.splits["train"], work.splits["val"], work.splits["test"]
    torch.manual_seed(train_cfg.seed)
    decoder = build("decoder", plan["decoder"], feature_dim=work.encoder.dim)
    trainer = Trainer(decoder, CaptionPairs.from_split(train), CaptionPairs.from_split(val),
                      train_cfg, folder, progress=progress)
    state = trainer.fit(resume=True)
    parameters = count_parameters(decoder)
    best = type(decoder).from_pretrained(trainer.best_dir)
    best.to(trainer.accelerator.device)

    references = {r.image_id: list(r.captions) for r in test.records}
    default = dict(plan["generate"])
    # the default options get every metric; the step sweep of an iterative decoder skips the
    # slow METEOR start-up (quality vs steps is read off BLEU/ROUGE-L/CIDEr)
    evaluations = [("default", default, ALL_METRICS)] + [
        (str(k), {**default, "steps": k}, SWEEP_METRICS)
        for k in type(best).step_sweep if k != default.get("steps")]
    runs: dict[str, Any] = {}
    for key, options, metric_names in evaluations:
        captions, seconds = generate_captions(best, test.features, **options)
        results = dict(zip(test.image_ids, captions, strict=True))
        write_results(folder / ("results_test.json" if key == "default"
                                else f"results_test_k{key}.json"), results)
        report: MetricReport = score_captions(results, references, metrics=metric_names)
        if key == "default":
            report.write(folder / "metrics.json")
        runs[key] = {
            "options": options, "scores": report.scores, "skipped": report.skipped,
            "generate_seconds": round(seconds, 3),
            "ms_per_image": round(1000 * seconds / len(captions), 3),
        }
    summary = {
        "decoder": plan["decoder"], "registered_as": registered_name(type(best)),
        "train": plan["train"], "generate": plan["generate"],
        "parameters": parameters,
        "train_steps": state.step, "train_seconds": round(state.elapsed_seconds, 1),
        "best_val_loss": state.best_val_loss,
        "test": runs,
    }
    (folder / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def compare(
    decoders: list[str],
    out: str | Path,
    preset: str = "embedded",
    dataset: dict | None = None,
    encoder: str | dict | None = None,
    cache_dir: str | Path | None = None,
    train_overrides: dict[str, Any] | None = None,
    device: str = "cpu",
    progress: bool = True,
) -> dict[str, Any]:
    """Run every decoder on the same features and split; write the run folder and report."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    plan = load_preset(preset)
    dataset_cfg = dataset or plan.get("dataset", {"type": "shapes"})
    encoder_cfg = encoder_config(encoder if encoder is not None else plan.get("encoder"))
    plans = {}
    for name in decoders:
        plans[name] = decoder_plan(plan, name)
        plans[name]["train"].update(train_overrides or {})
    config = {
        "command": shlex.join(["dcap", *sys.argv[1:]]),
        "preset": preset, "dataset": dataset_cfg, "encoder": encoder_cfg, "decoders": plans,
        "device": device, "cache_dir": str(cache_dir) if cache_dir else None,
    }
    (out / "config.json").write_text(json.dumps(config, indent=2))

    needs_text = any(resolve("decoder", p["decoder"]["type"]).needs_text_features
                     for p in plans.values())
    work = prepare_features(dataset_cfg, encoder_cfg, cache_dir, device, progress, needs_text)
    test = work.splits["test"]
    write_annotations(out / "annotations_test.json",
                      {r.image_id: list(r.captions) for r in test.records})
    summaries = {name: run_decoder(name, plans[name], work, out, progress) for name in plans}
    metrics = {
        "dataset": dataset_cfg, "encoder": {**encoder_cfg, "fingerprint": work.encoder.fingerprint},
        "test_images": len(test.records),
        "skipped_images": {s: len(f.skipped) for s, f in work.splits.items()},
        "decoders": summaries,
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, default=str))
    plot_quality_vs_steps(metrics["decoders"], out / "quality_vs_steps.png")
    (out / "report.md").write_text(render_report(config, metrics))
    return metrics


def _format(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def render_report(config: dict[str, Any], metrics: dict[str, Any]) -> str:
    """The side-by-side markdown table of the run."""
    lines = [
        "# Captioning decoders, side by side", "",
        f"Command: `{config['command']}`", "",
        f"Data: `{json.dumps(config['dataset'])}`, test split of {metrics['test_images']} images; "
        f"encoder `{metrics['encoder'].get('model')}` (fingerprint `{metrics['encoder']['fingerprint']}`); "
        "the same cached features, split and pycocoevalcap metric code for every decoder.", "",
        "| decoder | " + " | ".join(REPORT_METRICS) +
        " | steps | ms/image (batch 100) | params (trainable) | train steps | train time |",
        "|---" * (len(REPORT_METRICS) + 6) + "|",
    ]
    skipped: dict[str, str] = {}
    for name, summary in metrics["decoders"].items():
        run = summary["test"]["default"]
        skipped.update(run["skipped"])
        scores = [_format(run["scores"].get(m, "skipped" if m in run["skipped"] else "-"))
                  for m in REPORT_METRICS]
        params = summary["parameters"]
        lines.append(
            f"| {name} | " + " | ".join(scores) + f" | {run['options'].get('steps', '-')} | "
            f"{run['ms_per_image']:.2f} | "
            f"{params['total'] / 1e6:.2f}M ({params['trainable'] / 1e6:.2f}M) | "
            f"{summary['train_steps']} | {summary['train_seconds']:.0f} s |")
    lines.append("")
    curves = step_curves(metrics["decoders"], "CIDEr")
    if curves:
        lines += ["## Quality vs inference steps", "",
                  "| decoder | K | CIDEr | Bleu_4 | ms/image (batch 100) |", "|---|---|---|---|---|"]
        for name in curves:
            runs = sorted(metrics["decoders"][name]["test"].values(),
                          key=lambda r: r["options"]["steps"])
            for run in runs:
                lines.append(f"| {name} | {run['options']['steps']} | "
                             f"{_format(run['scores']['CIDEr'])} | "
                             f"{_format(run['scores'].get('Bleu_4', '-'))} | "
                             f"{run['ms_per_image']:.2f} |")
        lines += ["", "![quality vs steps](quality_vs_steps.png)", ""]
    for metric, reason in sorted(skipped.items()):
        lines.append(f"- {metric} skipped: {reason}")
    skipped_images = {k: v for k, v in metrics["skipped_images"].items() if v}
    if skipped_images:
        lines.append(f"- unreadable images skipped: {skipped_images}")
    lines.append("")
    lines.append("Per decoder: `<decoder>/results_test*.json` (COCO result format), "
                 "`<decoder>/metrics.json`, `<decoder>/train_log.jsonl`, `<decoder>/checkpoint/`.")
    return "\n".join(lines) + "\n"
