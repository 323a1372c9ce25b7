"""Diversity of n sampled captions per image, and their quality: distinct-n, mBLEU-4, Self-CIDEr,
oracle CIDEr@n and the mean CIDEr of the samples.

With S_b = (s_1..s_n) the n samples of image b (PTB-tokenised, as the harness tokenises, by
:func:`score_diversity`) and R_b its references:

- ``distinct_1``, ``distinct_2`` (Div-n, Aneja et al. 2019; Deshpande et al. 2019): the number of
  distinct n-grams of S_b over the number of words in S_b, averaged over the images; higher is
  more diverse.
- ``mBLEU_4`` (Shetty et al. 2017): sample j of every image scored by pycocoevalcap's corpus
  BLEU-4 against the other n - 1 samples of its image as references, averaged over j; lower is
  more diverse (n identical samples give 1).
- ``self_CIDEr`` (Wang and Chan 2019, "Describing like Humans: on Diversity in Image
  Captioning", CVPR, sec. 3): with K the n x n matrix of pairwise CIDEr, ``K_ij = CIDEr-D(s_i;
  {s_j})`` for i >= j, its idf taken over the test references (as the paper's code, which takes
  it over the references of the evaluated split), mirrored to the upper triangle (CIDEr-D's
  clipping makes ``CIDEr-D(s_j; {s_i})`` slightly different; the paper's code computes both and
  hands the matrix to ``numpy.linalg.eigvalsh``, which reads the lower triangle only: the same
  matrix), and lambda_1 >= .. >= lambda_n its eigenvalues (clipped at 0)::

      self_CIDEr = -log_n( sqrt(lambda_1) / sum_i sqrt(lambda_i) )

  The paper takes the singular values sigma_i = sqrt(lambda_i) of the LSA embedding whose
  kernel is K, hence the square roots. n identical samples give K of rank 1: 0, its minimum; n
  samples with no n-gram in common give K = 10 I: 1, its maximum. Averaged over the images (an
  image whose K is 0, e.g. empty samples, counts 0).
- ``CIDEr_mean``: pycocoevalcap's CIDEr-D of sample j against R_b (idf over the references, as
  the harness), averaged over j and the images; ``CIDEr_oracle``: per image the best of its n
  samples' CIDEr-D, averaged over the images (oracle CIDEr@n).

Every CIDEr and BLEU is pycocoevalcap's own scorer; nothing here computes an n-gram similarity
of its own.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.cider.cider_scorer import CiderScorer

from eval.java_scorers import find_java, ptb_tokenize

#: The scores :func:`diversity_scores` returns, in the report's order.
DIVERSITY_SCORES = ("distinct_1", "distinct_2", "mBLEU_4", "self_CIDEr", "CIDEr_mean",
                    "CIDEr_oracle")


def _check_samples(samples: Mapping[Any, Sequence[str]], least: int = 1) -> int:
    """n, the number of samples every image has; ValueError when they differ or n < least."""
    counts = {len(s) for s in samples.values()}
    if not samples or len(counts) != 1:
        raise ValueError(f"diversity: every image needs the same number of samples; got "
                         f"{sorted(counts) or 'no images'}")
    n = counts.pop()
    if n < least:
        raise ValueError(f"diversity: needs at least {least} samples per image, got {n}")
    return n


def distinct_n(samples: Mapping[Any, Sequence[str]], n: int) -> float:
    """Mean over the images of |distinct n-grams of its samples| / |words of its samples|
    (0 for an image whose samples have no word); tokens are space-separated."""
    _check_samples(samples)
    ratios = []
    for captions in samples.values():
        grams: set[tuple[str, ...]] = set()
        words = 0
        for caption in captions:
            tokens = caption.split()
            words += len(tokens)
            grams.update(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))
        ratios.append(len(grams) / words if words else 0.0)
    return float(np.mean(ratios))


def mutual_bleu(samples: Mapping[Any, Sequence[str]], order: int = 4) -> float:
    """mBLEU-``order``: sample j of every image against its other samples, pycocoevalcap's corpus
    BLEU, averaged over j (needs n >= 2)."""
    n = _check_samples(samples, least=2)
    scores = []
    for j in range(n):
        others = {key: [c for i, c in enumerate(captions) if i != j]
                  for key, captions in samples.items()}
        chosen = {key: [captions[j]] for key, captions in samples.items()}
        corpus, _ = Bleu(order).compute_score(others, chosen, verbose=0)
        scores.append(float(corpus[order - 1]))
    return float(np.mean(scores))


class _ReferenceIdfCider(CiderScorer):
    """pycocoevalcap's CIDEr-D scorer whose idf comes from a reference corpus of M images, not
    from the references of the pairs it scores.

    ``compute_cider`` weighs an n-gram g by ``log(N) - log(max(1, df(g)))``, N the number of
    scored entries (set inside it). Storing ``df(g) = df_M(g) N / M`` (and ``N / M`` for an
    unseen g) turns that into ``log(M) - log(max(1, df_M(g)))``, the idf over the corpus, so
    pycocoevalcap's own tf-idf, clipping, length penalty and mean over n = 1..4 score the pairs.
    It needs N >= M (else ``max(1, .)`` would cut): :func:`cider_kernels` pads with empty pairs.
    """

    def __init__(self, corpus_frequency: Mapping[tuple[str, ...], float], corpus_size: int) -> None:
        super().__init__(n=4, sigma=6.0)
        self._corpus_frequency = corpus_frequency
        self._corpus_size = corpus_size

    def compute_doc_freq(self) -> None:
        scale = len(self.crefs) / self._corpus_size
        self.document_frequency = defaultdict(
            lambda: scale, {g: df * scale for g, df in self._corpus_frequency.items()})


def corpus_frequency(references: Mapping[Any, Sequence[str]]) -> dict[tuple[str, ...], float]:
    """pycocoevalcap's document frequency of every 1..4-gram: in how many images' references it
    occurs (``CiderScorer.compute_doc_freq``)."""
    scorer = CiderScorer(n=4, sigma=6.0)
    for refs in references.values():
        scorer += (None, list(refs))
    scorer.compute_doc_freq()
    return dict(scorer.document_frequency)


def cider_kernels(samples: Mapping[Any, Sequence[str]],
                  references: Mapping[Any, Sequence[str]]) -> dict[Any, np.ndarray]:
    """Per image the n x n pairwise CIDEr-D matrix of its samples, ``K_ij = CIDEr-D(s_i;
    {s_j})`` for i >= j mirrored above the diagonal, the idf over ``references`` (module
    docstring); one pycocoevalcap scoring pass over the n (n + 1) / 2 pairs of every image."""
    n = _check_samples(samples)
    scorer = _ReferenceIdfCider(corpus_frequency(references), len(references))
    keys = list(samples)
    lower = np.tril_indices(n)  # (i, j) with i >= j, row by row
    for key in keys:
        for i, j in zip(*lower, strict=True):
            scorer += (samples[key][i], [samples[key][j]])
    entries = len(keys) * len(lower[0])
    for _ in range(len(references) - entries):  # N >= M (see _ReferenceIdfCider); scored 0
        scorer += ("", [""])
    _, scores = scorer.compute_score()
    pairs = np.asarray(scores[:entries], dtype=float).reshape(len(keys), -1)  # (images, n (n+1) / 2)
    kernels = {}
    for key, row in zip(keys, pairs, strict=True):
        kernel = np.zeros((n, n))
        kernel[lower] = row
        kernels[key] = np.tril(kernel) + np.tril(kernel, -1).T  # (n, n), symmetric
    return kernels


def self_cider_of(kernel: np.ndarray) -> float:
    """``-log_n(sqrt(lambda_1) / sum_i sqrt(lambda_i))`` of an n x n symmetric kernel (0 for a
    zero kernel or n = 1)."""
    n = kernel.shape[0]
    roots = np.sqrt(np.clip(np.linalg.eigvalsh(kernel), 0.0, None))  # (n,)
    if n < 2 or roots.sum() <= 0:
        return 0.0
    return float(-math.log(roots.max() / roots.sum()) / math.log(n))


def self_cider(samples: Mapping[Any, Sequence[str]],
               references: Mapping[Any, Sequence[str]]) -> float:
    """Self-CIDEr (Wang and Chan 2019) averaged over the images (module docstring)."""
    return float(np.mean([self_cider_of(k) for k in cider_kernels(samples, references).values()]))


def sample_cider(samples: Mapping[Any, Sequence[str]],
                 references: Mapping[Any, Sequence[str]]) -> np.ndarray:
    """(images, n) CIDEr-D of every sample against its image's references, pycocoevalcap's Cider
    over the images once per sample index (the harness's idf), images in ``samples`` order."""
    n = _check_samples(samples)
    keys = list(samples)
    gts = {key: list(references[key]) for key in keys}
    columns = []
    for j in range(n):
        _, per_image = Cider().compute_score(gts, {key: [samples[key][j]] for key in keys})
        columns.append([float(v) for v in per_image])  # in gts' (insertion) order: keys
    return np.asarray(columns, dtype=float).T  # (images, n)


def diversity_scores(samples: Mapping[Any, Sequence[str]],
                     references: Mapping[Any, Sequence[str]]) -> dict[str, float]:
    """Every score of the module docstring for tokenised ``samples`` (image -> n >= 2 captions)
    and ``references`` (image -> captions; every sampled image among them)."""
    _check_samples(samples, least=2)
    missing = [key for key in samples if key not in references]
    if missing:
        raise ValueError(f"diversity: {len(missing)} sampled images have no references "
                         f"(e.g. {missing[0]!r}); score samples of the split they came from")
    quality = sample_cider(samples, references)  # (images, n)
    return {"distinct_1": distinct_n(samples, 1), "distinct_2": distinct_n(samples, 2),
            "mBLEU_4": mutual_bleu(samples), "self_CIDEr": self_cider(samples, references),
            "CIDEr_mean": float(quality.mean()), "CIDEr_oracle": float(quality.max(1).mean())}


def tokenize_references(references: Mapping[Any, Sequence[str]],
                        java: str | None = None) -> dict[Any, list[str]]:
    """PTB-tokenised references (one JVM call), to score several sample sets against."""
    keys = list(references)
    flat = [ref for key in keys for ref in references[key]]
    tokens = iter(ptb_tokenize(java or find_java(), flat))
    return {key: [next(tokens) for _ in references[key]] for key in keys}


def score_diversity(samples: Mapping[Any, Sequence[str]],
                    references: Mapping[Any, Sequence[str]], java: str | None = None,
                    tokenized_references: bool = False) -> dict[str, float]:
    """:func:`diversity_scores` of raw captions: samples (and the references, unless
    ``tokenized_references``) PTB-tokenised as the harness does, one JVM call."""
    keys = list(samples)
    flat = [caption for key in keys for caption in samples[key]]
    tokens = iter(ptb_tokenize(java or find_java(), flat))
    tokenized = {key: [next(tokens) for _ in samples[key]] for key in keys}
    refs = references if tokenized_references else tokenize_references(
        {key: references[key] for key in keys}, java)
    return diversity_scores(tokenized, refs)
