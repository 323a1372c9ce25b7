"""What a comparison adds on top of the metrics: significance, reference-free scores, caption
statistics, side-by-side speed, and example captions (with the iterative decoders' trajectories)."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from diffusion_captioner.features import FeatureCache, SplitFeatures
from diffusion_captioner.inference import load_run
from diffusion_captioner.run_folder import RunFolder
from eval.significance import paired_bootstrap, paired_scores
from eval.speed import (
    benchmark_decoder,
    check_image_count,
    compile_step_modules,
    crossover_batch,
    speed_contrast,
)
from registry import CaptionDecoder, build

logger = logging.getLogger(__name__)

SIGNIFICANCE_METRICS = ("CIDEr", "Bleu_4")
BENCH_BATCHES = (1, 4, 16, 64)
#: Small batches are timed over this many different test images (a caption's length sets an
#: autoregressive decoder's latency, so one image would not do).
BENCH_IMAGES = 16


def like_with_like(names: list[str], suffix: str = "-scst") -> list[tuple[str, str]]:
    """The (row, baseline) pairs the report tests: every cross-entropy row against the first
    one; every SCST row (``<name>-scst``) against the first SCST row (SCST vs SCST) and
    against its own first phase (what SCST gained)."""
    plain = [n for n in names if not n.endswith(suffix)]
    scst = [n for n in names if n.endswith(suffix)]
    pairs = [(name, plain[0]) for name in plain[1:]]
    pairs += [(name, scst[0]) for name in scst[1:]]
    pairs += [(name, name.removesuffix(suffix)) for name in scst if name.removesuffix(suffix)
              in names]
    return pairs


def significance(per_image: dict[str, dict[str, dict[Any, float]]],
                 pairs: list[tuple[str, str]] | None = None, resamples: int = 2000
                 ) -> dict[str, dict[str, Any]]:
    """Paired bootstrap on per-image CIDEr and BLEU-4 of each (row, baseline) in ``pairs``
    (default: every decoder against the first), keyed by the row, or ``"row vs baseline"``
    when the baseline is not the first decoder; each entry names its ``baseline``.
    ``per_image[decoder][metric][image_id]`` (ids as ints or as JSON's strings)."""
    names = list(per_image)
    if len(names) < 2:
        return {}
    if pairs is None:
        pairs = [(name, names[0]) for name in names[1:]]
    out: dict[str, dict[str, Any]] = {}
    for name, baseline in pairs:
        key = name if baseline == names[0] else f"{name} vs {baseline}"
        out[key] = {"baseline": baseline, "row": name}
        for metric in SIGNIFICANCE_METRICS:
            first = {int(k): v for k, v in per_image[baseline].get(metric, {}).items()}
            second = {int(k): v for k, v in per_image[name].get(metric, {}).items()}
            if first and second:
                a, b = paired_scores(first, second)
                out[key][metric] = paired_bootstrap(a, b, resamples=resamples).to_dict()
    return out


def sweep_options(decoder: CaptionDecoder, default: dict[str, Any],
                  steps: tuple[int, ...] | None = None) -> list[dict[str, Any]]:
    """The default generate options, then one per step count of the decoder's declared sweep
    (``capabilities.step_sweep`` over its ``step_option``; ``steps`` replaces the sweep); a
    decoder without a step option runs at its default only. Used by the report and the bench."""
    capabilities = decoder.capabilities
    option = capabilities.step_option
    if option is None:
        return [dict(default)]
    sweep = capabilities.step_sweep if steps is None else steps
    current = getattr(decoder.options(default), option)
    return [dict(default), *({**default, option: k} for k in sweep if k != current)]


def test_features(config: dict[str, Any], encoder) -> SplitFeatures:
    dataset = build("dataset", config["dataset"])
    cache_dir = config.get("cache_dir")
    return FeatureCache(Path(cache_dir) if cache_dir else None).get(
        dataset, "test", encoder, progress=False)


def bench_decoders(decoders: dict[str, CaptionDecoder], generate_options: dict[str, dict],
                   features: torch.Tensor, device: str = "cpu", repeats: int = 5,
                   batch_sizes: tuple[int, ...] = BENCH_BATCHES,
                   images: int = BENCH_IMAGES, compile_backend: str | None = None,
                   steps: tuple[int, ...] | None = None, warmup: int = 2,
                   max_seconds: float | None = None) -> dict[str, Any]:
    """Time every decoder side by side in this process on the same ``features`` (N, D); a batch
    size smaller than ``images`` is timed over ``images`` different images
    (:func:`~eval.speed.benchmark_decoder`). ``compile_backend`` (e.g. ``"inductor"``):
    ``torch.compile`` each decoder's step modules first (:func:`~eval.speed.compile_step_modules`;
    a decoder that names none runs eager, with a warning).

    Returns ``{"threads", "device", "repeats", "images", "distinct_images", "compile",
    "decoders": {name: rows}, "crossover": {name: batch}, "contrast": {name: ...}}``:

    * ``images``: the images timed per small batch, ``distinct_images`` of them different
      (fewer when the features wrap round);
    * ``compile``: None, or ``{"backend", "decoders": {name: compiled?}}``;
    * ``crossover``: the batch size from which the faster of a decoder and the first decoder
      (both at their default options) changes;
    * ``contrast``: adds the latency ratio at batch 1 and the throughput ratio at the largest
      batch (:func:`~eval.speed.speed_contrast`);
    * ``cut_by_budget``: the decoders whose rows stopped early because the whole phase ran past
      ``max_seconds`` (their default options at the smallest batch are always timed).

    ``steps`` replaces the iterative decoders' step sweeps; ``warmup`` untimed runs per row.
    """
    rows_needed = max(b * -(-images // b) for b in batch_sizes)  # b * ceil(images / b)
    distinct = min(len(features), images)
    features = features[torch.arange(rows_needed) % len(features)]  # (rows_needed, D)
    rows, compiled, cut = {}, {}, []
    deadline = None if max_seconds is None else time.perf_counter() + float(max_seconds)
    for name, decoder in decoders.items():
        if compile_backend:
            compiled[name] = compile_step_modules(decoder, compile_backend) > 0
            if not compiled[name]:
                logger.warning("%s names no step modules: timed without torch.compile", name)
        logger.info("timing %s", name)
        rows[name] = benchmark_decoder(
            decoder, features, sweep_options(decoder, generate_options.get(name, {}), steps),
            batch_sizes=batch_sizes, repeats=repeats, images=images, warmup=warmup,
            deadline=deadline)
        planned = len(sweep_options(decoder, generate_options.get(name, {}), steps)) * len(
            batch_sizes)
        if len(rows[name]) < planned:
            cut.append(name)
    names = list(rows)
    default_rows = {n: [r for r in rows[n] if r["options"] == rows[n][0]["options"]] for n in names}
    return {
        "threads": torch.get_num_threads(), "device": device, "repeats": repeats,
        "images": images, "distinct_images": distinct,
        "compile": {"backend": compile_backend, "decoders": compiled} if compile_backend else None,
        "decoders": rows,
        "crossover": {n: crossover_batch(default_rows[names[0]], default_rows[n])
                      for n in names[1:]},
        "contrast": {n: speed_contrast(default_rows[names[0]], default_rows[n])
                     for n in names[1:]},
        "cut_by_budget": cut,
    }


def speed_file(compile_backend: str | None = None) -> str:
    """Where ``dcap bench`` writes its figures in a run folder: eager ones replace the report's
    ``speed.json``, compiled ones go beside it."""
    return "speed_compiled.json" if compile_backend else "speed.json"


def bench_run(run: str | Path, device: str = "cpu", repeats: int = 5,
              threads: int | None = None, images: int = BENCH_IMAGES,
              compile_backend: str | None = None, names: list[str] | None = None,
              batch_sizes: tuple[int, ...] = BENCH_BATCHES,
              steps: tuple[int, ...] | None = None) -> dict[str, Any]:
    """``dcap bench``: load a run's decoders, time them side by side, write ``run/speed.json``
    (``run/speed_compiled.json`` with ``compile_backend``, leaving the report's figures alone).

    ``threads`` defaults to the thread count the run was made with, so the figures match its
    report."""
    check_image_count(images)  # before the run's models are loaded
    folder = RunFolder(Path(run))
    loaded = load_run(folder.root, names, device=device)
    config = folder.read_config().to_dict()
    threads = threads if threads is not None else config.get("threads")
    if threads:
        torch.set_num_threads(int(threads))
    features = test_features(config, loaded.encoder).features  # (N, D)
    result = bench_decoders(loaded.decoders, loaded.generate_options, features, device, repeats,
                            batch_sizes=batch_sizes, images=images,
                            compile_backend=compile_backend, steps=steps)
    (folder.root / speed_file(compile_backend)).write_text(json.dumps(result, indent=2))
    return result


def examples(folder: Path, dataset, test: SplitFeatures, results: dict[str, dict[int, str]],
             decoders: dict, generate_options: dict, count: int = 4) -> list[dict[str, Any]]:
    """A few test images (thumbnails under ``folder``, the run's ``examples/``) with every
    decoder's caption (``results[decoder][image_id]``) and the caption after every step for the
    decoders that return a trajectory."""
    folder.mkdir(exist_ok=True)
    names = list(results)
    rows = [round(i * (len(test.records) - 1) / max(1, count - 1)) for i in range(count)]
    out = []
    for position, row in enumerate(rows):
        record = test.records[row]
        thumbnail = folder / f"{record.image_id}.png"
        image = dataset.load_image(record)
        if max(image.size) < 160:
            scale = 160 // max(image.size)
            image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
        image.thumbnail((224, 224))
        image.save(thumbnail)
        entry = {"image_id": record.image_id, "image": f"examples/{thumbnail.name}",
                 "references": list(record.captions),
                 "captions": {n: results[n].get(record.image_id, "") for n in names},
                 "trajectories": {}}
        if position == 0:
            for name, decoder in decoders.items():
                if decoder.capabilities.trajectory:
                    feature = test.features[row:row + 1].to(decoder.device)  # (1, D)
                    trajectory = decoder.generate_trajectory(feature,
                                                             **generate_options.get(name, {}))
                    entry["trajectories"][name] = list(trajectory[0])
        out.append(entry)
    return out
