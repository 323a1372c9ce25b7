"""The original CLIP-DiffusionLM code's BLEU-4, to set a reproduction beside the paper's figures.

Xu (2022) reports BLEU-4 0.1876 (Flickr8k) and 0.2470 (Flickr8k + 30k). Those numbers come from
the evaluation block at the end of ``CLIP-DDPM.py`` (xu-shitong/diffusion-image-captioning), not
from the COCO protocol this toolkit scores with (pycocoevalcap: PTB-tokenised words, corpus BLEU
over the whole test split). The original's protocol, reproduced here with the same library
(torchmetrics' ``BLEUScore``, 4-grams, no smoothing, whitespace tokens)::

    ids        = argmax over the L = 16 positions: [CLS] w_1 .. w_n [SEP] [PAD] .. [PAD]
    ids        = ids.unique_consecutive(dim=-1)      # per batch of 8: equal *columns* dropped
    hypothesis = tokenizer.decode(ids_row)           # word pieces merged, specials kept
    references = "[CLS] " + caption.strip().lower() + " [SEP]"   for each reference
    BLEU-4     = mean over batches of 8 of BLEUScore(hypotheses, references)

So [CLS] and [SEP] match in every pair (inflating the n-gram precisions), the trailing [PAD]
columns that every caption of a batch shares collapse to one, and the score is an average of
batch-level corpus BLEUs rather than one corpus BLEU. A caption string is turned back into the
ids the original would have decoded (its word pieces between [CLS] and [SEP], padded to L).
Differences that remain: the original scored every validation *caption row* (each image once
per reference caption, with its own noise draw), here every test image is scored once; and its
validation rows came from a random split of caption rows, so its validation images were seen in
training.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torchmetrics.text import BLEUScore
from transformers import PreTrainedTokenizerBase


def original_ids(tokenizer: PreTrainedTokenizerBase, caption: str, max_length: int) -> list[int]:
    """The id row the original decoder would emit for ``caption``: [CLS] word pieces [SEP] and
    [PAD] up to ``max_length`` (word pieces cut to ``max_length - 2``)."""
    pieces = tokenizer(caption, add_special_tokens=False)["input_ids"][: max_length - 2]
    row = [tokenizer.cls_token_id, *pieces, tokenizer.sep_token_id]
    return row + [tokenizer.pad_token_id] * (max_length - len(row))


def paper_bleu(
    results: Mapping[int, str],
    references: Mapping[int, Sequence[str]],
    tokenizer: PreTrainedTokenizerBase,
    max_length: int = 16,
    batch_size: int = 8,
) -> float:
    """BLEU-4 the way the original code computed it (see the module docstring).

    ``results``: image id -> caption; ``references``: image id -> its reference captions. Images
    are taken in id order, in batches of ``batch_size``; a last partial batch is dropped (the
    original's ``drop_last=True``) unless it is the only one.
    """
    missing = [i for i in ("cls_token_id", "sep_token_id", "pad_token_id")
               if getattr(tokenizer, i) is None]
    if missing:
        raise ValueError(f"paper_bleu needs a BERT-style tokenizer; this one has no "
                         f"{', '.join(m.removesuffix('_id') for m in missing)}")
    image_ids = sorted(results)
    absent = [i for i in image_ids if not references.get(i)]
    if absent:
        raise ValueError(f"paper_bleu: no references for image ids {absent[:5]}")
    if not image_ids:
        raise ValueError("paper_bleu: no captions to score")
    batches = [image_ids[i:i + batch_size] for i in range(0, len(image_ids), batch_size)]
    if len(batches) > 1 and len(batches[-1]) < batch_size:
        batches = batches[:-1]
    metric = BLEUScore(n_gram=4, smooth=False)
    scores = []
    for batch in batches:
        ids = torch.tensor([original_ids(tokenizer, results[i], max_length) for i in batch])
        ids = ids.unique_consecutive(dim=-1)  # (b, L') the original's batch-wide de-duplication
        hypotheses = [tokenizer.decode(row.tolist(), clean_up_tokenization_spaces=True)
                      for row in ids]
        targets = [[f"[CLS] {c.strip().lower()} [SEP]" for c in references[i]] for i in batch]
        scores.append(float(metric(hypotheses, targets)))
    return sum(scores) / len(scores)


def load_paper_bleu_tokenizer(name: str) -> PreTrainedTokenizerBase:
    """The word-piece tokenizer the protocol decodes with (a hub name, a local folder or
    ``embedded:NAME``), loaded under the hub guard: offline it fails in one line naming it."""
    from diffusion_captioner.hub import hf_access
    from diffusion_captioner.tokenization import read_tokenizer

    with hf_access(name, "tokenizer"):
        return read_tokenizer(name)
