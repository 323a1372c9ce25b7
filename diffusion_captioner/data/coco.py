"""COCO caption annotation files (``captions_train2014.json``...) plus an image folder.

Also the helpers every file-backed dataset shares: reading a JSON file with a one-line error
naming it, a cheap content fingerprint of the files a dataset reads, and path resolution against
an optional ``data_dir``.

The COCO caption format::

    {"images": [{"id": 391895, "file_name": "COCO_val2014_000000391895.jpg", ...}, ...],
     "annotations": [{"id": 770337, "image_id": 391895, "caption": "A man ..."}, ...]}

One annotation file is one split: ``split`` says which (``"test"`` by default), or map several
splits to their files with ``annotations={"train": ..., "val": ..., "test": ...}``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from registry import SPLITS, CaptionDataset, CaptionRecord, Split

logger = logging.getLogger(__name__)

#: Bump when the records a file-backed dataset makes from the same files change (keys caches).
FORMAT_VERSION = 1

_digests: dict[tuple[str, int, int], str] = {}


def resolve_path(path: str | os.PathLike[str], data_dir: str | os.PathLike[str] | None) -> Path:
    """``path`` with ``~`` expanded; a relative path is taken under ``data_dir`` when given."""
    resolved = Path(path).expanduser()
    if data_dir is not None and not resolved.is_absolute():
        resolved = Path(data_dir).expanduser() / resolved
    return resolved


def require_file(path: Path, what: str) -> Path:
    """``path`` if it is a file, else a one-line FileNotFoundError naming it and ``what`` it is."""
    if not path.is_file():
        where = "it is a directory" if path.is_dir() else "no such file"
        raise FileNotFoundError(f"{what} {path}: {where}")
    return path


def require_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise FileNotFoundError(f"{what} {path}: no such directory")
    return path


def read_json(path: Path, what: str) -> Any:
    """Parse a JSON file; a missing file or bad JSON is a one-line error naming the file."""
    require_file(path, what)
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except json.JSONDecodeError as error:
        raise ValueError(f"{what} {path}: not valid JSON ({error.msg} at line {error.lineno} "
                         f"column {error.colno})") from error
    except UnicodeDecodeError as error:
        raise ValueError(f"{what} {path}: not UTF-8 text ({error.reason})") from error


def file_digest(path: Path) -> str:
    """sha256 of a file's bytes (16 hex digits), memoised per (path, size, mtime)."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _digests:
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            while block := handle.read(1 << 22):
                digest.update(block)
        _digests[key] = digest.hexdigest()[:16]
    return _digests[key]


def fingerprint(kind: str, files: Mapping[str, Path], **arguments: Any) -> str:
    """``<kind>-<hash>`` of the annotation files' contents, the image folders' paths and the
    other arguments: it changes whenever the records or the pixels behind them would."""
    payload = {
        "kind": kind, "version": FORMAT_VERSION,
        "files": {name: file_digest(path) for name, path in sorted(files.items())},
        "arguments": {k: str(v) if isinstance(v, Path) else v for k, v in sorted(arguments.items())},
    }
    blob = json.dumps(payload, sort_keys=True, default=str).encode()
    return f"{kind}-{hashlib.sha256(blob).hexdigest()[:16]}"


def check_split(split: str | None) -> None:
    if split is not None and split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; splits: {', '.join(SPLITS)}")


class FileCaptionDataset(CaptionDataset):
    """Base of the file-backed datasets: records read once, lazily, and kept per split."""

    def _read(self) -> dict[Split, list[CaptionRecord]]:
        raise NotImplementedError

    def records(self, split: Split | None = None) -> list[CaptionRecord]:
        """Records of one split (or all, train then val then test), read once from the files."""
        check_split(split)
        if getattr(self, "_records", None) is None:
            self._records = self._read()
            counts = ", ".join(f"{s} {len(self._records.get(s, []))}" for s in SPLITS)
            logger.info("%s: %s images", self.fingerprint, counts)
        if split is None:
            return [r for s in SPLITS for r in self._records.get(s, [])]
        return list(self._records.get(split, []))


def coco_records(annotations: Path, image_dir: Path, split: Split) -> list[CaptionRecord]:
    """Records of one COCO caption annotation file: every image with at least one caption, in
    the file's image order, ``image_id`` = COCO's id, path = ``image_dir / file_name``."""
    what = "COCO annotation file"
    data = read_json(annotations, what)
    if not isinstance(data, dict) or not isinstance(data.get("annotations"), list):
        raise ValueError(f"{what} {annotations}: expected an object with an 'annotations' list "
                         '(COCO captions format: {"images": [...], "annotations": [...]})')
    captions: dict[int, list[str]] = {}
    for index, item in enumerate(data["annotations"]):
        try:
            captions.setdefault(int(item["image_id"]), []).append(" ".join(str(item["caption"]).split()))
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"{what} {annotations}: annotation {index} lacks an integer "
                             f"'image_id' or a 'caption' ({item!r:.80})") from error
    files: dict[int, str] = {}
    for index, item in enumerate(data.get("images") or []):
        try:
            files[int(item["id"])] = str(item["file_name"])
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"{what} {annotations}: image {index} lacks an integer 'id' or a "
                             f"'file_name' ({item!r:.80})") from error
    records = []
    for image_id, file_name in files.items():
        if captions.get(image_id):
            records.append(CaptionRecord(image_id, str(image_dir / file_name),
                                         tuple(captions[image_id]), split))
    orphans = len(set(captions) - set(files))
    if orphans:
        logger.warning("%s: %d image ids have captions but no 'images' entry (no file name); "
                       "left out", annotations, orphans)
    if not records:
        raise ValueError(f"{what} {annotations}: no image has both an 'images' entry and a caption")
    return records


@CaptionDataset.register("coco")
class CocoDataset(FileCaptionDataset):
    """COCO caption annotation file(s) + image folder(s); one file per split.

    Args:
        annotations: a ``captions_*.json`` path (its images form ``split``), or a mapping
            ``{split: path}`` for several splits.
        image_dir: folder holding the images' ``file_name``s, or a mapping ``{split: folder}``.
        split: the split a single annotation file is (default ``test``).
        data_dir: folder that relative paths are taken under.
    """

    def __init__(
        self,
        annotations: str | Mapping[str, str],
        image_dir: str | Mapping[str, str],
        split: Split = "test",
        data_dir: str | None = None,
    ) -> None:
        check_split(split)
        by_split = dict(annotations) if isinstance(annotations, Mapping) else {split: annotations}
        for name in by_split:
            check_split(name)
        self.annotations = {s: resolve_path(p, data_dir) for s, p in by_split.items()}
        if isinstance(image_dir, Mapping):
            missing = sorted(set(by_split) - set(image_dir))
            if missing:
                raise ValueError(f"coco: image_dir has no folder for split(s) {', '.join(missing)}")
            self.image_dirs = {s: resolve_path(image_dir[s], data_dir) for s in by_split}
        else:
            self.image_dirs = {s: resolve_path(image_dir, data_dir) for s in by_split}
        for name, path in self.annotations.items():
            require_file(path, f"COCO annotation file ({name})")
            require_dir(self.image_dirs[name], f"COCO image folder ({name})")
        self._config = {"annotations": annotations if isinstance(annotations, str) else dict(annotations),
                        "image_dir": image_dir if isinstance(image_dir, str) else dict(image_dir),
                        "split": split, "data_dir": data_dir}
        self.fingerprint = fingerprint(
            "coco", {f"annotations.{s}": p for s, p in self.annotations.items()},
            image_dirs={s: str(p.resolve()) for s, p in self.image_dirs.items()})
        self._records: dict[Split, list[CaptionRecord]] | None = None

    @property
    def config(self) -> dict[str, Any]:
        """Constructor arguments, key for key."""
        return dict(self._config)

    def _read(self) -> dict[Split, list[CaptionRecord]]:
        out: dict[Split, list[CaptionRecord]] = {}
        seen: dict[int, Split] = {}
        for split in SPLITS:
            if split not in self.annotations:
                continue
            out[split] = coco_records(self.annotations[split], self.image_dirs[split], split)
            for record in out[split]:
                if record.image_id in seen:
                    raise ValueError(f"coco: image id {record.image_id} is in both the "
                                     f"{seen[record.image_id]} and the {split} annotation files")
                seen[record.image_id] = split
        return out
