"""Stand-ins for a real-size run on a machine that cannot download pretrained weights.

Writes into ``OUT`` (default ``/tmp/dcap-real-size``):

* ``distilbert-base/``: a randomly initialised DistilBERT-base (``DistilBertConfig()``: 6 layers,
  768 wide, 66M parameters) with the real bert-base-uncased WordPiece vocabulary (30522 tokens),
  saved the way ``save_pretrained`` saves a hub download, so ``"lm": DIR`` loads it through the
  same code path as ``"lm": "distilbert-base-uncased"``;
* ``coco6.jsonl``: the real COCO photos of ``../shared/data/coco-sample`` that have captions (5 of
  the 6, 5 human captions each), split 3 train / 1 val / 1 test;
* ``paper-local.json``: the ``paper`` preset with ``lm`` and the ``paper_bleu`` tokenizer pointed
  at that folder, and compare's speed phase cut to batch 1 (one repeat, one image).

The preset also points clipcap (GPT-2 base) and mnic (BERT-base) at random weights over the real
tokenizer files of ``../shared/tokenizers`` as shipped (a bare GPT-2 BPE folder, a bare WordPiece
``vocab.txt``), times clipcap at 12 tokens (a random model never ends), and keeps compare's speed
phase to batch 1 and 4 within a 4-minute budget. Then (a few training steps; ``ViT-B-32`` without
a pretrained tag is a seeded random-weight CLIP of the real size)::

    python benchmarks/real_size_setup.py
    dcap compare --decoders diffusion --preset /tmp/dcap-real-size/paper-local.json \\
        --dataset '{"type": "jsonl", "path": "/tmp/dcap-real-size/coco6.jsonl"}' \\
        --encoder ViT-B-32 --train '{"max_steps": 3}' --out runs/paper-coco6 --threads 2
    # all three decoders: --decoders clipcap,diffusion,mnic
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"


def main(out: str = "/tmp/dcap-real-size") -> None:
    import torch
    from transformers import DistilBertConfig, DistilBertForMaskedLM

    from diffusion_captioner.tokenization import read_tokenizer

    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    vocab = SHARED / "tokenizers" / "bert-base-uncased" / "vocab.txt"
    photos = SHARED / "data" / "coco-sample"
    if not vocab.is_file() or not (photos / "captions.json").is_file():
        sys.exit(f"needs {vocab} and {photos}/captions.json (the project's ../shared)")

    model_dir = folder / "distilbert-base"
    tokenizer = read_tokenizer(vocab.parent)  # the bare vocab.txt folder, 30522 word pieces
    saved = model_dir / "config.json"
    if not saved.is_file() or json.loads(saved.read_text())["vocab_size"] != len(tokenizer):
        torch.manual_seed(0)
        model = DistilBertForMaskedLM(DistilBertConfig(vocab_size=len(tokenizer)))
        model.save_pretrained(str(model_dir))
        tokenizer.save_pretrained(str(model_dir))

    captions = json.loads((photos / "captions.json").read_text())
    captioned = [(name, entry) for name, entry in sorted(captions.items()) if entry["captions"]]
    splits = ["train"] * (len(captioned) - 2) + ["val", "test"]
    with (folder / "coco6.jsonl").open("w") as lines:
        for split, (name, entry) in zip(splits, captioned, strict=True):
            lines.write(json.dumps({"image": str(photos / name), "captions": entry["captions"],
                                    "image_id": entry["image_id"], "split": split}) + "\n")

    tokenizers = SHARED / "tokenizers"
    preset = {
        "include": ["paper"],
        "paper_bleu": {"tokenizer": str(model_dir)},
        "speed": {"batch_sizes": [1, 4], "repeats": 1, "warmup": 1, "images": 1,
                  "steps": [1], "max_seconds": 240},
        "decoders": {
            "diffusion": {"decoder": {"lm": str(model_dir)}},
            # GPT-2 base and BERT-base with random weights (built-in configs), over the real
            # tokenizer files exactly as shipped: GPT-2's vocab.json + merges.txt, BERT's vocab.txt
            "clipcap": {"decoder": {"lm_pretrained": False, "tokenizer": str(tokenizers / "gpt2")},
                        "generate": {"num_beams": 1, "fixed_tokens": 12}},
            "mnic": {"decoder": {"lm_pretrained": False,
                                 "tokenizer": str(tokenizers / "bert-base-uncased")}},
        },
    }
    (folder / "paper-local.json").write_text(json.dumps(preset, indent=2))
    print(f"wrote {model_dir}, {folder / 'coco6.jsonl'} and {folder / 'paper-local.json'}")


if __name__ == "__main__":
    main(*sys.argv[1:])
