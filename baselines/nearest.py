"""Nearest-neighbour retrieval captioning (Devlin et al. 2015): the floor under every report.

Training memorises every distinct (image feature, caption) pair the trainer shows it; nothing is
learnt. A test image takes the captions of its ``k`` nearest training images (cosine similarity
of the CLIP features) as candidates and returns their *consensus caption*: the candidate with the
highest mean similarity to the other candidates, similarity being the F1 of shared unigrams and
bigrams (Devlin et al. re-rank by BLEU/CIDEr against the other candidates; this is its cheap
form). With ``k = 1`` the candidates are the nearest image's own references.

Sampling (``generate_samples``) draws an image's n captions uniformly without replacement from
the same candidates (the captions of its k nearest training images; a fresh round through them
when n exceeds their number): retrieval's own diversity, that of the human captions it
retrieves.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from diffusion_captioner.sampling import draw_indices
from registry import Capabilities, CaptionDecoder, GenerationOptions

logger = logging.getLogger(__name__)

MEMORY = "memory.safetensors"
CAPTIONS = "memory_captions.json"


def ngram_f1(a: str, b: str) -> float:
    """F1 of the unigrams and bigrams two captions share (0 when either is empty)."""
    def grams(text: str) -> Counter:
        words = text.lower().split()
        return Counter(words) + Counter(zip(words, words[1:], strict=False))

    x, y = grams(a), grams(b)
    shared = sum((x & y).values())
    if not shared:
        return 0.0
    precision, recall = shared / sum(x.values()), shared / sum(y.values())
    return 2 * precision * recall / (precision + recall)


def consensus(candidates: list[str]) -> str:
    """The candidate most similar, on average, to the others (the first wins ties)."""
    if len(candidates) == 1:
        return candidates[0]
    scores = [sum(ngram_f1(c, o) for j, o in enumerate(candidates) if j != i)
              for i, c in enumerate(candidates)]
    return candidates[max(range(len(candidates)), key=scores.__getitem__)]


@dataclass(frozen=True)
class NearestOptions(GenerationOptions):
    """``k``: how many nearest training images give candidates (default: the model's)."""

    k: int | None = None


@CaptionDecoder.register("nearest")
class NearestDecoder(CaptionDecoder):
    """Nearest-neighbour retrieval (Devlin et al. 2015): the k nearest training images' consensus.

    Args:
        feature_dim: D, the CLIP feature size.
        k: how many nearest training images give candidate captions.
        memory: a checkpoint's memory file (set when a checkpoint is loaded).
    """

    Options = NearestOptions
    capabilities = Capabilities(kind="retrieval", sampling=True)

    def __init__(self, feature_dim: int, k: int = 1, memory: str | None = None) -> None:
        super().__init__()
        if int(k) < 1:
            raise ValueError(f"nearest: k must be >= 1, got {k}")
        self.feature_dim, self.k, self.memory = int(feature_dim), int(k), memory
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # the trainer wants a parameter
        self.seen: set[tuple[str, bytes]] = set()  # (caption, feature bytes) pairs memorised
        self.images: dict[bytes, int] = {}  # feature bytes -> row
        self.rows: list[torch.Tensor] = []  # (D,) unit-norm features, one per distinct image
        self.captions: list[list[str]] = []  # the captions memorised for each row
        if memory is not None:
            features = load_file(memory)["features"]  # (N, D)
            captions = json.loads((Path(memory).parent / CAPTIONS).read_text())
            for row, texts in zip(features, captions, strict=True):
                for text in texts:
                    self._remember(row, text)

    def _remember(self, feature: torch.Tensor, caption: str) -> None:
        unit = F.normalize(feature.detach().float().cpu(), dim=-1)  # (D,)
        raw = unit.numpy().tobytes()
        if (caption, raw) in self.seen:  # a later epoch shows the same pair again
            return
        self.seen.add((caption, raw))
        if raw not in self.images:
            self.images[raw] = len(self.rows)
            self.rows.append(unit)
            self.captions.append([])
        self.captions[self.images[raw]].append(caption)

    def loss(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Memorise the batch (in training mode); the loss is 0 and only keeps the trainer going."""
        if self.training:
            for feature, caption in zip(batch["features"], batch["captions"], strict=True):
                self._remember(feature, caption)
        return {"loss": self.anchor * 0.0, "memorised_images": torch.tensor(float(len(self.rows)))}

    def candidates(self, features: torch.Tensor, options: NearestOptions) -> list[list[str]]:
        """Per image the captions of its k nearest memorised images (cosine similarity), nearest
        first; the empty caption (with a warning) when nothing is memorised."""
        k = self.k if options.k is None else options.k
        if not self.rows:  # untrained: nothing to retrieve
            logger.warning("nearest: nothing memorised (train it for one epoch): empty captions")
            return [[""] for _ in range(len(features))]
        table = torch.stack(self.rows)  # (N, D)
        query = F.normalize(features.float().cpu(), dim=-1)  # (B, D)
        nearest = (query @ table.T).topk(min(k, len(self.rows)), dim=-1).indices  # (B, k)
        return [[c for i in row.tolist() for c in self.captions[i]] for row in nearest]

    def generate_batch(self, features: torch.Tensor, options: NearestOptions) -> list[str]:
        """(B, D) features -> B captions: the consensus of the k nearest images' captions."""
        return [consensus(pool) for pool in self.candidates(features, options)]

    def sample_batch(self, features: torch.Tensor, options: NearestOptions, num_samples: int,
                     generator: torch.Generator) -> list[list[str]]:
        """Per image ``num_samples`` of its candidates drawn uniformly without replacement (a
        new round through them when ``num_samples`` exceeds their number)."""
        pools = self.candidates(features, options)
        picks = draw_indices([len(pool) for pool in pools], num_samples, generator)
        return [[pool[i] for i in chosen] for pool, chosen in zip(pools, picks, strict=True)]

    def save_extra(self, directory: str | Path) -> None:
        """The memory beside the (empty) weights: features and their captions."""
        directory = Path(directory)
        features = torch.stack(self.rows) if self.rows else torch.zeros(0, self.feature_dim)
        save_file({"features": features.contiguous()}, str(directory / MEMORY))
        (directory / CAPTIONS).write_text(json.dumps(self.captions))

    @classmethod
    def checkpoint_overrides(cls, directory: str | Path) -> dict[str, Any]:
        return {"memory": str(Path(directory) / MEMORY)}
