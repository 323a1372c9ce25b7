"""Karpathy splits of Flickr8k, Flickr30k and COCO (``dataset_*.json`` from ``caption_datasets.zip``).

The file (Karpathy & Fei-Fei 2015, used by ClipCap, the CLIP-DiffusionLM paper and most
captioning work) lists every image once with its split and reference sentences::

    {"dataset": "flickr8k",
     "images": [{"filename": "1000268201_693b08cb0e.jpg", "imgid": 0, "split": "train",
                 "sentences": [{"raw": "A child in a pink dress ...", "tokens": [...]}, ...]},
                ...]}

COCO's entries add ``filepath`` (``train2014``/``val2014``, joined under the image root) and
``cocoid``, and a fourth split ``restval`` (30504 images of val2014 outside Karpathy's val/test),
which ``restval=True`` folds into train (the usual 113287-image train split) and
``restval=False`` leaves out. Splits are image-level: all captions of an image share its split.

Image ids are ``cocoid`` when present (so results line up with COCO's own annotation files),
else ``imgid``. Captions are the ``raw`` sentences with whitespace normalised (the ``tokens``
joined when a file has no ``raw``).

:func:`named_config` turns the short names ``flickr8k``, ``flickr30k``, ``coco-karpathy`` and
``flickr8k+flickr30k`` and a data folder into a dataset config (see the README's layout).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from diffusion_captioner.data.coco import (
    FileCaptionDataset,
    fingerprint,
    read_json,
    require_dir,
    require_file,
    resolve_path,
)
from registry import SPLITS, CaptionDataset, CaptionRecord, Split

logger = logging.getLogger(__name__)

#: Short dataset names -> (annotation file name, image folder candidates under the data dir).
#: The first candidate folder that exists is used; the data dir itself is the last resort.
NAMED: dict[str, tuple[str, tuple[str, ...]]] = {
    "flickr8k": ("dataset_flickr8k.json",
                 ("Flicker8k_Dataset", "Flickr8k_Dataset", "flickr8k/Flicker8k_Dataset",
                  "flickr8k/Flickr8k_Dataset", "flickr8k/images", "Images", "flickr8k")),
    "flickr30k": ("dataset_flickr30k.json",
                  ("flickr30k-images", "flickr30k/flickr30k-images", "flickr30k/images", "flickr30k")),
    "coco-karpathy": ("dataset_coco.json", ("coco", "mscoco")),
}
#: Names that combine others (the paper's Flickr8k + Flickr30k training set).
COMBINED_NAMES: dict[str, tuple[str, ...]] = {"flickr8k+flickr30k": ("flickr8k", "flickr30k")}
DOWNLOAD_HINT = (
    "Karpathy's split files are in caption_datasets.zip "
    "(https://cs.stanford.edu/people/karpathy/deepimagesent/caption_datasets.zip)")


def named_config(name: str, data_dir: str | Path | None) -> dict[str, Any]:
    """The dataset config for a short name (``flickr8k``...) with its files under ``data_dir``.

    Looks for ``dataset_<name>.json`` in ``data_dir`` (or ``data_dir/<name>/``) and for the images
    in the conventional folder names of each download (``Flicker8k_Dataset``, ``flickr30k-images``,
    ``train2014``/``val2014`` under ``data_dir`` or ``data_dir/coco``).
    """
    if name in COMBINED_NAMES:
        return {"type": "combined",
                "datasets": [named_config(part, data_dir) for part in COMBINED_NAMES[name]]}
    if name not in NAMED:
        known = ", ".join([*NAMED, *COMBINED_NAMES])
        raise ValueError(f"unknown dataset name {name!r}; named Karpathy datasets: {known}")
    annotation_name, image_folders = NAMED[name]
    if data_dir is None:
        raise ValueError(f"dataset {name!r} needs --data-dir DIR holding {annotation_name} and the "
                         f"images ({image_folders[0]}/); {DOWNLOAD_HINT}")
    root = Path(data_dir).expanduser()
    candidates = [root / annotation_name, root / name / annotation_name]
    annotations = next((p for p in candidates if p.is_file()), None)
    if annotations is None:
        raise FileNotFoundError(f"dataset {name!r}: no {annotation_name} in {root} or {root / name}; "
                                f"{DOWNLOAD_HINT}")
    if name == "coco-karpathy":  # filepath (train2014/val2014) is joined under the image root
        image_root = next((root / f for f in image_folders if (root / f / "val2014").is_dir()), root)
    else:
        image_root = next((root / f for f in image_folders if (root / f).is_dir()), root)
    return {"type": "karpathy", "annotations": str(annotations.resolve()),
            "image_root": str(image_root.resolve())}


@CaptionDataset.register("karpathy")
class KarpathyDataset(FileCaptionDataset):
    """Flickr8k / Flickr30k / COCO with Karpathy's image-level splits (dataset_*.json + images).

    Args:
        annotations: path of ``dataset_flickr8k.json``, ``dataset_flickr30k.json`` or
            ``dataset_coco.json``.
        image_root: folder of the images (for COCO: the folder holding ``train2014/`` and
            ``val2014/``).
        restval: fold COCO's ``restval`` images into train (True, the usual) or leave them out.
        max_images: keep only the first N images of each split (quick trials); None keeps all.
        data_dir: folder that relative paths are taken under.
    """

    def __init__(
        self,
        annotations: str,
        image_root: str,
        restval: bool = True,
        max_images: int | None = None,
        data_dir: str | None = None,
    ) -> None:
        self.annotations = require_file(resolve_path(annotations, data_dir), "Karpathy split file")
        self.image_root = require_dir(resolve_path(image_root, data_dir), "image folder")
        if max_images is not None and max_images < 1:
            raise ValueError(f"karpathy: max_images must be >= 1 or null, got {max_images}")
        self.restval = bool(restval)
        self.max_images = None if max_images is None else int(max_images)
        self._config = {"annotations": annotations, "image_root": image_root,
                        "restval": self.restval, "max_images": self.max_images, "data_dir": data_dir}
        self.fingerprint = fingerprint(
            "karpathy", {"annotations": self.annotations}, image_root=str(self.image_root.resolve()),
            restval=self.restval, max_images=self.max_images)
        self._records: dict[Split, list[CaptionRecord]] | None = None

    @property
    def config(self) -> dict[str, Any]:
        """Constructor arguments, key for key."""
        return dict(self._config)

    def _read(self) -> dict[Split, list[CaptionRecord]]:
        what = "Karpathy split file"
        data = read_json(self.annotations, what)
        if not isinstance(data, dict) or not isinstance(data.get("images"), list):
            raise ValueError(f"{what} {self.annotations}: expected an object with an 'images' list "
                             '({"images": [{"filename", "imgid", "split", "sentences"}, ...]})')
        out: dict[Split, list[CaptionRecord]] = {s: [] for s in SPLITS}
        seen: set[int] = set()
        for index, item in enumerate(data["images"]):
            try:
                split = item["split"]
                image_id = int(item["cocoid"] if "cocoid" in item else item["imgid"])
                path = self.image_root / item.get("filepath", "") / item["filename"]
                captions = tuple(
                    " ".join(str(s["raw"] if "raw" in s else " ".join(s["tokens"])).split())
                    for s in item["sentences"])
            except (KeyError, TypeError, ValueError) as error:
                raise ValueError(f"{what} {self.annotations}: image {index} lacks "
                                 f"{error if isinstance(error, KeyError) else 'a valid field'} "
                                 f"({str(item)[:80]})") from error
            if split == "restval":
                if not self.restval:
                    continue
                split = "train"
            if split not in out:
                raise ValueError(f"{what} {self.annotations}: image {index} has split {split!r}; "
                                 "expected train, val, test or restval")
            if image_id in seen:
                raise ValueError(f"{what} {self.annotations}: image id {image_id} appears twice")
            seen.add(image_id)
            captions = tuple(c for c in captions if c)
            if not captions:
                logger.warning("%s: image %s has no caption; left out", self.annotations, path.name)
                continue
            if self.max_images is None or len(out[split]) < self.max_images:
                out[split].append(CaptionRecord(image_id, str(path), captions, split))
        return out
