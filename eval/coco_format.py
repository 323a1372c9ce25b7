"""COCO caption files: the result format and the annotation format, read and written strictly.

Two JSON layouts are used by every COCO-style captioning evaluation:

- results (one caption per image)::

      [{"image_id": int, "caption": str}, ...]

- annotations (any number of reference captions per image)::

      {"info": {...}, "images": [{"id": int}, ...],
       "annotations": [{"id": int, "image_id": int, "caption": str}, ...],
       "type": "captions", "licenses": []}

Readers validate everything and fail with :class:`EvaluationInputError`, whose message is
one line naming the file (or value), what is wrong and what is expected. Writers are atomic:
the JSON goes to a temporary file in the target folder and is moved into place with
``os.replace``, so a reader never sees a half-written file.
"""

from __future__ import annotations

import json
import logging
import numbers
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

RESULTS_SHAPE = '[{"image_id": int, "caption": str}, ...]'
ANNOTATIONS_SHAPE = (
    '{"images": [{"id": int}, ...], "annotations": [{"image_id": int, "caption": str}, ...]}'
)


class EvaluationInputError(ValueError):
    """Bad input to the evaluation harness; the message is one line saying what to do."""


def _one_line(text: str) -> str:
    """Collapse whitespace so that an error message stays on one line."""
    return " ".join(text.split())


def _as_image_id(value: Any) -> int | None:
    """Return ``value`` as an ``int`` image id, or None if it is not an integer (bools are not)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        return None
    return int(value)


def _short_repr(value: Any, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def atomic_write_json(path: str | os.PathLike[str], obj: Any, *, indent: int | None = None) -> Path:
    """Write ``obj`` as UTF-8 JSON to ``path`` atomically (temp file + ``os.replace``).

    Parent folders are created. Returns the path written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(obj, ensure_ascii=False, indent=indent)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.write("\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return path


def _read_json(path: str | os.PathLike[str], kind: str, expected: str) -> Any:
    """Parse the JSON file at ``path``; ``kind`` ("results file") and ``expected`` go in errors."""
    path = Path(path)
    if not path.exists():
        raise EvaluationInputError(
            f"{kind} {path}: not found; pass an existing JSON file shaped like {expected}"
        )
    if path.is_dir():
        raise EvaluationInputError(
            f"{kind} {path}: is a directory; pass the JSON file itself, shaped like {expected}"
        )
    try:
        with path.open(encoding="utf-8") as handle:
            return json.load(handle)
    except json.JSONDecodeError as err:
        raise EvaluationInputError(
            f"{kind} {path}: not valid JSON ({err.msg} at line {err.lineno} column {err.colno}); "
            f"expected {expected}"
        ) from err
    except UnicodeDecodeError as err:
        raise EvaluationInputError(
            f"{kind} {path}: not UTF-8 text ({_one_line(str(err))}); expected JSON shaped like {expected}"
        ) from err
    except OSError as err:
        raise EvaluationInputError(
            f"{kind} {path}: cannot be read ({_one_line(str(err))}); check the path and permissions"
        ) from err


def write_results(path: str | os.PathLike[str], captions: Mapping[int, str]) -> Path:
    """Write ``captions`` (image id -> caption) in COCO result format, sorted by image id.

    Returns the path written. Raises :class:`EvaluationInputError` for a non-integer id or a
    non-string caption. (An empty mapping is written, with a warning, but cannot be loaded.)
    """
    items = []
    for key, caption in captions.items():
        image_id = _as_image_id(key)
        if image_id is None:
            raise EvaluationInputError(
                f"results for {path}: image id {_short_repr(key)} is not an integer; "
                "COCO results need integer image ids"
            )
        if not isinstance(caption, str):
            raise EvaluationInputError(
                f"results for {path}: caption of image {image_id} is {type(caption).__name__}, "
                "not str; pass one caption string per image"
            )
        items.append({"image_id": image_id, "caption": caption})
    if not items:
        logger.warning("writing an empty results file %s; load_results will reject it", path)
    items.sort(key=lambda item: item["image_id"])
    return atomic_write_json(path, items)


def load_results(path: str | os.PathLike[str]) -> dict[int, str]:
    """Read a COCO result file into ``{image_id: caption}``.

    Every problem (missing file, bad JSON, wrong shape, non-integer id, non-string caption,
    an image id given twice, no items) raises :class:`EvaluationInputError` with one line.
    """
    data = _read_json(path, "results file", RESULTS_SHAPE)
    where = f"results file {path}"
    if not isinstance(data, list):
        hint = (
            " (this looks like an annotation file; pass it as the annotations)"
            if isinstance(data, dict) and "annotations" in data
            else ""
        )
        raise EvaluationInputError(
            f"{where}: top level is a JSON {type(data).__name__}{hint}; expected a list {RESULTS_SHAPE}"
        )
    if not data:
        raise EvaluationInputError(f"{where}: holds no captions; expected {RESULTS_SHAPE}")
    captions: dict[int, str] = {}
    first_index: dict[int, int] = {}
    for index, item in enumerate(data):
        if not isinstance(item, dict):
            raise EvaluationInputError(
                f"{where}: item {index} is a JSON {type(item).__name__}, not an object; "
                f"expected {RESULTS_SHAPE}"
            )
        for key in ("image_id", "caption"):
            if key not in item:
                raise EvaluationInputError(
                    f"{where}: item {index} has no {key!r}; expected {RESULTS_SHAPE}"
                )
        image_id = _as_image_id(item["image_id"])
        if image_id is None:
            raise EvaluationInputError(
                f"{where}: item {index} has image_id {_short_repr(item['image_id'])}, not an integer; "
                f"expected {RESULTS_SHAPE}"
            )
        caption = item["caption"]
        if not isinstance(caption, str):
            raise EvaluationInputError(
                f"{where}: item {index} has a caption of type {type(caption).__name__}, not a string; "
                f"expected {RESULTS_SHAPE}"
            )
        if image_id in captions:
            raise EvaluationInputError(
                f"{where}: image_id {image_id} appears twice (items {first_index[image_id]} and "
                f"{index}); keep one caption per image"
            )
        captions[image_id] = caption
        first_index[image_id] = index
    logger.debug("read %d captions from %s", len(captions), path)
    return captions


def write_annotations(
    path: str | os.PathLike[str], references: Mapping[int, Sequence[str]]
) -> Path:
    """Write ``references`` (image id -> reference captions) as a COCO captions annotation file.

    The file is readable by ``pycocotools.coco.COCO`` and :func:`load_annotations`. Annotation
    ids are numbered 1, 2, ... in image-id order. Each image needs at least one reference.
    """
    checked: list[tuple[int, list[str]]] = []
    for key, refs in references.items():
        image_id = _as_image_id(key)
        if image_id is None:
            raise EvaluationInputError(
                f"references for {path}: image id {_short_repr(key)} is not an integer; "
                "COCO annotations need integer image ids"
            )
        if isinstance(refs, str) or not all(isinstance(ref, str) for ref in refs):
            raise EvaluationInputError(
                f"references for {path}: image {image_id} needs a list of caption strings, "
                f"got {_short_repr(refs)}"
            )
        if not refs:
            raise EvaluationInputError(
                f"references for {path}: image {image_id} has no reference captions; "
                "give at least one per image"
            )
        checked.append((image_id, list(refs)))
    checked.sort(key=lambda pair: pair[0])
    images = [{"id": image_id} for image_id, _ in checked]
    annotations = [
        {"id": number, "image_id": image_id, "caption": ref}
        for number, (image_id, ref) in enumerate(
            ((image_id, ref) for image_id, refs in checked for ref in refs), start=1
        )
    ]
    document = {
        "info": {"description": "reference captions written by diffusion_captioner eval"},
        "images": images,
        "annotations": annotations,
        "type": "captions",
        "licenses": [],
    }
    return atomic_write_json(path, document)


def load_annotations(path: str | os.PathLike[str]) -> dict[int, list[str]]:
    """Read a COCO captions annotation file into ``{image_id: [reference captions]}``.

    Only images with at least one caption appear; captions keep their order in the file.
    A missing file, bad JSON, no ``"annotations"`` list or a malformed annotation raises
    :class:`EvaluationInputError` with one line.
    """
    data = _read_json(path, "annotation file", ANNOTATIONS_SHAPE)
    where = f"annotation file {path}"
    if not isinstance(data, dict) or not isinstance(data.get("annotations"), list):
        if isinstance(data, list):
            hint = " (a JSON list: this looks like a results file)"
        elif isinstance(data, dict):
            hint = " (no 'annotations' list)"
        else:
            hint = f" (a JSON {type(data).__name__})"
        raise EvaluationInputError(
            f"{where}: not a COCO captions annotation file{hint}; expected {ANNOTATIONS_SHAPE}"
        )
    references: dict[int, list[str]] = {}
    for index, ann in enumerate(data["annotations"]):
        if not isinstance(ann, dict) or "image_id" not in ann or "caption" not in ann:
            raise EvaluationInputError(
                f"{where}: annotations item {index} lacks 'image_id' or 'caption'; "
                f"expected {ANNOTATIONS_SHAPE}"
            )
        image_id = _as_image_id(ann["image_id"])
        if image_id is None:
            raise EvaluationInputError(
                f"{where}: annotations item {index} has image_id {_short_repr(ann['image_id'])}, "
                f"not an integer; expected {ANNOTATIONS_SHAPE}"
            )
        if not isinstance(ann["caption"], str):
            raise EvaluationInputError(
                f"{where}: annotations item {index} has a caption of type "
                f"{type(ann['caption']).__name__}, not a string; expected {ANNOTATIONS_SHAPE}"
            )
        references.setdefault(image_id, []).append(ann["caption"])
    if not references:
        raise EvaluationInputError(
            f"{where}: the 'annotations' list is empty; expected {ANNOTATIONS_SHAPE}"
        )
    logger.debug(
        "read %d reference captions for %d images from %s",
        sum(map(len, references.values())),
        len(references),
        path,
    )
    return references
