"""Frozen image features, extracted once per dataset x split x encoder and cached on disk.

A cache entry is one safetensors file named by ``sha256(dataset.fingerprint | split |
encoder.fingerprint)``: tensors ``image_ids`` (N,) and ``features`` (N, D), metadata naming what
made it and which images could not be read. A changed encoder (weights, architecture,
preprocessing) or dataset changes the key, so stale features are never reused.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from registry import CaptionDataset, CaptionRecord, ImageEncoder, Split

logger = logging.getLogger(__name__)


def default_cache_dir() -> Path:
    """``$DCAP_CACHE`` or ``~/.cache/diffusion_captioner`` (features live under ``features/``)."""
    return Path(os.environ.get("DCAP_CACHE", Path.home() / ".cache" / "diffusion_captioner"))


@dataclass
class SplitFeatures:
    """One split's image features, aligned row for row with ``records``."""

    records: list[CaptionRecord]
    features: torch.Tensor  # (N, D)
    skipped: dict[int, str] = field(default_factory=dict)  # image id -> why it was left out
    from_cache: bool = False
    text_features: torch.Tensor | None = None  # (M, D), one row per caption, in record order

    @property
    def image_ids(self) -> list[int]:
        return [r.image_id for r in self.records]


class _PreprocessedImages(Dataset):
    """Records -> (row, pixels) with bad images returned as (row, error message)."""

    def __init__(self, dataset: CaptionDataset, records: list[CaptionRecord], encoder: ImageEncoder):
        self.dataset, self.records, self.encoder = dataset, records, encoder

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, row: int):
        try:
            return row, self.encoder.preprocess(self.dataset.load_image(self.records[row]))
        except (OSError, ValueError, SyntaxError) as error:
            return row, f"{type(error).__name__}: {error}"


def _collate(items):
    good = [(row, pixels) for row, pixels in items if isinstance(pixels, torch.Tensor)]
    bad = [(row, message) for row, message in items if isinstance(message, str)]
    rows = [row for row, _ in good]
    pixels = torch.stack([p for _, p in good]) if good else None
    return rows, pixels, bad


class FeatureCache:
    """Disk cache of frozen image features; :meth:`get` extracts on a miss, loads on a hit."""

    def __init__(self, root: str | Path | None = None) -> None:
        self.root = Path(root) if root is not None else default_cache_dir() / "features"

    @staticmethod
    def key(dataset: CaptionDataset, split: Split, encoder: ImageEncoder) -> str:
        text = f"{dataset.fingerprint}|{split}|{encoder.fingerprint}"
        return hashlib.sha256(text.encode()).hexdigest()[:20]

    def path(self, dataset: CaptionDataset, split: Split, encoder: ImageEncoder) -> Path:
        return self.root / f"{self.key(dataset, split, encoder)}.safetensors"

    def get(
        self,
        dataset: CaptionDataset,
        split: Split,
        encoder: ImageEncoder,
        batch_size: int = 64,
        num_workers: int = 0,
        progress: bool = True,
    ) -> SplitFeatures:
        """The split's features: read from the cache, or extracted, written, then returned."""
        records = dataset.records(split)
        path = self.path(dataset, split, encoder)
        if path.is_file():
            cached = self._read(path, records)
            if cached is not None:
                return cached
        features = extract_features(dataset, records, encoder, batch_size, num_workers, progress)
        self._write(path, dataset, split, encoder, features)
        return features

    def add_text_features(
        self,
        dataset: CaptionDataset,
        split: Split,
        encoder: ImageEncoder,
        features: SplitFeatures,
        batch_size: int = 256,
        progress: bool = True,
    ) -> SplitFeatures:
        """Attach CLIP text features of every caption of ``features.records`` (cached too)."""
        captions = [c for r in features.records for c in r.captions]
        path = self.path(dataset, split, encoder).with_suffix(".text.safetensors")
        if path.is_file():
            try:
                cached = load_file(str(path))["text_features"]
                if len(cached) == len(captions):
                    features.text_features = cached
                    return features
            except Exception as error:  # noqa: BLE001 - a corrupt entry is recomputed
                logger.warning("text feature cache %s unreadable (%s); encoding again", path, error)
        chunks = []
        for start in tqdm(range(0, len(captions), batch_size), desc=f"encode {split} captions",
                          unit="batch", disable=not progress):
            chunks.append(encoder.encode_texts(captions[start:start + batch_size]).cpu())  # (b, D)
        features.text_features = torch.cat(chunks)  # (M, D)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".partial")
        save_file({"text_features": features.text_features.contiguous()}, str(partial))
        os.replace(partial, path)
        return features

    def _read(self, path: Path, records: list[CaptionRecord]) -> SplitFeatures | None:
        from safetensors import safe_open

        try:
            with safe_open(str(path), "pt") as handle:
                metadata = handle.metadata() or {}
            tensors = load_file(str(path))
        except Exception as error:  # noqa: BLE001 - a corrupt cache entry is re-extracted
            logger.warning("feature cache %s unreadable (%s); extracting again", path, error)
            return None
        by_id = {r.image_id: r for r in records}
        ids = tensors["image_ids"].tolist()
        if any(i not in by_id for i in ids):
            logger.warning("feature cache %s does not match the dataset; extracting again", path)
            return None
        skipped = {int(k): v for k, v in json.loads(metadata.get("skipped", "{}")).items()}
        logger.info("feature cache hit: %s (%d images)", path.name, len(ids))
        return SplitFeatures([by_id[i] for i in ids], tensors["features"], skipped, from_cache=True)

    @staticmethod
    def _write(path: Path, dataset: CaptionDataset, split: Split, encoder: ImageEncoder,
               features: SplitFeatures) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        metadata = {
            "dataset": dataset.fingerprint,
            "split": split,
            "encoder": encoder.fingerprint,
            "skipped": json.dumps({str(k): v for k, v in features.skipped.items()}),
        }
        partial = path.with_suffix(".partial")
        save_file({"image_ids": torch.tensor(features.image_ids, dtype=torch.long),
                   "features": features.features.contiguous()}, str(partial), metadata=metadata)
        os.replace(partial, path)


def extract_features(
    dataset: CaptionDataset,
    records: list[CaptionRecord],
    encoder: ImageEncoder,
    batch_size: int = 64,
    num_workers: int = 0,
    progress: bool = True,
) -> SplitFeatures:
    """Encode every record's image; unreadable images are skipped, named in a warning each."""
    loader = DataLoader(_PreprocessedImages(dataset, records, encoder), batch_size=batch_size,
                        num_workers=num_workers, collate_fn=_collate)
    kept: list[CaptionRecord] = []
    chunks: list[torch.Tensor] = []
    skipped: dict[int, str] = {}
    with tqdm(total=len(records), desc="extract features", unit="img", disable=not progress) as bar:
        for rows, pixels, bad in loader:
            for row, message in bad:
                record = records[row]
                skipped[record.image_id] = message
                logger.warning("skipping image %s (id %d): %s", record.image, record.image_id, message)
            if pixels is not None:
                chunks.append(encoder.encode_images(pixels).cpu())  # (b, D)
                kept.extend(records[row] for row in rows)
            bar.update(len(rows) + len(bad))
    if not chunks:
        raise ValueError(f"no image of {len(records)} could be read; first error: "
                         f"{next(iter(skipped.values()), 'none')}")
    if skipped:
        logger.warning("%d of %d images could not be read and were skipped", len(skipped), len(records))
    return SplitFeatures(kept, torch.cat(chunks), skipped)
