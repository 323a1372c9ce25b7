"""Caption statistics that expose known failure modes of non-autoregressive decoders."""

from __future__ import annotations

from collections.abc import Iterable, Sequence


def words(caption: str) -> list[str]:
    """Lower-cased whitespace words with surrounding punctuation stripped."""
    return [w.strip(".,;:!?\"'") for w in caption.lower().split() if w.strip(".,;:!?\"'")]


def caption_statistics(captions: Sequence[str], training_captions: Iterable[str] = ()) -> dict[str, float]:
    """Statistics of generated ``captions``.

    - ``repeated_word_rate``: share of captions with a word immediately repeated ("a red red circle"),
    - ``repeated_token_rate``: share of words equal to the word before them,
    - ``mean_length``: mean number of words, ``empty_rate``: share of empty captions,
    - ``vocabulary``: distinct words used over all captions,
    - ``copied_from_train``: share of captions identical (word for word) to a training caption.
    """
    tokenised = [words(c) for c in captions]
    pairs = [(a, b) for t in tokenised for a, b in zip(t, t[1:], strict=False)]
    total_words = sum(len(t) for t in tokenised)
    train = {" ".join(words(c)) for c in training_captions}
    count = max(1, len(tokenised))
    return {
        "repeated_word_rate": sum(any(a == b for a, b in zip(t, t[1:], strict=False))
                                  for t in tokenised) / count,
        "repeated_token_rate": sum(a == b for a, b in pairs) / max(1, total_words),
        "mean_length": total_words / count,
        "empty_rate": sum(not t for t in tokenised) / count,
        "vocabulary": len({w for t in tokenised for w in t}),
        "copied_from_train": (sum(" ".join(t) in train for t in tokenised) / count) if train else 0.0,
    }
