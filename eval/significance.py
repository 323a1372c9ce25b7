"""Paired bootstrap confidence intervals for the difference between two systems.

With per-image scores a_i (system A) and b_i (system B) on the same N images, the statistic is
the mean difference d = mean_i (b_i - a_i). The bootstrap draws R resamples of image indices with
replacement, I_r ~ U{1..N}^N, and computes d_r = mean_{i in I_r} (b_i - a_i); the (1 - alpha)
interval is the [alpha/2, 1 - alpha/2] percentiles of {d_r}. The gap is called significant when
the interval excludes 0 (Koehn 2004, "Statistical significance tests for machine translation
evaluation"). Per-image CIDEr averages exactly to corpus CIDEr; per-image BLEU-4 is sentence BLEU.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class BootstrapResult:
    """``difference`` = mean(b - a) with its ``low``..``high`` percentile interval."""

    difference: float
    low: float
    high: float
    confidence: float
    resamples: int
    images: int

    @property
    def significant(self) -> bool:
        return self.low > 0 or self.high < 0

    def to_dict(self) -> dict[str, float | int | bool]:
        return {**asdict(self), "significant": self.significant}


def paired_bootstrap(
    a: np.ndarray, b: np.ndarray, resamples: int = 2000, confidence: float = 0.95, seed: int = 0
) -> BootstrapResult:
    """Percentile interval of mean(b - a) over ``resamples`` paired resamples of the images."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1 or len(a) == 0:
        raise ValueError(f"paired scores must be two equal-length vectors, got {a.shape} and {b.shape}")
    diff = b - a  # (N,)
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    for start in range(0, resamples, 256):  # bounded memory: (chunk, N) indices at a time
        count = min(256, resamples - start)
        index = rng.integers(0, len(diff), size=(count, len(diff)))  # (chunk, N)
        means[start:start + count] = diff[index].mean(axis=1)
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return BootstrapResult(float(diff.mean()), float(low), float(high), confidence, resamples,
                           len(diff))


def paired_scores(first: Mapping[int, float], second: Mapping[int, float]) -> tuple[np.ndarray, np.ndarray]:
    """Align two ``{image_id: score}`` maps on their shared image ids (sorted)."""
    shared = sorted(set(first) & set(second))
    if not shared:
        raise ValueError("the two systems share no scored image")
    return (np.array([first[i] for i in shared]), np.array([second[i] for i in shared]))
