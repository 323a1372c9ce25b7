"""The Python API: what the ``dcap`` commands do, as functions that return values instead of
printing. The CLI (``cli.py``) is a thin layer over these::

    import diffusion_captioner as dc

    dc.available("decoder")                              # ['clipcap', 'diffusion', 'mnic', 'nearest']
    result = dc.compare(decoders="clipcap,diffusion")    # dcap compare: result.folder, .scores
    captions = dc.load_run(result.folder).caption(["a.jpg", pil_image])   # {decoder: [caption]}
    dc.evaluate("results.json", "annotations.json").scores               # dcap evaluate
    dc.export(result.folder, "shared/my-run")                            # dcap export

Arguments are the CLI's, with the same spellings (``"a,b"`` or a list; a dict or a JSON string),
and fail with the same one-line errors. Heavy modules (torch, transformers, open_clip) are
imported when a function is called, so ``import diffusion_captioner`` stays cheap.
"""

from __future__ import annotations

import json
import logging
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from diffusion_captioner.inference import LoadedRun

if TYPE_CHECKING:
    from eval.metrics import MetricReport

logger = logging.getLogger(__name__)

ROLES = ("decoder", "encoder", "dataset")


def _include(include_package: Any) -> None:
    import registry
    from diffusion_captioner.arguments import as_list

    for package in as_list(include_package):
        registry.include_package(package)


# --------------------------------------------------------------------------------------------
# What is registered
# --------------------------------------------------------------------------------------------
@dataclass
class Components:
    """Every registered component by role (``{name: one-line description}``), the presets, and
    the plugins that failed to load (``{plugin: error}``)."""

    decoders: dict[str, str]
    encoders: dict[str, str]
    datasets: dict[str, str]
    presets: list[str]
    broken_plugins: dict[str, str] = field(default_factory=dict)

    def by_role(self) -> dict[str, dict[str, str]]:
        return {"decoder": self.decoders, "encoder": self.encoders, "dataset": self.datasets}


def _role(role: str) -> str:
    singular = str(role).rstrip("s") if str(role) not in ROLES else str(role)
    if singular not in (*ROLES, "preset"):
        raise ValueError(f"unknown role {role!r}; roles: {', '.join(ROLES)}, preset")
    return singular


def available(role: str = "decoder", include_package: Any = None) -> list[str]:
    """Registered names of ``role`` (``decoder``, ``encoder``, ``dataset``; or ``preset``), with
    built-ins, entry-point plugins and ``include_package`` modules loaded."""
    role = _role(role)
    _include(include_package)
    if role == "preset":
        from diffusion_captioner.presets import available_presets

        return available_presets()
    import registry

    return registry.available(role)


def list_components(include_package: Any = None) -> Components:
    """What ``dcap list`` shows: every decoder, encoder and dataset with its description, the presets."""
    import registry
    from diffusion_captioner.presets import available_presets

    _include(include_package)
    found = {role: {name: registry.describe(registry.resolve(role, name))
                    for name in registry.available(role)} for role in ROLES}
    return Components(found["decoder"], found["encoder"], found["dataset"], available_presets(),
                      dict(registry.plugin_errors))


# --------------------------------------------------------------------------------------------
# compare
# --------------------------------------------------------------------------------------------
@dataclass
class CompareResult:
    """A finished ``compare``: its run folder and the run's ``metrics.json`` content."""

    folder: Path
    metrics: dict[str, Any]

    @property
    def scores(self) -> dict[str, dict[str, float]]:
        """``{decoder: {metric: value}}`` on the test split at the default options
        (pycocoevalcap's names, plus ``CLIPScore`` and ``RefCLIPScore``)."""
        return {name: {**summary["test"]["default"]["scores"], **summary.get("clip_scores", {})}
                for name, summary in self.metrics["decoders"].items()}

    @property
    def report(self) -> str:
        """The run's ``report.md``."""
        return (self.folder / "report.md").read_text()


_COMPARE_DEFAULTS: dict[str, Any] = {
    "decoders": None, "out": None, "preset": "embedded", "dataset": None, "encoder": None,
    "cache_dir": None, "train": None, "device": "cpu", "include_package": None, "quiet": False,
    "data_dir": None, "threads": None, "decoder_config": None,
}


def equivalent_command(arguments: Mapping[str, Any]) -> str:
    """The ``dcap compare`` line of a Python call (only the arguments that differ from the
    defaults), recorded as the run's ``command``."""
    words = ["dcap", "compare"]
    for name, default in _COMPARE_DEFAULTS.items():
        value = arguments.get(name, default)
        if value == default:
            continue
        flag = f"--{name.replace('_', '-')}"
        if value is True:
            words.append(flag)
            continue
        if isinstance(value, dict):
            value = json.dumps(value)
        elif isinstance(value, list | tuple):
            value = ",".join(map(str, value))
        words += [flag, str(value)]
    return shlex.join(words)


def compare(
    decoders: Any = None,
    out: str | Path | None = None,
    preset: str = "embedded",
    dataset: Any = None,
    encoder: str | dict | None = None,
    cache_dir: str | Path | None = None,
    train: Any = None,
    device: str = "cpu",
    include_package: Any = None,
    quiet: bool = False,
    data_dir: str | Path | None = None,
    threads: int | None = None,
    decoder_config: Any = None,
    log_with: Any = None,
    *,
    command: str | None = None,
) -> CompareResult:
    """``dcap compare``: train each decoder on the same cached features and split, score the test
    split, write the run folder and its report; returns the folder and its metrics.

    The arguments are the command's (``dcap compare --help``): ``decoders`` a list or
    ``"a,b"`` (default: every registered decoder), ``dataset`` a name or a config dict,
    ``train`` and ``decoder_config`` dicts (or JSON strings). Rerunning into the same ``out``
    resumes. ``command`` is what ``config.json`` records as the command that made the run
    (default: the equivalent ``dcap compare`` line of this call).
    """
    arguments = dict(locals())
    import registry
    from diffusion_captioner import comparison as compare_module
    from diffusion_captioner.arguments import as_dict, as_list, dataset_config
    from diffusion_captioner.tracking import check_trackers

    trackers = check_trackers(as_list(log_with))  # a tracker not installed: before anything loads
    _include(include_package)
    if dataset is None and data_dir is not None:  # the preset's dataset, under --data-dir
        from diffusion_captioner.presets import load_preset

        dataset = load_preset(preset).get("dataset")
    from diffusion_captioner.presets import decoder_plan, load_preset

    names = as_list(decoders) or registry.available("decoder")
    loaded_preset = load_preset(preset)
    for name in names:  # fail before any work on an unknown name (a preset row names its type)
        registry.resolve("decoder", decoder_plan(loaded_preset, name)["decoder"]["type"])
    configs = as_dict(decoder_config, "decoder-config") or {}
    stray = sorted(set(configs) - set(names))
    if stray or not all(isinstance(v, dict) for v in configs.values()):
        raise ValueError(f"--decoder-config: a JSON object of {{decoder: {{argument: value}}}} "
                         f"for the decoders run ({', '.join(names)}); "
                         + (f"not run: {', '.join(stray)}" if stray else "values must be objects"))
    out_dir = Path(out) if out else Path("runs") / f"{Path(preset).stem}-{'-'.join(names)}"
    metrics = compare_module.compare(
        names, out_dir, preset=preset,
        dataset=dataset_config(dataset, str(data_dir) if data_dir is not None else None),
        encoder=encoder, cache_dir=Path(cache_dir) / "features" if cache_dir else None,
        train_overrides=as_dict(train, "train"), device=device, progress=not quiet,
        threads=threads, decoder_overrides=configs, log_with=trackers,
        command=command or equivalent_command(arguments),
    )
    return CompareResult(out_dir, metrics)


# --------------------------------------------------------------------------------------------
# load_run and caption
# --------------------------------------------------------------------------------------------
@dataclass
class Run(LoadedRun):
    """A loaded run (``compare`` folder, export or ``hf-hub:org/name``): its encoder and each
    decoder's best checkpoint, ready to caption. ``create_app(loaded=run)`` serves it."""

    folder: str = ""

    @property
    def names(self) -> list[str]:
        """The loaded decoders."""
        return list(self.decoders)

    def _select(self, decoders: Any) -> list[str]:
        from diffusion_captioner.arguments import as_list

        names = as_list(decoders) or self.names
        unknown = [n for n in names if n not in self.decoders]
        if unknown:
            raise ValueError(f"decoders: {', '.join(unknown)} not loaded; loaded: "
                             f"{', '.join(self.names)}")
        return list(dict.fromkeys(names))

    def _options(self, names: list[str], options: dict[str, Any]) -> dict[str, dict[str, Any]]:
        """Each generation option goes to the decoders whose ``Options`` name it (checked there:
        a mistyped value fails); one that none of them takes fails."""
        accepted: dict[str, dict[str, Any]] = {}
        takers: dict[str, list[str]] = {key: [] for key in options}
        for name in names:
            decoder = self.decoders[name]
            mine = {key: value for key, value in options.items()
                    if key in decoder.Options.names()}
            decoder.options(mine)  # a value of the wrong type fails here, naming the option
            for key in mine:
                takers[key].append(name)
            accepted[name] = mine
        untaken = [key for key, found in takers.items() if not found]
        if untaken:
            raise ValueError(f"caption: no decoder of {', '.join(names)} takes option(s) "
                             f"{', '.join(untaken)}")
        return accepted

    def caption(self, images: Any, decoders: Any = None, **options: Any) -> dict[str, list[str]]:
        """Caption ``images`` (a file path, a PIL image, or a list of them) with every loaded
        decoder (or ``decoders``): ``{decoder: [one caption per image, in order]}``.

        The images are encoded once and each decoder generates in the batches ``dcap caption``
        uses. ``options`` are generation options (``steps=10``) over the run's own; each goes to
        the decoders that take it. An unreadable file raises :class:`BadImageError` naming it,
        before anything is generated.
        """
        import torch
        from PIL import Image

        from diffusion_captioner.images import BadImageError, load_rgb, to_rgb
        from diffusion_captioner.inference import caption_pixels

        names = self._select(decoders)
        per_decoder = self._options(names, options)
        single = isinstance(images, str | Path | Image.Image)
        pixels, failures = [], []
        for item in [images] if single else list(images):
            try:
                image = to_rgb(item) if isinstance(item, Image.Image) else load_rgb(item)
            except BadImageError as error:
                failures.append(str(error))
                continue
            pixels.append(self.encoder.preprocess(image))
        if failures:
            more = f" (and {len(failures) - 1} more unreadable)" if len(failures) > 1 else ""
            raise BadImageError(f"{failures[0]}{more}")
        if not pixels:
            return {name: [] for name in names}
        subset = LoadedRun(self.encoder, {n: self.decoders[n] for n in names},
                           self.generate_options)
        return caption_pixels(subset, torch.stack(pixels), per_decoder)

    def caption_files(self, paths: Sequence[str | Path], **options: Any
                      ) -> tuple[dict[str, dict[str, str]], dict[str, str]]:
        """``dcap caption``'s form: ``({path: {decoder: caption}}, {unreadable path: error})``;
        a bad file is reported and the others captioned."""
        from diffusion_captioner.inference import caption_files

        return caption_files(self, list(paths), **options)


def load_run(run: str | Path, decoders: Any = None, device: str = "cpu",
             include_package: Any = None) -> Run:
    """Load a run for captioning: a ``compare`` run folder, a ``dcap export`` folder, or
    ``hf-hub:org/name`` (an export on the hub; offline and uncached it fails in one line).

    ``decoders`` picks a subset (a list or ``"a,b"``; default all).
    """
    from diffusion_captioner import inference
    from diffusion_captioner.arguments import as_list

    _include(include_package)
    loaded = inference.load_run(run, as_list(decoders) or None, device=device)
    return Run(loaded.encoder, loaded.decoders, loaded.generate_options, str(run))


# --------------------------------------------------------------------------------------------
# evaluate
# --------------------------------------------------------------------------------------------
@dataclass
class Evaluation:
    """Scores of a result set: pycocoevalcap's names (``Bleu_1`` .. ``CIDEr``), the metrics that
    could not run with the reason, the original CLIP-DiffusionLM code's BLEU-4 when asked for,
    and the full report (per-image values)."""

    scores: dict[str, float]
    skipped: dict[str, str]
    paper_bleu: float | None
    report: MetricReport
    #: With ``groups``: each group's report, and where they were written (beside ``out``).
    by_group: dict[str, MetricReport] | None = None
    by_group_file: Path | None = None


def evaluate(results: str | Path | Mapping[int, str],
             annotations: str | Path | Mapping[int, Sequence[str]],
             out: str | Path | None = None, paper_bleu: str | None = None,
             groups: str | Path | Mapping[int, str] | None = None) -> Evaluation:
    """``dcap evaluate``: score a COCO result JSON against a COCO caption annotation file
    (pycocoevalcap). In Python either may also be a dict (``{image_id: caption}``,
    ``{image_id: [references]}``). ``out`` writes the metrics JSON; ``paper_bleu`` names the
    word-piece tokenizer of the original code's BLEU-4 protocol (``distilbert-base-uncased``);
    ``groups`` (a group file, a nocaps annotation file or ``{image_id: group}``) also scores
    each group alone (written to ``<out stem>_by_group.json``)."""
    from eval.coco_format import load_annotations, load_results
    from eval.groups import check_groups, load_groups, score_groups, write_groups
    from eval.metrics import evaluate_files, score_captions

    group_of = None
    if groups is not None:  # a bad or incomplete group file fails before any scoring
        group_of = dict(groups) if isinstance(groups, Mapping) else load_groups(groups)
        check_groups(results if isinstance(results, Mapping) else load_results(results),
                     group_of, f"--groups {groups}" if not isinstance(groups, Mapping)
                     else "the groups")

    bleu_tokenizer = None
    if paper_bleu:  # loaded first: an offline machine fails before any scoring
        from eval.paper_bleu import load_paper_bleu_tokenizer

        bleu_tokenizer = load_paper_bleu_tokenizer(str(paper_bleu))
    if isinstance(results, Mapping) or isinstance(annotations, Mapping):
        hypotheses = results if isinstance(results, Mapping) else load_results(results)
        references = annotations if isinstance(annotations, Mapping) else load_annotations(annotations)
        report = score_captions(hypotheses, references)
        if out is not None:
            report.write(out)
    else:
        report = evaluate_files(results, annotations, out)
    value = None
    if bleu_tokenizer is not None:
        from eval.paper_bleu import paper_bleu as original_bleu

        hypotheses = results if isinstance(results, Mapping) else load_results(results)
        references = annotations if isinstance(annotations, Mapping) else load_annotations(annotations)
        value = original_bleu(hypotheses, references, bleu_tokenizer)
    by_group, by_group_file = None, None
    if group_of is not None:
        hypotheses = results if isinstance(results, Mapping) else load_results(results)
        references = annotations if isinstance(annotations, Mapping) else load_annotations(annotations)
        by_group = score_groups(hypotheses, references, group_of)
        if out is not None:
            by_group_file = write_groups(Path(out).with_name(f"{Path(out).stem}_by_group.json"),
                                         by_group)
    return Evaluation(dict(report.scores), dict(report.skipped), value, report, by_group,
                      by_group_file)


# --------------------------------------------------------------------------------------------
# export
# --------------------------------------------------------------------------------------------
def export(run: str | Path, to: str | Path, push_to_hub: str | None = None) -> Path:
    """``dcap export``: write a self-contained, shareable copy of a run (encoder, each decoder's
    best checkpoint, a Hugging Face model card) that ``load_run``, ``dcap caption`` and
    ``dcap serve`` accept as a run folder; ``push_to_hub="org/name"`` uploads it. A non-empty
    ``to`` that is not an export of the same run is refused. Returns ``to``."""
    from diffusion_captioner.sharing import export_run

    return export_run(run, to, push_to_hub=push_to_hub)
