"""Inference speed measured side by side in one process: warm-up, then medians.

Latency per caption at batch 1 and throughput at batch 64 (and a latency-vs-batch curve) for each
decoder at each step count it supports. All decoders see the same features, device and threads;
small batches are timed over several different images (an autoregressive decoder's latency
depends on the length of the caption it writes).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from registry import CaptionDecoder


def median_seconds(call: Callable[[], object], repeats: int = 5, warmup: int = 2) -> float:
    """Median wall time of ``call()`` over ``repeats`` runs after ``warmup`` untimed runs."""
    for _ in range(warmup):
        call()
    timings = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        started = time.perf_counter()
        call()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        timings.append(time.perf_counter() - started)
    return statistics.median(timings)


def compile_step_modules(decoder: CaptionDecoder, backend: str = "inductor") -> int:
    """``torch.compile`` (in place, :meth:`torch.nn.Module.compile`: weights and state-dict keys
    unchanged) every network ``decoder.step_modules()`` names; returns how many. Compilation
    itself happens at the first call of each new input shape, i.e. in a benchmark's warm-up."""
    modules = decoder.step_modules()
    for module in modules:
        module.compile(backend=backend)
    return len(modules)


def check_image_count(images: int) -> None:
    """Fail in one line unless at least one image is to be timed per small batch."""
    if int(images) < 1:
        raise ValueError(f"benchmark: --images must be >= 1, got {images}")


@torch.no_grad()
def benchmark_decoder(
    decoder: CaptionDecoder,
    features: torch.Tensor,
    options: Sequence[dict[str, Any]],
    batch_sizes: Sequence[int] = (1, 4, 16, 64),
    repeats: int = 5,
    warmup: int = 2,
    images: int = 16,
    deadline: float | None = None,
) -> list[dict[str, Any]]:
    """For each generate-options dict and batch size b: caption the first n = b * ceil(images / b)
    rows of ``features`` (N, D) in n / b calls of b, and report the median over ``repeats`` of
    that pass as seconds per call, ms per caption and captions per second.

    Several images even at batch 1, because an autoregressive decoder's latency grows with the
    caption it writes: one image's caption length would decide the latency ratio. ``features``
    must hold at least max over b of b * ceil(images / b) rows. ``deadline`` (a
    ``time.perf_counter()`` value): once passed, no further row is timed (the first always is)."""
    check_image_count(images)
    decoder.eval()
    rows = []
    for opts in options:
        for batch in batch_sizes:
            if rows and deadline is not None and time.perf_counter() > deadline:
                return rows
            calls = -(-images // batch)
            chunks = [features[i * batch:(i + 1) * batch].to(decoder.device)  # (b, D)
                      for i in range(calls)]
            if any(len(chunk) < batch for chunk in chunks):
                raise ValueError(f"benchmark: {len(features)} feature rows, {calls * batch} "
                                 f"needed for batch {batch}")

            def one_pass(chunks=chunks, opts=opts) -> None:
                for chunk in chunks:
                    decoder.generate(chunk, **opts)

            seconds = median_seconds(one_pass, repeats, warmup) / calls
            rows.append({"options": dict(opts), "batch": batch, "images": calls * batch,
                         "seconds": seconds, "ms_per_caption": 1000 * seconds / batch,
                         "captions_per_second": batch / seconds})
    return rows


def step_cost(rows: list[dict[str, Any]], batch: int = 1) -> dict[str, Any] | None:
    """What one more step costs an iterative decoder at ``batch``: the least-squares line
    ``ms(K) = fixed + per_step * K`` through its rows with a ``steps`` option (other options
    equal to those of the first such row). Returns ``{"per_step_ms", "fixed_ms", "steps"}``, or
    None with fewer than two step counts. ``batch`` is returned with them."""
    def other_options(row: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in row["options"].items() if k != "steps"}

    stepped = [r for r in rows if r["batch"] == batch and "steps" in r["options"]]
    if not stepped:
        return None
    points = sorted((int(r["options"]["steps"]), r["ms_per_caption"]) for r in stepped
                    if other_options(r) == other_options(stepped[0]))
    if len({k for k, _ in points}) < 2:
        return None
    per_step, fixed = statistics.linear_regression([float(k) for k, _ in points],
                                                   [ms for _, ms in points])
    return {"per_step_ms": per_step, "fixed_ms": fixed, "steps": [k for k, _ in points],
            "batch": batch}


def describe_step_costs(decoders: dict[str, list[dict[str, Any]]]) -> list[str]:
    """One line per iterative decoder (``{name: rows}``) from :func:`step_cost`."""
    lines = []
    for name, rows in decoders.items():
        cost = step_cost(rows)
        if not cost:
            continue
        through = f"(least-squares line through K = {', '.join(map(str, cost['steps']))})"
        if cost["per_step_ms"] <= 0:
            lines.append(f"{name}: no per-step cost resolved at batch {cost['batch']}: the fit "
                         f"gives {cost['per_step_ms']:.2f} ms per step {through}, i.e. timing "
                         "noise; rerun with more repeats.")
        elif cost["fixed_ms"] < 0:
            lines.append(f"{name}: each step costs {cost['per_step_ms']:.2f} ms at batch "
                         f"{cost['batch']}; the fixed cost per caption is below the timing "
                         f"noise (the fit gives {cost['fixed_ms']:.2f} ms) {through}.")
        else:
            lines.append(f"{name}: each step costs {cost['per_step_ms']:.2f} ms at batch "
                         f"{cost['batch']}, on top of {cost['fixed_ms']:.2f} ms per caption "
                         f"{through}.")
    return lines


def crossover_batch(first: list[dict[str, Any]], second: list[dict[str, Any]]) -> int | None:
    """The smallest batch size from which ``second``'s throughput no longer exceeds ``first``'s
    (or the reverse), i.e. where the faster decoder changes; ``None`` if it never changes."""
    a = {r["batch"]: r["captions_per_second"] for r in first}
    b = {r["batch"]: r["captions_per_second"] for r in second}
    shared = sorted(set(a) & set(b))
    if not shared:
        return None
    leader = a[shared[0]] >= b[shared[0]]
    for batch in shared[1:]:
        if (a[batch] >= b[batch]) != leader:
            return batch
    return None


def speed_contrast(first: list[dict[str, Any]], second: list[dict[str, Any]]) -> dict[str, Any]:
    """``second`` against ``first`` (rows of one options setting each): the latency ratio
    ``ms(second) / ms(first)`` at the smallest shared batch, the throughput ratio
    ``captions/s(second) / captions/s(first)`` at the largest, :func:`crossover_batch`, and the
    batch sizes at which ``second`` has the higher throughput. Empty when they share no batch
    size."""
    a = {r["batch"]: r for r in first}
    b = {r["batch"]: r for r in second}
    shared = sorted(set(a) & set(b))
    if not shared:
        return {}
    small, large = shared[0], shared[-1]
    return {
        "small_batch": small, "large_batch": large,
        "latency_ratio": b[small]["ms_per_caption"] / a[small]["ms_per_caption"],
        "throughput_ratio": b[large]["captions_per_second"] / a[large]["captions_per_second"],
        "crossover": crossover_batch(first, second),
        "second_faster_at": [n for n in shared
                             if b[n]["captions_per_second"] > a[n]["captions_per_second"]],
        "batches": shared,
    }


def describe_contrast(first: str, second: str, contrast: dict[str, Any]) -> str:
    """One line for a report: the latency ratio at batch 1, the throughput ratio at the largest
    batch, and at which batch sizes each decoder is the faster."""
    if not contrast:
        return f"{second} vs {first}: no shared batch size"
    ratio = contrast["latency_ratio"]
    at_small = (f"at batch {contrast['small_batch']} {second} takes {ratio:.2f}x the latency of "
                f"{first}")
    throughput = contrast["throughput_ratio"]
    at_large = (f"at batch {contrast['large_batch']} it has {throughput:.2f}x {first}'s "
                "throughput")
    faster = contrast.get("second_faster_at")
    if faster is None:  # a contrast recorded before the per-batch list
        flips = contrast["crossover"]
        change = (f"the faster one changes at batch {flips}" if flips else
                  f"{first if ratio > 1 else second} is faster at every batch size measured")
    elif not faster or len(faster) == len(contrast["batches"]):
        change = f"{second if faster else first} is faster at every batch size measured"
    else:
        slower = [n for n in contrast["batches"] if n not in faster]
        change = (f"{second} is faster at batch {_and(faster)}, {first} at batch "
                  f"{_and(slower)}")
    return f"{second} vs {first}: {at_small}; {at_large}; {change}."


def _and(numbers: Sequence[int]) -> str:
    """``[1]`` -> "1", ``[1, 4, 16]`` -> "1, 4 and 16"."""
    words = [str(n) for n in numbers]
    return words[0] if len(words) == 1 else f"{', '.join(words[:-1])} and {words[-1]}"
