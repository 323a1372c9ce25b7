"""Your own data: one JSON object per line, ``{"image": path, "captions": [...]}``.

Optional keys per line: ``"split"`` (``train``/``val``/``test``) and ``"image_id"`` (an integer,
unique in the file). ``"caption": "..."`` is accepted for a single caption. Relative image paths
are taken under ``image_root`` (default: the jsonl file's folder).

Lines without a split are assigned one by a seeded hash of the image path: ``u = sha256(seed,
path)`` read as a number in [0, 1) goes to test if ``u < test_fraction``, to val if
``u < test_fraction + val_fraction``, else to train. The assignment of an image never changes
when other lines are added or removed. Lines without an ``image_id`` get their 0-based line
number among the file's records.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Any

import jsonlines

from diffusion_captioner.data.coco import (
    FileCaptionDataset,
    check_split,
    fingerprint,
    require_dir,
    require_file,
    resolve_path,
)
from registry import SPLITS, CaptionDataset, CaptionRecord, Split

logger = logging.getLogger(__name__)


def seeded_split(key: str, seed: int, val_fraction: float, test_fraction: float) -> Split:
    """The split of ``key`` under ``seed``: a stable hash, never Python's salted ``hash``."""
    digest = hashlib.sha256(f"jsonl-split/{seed}/{key}".encode()).digest()
    u = int.from_bytes(digest[:8], "little") / 2**64
    if u < test_fraction:
        return "test"
    if u < test_fraction + val_fraction:
        return "val"
    return "train"


@CaptionDataset.register("jsonl")
class JsonlDataset(FileCaptionDataset):
    """Your own images and captions: a jsonl file of {"image": path, "captions": [...]} lines.

    Args:
        path: the ``.jsonl`` file.
        image_root: folder relative image paths are under (default: the file's folder).
        val_fraction, test_fraction: shares of the lines without a ``split`` that go to val/test.
        seed: seeds that assignment.
        data_dir: folder that a relative ``path``/``image_root`` is taken under.
    """

    def __init__(
        self,
        path: str,
        image_root: str | None = None,
        val_fraction: float = 0.05,
        test_fraction: float = 0.05,
        seed: int = 0,
        data_dir: str | None = None,
    ) -> None:
        if not (0 <= val_fraction and 0 <= test_fraction and val_fraction + test_fraction < 1):
            raise ValueError(f"jsonl: need val_fraction, test_fraction >= 0 with a sum < 1, got "
                             f"{val_fraction} and {test_fraction}")
        self.path = require_file(resolve_path(path, data_dir), "jsonl caption file")
        self.image_root = (require_dir(resolve_path(image_root, data_dir), "image folder")
                           if image_root is not None else self.path.parent)
        self.val_fraction, self.test_fraction = float(val_fraction), float(test_fraction)
        self.seed = int(seed)
        self._config = {"path": path, "image_root": image_root, "val_fraction": self.val_fraction,
                        "test_fraction": self.test_fraction, "seed": self.seed, "data_dir": data_dir}
        self.fingerprint = fingerprint(
            "jsonl", {"path": self.path}, image_root=str(self.image_root.resolve()),
            val_fraction=self.val_fraction, test_fraction=self.test_fraction, seed=self.seed)
        self._records: dict[Split, list[CaptionRecord]] | None = None

    @property
    def config(self) -> dict[str, Any]:
        """Constructor arguments, key for key."""
        return dict(self._config)

    def _line_error(self, number: int, problem: str) -> ValueError:
        return ValueError(f"jsonl caption file {self.path}: line {number}: {problem} "
                          '(expected {"image": "path", "captions": ["...", ...]})')

    def _read(self) -> dict[Split, list[CaptionRecord]]:
        out: dict[Split, list[CaptionRecord]] = {s: [] for s in SPLITS}
        seen: dict[int, int] = {}
        index = 0
        with open(self.path, encoding="utf-8") as handle:
            current = [0]  # line number of the line being parsed (blank lines skipped)

            def lines():
                for number, line in enumerate(handle, 1):
                    if line.strip():
                        current[0] = number
                        yield line

            try:
                for item in jsonlines.Reader(lines()):
                    number = current[0]
                    split, record = self._record(item, number, index)
                    if record.image_id in seen:
                        raise self._line_error(number, f"image_id {record.image_id} already "
                                                       f"used on line {seen[record.image_id]}")
                    seen[record.image_id] = number
                    out[split].append(record)
                    index += 1
            except jsonlines.InvalidLineError as error:
                raise self._line_error(current[0], "not valid JSON") from error
            except UnicodeDecodeError as error:
                raise self._line_error(current[0] + 1, "not UTF-8 text") from error
        if not seen:
            raise ValueError(f"jsonl caption file {self.path}: no records")
        return out

    def _record(self, item: Any, number: int, index: int) -> tuple[Split, CaptionRecord]:
        if not isinstance(item, dict):
            raise self._line_error(number, f"a {type(item).__name__}, not an object")
        image = item.get("image")
        if not isinstance(image, str) or not image:
            raise self._line_error(number, "no 'image' path")
        captions = item.get("captions", [item["caption"]] if "caption" in item else None)
        if isinstance(captions, str):
            captions = [captions]
        if not isinstance(captions, list) or not all(isinstance(c, str) for c in captions):
            raise self._line_error(number, "'captions' must be a list of strings")
        captions = [" ".join(c.split()) for c in captions if c.strip()]
        if not captions:
            raise self._line_error(number, "no caption")
        split = item.get("split")
        if split is None:
            split = seeded_split(image, self.seed, self.val_fraction, self.test_fraction)
        elif split not in SPLITS:
            raise self._line_error(number, f"split {split!r} is not one of {', '.join(SPLITS)}")
        check_split(split)
        image_id = item.get("image_id", index)
        if isinstance(image_id, bool) or not isinstance(image_id, int):
            raise self._line_error(number, f"image_id {image_id!r} is not an integer")
        path = resolve_path(image, self.image_root)
        return split, CaptionRecord(int(image_id), str(path), tuple(captions), split)
