"""``dcap``: the command line (python-fire). Thin: it normalises arguments and calls the library.

    dcap compare [--decoders clipcap,diffusion] [--out runs/NAME] [--preset embedded]
    dcap evaluate --results R.json --annotations A.json [--out M.json]
    dcap extract [--dataset shapes] [--encoder ViT-B-32:openai]
    dcap bench --run runs/NAME
    dcap caption --run runs/NAME --images a.jpg,b.png
    dcap list
    dcap pretrain-clip [--out DIR] [--steps N]

Every command takes ``--include-package my_pkg`` (repeatable as ``a,b``) to register user code.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

import fire

import registry

logger = logging.getLogger("dcap")


def as_list(value: Any) -> list[str]:
    """fire gives ``a,b`` as a tuple and ``a`` as a str (or a list from ``[a,b]``): one list."""
    if value is None:
        return []
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    return [str(v).strip() for v in value]


_JSON_WORDS = {"null": None, "true": True, "false": False}


def _json_words(value: Any) -> Any:
    """fire parses ``{"a": null}`` with JSON's bare words as strings: map them back."""
    if isinstance(value, dict):
        return {k: _json_words(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_words(v) for v in value]
    return _JSON_WORDS.get(value, value) if isinstance(value, str) else value


def as_dict(value: Any, what: str) -> dict[str, Any] | None:
    """A dict from fire (already parsed) or from a JSON string."""
    if value is None:
        return None
    if isinstance(value, dict):
        return _json_words(value)
    try:
        parsed = json.loads(value)
    except (TypeError, json.JSONDecodeError) as error:
        raise ValueError(f"--{what} must be a JSON object, got {value!r}") from error
    if not isinstance(parsed, dict):
        raise ValueError(f"--{what} must be a JSON object, got {value!r}")
    return parsed


def dataset_config(dataset: Any) -> dict[str, Any] | None:
    """``shapes`` -> {"type": "shapes"}; a dict/JSON object passes through."""
    if dataset is None:
        return None
    if isinstance(dataset, str) and not dataset.lstrip().startswith("{"):
        return {"type": dataset}
    return as_dict(dataset, "dataset")


def _include(include_package: Any) -> None:
    for package in as_list(include_package):
        registry.include_package(package)


class Commands:
    """Train and compare image-captioning decoders head to head (diffusion, ClipCap, MNIC, yours)."""

    def list(self, include_package: Any = None) -> None:
        """Every registered component (decoders, encoders, datasets) with a one-line description."""
        _include(include_package)
        for role in ("decoder", "encoder", "dataset"):
            print(f"{role}s:")
            for name in registry.available(role):
                cls = registry.resolve(role, name)
                print(f"  {name:<16} {registry.describe(cls)}")
        from diffusion_captioner.presets import available_presets

        print(f"presets: {', '.join(available_presets())}")
        for plugin, error in registry.plugin_errors.items():
            print(f"broken plugin {plugin}: {error}")

    def compare(
        self,
        decoders: Any = None,
        out: str | None = None,
        preset: str = "embedded",
        dataset: Any = None,
        encoder: str | None = None,
        cache_dir: str | None = None,
        train: Any = None,
        device: str = "cpu",
        include_package: Any = None,
        quiet: bool = False,
    ) -> None:
        """Train each decoder on the same cached features and split, score the test split, report.

        Args:
            decoders: comma-separated names (default: every registered decoder), or dotted
                paths ``pkg.module.Class``.
            out: run folder (default ``runs/<preset>-<decoders>``); rerun to resume.
            preset: preset name (packaged JSON stem) or a path to a preset JSON.
            dataset: dataset name (``shapes``) or a JSON config ``{"type": ..., ...}``.
            encoder: ``embedded`` (default), ``ViT-B-32:openai``, ``local-dir:PATH``...
            cache_dir: feature cache folder (default ``$DCAP_CACHE`` or ``~/.cache/diffusion_captioner``).
            train: JSON object of training overrides for every decoder, e.g. ``{"max_steps": 100}``.
            device: ``cpu``, ``cuda``, ``cuda:1``...
            include_package: module(s) whose decorators register your components.
            quiet: no progress bars.
        """
        from diffusion_captioner.compare import compare

        _include(include_package)
        names = as_list(decoders) or registry.available("decoder")
        for name in names:
            registry.resolve("decoder", name)  # fail before any work on an unknown name
        out_dir = Path(out) if out else Path("runs") / f"{Path(preset).stem}-{'-'.join(names)}"
        metrics = compare(
            names, out_dir, preset=preset, dataset=dataset_config(dataset), encoder=encoder,
            cache_dir=Path(cache_dir) / "features" if cache_dir else None,
            train_overrides=as_dict(train, "train"), device=device, progress=not quiet,
        )
        print((out_dir / "report.md").read_text())
        print(f"run folder: {out_dir}")
        del metrics

    def bench(self, run: str, device: str = "cpu", repeats: int = 5,
              include_package: Any = None) -> None:
        """Time every decoder of a `compare` run side by side (batch 1..64, every step count)."""
        from diffusion_captioner.analysis import bench_run

        _include(include_package)
        speed = bench_run(run, device=device, repeats=repeats)
        print(f"device {speed['device']}, {speed['threads']} thread(s), median of {repeats}")
        print(f"{'decoder':<12} {'options':<16} {'batch':>5} {'ms/caption':>11} {'captions/s':>11}")
        for name, rows in speed["decoders"].items():
            for row in rows:
                options = ",".join(f"{k}={v}" for k, v in row["options"].items()) or "default"
                print(f"{name:<12} {options:<16} {row['batch']:>5} {row['ms_per_caption']:>11.2f} "
                      f"{row['captions_per_second']:>11.1f}")
        for name, batch in speed["crossover"].items():
            print(f"throughput crossover {name} vs first decoder: {batch or 'none'}")
        print(f"written to {Path(run) / 'speed.json'}")

    def evaluate(self, results: str, annotations: str, out: str | None = None) -> None:
        """Score a COCO result JSON against a COCO caption annotation file (pycocoevalcap)."""
        from eval.metrics import evaluate_files

        report = evaluate_files(results, annotations, out)
        for name, value in report.scores.items():
            print(f"{name}: {value:.3f}")
        for name, reason in report.skipped.items():
            print(f"{name}: skipped ({reason})")
        if out:
            print(f"metrics written to {out}")

    def extract(
        self,
        dataset: Any = "shapes",
        encoder: str | None = None,
        splits: Any = "train,val,test",
        cache_dir: str | None = None,
        device: str = "cpu",
        batch_size: int = 64,
        num_workers: int = 0,
        include_package: Any = None,
    ) -> None:
        """Encode a dataset's splits once into the feature cache (with a progress bar)."""
        from diffusion_captioner.encoders import encoder_config
        from diffusion_captioner.features import FeatureCache

        _include(include_package)
        data = registry.build("dataset", dataset_config(dataset))
        clip = registry.build("encoder", {**encoder_config(encoder), "device": device})
        cache = FeatureCache(Path(cache_dir) / "features" if cache_dir else None)
        for split in as_list(splits):
            features = cache.get(data, split, clip, batch_size=batch_size, num_workers=num_workers)
            state = "cached" if features.from_cache else "extracted"
            print(f"{split}: {len(features.records)} images {state}, {len(features.skipped)} "
                  f"skipped -> {cache.path(data, split, clip)}")

    def caption(
        self,
        images: Any,
        run: str,
        decoders: Any = None,
        device: str = "cpu",
        include_package: Any = None,
    ) -> None:
        """Caption your own image files with every decoder of a `compare` run (or --decoders)."""
        from diffusion_captioner.images import BadImageError
        from diffusion_captioner.inference import caption_files, load_run

        _include(include_package)
        loaded = load_run(run, as_list(decoders) or None, device=device)
        captions, failures = caption_files(loaded, as_list(images))
        for path, by_decoder in captions.items():
            print(path)
            for name, text in by_decoder.items():
                print(f"  {name:<12} {text}")
        if failures:
            first = next(iter(failures.values()))
            more = f" (and {len(failures) - 1} more unreadable)" if len(failures) > 1 else ""
            raise BadImageError(f"{first}{more}")

    def pretrain_clip(
        self,
        out: str | None = None,
        dataset: Any = "shapes",
        steps: int = 3000,
        batch_size: int = 256,
        lr: float = 1e-3,
        seed: int = 0,
        include_package: Any = None,
    ) -> None:
        """Train the tiny embedded CLIP contrastively (default: into the package's assets)."""
        from diffusion_captioner.encoders import ASSETS
        from diffusion_captioner.pretrain_clip import pretrain_clip

        _include(include_package)
        report = pretrain_clip(out or ASSETS / "shapes_clip", dataset=dataset_config(dataset),
                               steps=steps, batch_size=batch_size, lr=lr, seed=seed)
        print(json.dumps(report["held_out"], indent=2))


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``dcap``: one clear line and a non-zero exit for bad input, no traceback."""
    from diffusion_captioner.images import BadImageError
    from eval.coco_format import EvaluationInputError

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "urllib3", "huggingface_hub", "root"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        fire.Fire(Commands, command=argv, name="dcap")
    except (registry.ComponentError, EvaluationInputError, BadImageError, FileNotFoundError,
            ValueError) as error:
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        print(f"dcap: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dcap: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
