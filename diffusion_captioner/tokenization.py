"""Tokenizers: a word-level tokenizer for small closed vocabularies, and one loader for all.

The word tokenizer maps a lowercased, whitespace/punctuation-split caption to word ids with a fixed
special-token block first::

    [PAD]=0  [UNK]=1  [CLS]=2  [SEP]=3  [MASK]=4  then the words, sorted

``bos`` is ``[CLS]`` and ``eos`` is ``[SEP]``. No post-processor is attached, so encoding never
adds special tokens; decoders add the ones they need themselves (and pass
``add_special_tokens=False`` to say so).

:func:`load_tokenizer` resolves ``"embedded:NAME"`` to a tokenizer shipped in
``diffusion_captioner/assets/NAME/`` and anything else to ``AutoTokenizer.from_pretrained``.
``python -m diffusion_captioner.tokenization`` (re)writes the embedded ``shapes_words`` tokenizer.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Iterable, Sequence
from pathlib import Path

from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
from transformers import (
    AutoTokenizer,
    BertTokenizerFast,
    GPT2TokenizerFast,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from registry import ComponentError

logger = logging.getLogger(__name__)

#: Special tokens of the word tokenizer, in id order 0..4.
SPECIAL_TOKENS: tuple[str, ...] = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
EMBEDDED_PREFIX = "embedded:"
ASSETS_DIR = Path(__file__).resolve().parent / "assets"


def build_word_tokenizer(words: Iterable[str]) -> PreTrainedTokenizerFast:
    """A word-level fast tokenizer over ``words``: ids 0..4 are the specials, then sorted words.

    Words are lowercased and deduplicated; a word that is also a special token is ignored. Text is
    lowercased and split on whitespace and punctuation (``Whitespace`` pre-tokenizer: ``\\w+|[^\\w\\s]+``),
    so include punctuation marks in ``words`` if captions keep them. Unknown words map to ``[UNK]``.
    ``decode(ids, skip_special_tokens=True)`` gives the words joined by single spaces.
    """
    vocabulary = sorted({word.lower() for word in words if word.strip()} - set(SPECIAL_TOKENS))
    bad = [word for word in vocabulary if len(word.split()) != 1]
    if bad:
        raise ValueError(f"vocabulary words must not contain whitespace: {bad[:5]}")
    vocab = {token: index for index, token in enumerate((*SPECIAL_TOKENS, *vocabulary))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="[PAD]",
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        bos_token="[CLS]",
        eos_token="[SEP]",
    )


def embedded_tokenizer_dir(name: str) -> Path:
    """Directory of the packaged tokenizer ``name`` (``diffusion_captioner/assets/NAME``)."""
    return ASSETS_DIR / name


def _is_bare_bpe_dir(path: Path) -> bool:
    """A directory holding only GPT-2 style ``vocab.json`` + ``merges.txt`` (no tokenizer config)."""
    return (
        path.is_dir()
        and (path / "vocab.json").is_file()
        and (path / "merges.txt").is_file()
        and not (path / "tokenizer.json").is_file()
        and not (path / "tokenizer_config.json").is_file()
    )


def _is_bare_wordpiece_dir(path: Path) -> bool:
    """A directory holding a BERT ``vocab.txt`` but no tokenizer config."""
    return (
        path.is_dir()
        and (path / "vocab.txt").is_file()
        and not (path / "tokenizer.json").is_file()
        and not (path / "tokenizer_config.json").is_file()
    )


def read_tokenizer(name_or_path: str | Path) -> PreTrainedTokenizerBase:
    """A tokenizer from any of the usual forms, as it is (no special tokens added).

    ``"embedded:NAME"`` -> the packaged ``assets/NAME`` directory; a directory with only
    ``vocab.json`` + ``merges.txt`` -> ``GPT2TokenizerFast``; a directory with only a WordPiece
    ``vocab.txt`` -> ``BertTokenizerFast`` (lower-casing when the vocabulary has no upper-case
    entry, as bert-base-uncased's); anything else (a hub name, a ``save_pretrained`` directory)
    -> ``AutoTokenizer.from_pretrained``. A folder that none of them reads fails in one line
    naming it and the forms that work.
    """
    name = str(name_or_path)
    if name.startswith(EMBEDDED_PREFIX):
        embedded = name[len(EMBEDDED_PREFIX) :]
        directory = embedded_tokenizer_dir(embedded)
        if not (directory / "tokenizer.json").is_file():
            available = sorted(p.name for p in ASSETS_DIR.glob("*") if p.is_dir()) or ["(none)"]
            raise ComponentError(
                f"embedded tokenizer {embedded!r} not found at {directory}; available: "
                f"{', '.join(available)} (write it with `python -m diffusion_captioner.tokenization`)"
            )
        return AutoTokenizer.from_pretrained(str(directory))
    path = Path(name).expanduser()
    if _is_bare_bpe_dir(path):
        return GPT2TokenizerFast.from_pretrained(str(path))
    if _is_bare_wordpiece_dir(path):
        vocab = path / "vocab.txt"
        cased = any(line.strip() != line.strip().lower()
                    for line in vocab.read_text(encoding="utf-8").splitlines()
                    if not line.startswith("["))
        # the vocabulary argument is `vocab` in transformers 5 (`vocab_file`, which 5.x silently
        # ignores, leaving 5 special tokens, in 4.x)
        keyword = ("vocab" if "vocab" in inspect.signature(BertTokenizerFast.__init__).parameters
                   else "vocab_file")
        tokenizer = BertTokenizerFast(**{keyword: str(vocab)}, do_lower_case=not cased)
        if len(tokenizer) < sum(1 for line in vocab.read_text(encoding="utf-8").splitlines()
                                if line.strip()):
            raise ComponentError(f"tokenizer folder {path}: vocab.txt was read as "
                                 f"{len(tokenizer)} tokens; save the tokenizer with "
                                 "save_pretrained and pass that folder")
        return tokenizer
    try:
        return AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as error:
        if not path.is_dir():
            raise
        message = " ".join(str(error).split())
        raise ComponentError(
            f"tokenizer folder {path} could not be read ({type(error).__name__}: {message}); a "
            "tokenizer folder holds tokenizer.json (save_pretrained), or GPT-2's vocab.json + "
            "merges.txt, or a WordPiece vocab.txt") from error


def with_special_tokens(tokenizer: PreTrainedTokenizerBase, pad: bool = False,
                        mask: bool = False) -> PreTrainedTokenizerBase:
    """Add the special tokens a decoder needs and ``tokenizer`` lacks (``[PAD]``, ``[MASK]``: a
    GPT-2 BPE tokenizer has neither). They take new ids after the vocabulary, so a language model
    built over the tokenizer grows its embeddings to fit; saved with the checkpoint's tokenizer."""
    added = {}
    if pad and tokenizer.pad_token is None:
        added["pad_token"] = "[PAD]"
    if mask and tokenizer.mask_token is None:
        added["mask_token"] = "[MASK]"
    if added:
        tokenizer.add_special_tokens(added)
    return tokenizer


def load_tokenizer(name_or_path: str | Path) -> PreTrainedTokenizerBase:
    """:func:`read_tokenizer`, then make sure it has a pad token and an end (eos) token.

    A tokenizer without a pad token (GPT-2) gets its eos token as pad; decoders must therefore
    mask padding by length, never by ``pad_id``. One without an eos token (BERT) gets its [SEP].
    """
    name = str(name_or_path)
    tokenizer = read_tokenizer(name)
    if tokenizer.eos_token is None and tokenizer.sep_token is not None:
        tokenizer.eos_token = tokenizer.sep_token
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ComponentError(f"tokenizer {name!r} has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.eos_token is None:
        raise ComponentError(f"tokenizer {name!r} has no eos token; captions need one to stop")
    return tokenizer


def write_embedded_tokenizer(name: str = "shapes_words") -> Path:
    """Build the word tokenizer of the embedded shapes data set and save it to ``assets/NAME``."""
    from diffusion_captioner.data.shapes import vocabulary  # lazy: data modules import torch/PIL

    tokenizer = build_word_tokenizer(vocabulary())
    directory = embedded_tokenizer_dir(name)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(directory))
    logger.info("wrote embedded tokenizer %s (%d tokens) to %s", name, len(tokenizer), directory)
    return directory


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    write_embedded_tokenizer()


def decode_until_stop(tokenizer: PreTrainedTokenizerBase, ids: Sequence[Sequence[int]],
                      stops: Iterable[int]) -> list[str]:
    """Token id rows -> captions: each row cut at its first ``stops`` token, special tokens
    dropped, whitespace stripped."""
    stops = set(stops)
    captions = []
    for row in ids:
        cut = next((i for i, token in enumerate(row) if token in stops), len(row))
        captions.append(tokenizer.decode(list(row[:cut]), skip_special_tokens=True).strip())
    return captions
