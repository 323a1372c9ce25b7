"""``dcap compare``: train every decoder on the same cached features and split, score them alike.

Steps: encode each split once (feature cache) -> for each decoder: train (resumable) ->
generate on the test split (at every step count it sweeps) -> COCO result JSON ->
pycocoevalcap + CLIPScore + caption statistics -> ``<decoder>/metrics.json`` (and, when the
dataset gives its test images groups, ``<decoder>/metrics_by_group.json``); then, for all
decoders together: n samples per test image from each decoder that can sample, scored for
diversity and quality (:mod:`eval.diversity`; the preset's ``diversity`` block), paired bootstrap
against the first decoder, speed side by side in one process, example captions, plots,
``report.md``/``report.html`` and the top-level ``metrics.json``.
A decoder whose ``summary.json`` exists is not trained or scored again, so rerunning with the same
``--out`` resumes an interrupted run.
"""

from __future__ import annotations

import json
import logging
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonlines
import torch

from diffusion_captioner import analysis
from diffusion_captioner.distillation import DistillPlan, distilled_pairs, teacher_captions
from diffusion_captioner.encoders import EMBEDDED_PREFIX, encoder_config
from diffusion_captioner.features import FeatureCache, SplitFeatures
from diffusion_captioner.hub import check_available
from diffusion_captioner.inference import generate_captions, load_best, sample_captions
from diffusion_captioner.presets import decoder_plan, load_preset
from diffusion_captioner.report import render_html, render_markdown
from diffusion_captioner.run_folder import (
    DecoderPlan,
    DecoderSummary,
    RunConfig,
    RunFolder,
    RunMetrics,
)
from diffusion_captioner.scst import (
    SCST_SUFFIX,
    ImageReferences,
    ScstPlan,
    SelfCritical,
    split_scst,
    training_rewards,
)
from diffusion_captioner.tracking import check_trackers
from diffusion_captioner.trainer import CaptionPairs, TrainConfig, Trainer
from eval.caption_stats import caption_statistics
from eval.clipscore import score_with_encoder
from eval.coco_format import atomic_write_json, write_annotations, write_results
from eval.diversity import score_diversity, tokenize_references
from eval.groups import groups_summary, record_groups, score_groups, write_groups
from eval.metrics import ALL_METRICS, find_java, score_captions
from eval.paper_bleu import load_paper_bleu_tokenizer, paper_bleu
from eval.plots import (
    plot_latency_vs_batch,
    plot_quality_vs_diversity,
    plot_quality_vs_steps,
    plot_scst_curves,
    plot_training_curves,
)
from eval.rerank import rerank_by_clipscore
from registry import CaptionDecoder, build, registered_name, resolve

logger = logging.getLogger(__name__)

#: The step sweep of an iterative decoder skips METEOR's slow Java start-up: quality vs steps is
#: read off BLEU / ROUGE-L / CIDEr; the default options get every metric.
SWEEP_METRICS = ("Bleu", "ROUGE_L", "CIDEr")


@dataclass
class Workspace:
    """The shared inputs of a comparison: dataset, encoder and each split's cached features."""

    dataset: Any
    encoder: Any
    splits: dict[str, SplitFeatures]
    rewards: Any = None  # the SCST rewards (training idf), built once on first use

    def scst_rewards(self) -> Any:
        """(train, val) CIDEr-D rewards with the training split's idf, made once per run."""
        if self.rewards is None:
            self.rewards = training_rewards(self.splits["train"], self.splits["val"])
        return self.rewards


def prepare_features(dataset: Any, encoder: Any, cache_dir: str | Path | None,
                     progress: bool = True, text_features: bool = False) -> Workspace:
    """Load (or extract once) the train/val/test features of a built dataset and encoder; with
    ``text_features`` also the CLIP text features of the train and val captions."""
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


def clipscore_prompt(encoder_cfg: dict[str, Any]) -> str:
    """Hessel et al.'s "A photo depicts " for real CLIP models; the embedded shapes CLIP was
    trained on bare captions (and has no such words), so none for it."""
    return "" if str(encoder_cfg.get("model", "")).startswith(EMBEDDED_PREFIX) else "A photo depicts "


def speed_options(block: dict[str, Any] | bool | None, repeats: int) -> dict[str, Any] | None:
    """A preset's ``speed`` block (``repeats``, ``warmup``, ``batch_sizes``, ``images``, ``steps``:
    the iterative decoders' step counts, ``max_seconds``: a budget for the whole phase) as keyword
    arguments of :func:`analysis.bench_decoders`; ``false`` switches the phase off (None). An
    unknown key fails naming the known ones."""
    if block is False:
        return None
    block = dict(block or {})
    known = {"repeats", "warmup", "batch_sizes", "images", "steps", "max_seconds"}
    unknown = sorted(set(block) - known)
    if unknown:
        raise ValueError(f"preset speed block: unknown key(s) {', '.join(unknown)}; known: "
                         f"{', '.join(sorted(known))}")
    options = {"repeats": int(block.get("repeats", repeats))}
    if "batch_sizes" in block:
        options["batch_sizes"] = tuple(int(b) for b in block["batch_sizes"])
    if "images" in block:
        options["images"] = int(block["images"])
    if "steps" in block:
        options["steps"] = tuple(int(k) for k in block["steps"])
    if "warmup" in block:
        options["warmup"] = int(block["warmup"])
    if block.get("max_seconds") is not None:
        options["max_seconds"] = float(block["max_seconds"])
    return options


def diversity_settings(block: dict[str, Any] | bool | None) -> dict[str, Any] | None:
    """A preset's ``diversity`` block: ``samples`` per test image (n >= 2, default 5), ``seed``
    (default 0), ``sweep`` (default true: also at every step count the decoder sweeps, for the
    quality-vs-diversity plot; false: its default options only), ``max_steps`` (sweep only the
    step counts up to it; default null: all); ``false`` switches the phase off (None). An
    unknown key or a bad value fails naming it."""
    if block is False:
        return None
    block = dict(block or {})
    known = {"samples", "seed", "sweep", "max_steps"}
    unknown = sorted(set(block) - known)
    if unknown:
        raise ValueError(f"preset diversity block: unknown key(s) {', '.join(unknown)}; known: "
                         f"{', '.join(sorted(known))} (or false to switch the phase off)")
    samples, seed, sweep = block.get("samples", 5), block.get("seed", 0), block.get("sweep", True)
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 2:
        raise ValueError(f"preset diversity block: samples must be an int >= 2 (mBLEU and "
                         f"Self-CIDEr compare samples with each other), got {samples!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"preset diversity block: seed must be an int, got {seed!r}")
    if not isinstance(sweep, bool):
        raise ValueError(f"preset diversity block: sweep must be true or false, got {sweep!r}")
    most = block.get("max_steps")
    if most is not None and (isinstance(most, bool) or not isinstance(most, int) or most < 1):
        raise ValueError(f"preset diversity block: max_steps must be an int >= 1 or null, "
                         f"got {most!r}")
    settings = {"samples": samples, "seed": seed, "sweep": sweep}
    return {**settings, "max_steps": most} if most is not None else settings


def rerank_phase(encoder: Any, test: SplitFeatures, results: dict[str, dict[int, str]],
                 run: RunFolder, summaries: dict[str, DecoderSummary], prompt: str = "") -> None:
    """``<decoder>+rerank``, its own row: each test image's default caption and the diversity
    phase's samples (``<decoder>/samples_test.json``) reranked by CLIPScore with the run's
    encoder (:mod:`eval.rerank`), scored like the step sweep (BLEU, ROUGE-L, CIDEr), into
    ``summaries[name]["rerank"]``; its cost is the samples' plus the CLIP text pass."""
    references = {r.image_id: list(r.captions) for r in test.records}
    rows = {image_id: row for row, image_id in enumerate(test.image_ids)}
    for name, summary in summaries.items():
        path = run.decoder(name).samples
        if not path.is_file() or name not in results:
            continue
        samples = {int(k): v for k, v in json.loads(path.read_text()).items()}
        ids = [i for i in test.image_ids if i in samples and i in results[name]]
        candidates = [[results[name][i], *samples[i]] for i in ids]
        started = time.perf_counter()
        chosen = rerank_by_clipscore(encoder, test.features[[rows[i] for i in ids]], candidates,
                                     prompt)
        seconds = time.perf_counter() - started
        reranked = dict(zip(ids, chosen, strict=True))
        write_results(run.decoder(name).reranked_results, reranked)
        report = score_captions(reranked, references, metrics=SWEEP_METRICS)
        default_run = ((summary.get("diversity") or {}).get("runs") or {}).get("default") or {}
        summary["rerank"] = {
            "candidates": len(candidates[0]) if candidates else 0,
            "scores": report.scores, "rerank_seconds": round(seconds, 2),
            "sample_seconds": default_run.get("sample_seconds"),
            "kept_default": sum(c == results[name][i] for i, c in reranked.items()) / len(ids)}
        logger.info("%s+rerank: CIDEr %.3f (default %.3f)", name, report.scores.get("CIDEr", 0),
                    summary["test"]["default"]["scores"].get("CIDEr", 0))


def diversity_phase(best: dict[str, CaptionDecoder], generate_options: dict[str, dict[str, Any]],
                    test: SplitFeatures, settings: dict[str, Any], run: RunFolder,
                    summaries: dict[str, DecoderSummary]) -> None:
    """n samples per test image from every decoder that declares sampling, at its default
    options (and, with ``sweep``, at each step count it sweeps), scored by
    :mod:`eval.diversity` into ``summaries[name]["diversity"]`` (and its ``summary.json``); the
    default options' samples go to ``<decoder>/samples_test.json``. A decoder that cannot
    sample gets ``{"skipped": reason}``; one whose summary holds this phase's result for the
    same settings and options (a resumed run) is not sampled again."""
    references = {r.image_id: list(r.captions) for r in test.records}
    java = find_java()
    tokenized: dict[int, list[str]] | None = None
    for name, decoder in best.items():
        summary = summaries[name]
        if not decoder.capabilities.sampling:
            summary["diversity"] = {"skipped": f"{type(decoder).__name__} declares no sampling "
                                               "(capabilities.sampling is False)"}
            continue
        options_list = (analysis.sweep_options(decoder, generate_options[name])
                        if settings["sweep"] else [dict(generate_options[name])])
        option, most = decoder.capabilities.step_option, settings.get("max_steps")
        if most is not None and option is not None:  # the default options are always sampled
            options_list = options_list[:1] + [o for o in options_list[1:] if o[option] <= most]
        record = {**settings, "options": options_list}
        previous = summary.get("diversity") or {}
        if {k: previous.get(k) for k in record} == record:
            logger.info("%s: diversity already scored (%s)", name, run.decoder(name).summary)
            continue
        if tokenized is None:
            tokenized = tokenize_references(references, java)
        runs: dict[str, Any] = {}
        for index, options in enumerate(options_list):
            samples, seconds = sample_captions(decoder, test.features, settings["samples"],
                                               settings["seed"], **options)
            by_image = dict(zip(test.image_ids, samples, strict=True))
            started = time.perf_counter()
            scores = score_diversity(by_image, tokenized, java, tokenized_references=True)
            option = decoder.capabilities.step_option
            steps = None if option is None else getattr(decoder.options(options), option)
            key = "default" if index == 0 else str(steps)
            runs[key] = {"options": options, "steps": steps, "scores": scores,
                         "sample_seconds": round(seconds, 3),
                         "score_seconds": round(time.perf_counter() - started, 3)}
            if index == 0:
                atomic_write_json(run.decoder(name).samples,
                                  {str(k): v for k, v in by_image.items()}, indent=1)
            logger.info("%s %s: %s", name, key, ", ".join(f"{k}={v:.3f}" for k, v in scores.items()))
        summary["diversity"] = {**record, "runs": runs}
        run.decoder(name).summary.write_text(json.dumps(summary, indent=2, default=str))


def check_same_plan(folder: Path, plan: dict[str, Any], record: str = "plan.json") -> None:
    """Resuming must not mix settings: ``folder/plan.json`` records the decoder and train
    settings of the first run into ``folder`` (``inputs.json`` in the run folder: its
    dataset and encoder, configs and fingerprints); a rerun with different ones fails in one
    line naming the changed keys (a new ``--out`` starts afresh)."""
    path = folder / record
    current = json.loads(json.dumps(plan, default=str))
    if not path.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(current, indent=2))
        return
    saved = json.loads(path.read_text())
    changed = [f"{section}.{key}" for section in sorted(set(saved) | set(current))
               for key in sorted(set(saved.get(section, {})) | set(current.get(section, {})))
               if saved.get(section, {}).get(key) != current.get(section, {}).get(key)]
    if changed:
        raise ValueError(
            f"{folder} was made with other settings ({', '.join(changed)} differ from "
            f"{path}); pass a new --out to train with these, or delete {folder}")


@dataclass
class Teacher:
    """A distilled decoder's teacher: its trained decoder, generation options and training time."""

    decoder: CaptionDecoder
    generate: dict[str, Any]
    train_seconds: float


@dataclass
class FirstPhase:
    """A ``-scst`` row's start: the first phase's trained decoder folder and its training."""

    name: str
    checkpoint: Path
    train_steps: int
    train_seconds: float
    teacher_seconds: float = 0.0


@dataclass
class DecoderOutcome:
    """What :func:`run_decoder` gives: the summary and, when it trained or scored now, the best
    decoder, its default test captions and per-image scores, kept in memory for the report."""

    summary: DecoderSummary
    decoder: CaptionDecoder | None = None
    results: dict[int, str] | None = None
    per_image: dict[str, dict[int, float]] | None = None


def run_decoder(name: str, plan: DecoderPlan, work: Workspace, out: RunFolder,
                clip_prompt: str = "", progress: bool = True,
                log_with: Sequence[str] = (), teacher: Teacher | None = None,
                first_phase: FirstPhase | None = None) -> DecoderOutcome:
    """Train, generate and score one decoder into ``out/<name>``.

    Only the decoder and train settings bind a folder (``plan.json``): other generation options
    than the summary's reuse the trained checkpoint and score it again. ``log_with``:
    experiment trackers (``tracking.py``) that get the training log and, at the last step, the
    test metrics as ``test/<metric>``; they write under ``out/tracker``. ``teacher``: for a
    decoder with a ``distill`` block, the trained teacher whose captions of the training images
    replace a share of its targets (:mod:`diffusion_captioner.distillation`). ``first_phase``:
    for a ``-scst`` row (``plan.scst``), the trained row it continues by SCST
    (:mod:`diffusion_captioner.scst`) from that row's best weights."""
    folder = out.decoder(name)
    check_same_plan(folder.root, {"decoder": plan.decoder, "train": plan.train,
                                  "distill": plan.distill, "scst": plan.scst})
    summary = folder.read_summary()
    if summary is not None:
        if summary.get("generate") == plan.generate:
            logger.info("%s: already trained and scored (%s)", name, folder.summary)
            return DecoderOutcome(summary)
        logger.info("%s: generation options changed: scoring the trained checkpoint again", name)
    folder.root.mkdir(parents=True, exist_ok=True)
    train_cfg = TrainConfig.from_dict(plan.train)
    train, val = work.splits["train"], work.splits["val"]
    if plan.scst:
        if first_phase is None:
            raise ValueError(f"{name}: an SCST row needs its first phase's run")
        return run_scst(name, plan, work, out, first_phase, clip_prompt, progress, log_with)
    pairs, teacher_record = CaptionPairs.from_split(train), None
    if plan.distill:
        if teacher is None:
            raise ValueError(f"{name}: a distilled decoder needs its teacher's run")
        distill = DistillPlan.from_dict(plan.distill, name)
        captions = teacher_captions(teacher.decoder, train, teacher.generate)
        atomic_write_json(folder.distill_captions, {str(k): v for k, v in captions.items()})
        pairs = distilled_pairs(train, captions, distill, work.encoder)
        teacher_record = {"name": distill.teacher, "ratio": distill.ratio,
                          "train_seconds": teacher.train_seconds}
    torch.manual_seed(train_cfg.seed)
    decoder = build("decoder", plan.decoder, feature_dim=work.encoder.dim)
    trainer = Trainer(decoder, pairs, CaptionPairs.from_split(val),
                      train_cfg, folder.root, progress=progress, log_with=log_with,
                      tracker_dir=out.tracker, tracker_name=name)
    state = trainer.fit(resume=True, end_tracking=False)
    outcome = score_decoder(name, plan, work, out, trainer, state, count_parameters(decoder),
                            clip_prompt)
    if teacher_record is not None:
        outcome.summary["teacher"] = teacher_record
    folder.summary.write_text(json.dumps(outcome.summary, indent=2, default=str))
    trainer.end_tracking()
    return outcome


def run_scst(name: str, plan: DecoderPlan, work: Workspace, out: RunFolder,
             first_phase: FirstPhase, clip_prompt: str = "", progress: bool = True,
             log_with: Sequence[str] = ()) -> DecoderOutcome:
    """The ``-scst`` row: SCST (:class:`~diffusion_captioner.scst.SelfCritical`) from the
    first phase's best weights on the training images, into ``out/<name>`` (resumable like
    the first phase), then scored like every row. Its summary records the first phase, whose
    training time the report adds to its own."""
    folder = out.decoder(name)
    scst = ScstPlan.from_dict(plan.scst, plan.train, name)
    decoder = resolve("decoder", plan.decoder["type"]).from_pretrained(first_phase.checkpoint)
    rewards, val_rewards = work.scst_rewards()
    trainer = Trainer(decoder, ImageReferences.from_split(work.splits["train"]),
                      ImageReferences.from_split(work.splits["val"]), scst.train, folder.root,
                      progress=progress, log_with=log_with, tracker_dir=out.tracker,
                      tracker_name=name,
                      objective=SelfCritical(rewards, val_rewards, plan.generate, scst))
    state = trainer.fit(resume=True, end_tracking=False)
    outcome = score_decoder(name, plan, work, out, trainer, state, count_parameters(decoder),
                            clip_prompt)
    outcome.summary["train"] = {**plan.train, "scst": scst.to_dict()}
    outcome.summary["scst"] = {
        "from": first_phase.name, "first_phase_steps": first_phase.train_steps,
        "first_phase_seconds": first_phase.train_seconds,
        "teacher_seconds": first_phase.teacher_seconds,
        "samples": scst.samples, "baseline": scst.baseline,
        "best_val_cider": -state.best_val_loss if state.best_val_loss is not None else None}
    folder.summary.write_text(json.dumps(outcome.summary, indent=2, default=str))
    trainer.end_tracking()
    return outcome


def score_decoder(name: str, plan: DecoderPlan, work: Workspace, out: RunFolder,
                  trainer: Trainer, state: Any, parameters: dict[str, int],
                  clip_prompt: str = "") -> DecoderOutcome:
    """Generate on the test split with the trained ``checkpoint/best`` (default options, then
    each swept step count), score it (pycocoevalcap, per group, CLIPScore, caption statistics)
    into ``out/<name>``, and return the outcome with its summary (not yet written)."""
    folder = out.decoder(name)
    train, test = work.splits["train"], work.splits["test"]
    best = resolve("decoder", plan.decoder["type"]).from_pretrained(trainer.best_dir).to(
        trainer.accelerator.device)

    references = {r.image_id: list(r.captions) for r in test.records}
    default, *sweep = analysis.sweep_options(best, plan.generate)
    step_option = best.capabilities.step_option
    evaluations = [(None, default, ALL_METRICS)] + [
        (options[step_option], options, SWEEP_METRICS) for options in sweep]
    runs: dict[str, Any] = {}
    default_results: dict[int, str] = {}
    per_image: dict[str, dict[int, float]] = {}
    for steps, options, metric_names in evaluations:
        captions, seconds = generate_captions(best, test.features, **options)
        results = dict(zip(test.image_ids, captions, strict=True))
        write_results(folder.results(steps), results)
        report = score_captions(results, references, metrics=metric_names)
        if steps is None:
            report.write(folder.metrics)
            default_results, per_image = results, report.per_image
            trainer.track(report.scores, state.step, prefix="test/")
        runs["default" if steps is None else str(steps)] = {
            "options": options, "scores": report.scores, "skipped": report.skipped,
            "generate_seconds": round(seconds, 3),
            "ms_per_image": round(1000 * seconds / len(captions), 3)}

    groups = record_groups(work.dataset, test.records)  # the dataset's optional group hook
    by_group = score_groups(default_results, references, groups) if groups else {}
    if by_group:
        write_groups(folder.metrics_by_group, by_group)
    for group, group_report in by_group.items():
        trainer.track(group_report.scores, state.step, prefix=f"test/{group}/")
    clip = score_with_encoder(work.encoder, test.features, test.image_ids, default_results,
                              references, prompt=clip_prompt)
    folder.clipscore.write_text(json.dumps({**clip, "prompt": clip_prompt}, indent=2))
    summary = DecoderSummary(
        decoder=plan.decoder, registered_as=registered_name(type(best)),
        train=plan.train, generate=plan.generate, parameters=parameters,
        train_steps=state.step, train_seconds=round(state.elapsed_seconds, 1),
        best_val_loss=state.best_val_loss, test=runs, test_groups=groups_summary(by_group),
        clip_scores={k: v for k, v in clip.items() if k != "per_image"},
        caption_stats=caption_statistics(
            list(default_results.values()), (c for r in train.records for c in r.captions)),
    )
    return DecoderOutcome(summary, best, default_results, per_image)


def compare(
    decoders: list[str],
    out: str | Path,
    preset: str = "embedded",
    dataset: dict | None = None,
    encoder: str | dict | None = None,
    cache_dir: str | Path | None = None,
    train_overrides: dict[str, Any] | None = None,
    decoder_overrides: dict[str, dict[str, Any]] | None = None,
    device: str = "cpu",
    progress: bool = True,
    bench_repeats: int = 5,
    threads: int | None = None,
    command: str | None = None,
    log_with: Sequence[str] = (),
) -> dict[str, Any]:
    """Run every decoder on the same features and split; write the run folder and report.

    ``command`` is what ``config.json`` records as the command that made the run (default: this
    process's ``dcap`` command line).

    ``threads`` (else the preset's ``threads``, else torch's default) sets torch's intra-op
    threads for the whole run: the embedded preset's tiny models run on one, because they gain
    little from a second and slow down badly when another process holds a core.
    """
    find_java()  # METEOR and the PTB tokenizer need it: fail now, not after training
    log_with = check_trackers(log_with)  # a tracker not installed: fail now too
    run = RunFolder(Path(out))
    out = run.root
    out.mkdir(parents=True, exist_ok=True)
    plan = load_preset(preset)
    threads = threads if threads is not None else plan.get("threads")
    if threads:
        torch.set_num_threads(int(threads))
    dataset_cfg = dataset or plan.get("dataset", {"type": "shapes"})
    encoder_cfg = encoder_config(encoder if encoder is not None else plan.get("encoder"))
    plans: dict[str, DecoderPlan] = {}
    for name in decoders:
        entry = decoder_plan(plan, name)
        plans[name] = DecoderPlan(
            {**entry["decoder"], **(decoder_overrides or {}).get(name, {})},
            {**entry["train"], **(train_overrides or {})}, entry["generate"], entry["distill"])
    plans = split_scst(plans)  # a train.scst block: the plain row, then its -scst row
    for name, p in plans.items():  # a teacher trains first, in the same run
        if p.distill:
            teacher = DistillPlan.from_dict(p.distill, name).teacher
            if teacher not in plans or list(plans).index(teacher) > list(plans).index(name):
                raise ValueError(f"{name} distils {teacher!r}: run the teacher too, before it "
                                 f"(--decoders {teacher},{name})")
    config = RunConfig(
        command=command or shlex.join(["dcap", *sys.argv[1:]]), preset=preset,
        dataset=dataset_cfg, encoder=encoder_cfg, decoders=plans, device=device,
        cache_dir=str(cache_dir) if cache_dir else None, threads=torch.get_num_threads())
    run.write_config(config)
    # the original CLIP-DiffusionLM code's BLEU-4, when the preset asks for it (``paper``):
    # its tokenizer is loaded now, so an offline machine fails before any training
    classes = {name: resolve("decoder", p.decoder["type"]) for name, p in plans.items()}
    for name, p in plans.items():  # a configuration that cannot work fails before any work
        classes[name].check_config(p.decoder)
        classes[name].check_generate_options(p.generate, p.decoder)
        if p.scst:
            scst = ScstPlan.from_dict(p.scst, p.train, name)
            if not classes[name].capabilities.log_probs:
                raise ValueError(f"{name.removesuffix(SCST_SUFFIX)}: {classes[name].__name__} "
                                 "gives no log-probabilities "
                                 "of its samples (capabilities.log_probs is False), so SCST "
                                 "cannot train it; drop train.scst for it")
            try:
                classes[name].check_generate_options({**p.generate, **scst.sample}, p.decoder)
            except ValueError as error:
                raise ValueError(f"{name.removesuffix(SCST_SUFFIX)}: train.scst.sample: "
                                 f"{error}") from None
    speed = speed_options(plan.get("speed"), bench_repeats)
    diversity = diversity_settings(plan.get("diversity"))
    protocol = dict(plan.get("paper_bleu") or {})
    # every model the run will load, checked together: offline, all the missing ones named
    check_available(
        [req for name, p in plans.items() for req in classes[name].hub_models(p.decoder)]
        + ([(str(protocol["tokenizer"]), "tokenizer")] if protocol.get("tokenizer") else []),
        [] if str(encoder_cfg.get("model", "")).startswith(EMBEDDED_PREFIX)
        else [(str(encoder_cfg.get("model")), encoder_cfg.get("pretrained"))])
    bleu_tokenizer = None
    if protocol:
        unknown = sorted(set(protocol) - {"tokenizer", "max_length", "batch_size"})
        if unknown or "tokenizer" not in protocol:
            raise ValueError(f"preset paper_bleu block: needs tokenizer, takes max_length and "
                             f"batch_size; got {', '.join(sorted(protocol))}")
        bleu_tokenizer = load_paper_bleu_tokenizer(protocol.pop("tokenizer"))

    needs_text = any(classes[name].uses_text_features(p.decoder) for name, p in plans.items())
    dataset_obj = build("dataset", dataset_cfg)
    encoder_obj = build("encoder", {**encoder_cfg, "device": device})
    check_same_plan(out, {
        "dataset": {"config": dataset_cfg, "fingerprint": dataset_obj.fingerprint},
        "encoder": {"config": encoder_cfg, "fingerprint": encoder_obj.fingerprint},
    }, record="inputs.json")
    work = prepare_features(dataset_obj, encoder_obj, cache_dir, progress, needs_text)
    test = work.splits["test"]
    write_annotations(run.annotations, {r.image_id: list(r.captions) for r in test.records})
    test_groups = record_groups(dataset_obj, test.records)
    if test_groups:  # for `dcap evaluate --groups runs/NAME/groups_test.json`
        atomic_write_json(run.groups, {str(k): v for k, v in test_groups.items()}, indent=2)
    prompt = clipscore_prompt(encoder_cfg)
    outcomes: dict[str, DecoderOutcome] = {}
    for name, p in plans.items():
        teacher = None
        if p.distill and not p.scst:  # an SCST row starts from its trained first phase
            source = DistillPlan.from_dict(p.distill, name).teacher
            done = outcomes[source]
            teacher = Teacher(done.decoder if done.decoder is not None
                              else load_best(run, source, plans[source], device),
                              plans[source].generate, float(done.summary["train_seconds"]))
        first_phase = None
        if p.scst:
            source = name.removesuffix(SCST_SUFFIX)
            done = outcomes[source].summary
            first_phase = FirstPhase(source, run.decoder(source).checkpoint,
                                     int(done["train_steps"]), float(done["train_seconds"]),
                                     float((done.get("teacher") or {}).get("train_seconds", 0)))
        outcomes[name] = run_decoder(name, p, work, run, prompt, progress, log_with, teacher,
                                     first_phase)
    # what was trained or scored now stays in memory; only resumed decoders are read back
    names = list(outcomes)
    best = {name: o.decoder if o.decoder is not None
            else load_best(run, name, plans[name], device) for name, o in outcomes.items()}
    results = {name: o.results if o.results is not None else run.decoder(name).read_results()
               for name, o in outcomes.items()}
    per_image = {name: o.per_image if o.per_image is not None
                 else run.decoder(name).read_per_image() for name, o in outcomes.items()}
    summaries = {name: o.summary for name, o in outcomes.items()}
    generate_options = {name: plans[name].generate for name in names}
    if bleu_tokenizer is not None:
        references = {r.image_id: list(r.captions) for r in test.records}
        for name in names:
            summaries[name]["paper_bleu"] = paper_bleu(results[name], references, bleu_tokenizer,
                                                       **protocol)
    if diversity is not None:
        started = time.perf_counter()
        diversity_phase(best, generate_options, test, diversity, run, summaries)
        diversity = {**diversity, "seconds": round(time.perf_counter() - started, 1)}
        rerank_phase(work.encoder, test, results, run, summaries, prompt)
    metrics = RunMetrics(
        dataset=dataset_cfg, encoder={**encoder_cfg, "fingerprint": work.encoder.fingerprint},
        test_images=len(test.records),
        skipped_images={s: len(f.skipped) for s, f in work.splits.items()},
        decoders=summaries,
        significance=analysis.significance(per_image, analysis.like_with_like(names)),
        speed={} if speed is None else analysis.bench_decoders(
            best, generate_options, test.features, device, **speed),
        speed_off=speed is None,
        examples=analysis.examples(run.examples, work.dataset, test, results, best,
                                   generate_options),
        diversity=diversity if diversity is not None else {"off": True},
    )
    if metrics["speed"]:
        run.speed.write_text(json.dumps(metrics["speed"], indent=2))
    logs = {}
    for name in names:
        with jsonlines.open(run.decoder(name).train_log) as log:
            logs[name] = list(log)
    written = [plot_quality_vs_steps(summaries, out / "quality_vs_steps.png"),
               plot_latency_vs_batch(metrics["speed"], out / "latency_vs_batch.png"),
               plot_training_curves(logs, out / "training_curves.png"),
               plot_scst_curves(logs, out / "scst_curves.png"),
               plot_quality_vs_diversity(summaries, out / "quality_vs_diversity.png")]
    metrics["plots"] = [p.name for p in written if p is not None]
    run.metrics.write_text(json.dumps(metrics, indent=2, default=str))
    markdown = render_markdown(config.to_dict(), metrics)
    run.report.write_text(markdown)
    run.report_html.write_text(render_html(markdown, out))
    return metrics
