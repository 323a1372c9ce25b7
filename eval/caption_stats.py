"""Caption statistics that expose known failure modes of non-autoregressive decoders."""

from __future__ import annotations

from collections.abc import Iterable, Sequence


def words(caption: str) -> list[str]:
    """Lower-cased whitespace words with surrounding punctuation stripped."""
    return [w.strip(".,;:!?\"'") for w in caption.lower().split() if w.strip(".,;:!?\"'")]


#: Function words: a repeated phrase made of these alone ("of the") is not a repeated content phrase.
FUNCTION_WORDS = frozenset(
    "a an the of to and or in on at by with from for is are be it its this that there "
    "next left right above below".split())


def content_phrases(tokens: Sequence[str]) -> list[tuple[str, ...]]:
    """The caption's maximal runs of content words (the words between function words): roughly
    its noun phrases, "a large red circle above a square" -> (large, red, circle), (square)."""
    phrases, current = [], []
    for token in [*tokens, "."]:
        if token in FUNCTION_WORDS or token == ".":
            if current:
                phrases.append(tuple(current))
            current = []
        else:
            current.append(token)
    return phrases


def repeats_a_content_phrase(tokens: Sequence[str]) -> bool:
    """Whether two of the caption's content phrases of two or more words are the same ("a large
    red circle above a large red circle"): the failure of parallel decoders that name one object
    twice. Two objects sharing some words ("a small red square left of a small red cross") do not
    count."""
    long = [phrase for phrase in content_phrases(tokens) if len(phrase) >= 2]
    return len(set(long)) < len(long)


def caption_statistics(captions: Sequence[str], training_captions: Iterable[str] = ()) -> dict[str, float]:
    """Statistics of generated ``captions``.

    - ``repeated_word_rate``: share of captions with a word immediately repeated ("a red red circle"),
    - ``repeated_token_rate``: share of words equal to the word before them,
    - ``repeated_phrase_rate``: share of captions that repeat a content phrase of two or more
      words (:func:`repeats_a_content_phrase`),
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
        "repeated_phrase_rate": sum(map(repeats_a_content_phrase, tokenised)) / count,
        "mean_length": total_words / count,
        "empty_rate": sum(not t for t in tokenised) / count,
        "vocabulary": len({w for t in tokenised for w in t}),
        "copied_from_train": (sum(" ".join(t) in train for t in tokenised) / count) if train else 0.0,
    }
