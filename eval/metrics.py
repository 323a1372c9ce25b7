"""COCO caption metrics with pycocoevalcap: BLEU-1..4, METEOR, ROUGE-L, CIDEr-D and SPICE.

The pipeline is ``pycocoevalcap.eval.COCOEvalCap.evaluate`` restricted to the images that have a
result (as the coco-caption demo does by setting ``params['image_id'] = cocoRes.getImgIds()``):

1. every reference and candidate is tokenised by Stanford's PTBTokenizer (CoreNLP 3.4.1,
   ``-preserveLines -lowerCase``) and pycocoevalcap's punctuation tokens are dropped;
2. each scorer compares ``{image_id: [candidate]}`` with ``{image_id: [references]}``.

With c the candidate and R the references of one image:

- ``Bleu_n``: corpus BLEU, BP * exp(sum_{k<=n} log(p_k) / n), where the clipped k-gram precisions
  p_k and the lengths are pooled over all images and BP = min(1, exp(1 - r / len(c))) uses the
  closest reference length r. Per-image values apply the same formula to one sentence.
- ``METEOR`` (1.5, ``-l en -norm``): F_mean = P R / (alpha P + (1 - alpha) R) over exact, stem,
  synonym and paraphrase alignments, times (1 - fragmentation penalty), best over R. The corpus
  value comes from pooled statistics, so it is not the mean of the per-image values.
- ``ROUGE_L``: F_beta (beta = 1.2) of the longest common subsequence precision and recall, the
  maxima over R; corpus value = mean over images.
- ``CIDEr`` (CIDEr-D): 10 * mean_{r in R} mean_{n=1..4} of the cosine between clipped tf-idf
  n-gram vectors of c and r, times exp(-(len(c) - len(r))^2 / (2 * 6^2)). The idf is computed over
  the references of the scored images, so the value depends on which images are scored;
  corpus value = mean over images.
- ``SPICE``: F-score of scene-graph tuples parsed from c against those of R; corpus value = mean.

METEOR, the tokenizer and SPICE run Java (:mod:`eval.java_scorers`). Nothing downloads anything:
SPICE needs the Stanford CoreNLP 3.6.0 jars, which pycocoevalcap fetches on first use; when they
are absent SPICE is reported in ``MetricReport.skipped`` with the command that fetches them.
"""

from __future__ import annotations

import json
import logging
import math
import numbers
import os
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.rouge.rouge import Rouge

from eval.coco_format import (
    EvaluationInputError,
    atomic_write_json,
    load_annotations,
    load_results,
)
from eval.java_scorers import (
    JAVA_INSTALL_HINT,
    METEOR_TIMEOUT_S,
    JavaMissingError,
    MeteorProcess,
    ScorerError,
    SpiceUnavailable,
    find_java,
    ptb_tokenize,
    run_spice,
    spice_unavailable_reason,
    timeout_for,
)

logger = logging.getLogger(__name__)

# Re-exported: the Java errors and checks belong to this module's public interface.
__all__ = [
    "ALL_METRICS", "JAVA_INSTALL_HINT", "JavaMissingError", "MetricReport", "ScorerError",
    "evaluate_files", "find_java", "score_captions", "spice_unavailable_reason",
]

MetricName = Literal["Bleu", "METEOR", "ROUGE_L", "CIDEr", "SPICE"]
ALL_METRICS: tuple[MetricName, ...] = get_args(MetricName)
SCORE_NAMES: tuple[str, ...] = (
    "Bleu_1",
    "Bleu_2",
    "Bleu_3",
    "Bleu_4",
    "METEOR",
    "ROUGE_L",
    "CIDEr",
    "SPICE",
)
_REPORT_KEYS = ("skipped", "num_images", "seconds", "per_image")


@dataclass
class MetricReport:
    """Scores of one result set.

    ``scores`` uses pycocoevalcap's names (``Bleu_1`` .. ``Bleu_4``, ``METEOR``, ``ROUGE_L``,
    ``CIDEr``, ``SPICE``); ``per_image[name][image_id]`` holds the per-image value of each scored
    metric (for paired bootstrap); ``skipped`` maps a requested metric that could not run to the
    reason; ``seconds`` is the wall time of scoring.
    """

    scores: dict[str, float]
    per_image: dict[str, dict[int, float]] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    num_images: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict: scores at the top level, then skipped, num_images, seconds, per_image.

        Non-finite values (SPICE can give NaN) become ``null``; image ids become strings.
        """
        out: dict[str, Any] = {name: _finite_or_none(value) for name, value in self.scores.items()}
        out["skipped"] = dict(self.skipped)
        out["num_images"] = self.num_images
        out["seconds"] = round(self.seconds, 3)
        out["per_image"] = {
            name: {str(image_id): _finite_or_none(value) for image_id, value in values.items()}
            for name, values in self.per_image.items()
        }
        return out

    def to_json(self, indent: int | None = 2) -> str:
        """The :meth:`to_dict` document as a JSON string."""
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> MetricReport:
        """Inverse of :meth:`to_dict` (``null`` scores come back as NaN)."""
        scores = {
            name: _none_to_nan(value) for name, value in data.items() if name not in _REPORT_KEYS
        }
        per_image = {
            name: {int(image_id): _none_to_nan(value) for image_id, value in values.items()}
            for name, values in data.get("per_image", {}).items()
        }
        return cls(
            scores=scores,
            per_image=per_image,
            skipped=dict(data.get("skipped", {})),
            num_images=int(data.get("num_images", 0)),
            seconds=float(data.get("seconds", 0.0)),
        )

    def write(self, path: str | os.PathLike[str]) -> Path:
        """Write :meth:`to_dict` as JSON to ``path`` atomically; returns the path."""
        return atomic_write_json(path, self.to_dict(), indent=2)


def _finite_or_none(value: float) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


def _none_to_nan(value: float | None) -> float:
    return math.nan if value is None else float(value)


# ----------------------------------------------------------------------------- scoring


def _normalise_metrics(metrics: str | Iterable[str]) -> list[MetricName]:
    """Metric families to run, in canonical order; ``Bleu_4`` etc. select ``Bleu``."""
    names = [metrics] if isinstance(metrics, str) else list(metrics)
    wanted: set[str] = set()
    for name in names:
        family = "Bleu" if re.fullmatch(r"Bleu(_[1-4])?", name) else name
        if family not in ALL_METRICS:
            raise EvaluationInputError(
                f"unknown metric {name!r}; choose from {', '.join(ALL_METRICS)}"
            )
        wanted.add(family)
    if not wanted:
        raise EvaluationInputError(f"no metrics requested; choose from {', '.join(ALL_METRICS)}")
    return [name for name in ALL_METRICS if name in wanted]


def _check_inputs(
    results: Mapping[int, str],
    references: Mapping[int, Sequence[str]],
    results_name: str = "results",
    references_name: str = "references",
) -> list[int]:
    """Validate results against references; return the result image ids, sorted."""
    if not results:
        raise EvaluationInputError(f"{results_name}: no captions to score")
    for image_id in results:
        if isinstance(image_id, bool) or not isinstance(image_id, numbers.Integral):
            raise EvaluationInputError(
                f"{results_name}: image id {image_id!r} is not an integer; COCO image ids are ints"
            )
    missing = [image_id for image_id in results if image_id not in references]
    if missing:
        examples = ", ".join(repr(image_id) for image_id in sorted(missing, key=str)[:5])
        raise EvaluationInputError(
            f"{results_name}: {len(missing)} of {len(results)} image ids are not in "
            f"{references_name} (e.g. {examples}); score captions against the annotations "
            "of the split they were generated for"
        )
    for image_id, caption in results.items():
        if not isinstance(caption, str):
            raise EvaluationInputError(
                f"{results_name}: caption of image {image_id!r} is {type(caption).__name__}, "
                "not str"
            )
        refs = references[image_id]
        if isinstance(refs, str) or not refs or not all(isinstance(r, str) for r in refs):
            raise EvaluationInputError(
                f"{references_name}: image {image_id!r} needs a non-empty list of reference "
                "caption strings"
            )
    return sorted(results)


def score_captions(
    results: Mapping[int, str],
    references: Mapping[int, Sequence[str]],
    metrics: str | Sequence[str] = ALL_METRICS,
    *,
    meteor: MeteorProcess | None = None,
) -> MetricReport:
    """Score ``results`` (image id -> caption) against ``references`` (image id -> captions).

    Scores are computed over the images in ``results``; each must be in ``references``
    (else :class:`EvaluationInputError`). Raises :class:`JavaMissingError` without a Java
    runtime and :class:`ScorerError` if the tokenizer or METEOR fails. SPICE never raises: when
    it cannot run, it is listed in ``skipped`` with the reason. ``meteor``: an open
    :class:`MeteorProcess` to use (and leave open), saving its JVM start when scoring many
    subsets (:mod:`eval.groups`).
    """
    return _score(results, references, metrics, "results", "references", meteor)


def _score(
    results: Mapping[int, str],
    references: Mapping[int, Sequence[str]],
    metrics: str | Sequence[str],
    results_name: str,
    references_name: str,
    shared_meteor: MeteorProcess | None = None,
) -> MetricReport:
    start = time.perf_counter()
    wanted = _normalise_metrics(metrics)
    ids = _check_inputs(results, references, results_name, references_name)
    java = find_java()
    if len(ids) < len(references):
        logger.info(
            "scoring the %d of %d reference images that have a result", len(ids), len(references)
        )

    skipped: dict[str, str] = {}
    if "SPICE" in wanted and (reason := spice_unavailable_reason()) is not None:
        skipped["SPICE"] = reason
        logger.warning("SPICE skipped: %s", reason)

    scores: dict[str, float] = {}
    per_image: dict[str, list[float]] = {}
    # Start METEOR's JVM first: loading its paraphrase table overlaps tokenisation and BLEU/CIDEr.
    meteor = shared_meteor if shared_meteor is not None or "METEOR" not in wanted else (
        MeteorProcess(java, timeout_for(METEOR_TIMEOUT_S, len(ids)))
    )
    try:
        gts, res = _tokenize(java, ids, results, references)
        if "Bleu" in wanted:
            bleu, bleu_per_image = Bleu(4).compute_score(gts, res, verbose=0)
            for n in range(4):
                scores[f"Bleu_{n + 1}"] = float(bleu[n])
                per_image[f"Bleu_{n + 1}"] = [float(v) for v in bleu_per_image[n]]
        if "ROUGE_L" in wanted:
            rouge, rouge_per_image = Rouge().compute_score(gts, res)
            scores["ROUGE_L"] = float(rouge)
            per_image["ROUGE_L"] = [float(v) for v in rouge_per_image]
        if "CIDEr" in wanted:
            cider, cider_per_image = Cider().compute_score(gts, res)
            scores["CIDEr"] = float(cider)
            per_image["CIDEr"] = [float(v) for v in cider_per_image]
        if meteor is not None and "METEOR" in wanted:
            scores["METEOR"], per_image["METEOR"] = meteor.score(gts, res)
    finally:
        if meteor is not None and meteor is not shared_meteor:
            meteor.close()

    if "SPICE" in wanted and "SPICE" not in skipped:
        try:
            scores["SPICE"], per_image["SPICE"] = run_spice(java, ids, gts, res)
        except SpiceUnavailable as err:
            skipped["SPICE"] = " ".join(str(err).split())
            logger.warning("SPICE skipped: %s", skipped["SPICE"])

    seconds = time.perf_counter() - start
    ordered = {name: scores[name] for name in SCORE_NAMES if name in scores}
    report = MetricReport(
        scores=ordered,
        per_image={
            name: dict(zip(ids, per_image[name], strict=True))
            for name in SCORE_NAMES
            if name in per_image
        },
        skipped=skipped,
        num_images=len(ids),
        seconds=seconds,
    )
    logger.info(
        "scored %d images in %.1f s: %s",
        len(ids),
        seconds,
        ", ".join(f"{name}={value:.3f}" for name, value in ordered.items()),
    )
    return report


def _tokenize(
    java: str,
    ids: Sequence[int],
    results: Mapping[int, str],
    references: Mapping[int, Sequence[str]],
) -> tuple[dict[int, list[str]], dict[int, list[str]]]:
    """PTB-tokenise references and candidates in one JVM call; both dicts keyed in ``ids`` order."""
    flat_refs = [ref for image_id in ids for ref in references[image_id]]
    tokens = ptb_tokenize(java, flat_refs + [results[image_id] for image_id in ids])
    gts: dict[int, list[str]] = {}
    cursor = 0
    for image_id in ids:
        count = len(references[image_id])
        gts[image_id] = tokens[cursor : cursor + count]
        cursor += count
    res = {image_id: [tokens[cursor + k]] for k, image_id in enumerate(ids)}
    return gts, res


def evaluate_files(
    results_path: str | os.PathLike[str],
    annotations_path: str | os.PathLike[str],
    out_path: str | os.PathLike[str] | None = None,
    metrics: str | Sequence[str] = ALL_METRICS,
) -> MetricReport:
    """Score a COCO result file against a COCO captions annotation file.

    When ``out_path`` is given, the metrics JSON (:meth:`MetricReport.to_dict`: pycocoevalcap
    names at the top level, ``skipped``, ``num_images``, ``seconds``, ``per_image``) is written
    there atomically.
    """
    results = load_results(results_path)
    references = load_annotations(annotations_path)
    report = _score(
        results,
        references,
        metrics,
        f"results file {results_path}",
        f"annotation file {annotations_path}",
    )
    if out_path is not None:
        report.write(out_path)
        logger.info("wrote metrics to %s", out_path)
    return report
