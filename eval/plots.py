"""Plots of a comparison run (matplotlib, PNG)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _plain_numbers(axis) -> None:
    """Log-scaled axes with plain tick labels (2, 5, 10) instead of 2 x 10^0. Minor ticks are
    labelled only on an axis spanning less than a decade (else their labels overlap); call it
    after plotting, when the limits are known."""
    import math

    from matplotlib.ticker import FuncFormatter, NullFormatter

    plain = FuncFormatter(lambda value, _: f"{value:g}")
    for which, limits in ((axis.xaxis, axis.get_xlim()), (axis.yaxis, axis.get_ylim())):
        which.set_major_formatter(plain)
        low, high = sorted(limits)
        narrow = low > 0 and math.log10(high / low) < 1
        which.set_minor_formatter(plain if narrow else NullFormatter())


def step_curves(decoders: dict[str, Any], metric: str) -> dict[str, list[tuple[int, float]]]:
    """``{decoder: [(steps, score), ...]}`` for every decoder evaluated at several step counts."""
    curves: dict[str, list[tuple[int, float]]] = {}
    for name, summary in decoders.items():
        points = sorted((int(run["options"]["steps"]), float(run["scores"][metric]))
                        for run in summary["test"].values()
                        if "steps" in run["options"] and metric in run["scores"])
        if len(points) > 1:
            curves[name] = points
    return curves


def plot_quality_vs_steps(decoders: dict[str, Any], out: str | Path, metric: str = "CIDEr") -> Path | None:
    """Quality vs inference steps for the iterative decoders; one-shot decoders as flat lines."""
    curves = step_curves(decoders, metric)
    if not curves:
        return None
    figure, axis = plt.subplots(figsize=(6, 4))
    for name, points in curves.items():
        axis.plot([k for k, _ in points], [v for _, v in points], marker="o", label=name)
    for name, summary in decoders.items():
        if name not in curves and metric in summary["test"]["default"]["scores"]:
            axis.axhline(summary["test"]["default"]["scores"][metric], linestyle="--",
                         color="gray", label=f"{name} (autoregressive)")
    axis.set_xscale("log")
    axis.set_xlabel("inference steps K")
    axis.set_ylabel(metric)
    axis.set_title(f"{metric} on the test split vs inference steps")
    return _save(figure, axis, out, legend_size=None)


def plot_latency_vs_batch(speed: dict[str, Any], out: str | Path) -> Path | None:
    """Milliseconds per caption vs batch size, one line per decoder and step count (log-log)."""
    if not speed.get("decoders"):
        return None
    figure, axis = plt.subplots(figsize=(6, 4))
    for name, rows in speed["decoders"].items():
        groups: dict[str, list[tuple[int, float]]] = {}
        for row in rows:
            steps = row["options"].get("steps")
            label = name if steps is None else f"{name} K={steps}"
            groups.setdefault(label, []).append((row["batch"], row["ms_per_caption"]))
        for label, points in groups.items():
            points.sort()
            axis.plot([b for b, _ in points], [ms for _, ms in points], marker="o", label=label)
    axis.set_xscale("log", base=2)
    axis.set_yscale("log")
    _plain_numbers(axis)
    axis.set_xlabel("batch size")
    axis.set_ylabel("ms per caption (median)")
    axis.set_title(f"Latency vs batch size ({speed['device']}, {speed['threads']} thread(s))")
    return _save(figure, axis, out, grid_which="both")


def plot_training_curves(logs: dict[str, list[dict[str, Any]]], out: str | Path) -> Path | None:
    """Training loss (solid) and validation loss (dashed) vs step for every decoder's jsonl log
    (an SCST phase's is :func:`plot_scst_curves`')."""
    if not any(logs.values()):
        return None
    figure, axis = plt.subplots(figsize=(6, 4))
    positive = False  # a log axis needs a positive loss (nearest's is always 0)
    logs = {name: rows for name, rows in logs.items()
            if not is_self_critical(rows)}  # SCST's loss is an advantage: plot_scst_curves
    if not any(logs.values()):
        plt.close(figure)
        return None
    for index, (name, rows) in enumerate(logs.items()):
        color = f"C{index}"
        train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
        val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
        positive = positive or any(value > 0 for _, value in train + val)
        if train:  # a marker too, so a run with one logged step still shows
            axis.plot(*zip(*train, strict=True), color=color, label=f"{name} train",
                      marker="." if len(train) < 20 else None)
        if val:
            axis.plot(*zip(*val, strict=True), color=color, linestyle="--", marker=".",
                      label=f"{name} val")
    if positive:
        axis.set_yscale("log")
        _plain_numbers(axis)
    axis.set_xlabel("optimizer step")
    axis.set_ylabel("loss (each decoder's own)")
    axis.set_title("Training curves")
    return _save(figure, axis, out)


def is_self_critical(rows: list[dict[str, Any]]) -> bool:
    """Whether a training log is an SCST phase's (its steps log a ``reward``)."""
    return any("reward" in row for row in rows)


def plot_scst_curves(logs: dict[str, list[dict[str, Any]]], out: str | Path) -> Path | None:
    """Every SCST phase's CIDEr-D vs step: the greedy captions of the training batches
    (solid, or the samples' mean with the mean baseline), and of the validation images (dashed,
    minus its ``val_loss``, from step 0: the first phase's weights)."""
    phases = {name: rows for name, rows in logs.items() if is_self_critical(rows)}
    if not phases:
        return None
    figure, axis = plt.subplots(figsize=(6, 4))
    for index, (name, rows) in enumerate(phases.items()):
        color = f"C{index}"
        key = "greedy_reward" if any("greedy_reward" in r for r in rows) else "reward"
        train = [(r["step"], r[key]) for r in rows if key in r]
        val = [(r["step"], -r["val_loss"]) for r in rows if "val_loss" in r]
        if train:
            what = "greedy" if key == "greedy_reward" else "samples"
            axis.plot(*zip(*train, strict=True), color=color, alpha=0.6,
                      label=f"{name} train ({what})", marker="." if len(train) < 20 else None)
        if val:
            axis.plot(*zip(*val, strict=True), color=color, linestyle="--", marker=".",
                      label=f"{name} val (greedy)")
    axis.set_xlabel("SCST step")
    axis.set_ylabel("CIDEr-D (training idf)")
    axis.set_title("Self-critical training")
    return _save(figure, axis, out)


def diversity_points(decoders: dict[str, Any], diversity: str = "self_CIDEr",
                     quality: str = "CIDEr_mean") -> dict[str, list[tuple[int | None, float, float]]]:
    """``{decoder: [(steps or None, diversity, quality), ...]}`` from each summary's diversity
    phase (``runs``: the default options and every step count it sampled), by step count."""
    points: dict[str, list[tuple[int | None, float, float]]] = {}
    for name, summary in decoders.items():
        runs = (summary.get("diversity") or {}).get("runs") or {}
        rows = [(run.get("steps"), float(run["scores"][diversity]),
                 float(run["scores"][quality])) for run in runs.values()
                if diversity in run["scores"] and quality in run["scores"]]
        if rows:
            points[name] = sorted(rows, key=lambda row: -1 if row[0] is None else row[0])
    return points


def plot_quality_vs_diversity(decoders: dict[str, Any], out: str | Path,
                              diversity: str = "self_CIDEr",
                              quality: str = "CIDEr_mean") -> Path | None:
    """Quality (mean CIDEr of the samples) vs diversity (Self-CIDEr) of the sampled captions:
    one point per decoder and step count, a decoder's step counts joined and labelled K."""
    points = diversity_points(decoders, diversity, quality)
    if not points:
        return None
    figure, axis = plt.subplots(figsize=(6, 4))
    for name, rows in points.items():
        line = axis.plot([d for _, d, _ in rows], [q for _, _, q in rows], marker="o",
                         label=name)[0]
        for steps, x, y in rows:
            if steps is not None and len(rows) > 1:
                axis.annotate(f"K={steps}", (x, y), textcoords="offset points", xytext=(4, 4),
                              fontsize=7, color=line.get_color())
    axis.set_xlabel(f"{diversity} of the samples (higher: more diverse)")
    axis.set_ylabel(f"{quality.replace('_', ' ')} of the samples")
    axis.set_title("Quality vs diversity of sampled captions")
    return _save(figure, axis, out)


def _save(figure: Any, axis: Any, out: str | Path, legend_size: int | None = 7,
          grid_which: str = "major") -> Path:
    """Grid, legend, tight layout; write ``out`` (PNG, 120 dpi) and close the figure."""
    axis.grid(alpha=0.3, which=grid_which)
    axis.legend(**({"fontsize": legend_size} if legend_size else {}))
    figure.tight_layout()
    out = Path(out)
    figure.savefig(out, dpi=120)
    plt.close(figure)
    return out
