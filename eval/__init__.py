"""COCO-style caption evaluation: result/annotation JSON files and pycocoevalcap metrics."""

from __future__ import annotations

from eval.coco_format import (
    EvaluationInputError,
    load_annotations,
    load_results,
    write_annotations,
    write_results,
)
from eval.metrics import (
    ALL_METRICS,
    JavaMissingError,
    MetricReport,
    ScorerError,
    evaluate_files,
    score_captions,
)

__all__ = [
    "ALL_METRICS",
    "EvaluationInputError",
    "JavaMissingError",
    "MetricReport",
    "ScorerError",
    "evaluate_files",
    "load_annotations",
    "load_results",
    "score_captions",
    "write_annotations",
    "write_results",
]
