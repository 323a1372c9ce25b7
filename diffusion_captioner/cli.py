"""``dcap``: the command line (python-fire). Thin: it normalises arguments and calls the library.

    dcap compare [--decoders clipcap,diffusion] [--out runs/NAME] [--preset embedded]
    dcap evaluate --results R.json --annotations A.json [--out M.json]
    dcap extract [--dataset shapes] [--encoder ViT-B-32:openai]
    dcap bench --run runs/NAME
    dcap caption --run runs/NAME --images a.jpg,b.png
    dcap export --run runs/NAME --to DIR [--push-to-hub org/name]
    dcap list
    dcap serve [--run runs/NAME] [--port 8000]
    dcap pretrain-clip [--out DIR] [--steps N]

Every command takes ``--include-package my_pkg`` (repeatable as ``a,b``) to register user code.
The commands call the Python API (``diffusion_captioner.api``, ``import diffusion_captioner as dc``).
"""

from __future__ import annotations

import json
import logging
import shlex
import sys
from pathlib import Path
from typing import Any

import fire

import registry
from diffusion_captioner.arguments import as_list, dataset_config

logger = logging.getLogger("dcap")


def _include(include_package: Any) -> None:
    for package in as_list(include_package):
        registry.include_package(package)


class Commands:
    """Train and compare image-captioning decoders head to head (diffusion, ClipCap, MNIC, yours)."""

    def list(self, include_package: Any = None) -> None:
        """Every registered component (decoders, encoders, datasets) with a one-line description."""
        from diffusion_captioner import api

        components = api.list_components(include_package)
        for role, found in components.by_role().items():
            print(f"{role}s:")
            for name, description in found.items():
                print(f"  {name:<16} {description}")
        print(f"presets: {', '.join(components.presets)}")
        for plugin, error in components.broken_plugins.items():
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
        data_dir: str | None = None,
        threads: int | None = None,
        decoder_config: Any = None,
        log_with: Any = None,
    ) -> None:
        """Train each decoder on the same cached features and split, score the test split, report.

        Args:
            decoders: comma-separated names (default: every registered decoder), or dotted
                paths ``pkg.module.Class``.
            out: run folder (default ``runs/<preset>-<decoders>``); rerun to resume.
            preset: preset name (packaged JSON stem, ``dcap list`` lists them: ``embedded``;
                ``embedded-distilled``, plus a diffusion row distilled from clipcap;
                ``embedded-scst``, plus a ``-scst`` row per decoder, its self-critical phase;
                ``paper``, the original CLIP-DiffusionLM code; ``paper-text``, the paper's
                text where it differs; ``paper-embedded``, the original at the embedded size)
                or a path to a preset JSON; its ``speed`` block sets the timing phase and its
                ``paper_bleu`` block adds the original code's BLEU-4 to the report.
            dataset: dataset name (``shapes``) or a JSON config ``{"type": ..., ...}``.
            encoder: ``embedded`` (default), ``ViT-B-32:openai``, ``local-dir:PATH``...
            cache_dir: feature cache folder (default ``$DCAP_CACHE`` or ``~/.cache/diffusion_captioner``).
            train: JSON object of training overrides for every decoder, e.g. ``{"max_steps": 100}``;
                an ``scst`` block in it (``{"scst": {"samples": 5, "max_minutes": 3}}``) adds a
                ``<decoder>-scst`` row per decoder: self-critical training on CIDEr-D after
                cross-entropy (README, "Self-critical training"); ``consensus_targets`` r
                trains on each image's consensus reference for a share r of the pairs
                (the embedded diffusion default: 0.75).
            decoder_config: JSON object of constructor arguments per decoder, over the preset's,
                e.g. ``{"diffusion": {"refine_noise": 0.25}, "my_pkg.mod.Mine": {"k": 5}}``
                (a plugin without a preset entry gets its arguments this way).
            device: ``cpu``, ``cuda``, ``cuda:1``...
            include_package: module(s) whose decorators register your components.
            quiet: no progress bars.
            threads: torch intra-op threads for the run (default: the preset's; embedded uses 1).
            data_dir: folder of the data files: ``--dataset flickr8k --data-dir DATA`` (also
                ``flickr30k``, ``coco-karpathy``, ``flickr8k+flickr30k``), or the folder relative
                paths in a ``--dataset`` JSON config resolve under.
            log_with: experiment trackers through accelerate, comma-separated: ``tensorboard``,
                ``wandb``, ``mlflow``, ``aim``... (each needs its package installed); they get
                the training log's scalars and the test metrics, under ``OUT/tracker/``.
        """
        from diffusion_captioner import api

        result = api.compare(
            decoders, out, preset=preset, dataset=dataset, encoder=encoder, cache_dir=cache_dir,
            train=train, device=device, include_package=include_package, quiet=quiet,
            data_dir=data_dir, threads=threads, decoder_config=decoder_config,
            log_with=log_with, command=shlex.join(["dcap", *sys.argv[1:]]))
        print(result.report)
        print(f"run folder: {result.folder}")

    def bench(self, run: str | None = None, preset: str | None = None,
              random_init: bool = False, decoders: Any = None, device: str = "cpu",
              repeats: int | None = None, threads: int | None = None,
              images: int | None = None, batch_sizes: Any = "1,4,16,64", steps: Any = None,
              tokens: int | None = None, out: str | None = None,
              compile: bool | str = False, include_package: Any = None) -> None:
        """Time decoders side by side (batch sizes, every step count): a trained run, or a
        preset's decoders at their real size with random weights.

        --run R: the decoders of a `compare` run; --threads defaults to the run's own, so the
        figures match its report; writes R/speed.json (R/speed_compiled.json with --compile).
        --preset P --random-init: every decoder of preset P (or --decoders) built untrained at
        the preset's size, on random features of its encoder's width; nothing is downloaded (a
        tokenizer not at hand is replaced by a stand-in of the same vocabulary size); an
        autoregressive decoder writes exactly --tokens tokens (default 12; its end token
        ignored; 0: until it stops); writes --out (default runs/bench-P.json).
        Batches smaller than --images are timed over that many different images (default 16
        for a run, 4 for a preset); --repeats timed runs per row (default 5 / 3); --steps 1,5
        replaces an iterative decoder's step sweep (a preset: 1 besides its default, enough for
        the per-step line, and the whole bench stays within minutes on a CPU); --batch-sizes 1,64.
        --compile: torch.compile each decoder's per-step networks first (inductor, or the backend
        named); needs a C++ compiler on CPU and adds a minute or more of compiling."""
        from diffusion_captioner.analysis import bench_run, speed_file
        from eval.speed import check_image_count, describe_contrast, describe_step_costs

        _include(include_package)
        # --compile is the flag users type, so the parameter keeps the builtin's name here
        backend = ("inductor" if compile is True else str(compile)) if compile else None
        if (run is None) == (preset is None):
            raise ValueError("bench: pass --run RUN_FOLDER or --preset NAME --random-init")
        if preset is not None and not random_init:
            raise ValueError("bench: a preset has no trained weights; --preset needs "
                             "--random-init (or time a trained run with --run)")
        sizes = tuple(int(b) for b in as_list(batch_sizes))
        step_counts = tuple(int(k) for k in as_list(steps)) if steps is not None else None
        if threads:
            import torch

            torch.set_num_threads(int(threads))
        if run is not None:
            if tokens is not None or out is not None:
                raise ValueError("bench: --tokens and --out are for --preset; a trained run "
                                 "writes its captions to their end, into RUN/speed.json")
            images = 16 if images is None else images
            repeats = 5 if repeats is None else repeats
            check_image_count(images)
            speed = bench_run(run, device=device, repeats=repeats, threads=threads,
                              images=images, compile_backend=backend,
                              names=as_list(decoders) or None, batch_sizes=sizes,
                              steps=step_counts)
            written = Path(run) / speed_file(backend)
        else:
            from diffusion_captioner.bench_preset import bench_preset

            images = 4 if images is None else images
            repeats = 3 if repeats is None else repeats
            step_counts = step_counts if step_counts is not None else (1,)
            check_image_count(images)
            tokens = 12 if tokens is None else int(tokens)
            speed = bench_preset(preset, as_list(decoders) or None, device,
                                 repeats=repeats, images=images, batch_sizes=sizes,
                                 steps=step_counts, tokens=tokens or None,
                                 compile_backend=backend)
            written = Path(out) if out else Path("runs") / f"bench-{Path(preset).stem}.json"
            written.parent.mkdir(parents=True, exist_ok=True)
            written.write_text(json.dumps(speed, indent=2))
        print(f"device {speed['device']}, {speed['threads']} thread(s), median of {repeats}, "
              f"{images} images at small batches"
              + (f", torch.compile ({backend})" if backend else "")
              + (f"; {preset} at its real size, random weights"
                 + (f", autoregressive decoders at {tokens} tokens" if tokens else "")
                 if preset else ""))
        print(f"{'decoder':<12} {'options':<26} {'batch':>5} {'ms/caption':>11} {'captions/s':>11}")
        for name, rows in speed["decoders"].items():
            for row in rows:
                options = ",".join(f"{k}={v}" for k, v in row["options"].items()) or "default"
                print(f"{name:<12} {options:<26} {row['batch']:>5} {row['ms_per_caption']:>11.2f} "
                      f"{row['captions_per_second']:>11.1f}")
        first = next(iter(speed["decoders"]))
        for name, contrast in speed["contrast"].items():
            print(describe_contrast(first, name, contrast))
        for line in describe_step_costs(speed["decoders"]):
            print(line)
        print(f"written to {written}")

    def evaluate(self, results: str, annotations: str, out: str | None = None,
                 paper_bleu: str | None = None, groups: str | None = None) -> None:
        """Score a COCO result JSON against a COCO caption annotation file (pycocoevalcap).

        Args:
            paper_bleu: also print BLEU-4 by the original CLIP-DiffusionLM code's protocol
                (eval/paper_bleu.py), decoding with this word-piece tokenizer (a hub name such
                as ``distilbert-base-uncased`` or a local folder).
            groups: also score each group of images alone: a JSON file mapping image id ->
                group name (``{"0": "in-domain", ...}``), or a nocaps annotation file (the
                group is the image's domain). Every result image needs a group. With --out
                M.json the groups' metrics go to M_by_group.json.
        """
        from diffusion_captioner import api

        evaluation = api.evaluate(results, annotations, out,
                                  paper_bleu=str(paper_bleu) if paper_bleu else None,
                                  groups=groups)
        for name, value in evaluation.scores.items():
            print(f"{name}: {value:.3f}")
        if evaluation.paper_bleu is not None:
            print(f"paper_BLEU_4: {evaluation.paper_bleu:.4f}  (the original code's protocol)")
        for name, reason in evaluation.skipped.items():
            print(f"{name}: skipped ({reason})")
        if out:
            print(f"metrics written to {out}")
        for group, scores in (evaluation.by_group or {}).items():
            print(f"{group} ({scores.num_images} images): "
                  + "  ".join(f"{k}: {v:.3f}" for k, v in scores.scores.items()))
        if evaluation.by_group is not None and out:
            print(f"metrics per group written to {evaluation.by_group_file}")

    def extract(
        self,
        dataset: Any = "shapes",
        encoder: str | None = None,
        splits: Any = "train,val,test",
        cache_dir: str | None = None,
        device: str = "cpu",
        batch_size: int = 64,
        num_workers: int = 0,
        precision: str | None = None,
        shard_size: int | None = None,
        data_dir: str | None = None,
        include_package: Any = None,
        quiet: bool = False,
    ) -> None:
        """Encode a dataset's splits once into the feature cache (progress bar, resumable shards).

        Run it under ``accelerate launch --num_processes N -m diffusion_captioner extract ...``
        to split the work across N processes (each rank a share of the shards, merged at the end).

        Args:
            dataset: dataset name (``shapes``, ``flickr8k``, ``flickr30k``, ``coco-karpathy``,
                ``flickr8k+flickr30k``) or a JSON config ``{"type": "karpathy", ...}``.
            encoder: ``embedded`` (default), ``ViT-B-32:openai``, ``local-dir:PATH``...
            splits: comma-separated splits to encode.
            cache_dir: cache folder (default ``$DCAP_CACHE`` or ``~/.cache/diffusion_captioner``).
            device: ``cpu``, ``cuda``, ``cuda:1``... (``cuda`` under accelerate: this rank's GPU).
            batch_size: images per encoder call.
            num_workers: DataLoader processes that decode and preprocess images.
            precision: encoder weights and inputs in ``fp32``, ``fp16`` or ``bf16`` (GPU); part
                of the encoder fingerprint, so ``compare`` reuses the features only with the
                same precision in its ``--encoder`` spec.
            shard_size: records per resumable shard (an interrupted run redoes at most one).
            data_dir: folder of the data files (named datasets; relative paths in a config).
            include_package: module(s) whose decorators register your components.
            quiet: no progress bars.
        """
        import os
        import time

        from diffusion_captioner.encoders import encoder_config
        from diffusion_captioner.features import DEFAULT_SHARD_SIZE, FeatureCache, ProcessLayout

        _include(include_package)
        layout = ProcessLayout.current()
        if layout.world > 1 and device == "cuda":
            device = f"cuda:{os.environ.get('LOCAL_RANK', layout.rank)}"
        data = registry.build("dataset", dataset_config(dataset, data_dir))
        clip_cfg = {**encoder_config(encoder), "device": device}
        if precision is not None:  # else the encoder spec's own (fp32 by default)
            clip_cfg["precision"] = precision
        clip = registry.build("encoder", clip_cfg)
        cache = FeatureCache(Path(cache_dir) / "features" if cache_dir else None,
                             shard_size=int(shard_size or DEFAULT_SHARD_SIZE))
        for split in as_list(splits):
            began = time.perf_counter()
            features = cache.get(data, split, clip, batch_size=int(batch_size),
                                 num_workers=int(num_workers), progress=not quiet)
            seconds = time.perf_counter() - began
            if not layout.is_main:
                continue
            state = "cached" if features.from_cache else (
                f"extracted in {seconds:.1f} s ({len(features.records) / max(seconds, 1e-9):.1f} "
                f"images/s over {layout.world} process(es))")
            print(f"{split}: {len(features.records)} images {state}, {len(features.skipped)} "
                  f"skipped ({len(features.missing)} missing files) -> {cache.path(data, split, clip)}")
            for image_id, message in list(features.skipped.items())[:20]:
                print(f"  skipped id {image_id}: {message}")
            if len(features.skipped) > 20:
                print(f"  ... and {len(features.skipped) - 20} more (in the cache file's metadata)")

    def caption(
        self,
        images: Any,
        run: str,
        decoders: Any = None,
        device: str = "cpu",
        include_package: Any = None,
    ) -> None:
        """Caption your own image files with every decoder of a `compare` run (or --decoders).

        --run is a `compare` run folder, a `dcap export` folder, or hf-hub:org/name (an export on
        the Hugging Face hub; offline and not in the cache it fails in one line)."""
        from diffusion_captioner import api
        from diffusion_captioner.images import BadImageError

        loaded = api.load_run(run, decoders, device=device, include_package=include_package)
        captions, failures = loaded.caption_files(as_list(images))
        for path, by_decoder in captions.items():
            print(path)
            for name, text in by_decoder.items():
                print(f"  {name:<12} {text}")
        if failures:
            first = next(iter(failures.values()))
            more = f" (and {len(failures) - 1} more unreadable)" if len(failures) > 1 else ""
            raise BadImageError(f"{first}{more}")

    def export(self, run: str, to: str, push_to_hub: str | None = None,
               include_package: Any = None) -> None:
        """Write a self-contained, shareable copy of a `compare` run that `dcap caption`,
        `dcap serve` and `dc.load_run` accept as a run folder.

        DIR gets the encoder (the embedded CLIP's or a local encoder's files; a hub or pretrained
        name by reference), each decoder's best checkpoint, the run's config, metrics and report,
        and a Hugging Face model card README.md (YAML front matter: library_name, tags, datasets,
        license, metrics, model-index). A non-empty DIR is replaced only when it is an export of
        the same run.

        Args:
            run: the run folder (``runs/NAME``), or an export.
            to: the folder to write (new, empty, or an earlier export of the same run).
            push_to_hub: upload DIR to hub repo org/name too (load it as --run hf-hub:org/name);
                needs the network and a login, checked before anything is written.
            include_package: module(s) whose decorators register your components.
        """
        from diffusion_captioner import api

        _include(include_package)
        written = api.export(run, to, push_to_hub=push_to_hub)
        names = json.loads((written / "export.json").read_text())["decoders"]
        print(f"exported {run} ({', '.join(names)}) to {written}; model card {written / 'README.md'}")
        if push_to_hub:
            print(f"pushed to https://huggingface.co/{push_to_hub} (load it with --run hf-hub:{push_to_hub})")

    def serve(
        self,
        run: str | None = None,
        port: int = 8000,
        host: str = "127.0.0.1",
        decoders: Any = None,
        device: str = "cpu",
        include_package: Any = None,
        quiet: bool = False,
        workers: int = 2,
        queue: int = 16,
        timeout: float = 30.0,
    ) -> None:
        """Web page + JSON API: caption your own image with every decoder of a `compare` run.

        Served by waitress (a production WSGI server, pure Python). At most --workers caption
        requests run at once and --queue more wait; any beyond answer 503 with a JSON error at
        once. A caption request not answered within --timeout seconds (waiting included)
        answers 504 JSON. Uploads stay capped at 10 MB and 40 megapixels (413 / 400).

        Args:
            run: run folder, `dcap export` folder or ``hf-hub:org/name`` (default: the embedded
                run ``runs/embedded-<every decoder>`` that `dcap compare` with no arguments
                writes; trained first when it is not finished).
            port: TCP port (0 picks a free one).
            host: interface to listen on; keep 127.0.0.1 unless you mean to expose the demo.
            decoders: comma-separated subset of the run's decoders (default: all).
            device: ``cpu``, ``cuda``...
            include_package: module(s) whose decorators register your components.
            quiet: no progress bars while training the default run.
            workers: caption requests served at once (threads; the models are one copy behind
                one lock, so their generation calls take turns).
            queue: caption requests that may wait for a worker; one more answers 503.
            timeout: seconds a caption request may take, waiting included; then 504.
        """
        from diffusion_captioner.web import create_app, run_is_finished, serve
        from diffusion_captioner.web.limits import Admission

        Admission(int(workers), int(queue), float(timeout)).close()  # bad limits: fail now

        _include(include_package)
        if run is None:
            names = registry.available("decoder")
            default = Path("runs") / f"embedded-{'-'.join(names)}"
            if not run_is_finished(default, names):
                print(f"no finished embedded run at {default}: training it first "
                      f"(`dcap compare --out {default}`), then serving it")
                self.compare(decoders=",".join(names), out=str(default), device=device,
                             include_package=include_package, quiet=quiet)
            run = str(default)
        app = create_app(run, decoders=as_list(decoders) or None, device=device,
                         workers=int(workers), queue=int(queue), timeout_s=float(timeout))
        serve(app, host=str(host), port=int(port))

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


def check_flags(argv: list[str]) -> None:
    """Reject a mistyped ``--flag`` of a command at once, before anything loads (fire would
    complain only after the command had run, e.g. after training every decoder); the error
    names the accepted flags. ``--name=value``, fire's ``--noflag`` for booleans and dashes for
    underscores are understood; everything after a bare ``--`` belongs to fire."""
    import inspect

    if not argv or argv[0].startswith("-") or not hasattr(Commands, argv[0]):
        return  # no command (fire lists them) or an unknown one (fire names it)
    command = argv[0]
    parameters = [p for p in inspect.signature(getattr(Commands, command)).parameters
                  if p != "self"]
    accepted = set(parameters)
    for token in argv[1:]:
        if token == "--":
            break
        if not token.startswith("--"):
            continue
        name = token[2:].split("=", 1)[0].replace("-", "_")
        if name in accepted or (name.startswith("no") and name[2:] in accepted):
            continue
        flags = ", ".join(f"--{p.replace('_', '-')}" for p in parameters)
        raise ValueError(f"dcap {command}: unknown flag {token.split('=', 1)[0]}; "
                         f"accepted: {flags} (dcap {command} --help)")


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``dcap``: one clear line and a non-zero exit for bad input, no traceback."""
    from diffusion_captioner.images import BadImageError
    from eval.coco_format import EvaluationInputError

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "urllib3", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    for handler in logging.getLogger().handlers:  # open_clip logs INFO chatter on the root logger
        handler.addFilter(lambda record: record.name != "root" or record.levelno >= logging.WARNING)
    argv = list(sys.argv[1:] if argv is None else argv)
    helps = {"-h", "--help"}
    if "--" not in argv and helps & set(argv):  # fire's own form: no "INFO: Showing help" line
        argv = [a for a in argv if a not in helps] + ["--", "--help"]
    try:
        check_flags(argv)
        fire.Fire(Commands, command=argv, name="dcap")
    except (registry.ComponentError, EvaluationInputError, BadImageError, FileNotFoundError,
            ValueError) as error:
        message = " ".join(str(error).split()) or type(error).__name__  # one line, never cut
        print(f"dcap: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dcap: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    finally:
        _close_process_group()
    return 0


def _close_process_group() -> None:
    """Under ``accelerate launch``, destroy the process group before exit: gloo's worker threads
    otherwise abort the interpreter at shutdown ("terminate called without an active exception")."""
    import torch.distributed

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
