"""CIDEr-D as the per-step reward of self-critical sequence training (SCST): the idf fixed by a
reference corpus, every reference vector precomputed once, the samples scored in pure Python.

With C the corpus (the training split: M images, image b with references R_b), every caption
tokenised by :func:`reward_tokens` and g_k(s) the count of n-gram g of order k in caption s:

- document frequency and idf (pycocoevalcap's ``CiderScorer.compute_doc_freq``)::

      df(g)  = |{b in C : g occurs in some r in R_b}|
      idf(g) = log(M) - log(max(1, df(g)))          (log M for an n-gram C never saw)

- tf-idf vector of order k, its norm and the length ``l(s)`` (pycocoevalcap's ``counts2vec``,
  whose length counts the BIGRAMS of s: ``words(s) - 1`` for a non-empty s)::

      v_k(s)[g] = g_k(s) idf(g),      |v_k(s)| = sqrt(sum_g v_k(s)[g]^2)

- CIDEr-D of a sample h of image b (pycocoevalcap's ``compute_cider``; sigma = 6, n = 4)::

      CIDEr-D(h, R_b) = 10 / |R_b| sum_{r in R_b} 1/n sum_{k=1..n}
                        exp(-(l(h) - l(r))^2 / (2 sigma^2))
                        sum_g min(v_k(h)[g], v_k(r)[g]) v_k(r)[g] / (|v_k(h)| |v_k(r)|)

  (an order whose h or r vector is zero adds 0).

The idf is that of the corpus given to :class:`CiderDReward`, not that of the scored batch's
references (which is what ``Cider().compute_score`` does): as in ruotianluo's
ImageCaptioning.pytorch, whose SCST reward is ``CiderD(df="coco-train")``. A batch of 64 images
would otherwise weigh every n-gram by how rare it is among those 64 images, and the reward of
the same caption would change from batch to batch. With the corpus equal to the scored images'
references the reward is pycocoevalcap's CIDEr-D exactly (tests/test_cider_reward.py).

The n-gram counting and the document frequency are pycocoevalcap's own (``precook``,
``cook_refs``, ``CiderScorer.compute_doc_freq``); the tf-idf arithmetic of ``counts2vec`` and
``sim`` is redone here on precomputed dicts because pycocoevalcap recomputes every reference
vector (and the idf, with ``np.log``) for every pair it scores, far too slow for every training
step.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Hashable, Mapping, Sequence
from types import MappingProxyType

import numpy as np
from pycocoevalcap.cider.cider_scorer import CiderScorer, cook_refs, precook
from pycocoevalcap.tokenizer.ptbtokenizer import PUNCTUATIONS

#: PTB's names for brackets in pycocoevalcap's PUNCTUATIONS, as the characters they stand for.
_BRACKETS = {"-LRB-": "(", "-RRB-": ")", "-LCB-": "{", "-RCB-": "}"}
#: Every character of pycocoevalcap's PUNCTUATIONS (``'' ' `` ` . ? ! , : - -- ... ;`` and the
#: brackets), plus ``"``, which PTB turns into ``` `` ``` or ``''`` before they are dropped.
PUNCTUATION_CHARS = "".join(sorted({c for p in PUNCTUATIONS for c in _BRACKETS.get(p, p)} | {'"'}))


def reward_tokens(caption: str) -> str:
    """The caption lowercased, split on whitespace, every token stripped of the punctuation
    pycocoevalcap's PTBTokenizer drops (:data:`PUNCTUATION_CHARS`) at both ends, the tokens left
    re-joined with single spaces.

    An in-process stand-in for pycocoevalcap's PTB tokenisation (which runs Java; this runs every
    training step). It approximates PTB: punctuation inside a token stays (PTB splits off
    clitics, ``"man's" -> "man 's"``, and separates ``"a,b" -> "a b"``, this keeps ``"man's"``
    and ``"a,b"``), brackets are dropped (pycocoevalcap's ``-lowerCase`` run keeps them as
    ``-lrb-`` tokens, which its lowercase PUNCTUATIONS check misses) and PTB's tokens made only of
    ``!?`` stay there too, not here. References and samples both go through this function in
    :class:`CiderDReward`, so the reward is consistent with itself. For captions of plain words
    it gives PTB's tokens: all 35,556 distinct captions of the default shapes data tokenise as
    pycocoevalcap's Java PTBTokenizer tokenises them.
    """
    stripped = (token.strip(PUNCTUATION_CHARS) for token in caption.lower().split())
    return " ".join(token for token in stripped if token)


class CiderDReward:
    """CIDEr-D of sampled captions against their images' references, the idf over a fixed
    reference corpus (module docstring); ``reward(keys, captions) -> (B,)``.

    Args:
        references: image key -> its reference captions: the corpus (the training split). Every
            image needs at least one; they are tokenised by :func:`reward_tokens`.
        n: Highest n-gram order (pycocoevalcap: 4).
        sigma: Standard deviation of the Gaussian length penalty (pycocoevalcap: 6).
    """

    def __init__(self, references: Mapping[Hashable, Sequence[str]], n: int = 4,
                 sigma: float = 6.0) -> None:
        if n < 1:
            raise ValueError(f"CiderDReward: n must be >= 1, got {n}")
        if not sigma > 0:
            raise ValueError(f"CiderDReward: sigma must be > 0, got {sigma}")
        if not references:
            raise ValueError("CiderDReward: the reference corpus is empty")
        empty = [key for key, refs in references.items() if not refs]
        if empty:
            raise ValueError(f"CiderDReward: {len(empty)} images have no reference caption "
                             f"(e.g. {empty[0]!r})")
        self.n = int(n)
        self.sigma = float(sigma)
        keys = list(references)
        # pycocoevalcap's own counting; cook_refs with our n (CiderScorer.cook_append would cook
        # 1..4-grams whatever its n).
        scorer = CiderScorer(n=self.n, sigma=self.sigma)
        scorer.crefs = [cook_refs([reward_tokens(r) for r in references[key]], self.n)
                        for key in keys]
        scorer.ctest = [None] * len(keys)
        scorer.compute_doc_freq()
        self._df: dict[tuple[str, ...], float] = dict(scorer.document_frequency)
        self._size = len(keys)
        self._log_m = math.log(float(self._size))
        # idf(g) = log M - log max(1, df(g)); df >= 1 for every corpus n-gram
        self._idf = {g: self._log_m - math.log(df) for g, df in self._df.items()}
        self._refs = {key: tuple(self._vector(counts) for counts in cooked)
                      for key, cooked in zip(keys, scorer.crefs, strict=True)}

    def with_references(self, references: Mapping[Hashable, Sequence[str]]) -> CiderDReward:
        """A reward that scores against ``references`` (e.g. the validation split's) with this
        corpus's idf: the training idf, as SCST's validation uses it."""
        empty = [key for key, refs in references.items() if not refs]
        if not references or empty:
            raise ValueError("CiderDReward.with_references: every image needs a reference "
                             f"caption{f' (e.g. {empty[0]!r})' if empty else ''}")
        other = copy.copy(self)
        other._refs = {key: tuple(self._vector(precook(reward_tokens(r), self.n))
                                  for r in refs) for key, refs in references.items()}
        return other

    @property
    def corpus_size(self) -> int:
        """M, the number of images in the reference corpus."""
        return self._size

    @property
    def document_frequency(self) -> Mapping[tuple[str, ...], float]:
        """n-gram -> in how many corpus images' references it occurs (read-only)."""
        return MappingProxyType(self._df)

    def idf(self, ngram: tuple[str, ...]) -> float:
        """``log(M) - log(max(1, df(ngram)))``: the weight of ``ngram`` in every tf-idf vector."""
        return self._idf.get(tuple(ngram), self._log_m)

    def _vector(self, counts: Mapping[tuple[str, ...], int]
                ) -> tuple[tuple[dict[tuple[str, ...], float], ...], tuple[float, ...], int]:
        """pycocoevalcap's ``counts2vec``: per order k the dict g -> tf idf, per order the norm,
        and the length. The length counts the bigrams (``len(ngram) - 1 == 1`` in pycocoevalcap),
        replicated exactly: ``words - 1`` for a non-empty caption, so the penalty's length
        difference is the word-count difference wherever it can matter (an empty caption or
        reference has zero vectors and adds 0 whatever its length)."""
        idf, log_m = self._idf, self._log_m
        vec: list[dict[tuple[str, ...], float]] = [{} for _ in range(self.n)]
        norm = [0.0] * self.n
        length = 0
        for gram, term_freq in counts.items():
            k = len(gram) - 1
            weight = float(term_freq) * idf.get(gram, log_m)
            vec[k][gram] = weight
            norm[k] += weight * weight
            if k == 1:
                length += term_freq
        return tuple(vec), tuple(math.sqrt(x) for x in norm), length

    def leave_one_out(self, key: Hashable) -> np.ndarray:
        """(R,) CIDEr-D of each of corpus image ``key``'s R references against its R - 1 others,
        ``CIDEr-D(r_j, R_b minus r_j)`` with the corpus idf: the score :meth:`__call__` would give
        r_j against those references, from the precomputed vectors (zeros when R = 1)."""
        refs = self._refs[key]
        out = np.zeros(len(refs))  # (R,)
        if len(refs) < 2:
            return out
        two_sigma_sq = 2.0 * self.sigma * self.sigma
        for j, (vec, norm, length) in enumerate(refs):
            total = 0.0
            for i, (ref_vec, ref_norm, ref_length) in enumerate(refs):
                if i == j:
                    continue
                delta = float(length - ref_length)
                penalty = math.exp(-(delta * delta) / two_sigma_sq)
                for k in range(self.n):
                    denominator = norm[k] * ref_norm[k]
                    if denominator == 0.0:
                        continue
                    ref_k = ref_vec[k]
                    dot = sum(min(weight, r) * r for gram, weight in vec[k].items()
                              if (r := ref_k.get(gram)) is not None)
                    total += dot / denominator * penalty
            out[j] = total / self.n / (len(refs) - 1) * 10.0
        return out

    def __call__(self, keys: Sequence[Hashable], captions: Sequence[str]) -> np.ndarray:
        """(B,) CIDEr-D of ``captions[i]`` (tokenised by :func:`reward_tokens`) against the
        references of ``keys[i]``; KeyError for a key not in the corpus."""
        if len(keys) != len(captions):
            raise ValueError(f"CiderDReward: {len(keys)} keys but {len(captions)} captions")
        refs_of = self._refs
        missing = next((key for key in keys if key not in refs_of), None)
        if missing is not None:
            raise KeyError(f"CiderDReward: image {missing!r} is not in the reference corpus "
                           f"({self._size} images); score samples of the split it was built on")
        n = self.n
        orders = range(n)
        two_sigma_sq = 2.0 * self.sigma * self.sigma
        exp = math.exp
        out = np.zeros(len(keys))  # (B,)
        for i, (key, caption) in enumerate(zip(keys, captions, strict=True)):
            vec, norm, length = self._vector(precook(reward_tokens(caption), n))
            # per order the sample's n-grams that some corpus reference has (the others have
            # v_k(r)[g] = 0 for every r) with their weights
            grams = [[(g, w) for g, w in vec[k].items() if g in self._idf] for k in orders]
            live = [k for k in orders if norm[k] != 0.0]
            total = 0.0
            for ref_vec, ref_norm, ref_length in refs_of[key]:
                delta = float(length - ref_length)
                penalty = exp(-(delta * delta) / two_sigma_sq)
                for k in live:
                    denominator = norm[k] * ref_norm[k]
                    if denominator == 0.0:
                        continue
                    ref_k = ref_vec[k]
                    dot = 0.0
                    for gram, weight in grams[k]:
                        r = ref_k.get(gram)
                        if r is not None:
                            dot += (weight if weight < r else r) * r  # clipped: min(h, r) r
                    total += dot / denominator * penalty
            out[i] = total / n / len(refs_of[key]) * 10.0
        return out
