"""nocaps (Agrawal et al. 2019): novel-object captioning on Open Images, scored per domain.

The annotation file (``nocaps_val_4500_captions.json``; the public validation set) is the COCO
caption layout plus a ``domain`` on every image::

    {"images": [{"id": 0, "file_name": "0013ea2087020901.jpg", "domain": "in-domain",
                 "open_images_id": "0013ea2087020901", ...}, ...],
     "annotations": [{"id": 0, "image_id": 0, "caption": "A baby is standing ..."}, ...]}

Split choice: nocaps is an evaluation-only benchmark (its models train on COCO), so every image
of the file is in the **test** split and train/val are empty; train on another dataset and test
here with ``{"type": "combined", "eval_from": 1, "datasets": [<coco-karpathy>, <nocaps>]}``.
(The nocaps *test* set's captions are held out by its evaluation server; a file without
annotations has no image with a caption and is refused.) Each record's group is its domain,
``in-domain``, ``near-domain`` or ``out-domain`` (``meta["group"]``), so ``compare`` reports the
metrics per domain beside the overall ones.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Literal, get_args

from diffusion_captioner.data.coco import (
    FileCaptionDataset,
    coco_records,
    fingerprint,
    read_json,
    require_dir,
    require_file,
    resolve_path,
)
from registry import CaptionDataset, CaptionRecord, Split

NocapsDomain = Literal["in-domain", "near-domain", "out-domain"]
DOMAINS: tuple[NocapsDomain, ...] = get_args(NocapsDomain)


def nocaps_domains(annotations: Path) -> dict[int, NocapsDomain]:
    """Image id -> domain of a nocaps annotation file; one-line errors name the file."""
    what = "nocaps annotation file"
    data = read_json(annotations, what)
    images = data.get("images") if isinstance(data, dict) else None
    if not isinstance(images, list):
        raise ValueError(f"{what} {annotations}: expected an object with an 'images' list "
                         "(nocaps_val_4500_captions.json layout)")
    domains: dict[int, NocapsDomain] = {}
    for index, image in enumerate(images):
        domain = image.get("domain") if isinstance(image, dict) else None
        if domain not in DOMAINS:
            raise ValueError(f"{what} {annotations}: image {index} has domain {domain!r}; "
                             f"nocaps domains are {', '.join(DOMAINS)}")
        try:
            domains[int(image["id"])] = domain
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"{what} {annotations}: image {index} lacks an integer 'id'") from error
    return domains


@CaptionDataset.register("nocaps")
class NocapsDataset(FileCaptionDataset):
    """nocaps annotation file + image folder: all images in the test split, grouped by domain.

    Args:
        annotations: ``nocaps_val_4500_captions.json`` (or another file in its layout).
        image_dir: folder holding the images' ``file_name``s (nocaps' ``val`` images).
        data_dir: folder that relative paths are taken under.
    """

    def __init__(self, annotations: str, image_dir: str, data_dir: str | None = None) -> None:
        self.annotations = require_file(resolve_path(annotations, data_dir),
                                        "nocaps annotation file")
        self.image_dir = require_dir(resolve_path(image_dir, data_dir), "nocaps image folder")
        self._config = {"annotations": annotations, "image_dir": image_dir, "data_dir": data_dir}
        self.fingerprint = fingerprint("nocaps", {"annotations": self.annotations},
                                       image_dir=str(self.image_dir.resolve()))
        self._records: dict[Split, list[CaptionRecord]] | None = None

    @property
    def config(self) -> dict[str, Any]:
        """Constructor arguments, key for key."""
        return dict(self._config)

    def _read(self) -> dict[Split, list[CaptionRecord]]:
        domains = nocaps_domains(self.annotations)
        records = [dataclasses.replace(r, meta={**r.meta, "group": domains[r.image_id]})
                   for r in coco_records(self.annotations, self.image_dir, "test")]
        return {"train": [], "val": [], "test": records}
