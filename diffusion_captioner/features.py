"""Frozen image features, extracted once per dataset x split x encoder and cached on disk.

A cache entry is one safetensors file named by ``sha256(dataset.fingerprint | split |
encoder.fingerprint)``: tensors ``image_ids`` (N,) and ``features`` (N, D), metadata naming what
made it and which images could not be read. A changed encoder (weights, architecture,
preprocessing, precision) or dataset changes the key, so stale features are never reused.

Extraction at scale: a batched :class:`~torch.utils.data.DataLoader` (``num_workers`` processes
decode and preprocess while the encoder runs; pinned memory on CUDA) feeds the encoder in its own
precision (``fp16``/``bf16`` on a GPU). The split is cut into shards of ``shard_size`` consecutive
records; each finished shard is written at once to ``<key>.shards/rows-<start>-<end>.safetensors``,
so an interrupted extraction resumes at the shard it stopped in. Under ``accelerate launch`` rank r
of W takes shards r, r + W, r + 2W, ...; after a barrier every rank reads all shards, the main
process writes the merged entry and removes the shards.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from registry import CaptionDataset, CaptionRecord, ImageEncoder, Split

logger = logging.getLogger(__name__)

#: Records per resumable shard (a shard is the unit an interrupted extraction redoes).
DEFAULT_SHARD_SIZE = 2048


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

    @property
    def missing(self) -> dict[int, str]:
        """The skipped images whose file does not exist (image id -> message)."""
        return {k: v for k, v in self.skipped.items() if "file not found" in v}


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
    """Disk cache of frozen image features; :meth:`get` extracts on a miss, loads on a hit.

    Args:
        root: cache folder (default ``$DCAP_CACHE/features``).
        shard_size: records per resumable shard while extracting.
    """

    def __init__(self, root: str | Path | None = None,
                 shard_size: int = DEFAULT_SHARD_SIZE) -> None:
        self.root = Path(root) if root is not None else default_cache_dir() / "features"
        if shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {shard_size}")
        self.shard_size = int(shard_size)

    @staticmethod
    def key(dataset: CaptionDataset, split: Split, encoder: ImageEncoder) -> str:
        text = f"{dataset.fingerprint}|{split}|{encoder.fingerprint}"
        return hashlib.sha256(text.encode()).hexdigest()[:20]

    def path(self, dataset: CaptionDataset, split: Split, encoder: ImageEncoder) -> Path:
        return self.root / f"{self.key(dataset, split, encoder)}.safetensors"

    def shard_dir(self, dataset: CaptionDataset, split: Split, encoder: ImageEncoder) -> Path:
        """Where the shards of an unfinished extraction live until they are merged."""
        return self.root / f"{self.key(dataset, split, encoder)}.shards"

    def get(
        self,
        dataset: CaptionDataset,
        split: Split,
        encoder: ImageEncoder,
        batch_size: int = 64,
        num_workers: int = 0,
        progress: bool = True,
    ) -> SplitFeatures:
        """The split's features: read from the cache, or extracted (resuming any finished
        shards; across processes under ``accelerate launch``), written, then returned."""
        records = dataset.records(split)
        path = self.path(dataset, split, encoder)
        if path.is_file():
            cached = self._read(path, records)
            if cached is not None:
                return cached
        shards = self.shard_dir(dataset, split, encoder)
        layout = ProcessLayout.current()
        features = extract_features(dataset, records, encoder, batch_size, num_workers, progress,
                                    shard_dir=shards, shard_size=self.shard_size, layout=layout)
        if layout.is_main:
            self._write(path, dataset, split, encoder, features)
            shutil.rmtree(shards, ignore_errors=True)
        layout.wait()
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
        features.text_features = (torch.cat(chunks) if chunks
                                  else torch.zeros(0, int(getattr(encoder, "dim", 0))))  # (M, D)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(f".{os.getpid()}.partial")  # ranks may write it at once
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


@dataclass
class ProcessLayout:
    """This process's rank among ``world`` extraction processes (1 unless ``accelerate launch``)."""

    rank: int = 0
    world: int = 1
    state: object | None = None  # accelerate.PartialState when world > 1

    @classmethod
    def current(cls) -> ProcessLayout:
        """The layout of a run started by ``accelerate launch`` / torchrun (WORLD_SIZE > 1), else one process."""
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            return cls()
        from accelerate import PartialState

        # without CUDA a multi-process launch runs on CPU with gloo (as the trainer's Accelerator)
        state = PartialState(cpu=not torch.cuda.is_available())
        return cls(state.process_index, state.num_processes, state)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def wait(self) -> None:
        """Barrier across the processes (no-op for one process)."""
        if self.state is not None:
            self.state.wait_for_everyone()


@dataclass(eq=False)  # identity: shards hold tensors
class _Shard:
    """Records ``[start, end)`` of a split and, once extracted, what came out of them."""

    start: int
    end: int
    rows: list[int] = field(default_factory=list)  # kept record rows
    chunks: list[torch.Tensor] = field(default_factory=list)
    skipped: dict[int, str] = field(default_factory=dict)
    seen: int = 0

    def file(self, folder: Path) -> Path:
        return folder / f"rows-{self.start:09d}-{self.end:09d}.safetensors"

    @property
    def complete(self) -> bool:
        return self.seen == self.end - self.start

    def save(self, folder: Path, records: list[CaptionRecord], dim: int) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        features = torch.cat(self.chunks) if self.chunks else torch.zeros(0, dim)  # (m, D)
        ids = torch.tensor([records[r].image_id for r in self.rows], dtype=torch.long)
        partial = self.file(folder).with_suffix(".partial")
        save_file({"image_ids": ids, "features": features.contiguous()}, str(partial),
                  metadata={"skipped": json.dumps({str(k): v for k, v in self.skipped.items()})})
        os.replace(partial, self.file(folder))

    def load(self, folder: Path, records: list[CaptionRecord]) -> bool:
        """Fill from the shard's file; False when it is missing, unreadable or does not match."""
        from safetensors import safe_open

        path = self.file(folder)
        if not path.is_file():
            return False
        try:
            with safe_open(str(path), "pt") as handle:
                metadata = handle.metadata() or {}
            tensors = load_file(str(path))
            skipped = {int(k): v for k, v in json.loads(metadata.get("skipped", "{}")).items()}
        except Exception as error:  # noqa: BLE001 - a damaged shard is extracted again
            logger.warning("feature shard %s unreadable (%s); extracting it again", path, error)
            return False
        row_of = {records[r].image_id: r for r in range(self.start, self.end)}
        ids = tensors["image_ids"].tolist()
        if set(ids) | set(skipped) != set(row_of) or len(ids) + len(skipped) != len(row_of):
            logger.warning("feature shard %s does not match the records; extracting it again", path)
            return False
        self.rows = [row_of[i] for i in ids]
        self.chunks = [tensors["features"]]
        self.skipped = skipped
        self.seen = self.end - self.start
        return True


def _batches(shards: list[_Shard], batch_size: int) -> Iterator[list[int]]:
    """Record rows in batches that never cross a shard boundary, shard after shard."""
    for shard in shards:
        for start in range(shard.start, shard.end, batch_size):
            yield list(range(start, min(start + batch_size, shard.end)))


def extract_features(
    dataset: CaptionDataset,
    records: list[CaptionRecord],
    encoder: ImageEncoder,
    batch_size: int = 64,
    num_workers: int = 0,
    progress: bool = True,
    *,
    shard_dir: str | Path | None = None,
    shard_size: int | None = None,
    layout: ProcessLayout | None = None,
) -> SplitFeatures:
    """Encode every record's image; unreadable images are skipped, named in a warning each.

    With ``shard_dir`` every finished shard of ``shard_size`` records is written there at once
    and shards already there are read instead of encoded (resume). With a multi-process
    ``layout`` (``accelerate launch``) each rank encodes its share of the shards, then every
    rank reads all of them (``shard_dir`` is required). Rows come back in record order.
    """
    layout = layout or ProcessLayout()
    dim = int(getattr(encoder, "dim", 0))
    if not records:
        return SplitFeatures([], torch.zeros(0, dim))
    if layout.world > 1 and shard_dir is None:
        raise ValueError("extracting across processes needs a shard_dir the ranks share")
    folder = Path(shard_dir) if shard_dir is not None else None
    size = int(shard_size or len(records))
    shards = [_Shard(start, min(start + size, len(records)))
              for start in range(0, len(records), size)]
    mine = shards[layout.rank::layout.world]
    pending = [s for s in mine if folder is None or not s.load(folder, records)]
    resumed = sum(s.end - s.start for s in mine if s not in pending)
    if resumed:
        logger.info("resuming extraction: %d of %d records already in shards under %s",
                    resumed, sum(s.end - s.start for s in mine), folder)

    device = getattr(encoder, "device", None)
    loader = DataLoader(_PreprocessedImages(dataset, records, encoder),
                        batch_sampler=list(_batches(pending, batch_size)), num_workers=num_workers,
                        collate_fn=_collate,
                        pin_memory=isinstance(device, torch.device) and device.type == "cuda")
    shard_of = {row: shard for shard in pending for row in range(shard.start, shard.end)}
    total = sum(s.end - s.start for s in mine)
    desc = "extract features" + (f" [rank {layout.rank}/{layout.world}]" if layout.world > 1 else "")
    encoded, began = 0, time.perf_counter()
    with tqdm(total=total, initial=resumed, desc=desc, unit="img",
              disable=not progress or not (layout.is_main or layout.world == 1)) as bar:
        for rows, pixels, bad in loader:
            shard = shard_of[(rows or [row for row, _ in bad])[0]]
            for row, message in bad:
                record = records[row]
                shard.skipped[record.image_id] = message
                logger.warning("skipping image %s (id %d): %s", record.image, record.image_id, message)
            if pixels is not None:
                shard.chunks.append(encoder.encode_images(pixels).cpu())  # (b, D)
                shard.rows.extend(rows)
                encoded += len(rows)
            shard.seen += len(rows) + len(bad)
            if shard.complete and folder is not None:
                shard.save(folder, records, dim)
            bar.update(len(rows) + len(bad))
    seconds = time.perf_counter() - began
    if encoded:
        logger.info("encoded %d images in %.1f s (%.1f images/s)", encoded, seconds,
                    encoded / max(seconds, 1e-9))

    if layout.world > 1:
        layout.wait()  # every rank's shards are on disk
        for shard in shards:
            if shard not in mine and not shard.load(folder, records):
                raise RuntimeError(f"feature shard {shard.file(folder)} is missing after every "
                                   "rank finished; rerun to resume")
    kept: list[CaptionRecord] = []
    chunks: list[torch.Tensor] = []
    skipped: dict[int, str] = {}
    for shard in shards:
        kept.extend(records[row] for row in shard.rows)
        chunks.extend(shard.chunks)
        skipped.update(shard.skipped)
    layout.wait()  # nobody removes the shards before every rank has read them
    if not kept:
        raise ValueError(f"no image of {len(records)} could be read; first error: "
                         f"{next(iter(skipped.values()), 'none')}")
    if skipped:
        logger.warning("%d of %d images could not be read and were skipped", len(skipped), len(records))
    return SplitFeatures(kept, torch.cat(chunks), skipped)
