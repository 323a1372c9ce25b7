"""Plots of a comparison run (matplotlib, PNG)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


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
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    out = Path(out)
    figure.savefig(out, dpi=120)
    plt.close(figure)
    return out
