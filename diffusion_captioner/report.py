"""The comparison report: ``report.md`` (readable in a minute) and ``report.html`` (thumbnails inline).

Both are rendered from the run's top-level ``metrics.json`` document; every number in them comes
from that file, which the run wrote.
"""

from __future__ import annotations

import base64
import html
import json
import re
from pathlib import Path
from typing import Any

from eval.plots import step_curves
from eval.speed import describe_contrast, describe_step_costs

REPORT_METRICS = ("Bleu_1", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr", "SPICE")


def _format(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3f}"
    return "-" if value is None else str(value)


def _speed_at(metrics: dict[str, Any], name: str, batch: int, options: dict | None = None):
    rows = (metrics.get("speed") or {}).get("decoders", {}).get(name, [])
    for row in rows:
        if row["batch"] == batch and (options is None or row["options"] == options):
            return row
    return None


def _all_zero(test: dict[str, Any]) -> bool:
    """A bootstrap whose difference and interval all round to 0.000 (nothing to compare, not
    a figure: e.g. two decoders that both score 0 on every image)."""
    return max(abs(test["difference"]), abs(test["low"]), abs(test["high"])) < 5e-4


def _cider_ratio(decoders: dict[str, Any], name: str, baseline: str) -> str:
    """`` (0.877x)``: the row's test CIDEr over the baseline's, or nothing without both; three
    decimals, so that a ratio just under a target (0.9189) never reads as reaching it (0.92)."""
    values = [((decoders.get(n) or {}).get("test", {}).get("default", {}).get("scores") or {})
              .get("CIDEr") for n in (name, baseline)]
    if None in values or not values[1]:
        return ""
    return f" ({values[0] / values[1]:.3f}x)"


def _headline(metrics: dict[str, Any]) -> list[str]:
    """One line per decoder vs the first: CIDEr gap with its bootstrap interval, and speed."""
    names = list(metrics["decoders"])
    if len(names) < 2:
        return []
    lines = []
    for key, tests in metrics.get("significance", {}).items():
        name, baseline = tests.get("row", key), tests.get("baseline", names[0])
        cider = tests.get("CIDEr")
        if not cider:
            continue
        if _all_zero(cider):
            text = (f"**{name}** vs **{baseline}**: CIDEr: no difference to test (every "
                    f"per-image difference is 0 over {cider['images']} images)")
        else:
            verdict = "significant" if cider["significant"] else "not significant"
            sign = "better" if cider["difference"] > 0 else "worse"
            ratio = _cider_ratio(metrics["decoders"], name, baseline)
            text = (f"**{name}** vs **{baseline}**: CIDEr {cider['difference']:+.3f}{ratio} "
                    f"(95% paired-bootstrap CI [{cider['low']:+.3f}, {cider['high']:+.3f}], "
                    f"{cider['images']} images): {sign}, {verdict}")
        bleu = tests.get("Bleu_4")
        if bleu and not _all_zero(bleu):
            text += (f"; per-image BLEU-4 {bleu['difference']:+.3f} "
                     f"[{bleu['low']:+.3f}, {bleu['high']:+.3f}]")
        mine, theirs = _speed_at(metrics, name, 1), _speed_at(metrics, baseline, 1)
        if mine and theirs:
            text += (f"; batch-1 latency {mine['ms_per_caption']:.1f} ms vs "
                     f"{theirs['ms_per_caption']:.1f} ms ({mine['ms_per_caption'] / theirs['ms_per_caption']:.2f}x)")
        lines.append(f"- {text}.")
    return lines


def _train_time(summary: dict[str, Any]) -> str:
    """A decoder's training time; a distilled one's teacher's added, and an SCST row's first
    phase (each row pays for what it was built on)."""
    own = f"{summary['train_seconds']:.0f} s"
    teacher, scst = summary.get("teacher"), summary.get("scst")
    if scst:
        total = summary["train_seconds"] + scst["first_phase_seconds"] + scst["teacher_seconds"]
        first = f"{scst['from']} {scst['first_phase_seconds']:.0f} s"
        if scst["teacher_seconds"]:
            first += f" incl. teacher {scst['teacher_seconds']:.0f} s"
        return f"{total:.0f} s ({first} + SCST {own})"
    if not teacher:
        return own
    total = summary["train_seconds"] + teacher["train_seconds"]
    return f"{total:.0f} s ({own} + {teacher['name']} teacher {teacher['train_seconds']:.0f} s)"


def _budget_line(decoders: dict[str, Any]) -> str | None:
    """The training budgets side by side: each decoder's step (or epoch) and wall-clock limits,
    and which one stopped it, so that unequal training is visible in the report itself."""
    parts = []
    for name, summary in decoders.items():
        train = summary.get("train") or {}
        train = train.get("scst") or train  # an SCST row: its own phase's budget
        if not train:
            continue
        minutes = train.get("max_minutes")
        limit = (f"{train['epochs']} epoch(s)" if train.get("epochs") else
                 f"{train.get('max_steps')} steps" if train.get("max_steps") else "no step limit")
        clock = f"{minutes * 60:.0f} s" if minutes else "no time limit"
        by_clock = bool(minutes) and summary["train_seconds"] >= minutes * 60 - 1
        used = f"stopped by the {'clock' if by_clock else 'step budget'} at " \
               f"{summary['train_steps']} steps, {summary['train_seconds']:.0f} s"
        parts.append(f"{name} {limit} / {clock} ({used})")
    return ("- training budgets (steps / wall clock): " + "; ".join(parts)) if parts else None


def render_markdown(config: dict[str, Any], metrics: dict[str, Any]) -> str:
    """The side-by-side markdown report of a run."""
    decoders = metrics["decoders"]
    lines = [
        "# Captioning decoders, side by side", "",
        f"Command: `{config['command']}`", "",
        f"Data: `{json.dumps(config['dataset'])}`, test split of {metrics['test_images']} images; "
        f"encoder `{metrics['encoder'].get('model')}` (fingerprint "
        f"`{metrics['encoder']['fingerprint']}`); the same cached features, split and "
        "pycocoevalcap metric code for every decoder.", "",
    ]
    lines += _headline(metrics) + [""]
    lines += [
        "| decoder | " + " | ".join(REPORT_METRICS) + " | CLIP-S | RefCLIP-S | steps | "
        "ms/caption (batch 1) | captions/s (batch 64) | params (trainable) | train steps | train time |",
        "|---" * (len(REPORT_METRICS) + 9) + "|",
    ]
    skipped: dict[str, str] = {}
    for name, summary in decoders.items():
        run = summary["test"]["default"]
        skipped.update(run["skipped"])
        scores = [_format(run["scores"].get(m, "skipped" if m in run["skipped"] else None))
                  for m in REPORT_METRICS]
        clip = summary.get("clip_scores", {})
        params = summary["parameters"]
        one, many = _speed_at(metrics, name, 1, run["options"]), _speed_at(metrics, name, 64, run["options"])
        lines.append(
            f"| {name} | " + " | ".join(scores) + f" | {_format(clip.get('CLIPScore'))} | "
            f"{_format(clip.get('RefCLIPScore'))} | {run['options'].get('steps', '-')} | "
            f"{_format(one['ms_per_caption']) if one else '-'} | "
            f"{_format(many['captions_per_second']) if many else '-'} | "
            f"{params['total'] / 1e6:.2f}M ({params['trainable'] / 1e6:.2f}M) | "
            f"{summary['train_steps']} | {_train_time(summary)} |")
    lines.append("")
    budgets = _budget_line(decoders)
    if budgets:
        lines.append(budgets)
    for metric, reason in sorted(skipped.items()):
        lines.append(f"- {metric} skipped: {reason}")
    paper = {n: s["paper_bleu"] for n, s in decoders.items() if "paper_bleu" in s}
    if paper:
        lines.append("- BLEU-4 by the original CLIP-DiffusionLM code's protocol (torchmetrics over "
                     "DistilBERT word pieces, [CLS]/[SEP] kept, batches of 8; not comparable with "
                     "Bleu_4 above, comparable with the paper's 0.1876): "
                     + ", ".join(f"{n} {v:.4f}" for n, v in paper.items()))
    skipped_images = {k: v for k, v in metrics.get("skipped_images", {}).items() if v}
    if skipped_images:
        lines.append(f"- unreadable images skipped (named in the log): {skipped_images}")
    lines.append("")
    lines += _group_table(decoders, metrics.get("test_images", "-"))

    stats = {n: s["caption_stats"] for n, s in decoders.items() if "caption_stats" in s}
    if stats:
        lines += ["## Caption statistics", "",
                  "| decoder | repeated-word captions | repeated-phrase captions | repeated tokens "
                  "| mean length | vocabulary | empty | copied from train |",
                  "|---|---|---|---|---|---|---|---|"]
        for name, s in stats.items():
            phrase = s.get("repeated_phrase_rate")  # absent from summaries written before it
            lines.append(f"| {name} | {s['repeated_word_rate']:.1%} | "
                         f"{'-' if phrase is None else f'{phrase:.1%}'} | "
                         f"{s['repeated_token_rate']:.1%} | "
                         f"{s['mean_length']:.2f} | {s['vocabulary']} | {s['empty_rate']:.1%} | "
                         f"{s['copied_from_train']:.1%} |")
        lines.append("")

    curves = step_curves(decoders, "CIDEr")
    if curves:
        lines += ["## Quality vs inference steps", "",
                  "| decoder | K | CIDEr | Bleu_4 | ms/caption (batch 1) | captions/s (batch 64) |",
                  "|---|---|---|---|---|---|"]
        for name in curves:
            for run in sorted(decoders[name]["test"].values(), key=lambda r: r["options"]["steps"]):
                one = _speed_at(metrics, name, 1, run["options"])
                many = _speed_at(metrics, name, 64, run["options"])
                lines.append(
                    f"| {name} | {run['options']['steps']} | {_format(run['scores']['CIDEr'])} | "
                    f"{_format(run['scores'].get('Bleu_4'))} | "
                    f"{_format(one['ms_per_caption']) if one else '-'} | "
                    f"{_format(many['captions_per_second']) if many else '-'} |")
        lines += [""]

    lines += _diversity_table(decoders, metrics.get("diversity") or {})
    lines += _rerank_table(decoders, metrics.get("test_images") or 1)

    speed = metrics.get("speed")
    if metrics.get("speed_off"):
        lines += ["## Speed", "", "Not measured: the preset switches the speed phase off "
                  "(`\"speed\": false`); `dcap bench --run` times the run's decoders.", ""]
    if speed:
        lines += ["## Speed", "",
                  f"Medians of {speed['repeats']} timed runs after warm-up, all decoders in one "
                  f"process on `{speed['device']}` with {speed['threads']} thread(s), the same "
                  "test features"
                  + (_small_batch_images(speed) if speed.get("images") else ".")]
        first = list(speed.get("decoders", decoders))[0]
        for name, batch in speed.get("crossover", {}).items():
            contrast = speed.get("contrast", {}).get(name)
            if contrast:
                lines.append(f"- {describe_contrast(first, name, contrast)}")
            else:  # speed.json from before contrasts were recorded
                lines.append(f"- throughput of {name} vs {first}: "
                             + (f"the faster one changes at batch {batch}." if batch else
                                "the faster one is the same at every batch size measured."))
        lines += [f"- {line}" for line in describe_step_costs(speed.get("decoders", {}))]
        if speed.get("cut_by_budget"):
            lines.append("- the speed phase's time budget (`max_seconds`) cut the rows of "
                         + ", ".join(speed["cut_by_budget"]) + ": see speed.json for those timed")
        lines.append("")

    plots = [(title, name) for title, name in (
        ("quality vs steps", "quality_vs_steps.png"), ("latency vs batch size", "latency_vs_batch.png"),
        ("training curves", "training_curves.png"), ("self-critical training", "scst_curves.png"),
        ("quality vs diversity", "quality_vs_diversity.png")) if name in metrics.get("plots", [])]
    if plots:
        lines += ["## Plots", ""] + [f"![{title}]({name})" for title, name in plots] + [""]

    if metrics.get("examples"):
        lines += ["## Examples", ""]
        for example in metrics["examples"]:
            lines.append(f"![image {example['image_id']}]({example['image']})  ")
            lines.append(f"image {example['image_id']}; references: "
                         + "; ".join(f"_{r}_" for r in example["references"][:3]))
            lines += ["", "| decoder | caption |", "|---|---|"]
            lines += [f"| {n} | {c} |" for n, c in example["captions"].items()]
            for name, trajectory in example["trajectories"].items():
                lines += ["", f"{name}, caption after each of its {len(trajectory)} steps:", ""]
                lines += [f"{k}. {caption}" for k, caption in enumerate(trajectory, 1)]
            lines.append("")
    lines.append("Per decoder: `<decoder>/results_test*.json` (COCO result format), "
                 "`<decoder>/metrics.json` (with per-image scores), `<decoder>/clipscore.json`, "
                 "`<decoder>/train_log.jsonl`, `<decoder>/checkpoint/`; `speed.json`.")
    return "\n".join(lines) + "\n"


def _rerank_table(decoders: dict[str, Any], images: int) -> list[str]:
    """``<decoder>+rerank`` rows: the default caption and the diversity samples reranked by
    CLIPScore, each beside the decoder's own default, with what it spent."""
    rows = {n: s["rerank"] for n, s in decoders.items() if s.get("rerank")}
    if not rows:
        return []
    lines = ["## Reranked by CLIPScore (their own rows, not the headline)", "",
             "Each image's default caption and its diversity samples, reranked by the run's CLIP "
             "encoder (`eval/rerank.py`). The cost is the samples' plus one CLIP text pass.", "",
             "| row | candidates | CIDEr | Bleu_4 | the decoder's own CIDEr | default kept | "
             "extra ms/image |", "|---|---|---|---|---|---|---|"]
    for name, rerank in rows.items():
        own = decoders[name]["test"]["default"]["scores"].get("CIDEr")
        extra = (rerank.get("sample_seconds") or 0) + rerank["rerank_seconds"]
        lines.append(f"| {name}+rerank | {rerank['candidates']} | "
                     f"{_format(rerank['scores'].get('CIDEr'))} | "
                     f"{_format(rerank['scores'].get('Bleu_4'))} | {_format(own)} | "
                     f"{rerank['kept_default']:.0%} | {1000 * extra / images:.2f} |")
    return [*lines, ""]


def _diversity_table(decoders: dict[str, Any], phase: dict[str, Any]) -> list[str]:
    """The diversity phase: per decoder and step count the diversity of its n samples per test
    image and their CIDEr, beside its default ``generate`` CIDEr; a line for each decoder that
    cannot sample. Nothing for a run made before the phase existed."""
    if phase.get("off"):
        return ["## Diversity", "", "Not measured: the preset switches the diversity phase off "
                "(`\"diversity\": false`).", ""]
    sampled = {n: s["diversity"] for n, s in decoders.items() if s.get("diversity")}
    if not sampled:
        return []
    n = phase.get("samples", next((d["samples"] for d in sampled.values() if "samples" in d), "n"))
    lines = ["## Diversity", "",
             f"{n} samples per test image (seed {phase.get('seed', '-')}), drawn by each "
             "decoder's `generate_samples` at its default sampling options "
             "(`sample_temperature` 1, no top-k / top-p cut). Distinct-n and Self-CIDEr: higher "
             "is more diverse; mBLEU-4: lower is more diverse. CIDEr of the samples against the "
             f"references: their mean, and the oracle (the best of the {n} per image), beside "
             "the decoder's default `generate` CIDEr (`eval/diversity.py`; "
             "`<decoder>/samples_test.json`)."
             + (f" The phase took {phase['seconds']:.0f} s." if "seconds" in phase else ""), "",
             "| decoder | K | distinct-1 | distinct-2 | mBLEU-4 | Self-CIDEr | CIDEr (samples) | "
             f"oracle CIDEr@{n} | CIDEr (generate) |", "|---" * 9 + "|"]
    header = len(lines)
    skipped = []
    for name, record in sampled.items():
        if "skipped" in record:
            skipped.append(f"- {name}: not sampled: {record['skipped']}.")
            continue
        runs = sorted(record.get("runs", {}).items(), key=lambda item: item[1].get("steps") or 0)
        for key, run in runs:
            scores = run["scores"]
            steps = run.get("steps")
            label = "-" if steps is None else (f"{steps} (default)" if key == "default"
                                               and len(runs) > 1 else str(steps))
            greedy = decoders[name]["test"].get(key, {}).get("scores", {}).get("CIDEr")
            lines.append(
                f"| {name} | {label} | " + " | ".join(_format(scores.get(m)) for m in (
                    "distinct_1", "distinct_2", "mBLEU_4", "self_CIDEr", "CIDEr_mean",
                    "CIDEr_oracle")) + f" | {_format(greedy)} |")
    if len(lines) == header:  # no decoder could sample: no empty table
        lines = lines[:header - 2]
    return lines + [""] + skipped + ([""] if skipped else [])


def _group_table(decoders: dict[str, Any], images: Any) -> list[str]:
    """Metrics per group of test images (nocaps domain, shapes object count), each group scored
    alone, under the overall rows; nothing when the dataset gives no groups."""
    grouped = {n: s["test_groups"] for n, s in decoders.items() if s.get("test_groups")}
    if not grouped:
        return []
    lines = ["## Metrics per group", "",
             "Each group's images scored alone by the same pycocoevalcap code (CIDEr's idf over "
             "the group's references); `<decoder>/metrics_by_group.json`.", "",
             "| group | images | decoder | " + " | ".join(REPORT_METRICS) + " |",
             "|---" * (len(REPORT_METRICS) + 3) + "|"]
    for name, summary in decoders.items():
        run = summary["test"]["default"]
        lines.append(f"| all | {images} | {name} | " + " | ".join(
            _format(run["scores"].get(m, "skipped" if m in run["skipped"] else None))
            for m in REPORT_METRICS) + " |")
    groups = list(dict.fromkeys(g for by_group in grouped.values() for g in by_group))
    for group in groups:
        for name, by_group in grouped.items():
            if group in by_group:
                entry = by_group[group]
                skipped = entry.get("skipped", {})
                lines.append(f"| {group} | {entry['num_images']} | {name} | " + " | ".join(
                    _format(entry["scores"].get(m, "skipped" if m in skipped else None))
                    for m in REPORT_METRICS) + " |")
    return lines + [""]


def _small_batch_images(speed: dict) -> str:
    """How small batches were timed: over ``images`` test images (fewer distinct ones when the
    test split is smaller, the features wrapping round)."""
    images = speed["images"]
    distinct = speed.get("distinct_images", images)
    if distinct >= images:
        return (f"; batches smaller than {images} are timed over {images} different images, so "
                "no single caption's length sets the latency.")
    return (f"; batches smaller than {images} are timed over {images} images, of which only "
            f"{distinct} are different (the test split is that small).")


def _inline_images(body: str, run: Path) -> str:
    """Replace ``<img src="file.png">`` of files in the run folder by base64 data URIs."""

    def replace(match: re.Match) -> str:
        path = run / html.unescape(match.group(1))
        if not path.is_file():
            return match.group(0)
        data = base64.b64encode(path.read_bytes()).decode()
        return f'<img src="data:image/png;base64,{data}" alt="{match.group(2)}">'

    return re.sub(r'<img src="([^"]*)" alt="([^"]*)">', replace, body)


def render_html(markdown_text: str, run: Path) -> str:
    """``report.md`` as a standalone HTML page with every image inlined (base64)."""
    out, table = [], []

    def flush_table() -> None:
        if not table:
            return
        rows = [r.strip().strip("|").split("|") for r in table if not set(r.strip()) <= set("|-")]
        out.append("<table>")
        for i, cells in enumerate(rows):
            tag = "th" if i == 0 else "td"
            out.append("<tr>" + "".join(f"<{tag}>{_inline(c.strip())}</{tag}>" for c in cells) + "</tr>")
        out.append("</table>")
        table.clear()

    for line in markdown_text.splitlines():
        if line.startswith("|"):
            table.append(line)
            continue
        flush_table()
        if line.startswith("# "):
            out.append(f"<h1>{html.escape(line[2:])}</h1>")
        elif line.startswith("## "):
            out.append(f"<h2>{html.escape(line[3:])}</h2>")
        elif line.startswith("- "):
            out.append(f"<p>&bull; {_inline(line[2:])}</p>")
        elif line.strip():
            out.append(f"<p>{_inline(line.rstrip())}</p>")
    flush_table()
    body = _inline_images("\n".join(out), run)
    style = ("body{font-family:sans-serif;max-width:1200px;margin:2em auto;line-height:1.4}"
             "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;"
             "padding:4px 8px;text-align:left}img{max-width:100%;image-rendering:pixelated}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>comparison report</title>"
            f"<style>{style}</style></head><body>{body}</body></html>\n")


def _inline(text: str) -> str:
    """The little markdown the report uses: images, bold, italics, code."""
    text = html.escape(text)
    text = re.sub(r"!\[([^\]]*)\]\(([^)]*)\)", r'<img src="\2" alt="\1">', text)
    text = re.sub(r"\*\*([^*]+)\*\*", r"<b>\1</b>", text)
    text = re.sub(r"`([^`]+)`", r"<code>\1</code>", text)
    text = re.sub(r"(?<![\w])_([^_]+)_(?![\w])", r"<i>\1</i>", text)
    return text
