"""Metrics per group of test images (nocaps domains, shapes object counts, your own labels).

A *group file* maps image ids to group names, as JSON::

    {"0": "in-domain", "1": "near-domain", "2": "out-domain", ...}

(keys are image ids as strings or ints, values any string). A nocaps annotation file
(``nocaps_val_4500_captions.json``: ``images`` entries with ``id`` and ``domain``) is read as
one directly: each image's group is its domain.

For a group g with image set I_g the report is :func:`eval.metrics.score_captions` over the
results restricted to I_g, exactly as if only those images had been evaluated: the I_g sum to
the scored images, corpus BLEU pools its n-gram counts within I_g, and CIDEr-D's idf is taken
over the references of I_g (so a group's CIDEr is not a share of the overall one).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from eval.coco_format import EvaluationInputError
from eval.java_scorers import METEOR_TIMEOUT_S, MeteorProcess, find_java, timeout_for
from eval.metrics import ALL_METRICS, MetricReport, score_captions

logger = logging.getLogger(__name__)

GROUPS_SHAPE = '{"<image id>": "<group name>", ...} or a nocaps annotation file'


def load_groups(path: str | os.PathLike[str]) -> dict[int, str]:
    """Image id -> group name from a group file or a nocaps annotation file (see the module)."""
    path = Path(path)
    what = f"group file {path}"
    if not path.is_file():
        raise EvaluationInputError(f"{what}: no such file; --groups takes {GROUPS_SHAPE}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise EvaluationInputError(f"{what}: not valid JSON ({error}); expected {GROUPS_SHAPE}"
                                   ) from error
    if isinstance(data, dict) and isinstance(data.get("images"), list):  # nocaps layout
        groups: dict[int, str] = {}
        for index, image in enumerate(data["images"]):
            if not isinstance(image, dict) or "id" not in image or "domain" not in image:
                raise EvaluationInputError(f"{what}: images[{index}] has no 'id' and 'domain' "
                                           "(a nocaps annotation file has both on every image)")
            groups[_image_id(image["id"], what)] = str(image["domain"])
        return groups
    if not isinstance(data, dict) or not data:
        raise EvaluationInputError(f"{what}: expected {GROUPS_SHAPE}")
    groups = {}
    for key, value in data.items():
        if not isinstance(value, str) or not value:
            raise EvaluationInputError(f"{what}: the group of image {key} is {value!r}, not a "
                                       "name (a non-empty string)")
        groups[_image_id(key, what)] = value
    return groups


def _image_id(value: Any, what: str) -> int:
    try:
        if isinstance(value, bool):
            raise ValueError
        return int(value)
    except (TypeError, ValueError) as error:
        raise EvaluationInputError(f"{what}: image id {value!r} is not an integer") from error


def record_groups(dataset: Any, records: Iterable[Any]) -> dict[int, str] | None:
    """``dataset.group(record)`` of every record; None when the dataset gives no record a group.

    Records without a group (when some have one) are put in the group ``"other"``.
    """
    group_of = getattr(dataset, "group", None)
    if group_of is None:
        return None
    groups = {record.image_id: group_of(record) for record in records}
    if not any(g is not None for g in groups.values()):
        return None
    return {image_id: str(g) if g is not None else "other" for image_id, g in groups.items()}


def check_groups(results: Mapping[int, Any], groups: Mapping[int, str],
                 groups_name: str = "the group file") -> None:
    """Every result image id has a group, else one :class:`EvaluationInputError` line."""
    missing = [image_id for image_id in results if image_id not in groups]
    if missing:
        examples = ", ".join(map(str, sorted(missing)[:5]))
        raise EvaluationInputError(
            f"{len(missing)} of {len(results)} result image ids have no group (e.g. {examples}); "
            f"{groups_name} must name every image of the results")


def score_groups(
    results: Mapping[int, str],
    references: Mapping[int, Sequence[str]],
    groups: Mapping[int, str],
    metrics: str | Sequence[str] = ALL_METRICS,
) -> dict[str, MetricReport]:
    """One :class:`MetricReport` per group (groups in sorted order), each scored alone.

    Every result image needs a group (else :class:`EvaluationInputError` naming a few).
    """
    check_groups(results, groups)
    members: dict[str, dict[int, str]] = {}
    for image_id, caption in results.items():
        members.setdefault(groups[image_id], {})[image_id] = caption
    wanted = [metrics] if isinstance(metrics, str) else list(metrics)
    meteor = None
    if "METEOR" in wanted:  # one JVM for every group (its start costs seconds)
        meteor = MeteorProcess(find_java(), timeout_for(METEOR_TIMEOUT_S, len(results)))
    reports = {}
    try:
        for group in sorted(members):
            logger.info("scoring group %s (%d images)", group, len(members[group]))
            reports[group] = score_captions(members[group], references, metrics=metrics,
                                            meteor=meteor)
    finally:
        if meteor is not None:
            meteor.close()
    return reports


def groups_summary(reports: Mapping[str, MetricReport]) -> dict[str, dict[str, Any]]:
    """``{group: {"num_images", "scores", "skipped"}}`` for summaries and the report."""
    return {group: {"num_images": r.num_images, "scores": dict(r.scores),
                    "skipped": dict(r.skipped)} for group, r in reports.items()}


def write_groups(path: str | os.PathLike[str], reports: Mapping[str, MetricReport]) -> Path:
    """``{group: MetricReport.to_dict()}`` as JSON (per-image scores included)."""
    from eval.coco_format import atomic_write_json

    return atomic_write_json(path, {g: r.to_dict() for g, r in reports.items()}, indent=2)
