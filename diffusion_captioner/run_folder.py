"""The run folder ``dcap compare`` writes, typed: every path in it and the records it holds.

Every reader (compare, inference, the web page, analysis, the report's writer, export, the
benchmarks) takes its paths from here instead of spelling them out::

    runs/NAME/config.json              RunConfig: everything needed to rerun
    runs/NAME/inputs.json              the dataset and encoder (configs, fingerprints) it binds
    runs/NAME/annotations_test.json    the test references, COCO annotation format
    runs/NAME/groups_test.json         image id -> group, when the dataset groups its images
    runs/NAME/tracker/<decoder>/       experiment trackers' files (--log-with)
    runs/NAME/<decoder>/               DecoderFolder: plan.json, checkpoint/best, train_log.jsonl,
                                       results_test.json (+ _k<steps>), metrics.json,
                                       metrics_by_group.json, clipscore.json,
                                       samples_test.json (diversity), summary.json (DecoderSummary)
    runs/NAME/metrics.json             RunMetrics: the side-by-side record the report renders
    runs/NAME/speed.json               SpeedResult: the timing phase (rows per decoder)
    runs/NAME/report.md, report.html, examples/, *.png
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypedDict

from eval.coco_format import load_results


@dataclass(frozen=True)
class DecoderPlan:
    """One decoder's settings in a run: constructor arguments (with ``type``), training and
    generation options. Only ``decoder`` and ``train`` bind its trained checkpoint."""

    decoder: dict[str, Any]
    train: dict[str, Any]
    generate: dict[str, Any] = field(default_factory=dict)
    distill: dict[str, Any] = field(default_factory=dict)  # {} or {"teacher", "ratio", "seed"}
    #: {} or the ``train.scst`` block: this plan is the ``<decoder>+scst`` row, the SCST phase
    #: started from the ``<decoder>`` row's best weights (``train`` is that row's first phase)
    scst: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DecoderPlan:
        return cls(dict(data["decoder"]), dict(data.get("train", {})),
                   dict(data.get("generate", {})), dict(data.get("distill") or {}),
                   dict(data.get("scst") or {}))

    def to_dict(self) -> dict[str, Any]:
        out = {"decoder": self.decoder, "train": self.train, "generate": self.generate}
        if self.distill:
            out["distill"] = self.distill
        return {**out, "scst": self.scst} if self.scst else out


@dataclass(frozen=True)
class RunConfig:
    """``config.json``: the command, preset, dataset, encoder and every decoder's plan."""

    command: str
    preset: str
    dataset: dict[str, Any]
    encoder: dict[str, Any]
    decoders: dict[str, DecoderPlan]
    device: str = "cpu"
    cache_dir: str | None = None
    threads: int | None = None

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunConfig:
        return cls(str(data.get("command", "")), str(data.get("preset", "")),
                   dict(data.get("dataset") or {}), dict(data["encoder"]),
                   {name: DecoderPlan.from_dict(plan) for name, plan in data["decoders"].items()},
                   str(data.get("device", "cpu")), data.get("cache_dir"), data.get("threads"))

    def to_dict(self) -> dict[str, Any]:
        return {"command": self.command, "preset": self.preset, "dataset": self.dataset,
                "encoder": self.encoder,
                "decoders": {name: plan.to_dict() for name, plan in self.decoders.items()},
                "device": self.device, "cache_dir": self.cache_dir, "threads": self.threads}


class DecoderSummary(TypedDict, total=False):
    """``<decoder>/summary.json``: what one decoder's training and scoring gave."""

    decoder: dict[str, Any]
    registered_as: str
    train: dict[str, Any]
    generate: dict[str, Any]
    parameters: dict[str, int]
    train_steps: int
    train_seconds: float
    best_val_loss: float | None
    test: dict[str, Any]  # "default" and each swept step count: options, scores, timings
    test_groups: dict[str, Any]  # per test group: images and scores of the default options
    clip_scores: dict[str, float]
    caption_stats: dict[str, Any]
    paper_bleu: dict[str, Any]
    teacher: dict[str, Any]  # a distilled decoder's teacher: name, ratio, train_seconds
    scst: dict[str, Any]  # a +scst row: its first phase (name, steps, seconds) and SCST plan
    diversity: dict[str, Any]  # settings and scores of the samples per step count, or "skipped"


class SpeedRow(TypedDict):
    """One timed setting: generation options at one batch size."""

    options: dict[str, Any]
    batch: int
    images: int
    ms_per_caption: float


class SpeedResult(TypedDict, total=False):
    """``speed.json`` (``analysis.bench_decoders``)."""

    threads: int
    device: str
    repeats: int
    images: int
    distinct_images: int
    compile: dict[str, Any] | None
    decoders: dict[str, list[SpeedRow]]
    crossover: dict[str, Any]
    contrast: dict[str, Any]
    cut_by_budget: list[str]


class RunMetrics(TypedDict, total=False):
    """The run's ``metrics.json``: the record ``report.md`` renders."""

    dataset: dict[str, Any]
    encoder: dict[str, Any]
    test_images: int
    skipped_images: dict[str, int]
    decoders: dict[str, DecoderSummary]
    significance: dict[str, Any]
    speed: SpeedResult
    speed_off: bool
    examples: list[dict[str, Any]]
    plots: list[str]
    diversity: dict[str, Any]  # the diversity phase's settings and seconds, or {"off": True}


@dataclass(frozen=True)
class DecoderFolder:
    """``runs/NAME/<decoder>/``."""

    root: Path

    @property
    def plan(self) -> Path:
        return self.root / "plan.json"

    @property
    def checkpoint(self) -> Path:
        """The best checkpoint (what every reader loads)."""
        return self.root / "checkpoint" / "best"

    @property
    def train_log(self) -> Path:
        return self.root / "train_log.jsonl"

    @property
    def summary(self) -> Path:
        return self.root / "summary.json"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.json"

    @property
    def clipscore(self) -> Path:
        return self.root / "clipscore.json"

    @property
    def metrics_by_group(self) -> Path:
        """Each test group's metrics, when the dataset gives its images groups."""
        return self.root / "metrics_by_group.json"

    @property
    def distill_captions(self) -> Path:
        """The teacher's caption of every training image, for a distilled decoder."""
        return self.root / "distill_captions.json"

    @property
    def samples(self) -> Path:
        """The diversity phase's samples of the default options: image id -> n captions."""
        return self.root / "samples_test.json"

    def results(self, steps: int | str | None = None) -> Path:
        """The COCO result file of the default options, or of the sweep at ``steps``."""
        return self.root / ("results_test.json" if steps is None else f"results_test_k{steps}.json")

    @property
    def reranked_results(self) -> Path:
        """The ``+rerank`` row's test captions (COCO result format)."""
        return self.root / "results_test_rerank.json"

    def has_checkpoint(self) -> bool:
        return (self.checkpoint / "config.json").is_file()

    def read_summary(self) -> DecoderSummary | None:
        return json.loads(self.summary.read_text()) if self.summary.is_file() else None

    def read_results(self) -> dict[int, str]:
        """The default options' test captions by image id."""
        return load_results(self.results())

    def read_per_image(self) -> dict[str, dict[str, float]]:
        """Per-image scores of the default options (``metrics.json``'s ``per_image``)."""
        return json.loads(self.metrics.read_text())["per_image"]


@dataclass(frozen=True)
class RunFolder:
    """``runs/NAME/``."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    @property
    def config(self) -> Path:
        return self.root / "config.json"

    @property
    def inputs(self) -> Path:
        return self.root / "inputs.json"

    @property
    def annotations(self) -> Path:
        return self.root / "annotations_test.json"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.json"

    @property
    def speed(self) -> Path:
        return self.root / "speed.json"

    @property
    def groups(self) -> Path:
        """Image id -> group of the test images (``dcap evaluate --groups``), when grouped."""
        return self.root / "groups_test.json"

    @property
    def tracker(self) -> Path:
        """The experiment trackers' files (``--log-with``), one folder per decoder."""
        return self.root / "tracker"

    @property
    def report(self) -> Path:
        return self.root / "report.md"

    @property
    def report_html(self) -> Path:
        return self.root / "report.html"

    @property
    def examples(self) -> Path:
        return self.root / "examples"

    def decoder(self, name: str) -> DecoderFolder:
        return DecoderFolder(self.root / name)

    def read_config(self) -> RunConfig:
        """``config.json``; a folder without one fails in one line naming it."""
        if not self.config.is_file():
            raise FileNotFoundError(f"run folder {self.root}: no config.json; is it a "
                                    "`dcap compare` --out?")
        return RunConfig.from_dict(json.loads(self.config.read_text()))

    def write_config(self, config: RunConfig) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.config.write_text(json.dumps(config.to_dict(), indent=2))

    def read_metrics(self) -> RunMetrics:
        return json.loads(self.metrics.read_text())

    def is_finished(self, names: list[str]) -> bool:
        """A complete ``dcap compare`` folder for ``names``: report written and every decoder's
        best checkpoint present."""
        return (self.config.is_file() and self.report.is_file()
                and all(self.decoder(name).has_checkpoint() for name in names))
