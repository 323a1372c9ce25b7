"""Several datasets as one (the paper trains on Flickr8k + Flickr30k together).

Each member keeps its own splits; a split of the combination is the members' splits of that name
concatenated in member order. Image ids are namespaced by member position so they stay unique
and stable::

    image_id = member_index * id_stride + member_image_id      (0 <= member_image_id < id_stride)

so member 0's ids are unchanged and the same config always gives the same ids. ``eval_from``
takes val and test from one member only (e.g. train on Flickr8k + Flickr30k, report Flickr8k's
test split). Note that Flickr8k and Flickr30k share many photos under different file names, so a
combined train split can contain a member's test photos; prefer ``eval_from`` with care.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from PIL import Image

from diffusion_captioner.data.coco import FileCaptionDataset
from registry import SPLITS, CaptionDataset, CaptionRecord, Split, build

#: Default id namespace width per member: above every COCO (< 600k) and Flickr id.
ID_STRIDE = 10_000_000


@CaptionDataset.register("combined")
class CombinedDataset(FileCaptionDataset):
    """Several datasets merged into one, image ids kept unique (offset per member).

    Args:
        datasets: member configs (``{"type": "karpathy", ...}``), or already built datasets.
        id_stride: ids of member i become ``i * id_stride + id``; every member id must be below it.
        eval_from: index of the member whose val and test splits are used alone (None: all).
        data_dir: passed to members that take one and set none.
    """

    def __init__(
        self,
        datasets: list[dict[str, Any] | CaptionDataset],
        id_stride: int = ID_STRIDE,
        eval_from: int | None = None,
        data_dir: str | None = None,
    ) -> None:
        if not datasets:
            raise ValueError("combined: 'datasets' must list at least one dataset config")
        if eval_from is not None and not 0 <= eval_from < len(datasets):
            raise ValueError(f"combined: eval_from {eval_from} is not a member index "
                             f"(0..{len(datasets) - 1})")
        self.members: list[CaptionDataset] = []
        for cfg in datasets:
            if isinstance(cfg, CaptionDataset):
                self.members.append(cfg)
                continue
            if not isinstance(cfg, dict) or "type" not in cfg:
                raise ValueError(f"combined: each member must be a dataset config with a 'type', "
                                 f"got {cfg!r:.80}")
            if data_dir is not None and "data_dir" not in cfg and cfg["type"] != "shapes":
                cfg = {**cfg, "data_dir": data_dir}
            self.members.append(build("dataset", cfg))
        self.id_stride = int(id_stride)
        self.eval_from = eval_from
        self._config = {"datasets": [_member_config(m) for m in self.members],
                        "id_stride": self.id_stride, "eval_from": eval_from, "data_dir": data_dir}
        payload = {"members": [m.fingerprint for m in self.members], "stride": self.id_stride,
                   "eval_from": eval_from}
        digest = hashlib.sha256(json.dumps(payload).encode()).hexdigest()[:16]
        self.fingerprint = f"combined-{digest}"
        self._records: dict[Split, list[CaptionRecord]] | None = None
        self._sources: dict[int, tuple[CaptionDataset, CaptionRecord]] = {}

    @property
    def config(self) -> dict[str, Any]:
        """Constructor arguments, key for key (members as configs)."""
        return dict(self._config)

    def _read(self) -> dict[Split, list[CaptionRecord]]:
        out: dict[Split, list[CaptionRecord]] = {s: [] for s in SPLITS}
        for index, member in enumerate(self.members):
            for split in SPLITS:
                if split != "train" and self.eval_from is not None and index != self.eval_from:
                    continue
                for record in member.records(split):
                    if not 0 <= record.image_id < self.id_stride:
                        raise ValueError(
                            f"combined: member {index} ({member.fingerprint}) has image id "
                            f"{record.image_id} outside [0, id_stride={self.id_stride}); raise id_stride")
                    image_id = index * self.id_stride + record.image_id
                    merged = CaptionRecord(image_id, record.image, record.captions, split,
                                           {**record.meta, "member": index,
                                            "member_image_id": record.image_id})
                    self._sources[image_id] = (member, record)
                    out[split].append(merged)
        return out

    def _source(self, record: CaptionRecord) -> tuple[CaptionDataset, CaptionRecord]:
        if not self._sources:
            self.records()
        found = self._sources.get(record.image_id)
        if found is None:
            raise ValueError(f"combined: image id {record.image_id} is not in this dataset")
        return found

    def load_image(self, record: CaptionRecord) -> Image.Image:
        """The member dataset loads its own record's image (embedded sources work too)."""
        member, original = self._source(record)
        return member.load_image(original)

    def group(self, record: CaptionRecord) -> str | None:
        """The member dataset's group of its own record (nocaps' domain, shapes' object count)."""
        member, original = self._source(record)
        return member.group(original)


def _member_config(dataset: CaptionDataset) -> dict[str, Any]:
    """``{"type": name, **config}`` of a built member (its config, when it has one)."""
    from registry import registered_name

    cfg = getattr(dataset, "config", None)
    return {"type": registered_name(type(dataset)), **(cfg if isinstance(cfg, dict) else {})}
