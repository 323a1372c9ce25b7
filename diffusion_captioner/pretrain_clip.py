"""Contrastive pre-training of the tiny embedded CLIP on a captioning data set (``dcap pretrain-clip``).

The embedded default encoder is an open_clip CLIP (custom config: a small ViT image tower and a
small text transformer over a word-level vocabulary) trained with the symmetric InfoNCE loss

    L = 1/2 [ CE(s * I T^T, diag) + CE(s * T I^T, diag) ],   I, T l2-normalised, s = exp(logit_scale)

on (image, one of its captions) pairs. The result is an ``open_clip`` local-dir folder
(``open_clip_config.json`` + ``open_clip_model.safetensors`` + tokenizer files + ``pretrain.json``
with the command, the settings and the held-out retrieval recall).
"""

from __future__ import annotations

import json
import logging
import math
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from registry import CaptionDataset, CaptionRecord, build

logger = logging.getLogger(__name__)

MEAN = (0.5, 0.5, 0.5)
STD = (0.5, 0.5, 0.5)


def tiny_clip_config(
    vocab_size: int,
    eos_id: int,
    image_size: int = 64,
    patch_size: int = 8,
    width: int = 128,
    vision_layers: int = 4,
    text_layers: int = 3,
    embed_dim: int = 128,
    context_length: int = 24,
) -> dict[str, Any]:
    """open_clip ``model_cfg`` of a small CLIP: ViT image tower, causal text tower pooled at [SEP]."""
    return {
        "embed_dim": embed_dim,
        "vision_cfg": {
            "image_size": image_size,
            "patch_size": patch_size,
            "width": width,
            "layers": vision_layers,
            "head_width": 32,
        },
        "text_cfg": {
            "context_length": context_length,
            "vocab_size": vocab_size,
            "width": width,
            "heads": width // 32,
            "layers": text_layers,
            "pool_type": "eos",
            "eos_id": eos_id,
            "pad_id": 0,
            "hf_tokenizer_name": "local",
        },
    }


def clip_tokenizer(words: list[str]):
    """Word-level tokenizer whose encodings read ``[CLS] words [SEP]`` (the text tower pools at [SEP])."""
    from tokenizers.processors import TemplateProcessing

    from diffusion_captioner.tokenization import build_word_tokenizer

    tokenizer = build_word_tokenizer(words)
    cls_id, sep_id = tokenizer.cls_token_id, tokenizer.sep_token_id
    tokenizer.backend_tokenizer.post_processor = TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)]
    )
    return tokenizer


def caption_vocabulary(records: list[CaptionRecord]) -> list[str]:
    """Every lower-cased whitespace word of every caption, sorted."""
    return sorted({word for record in records for caption in record.captions
                   for word in caption.lower().split()})


def render_pixels(dataset: CaptionDataset, records: list[CaptionRecord], preprocess) -> torch.Tensor:
    """Preprocess every record's image once: (N, 3, H, W)."""
    return torch.stack([preprocess(dataset.load_image(r)) for r in tqdm(
        records, desc="render", unit="img", leave=False)])


@torch.no_grad()
def image_to_text_recall(
    image_features: torch.Tensor, records: list[CaptionRecord], text_features: torch.Tensor,
    ks: tuple[int, ...] = (1, 5),
) -> dict[str, float]:
    """Image -> text retrieval over every caption of ``records``.

    ``image_features`` (N, D) is one row per record; ``text_features`` (N*5, D) one row per caption
    in record order. A retrieved caption counts as correct when it is, word for word, one of the
    query image's own references (different images can share a caption). Returns ``R@k``.
    """
    captions = [c for r in records for c in r.captions]
    image = F.normalize(image_features, dim=-1)  # (N, D)
    text = F.normalize(text_features, dim=-1)  # (M, D)
    ranked = (image @ text.T).topk(max(ks), dim=-1).indices  # (N, K)
    hits = {k: 0 for k in ks}
    for row, record in enumerate(records):
        own = set(record.captions)
        correct = [captions[i] in own for i in ranked[row].tolist()]
        for k in ks:
            hits[k] += any(correct[:k])
    return {f"R@{k}": hits[k] / len(records) for k in ks}


def pretrain_clip(
    out: str | Path,
    dataset: dict | None = None,
    steps: int = 3000,
    batch_size: int = 256,
    lr: float = 1e-3,
    weight_decay: float = 0.1,
    warmup: int = 200,
    seed: int = 0,
    eval_split: str = "val",
    model: dict | None = None,
) -> dict[str, Any]:
    """Train a tiny CLIP on ``dataset`` (default: shapes) and write it as an open_clip local-dir."""
    import open_clip
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    started = time.time()
    data: CaptionDataset = build("dataset", dataset or {"type": "shapes"})
    train, held_out = data.records("train"), data.records(eval_split)

    tokenizer = clip_tokenizer(caption_vocabulary(train + held_out))
    tokenizer.save_pretrained(out)
    model_cfg = tiny_clip_config(len(tokenizer), tokenizer.sep_token_id, **(model or {}))
    size = model_cfg["vision_cfg"]["image_size"]
    config = {
        "model_cfg": model_cfg,
        "preprocess_cfg": {"size": size, "mean": list(MEAN), "std": list(STD),
                           "interpolation": "bicubic", "resize_mode": "shortest"},
    }
    (out / "open_clip_config.json").write_text(json.dumps(config, indent=2))
    for stale in out.glob("*.safetensors"):
        stale.unlink()
    clip, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{out}")
    text_tokenize = open_clip.get_tokenizer(f"local-dir:{out}")

    pixels = render_pixels(data, train, preprocess)  # (N, 3, H, W)
    tokens = torch.stack([text_tokenize(list(r.captions)) for r in train])  # (N, 5, C)
    optimizer = torch.optim.AdamW(clip.parameters(), lr=lr, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup)
                                                 * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    generator = torch.Generator().manual_seed(seed)
    clip.train()
    progress = tqdm(range(steps), desc="pretrain-clip", unit="step")
    for _ in progress:
        index = torch.randint(len(train), (batch_size,), generator=generator)  # (B,)
        choice = torch.randint(tokens.shape[1], (batch_size,), generator=generator)  # (B,)
        image = F.normalize(clip.encode_image(pixels[index]), dim=-1)  # (B, E)
        text = F.normalize(clip.encode_text(tokens[index, choice]), dim=-1)  # (B, E)
        logits = clip.logit_scale.exp() * image @ text.T  # (B, B)
        target = torch.arange(batch_size)
        loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        with torch.no_grad():
            clip.logit_scale.clamp_(0, math.log(100))
        progress.set_postfix(loss=f"{loss.item():.3f}")
    clip.eval()

    save_file({k: v.contiguous() for k, v in clip.state_dict().items()},
              str(out / "open_clip_model.safetensors"))
    with torch.no_grad():
        held_pixels = render_pixels(data, held_out, preprocess)
        image_features = torch.cat([clip.encode_image(b) for b in held_pixels.split(256)])
        captions = [c for r in held_out for c in r.captions]
        text_features = torch.cat([clip.encode_text(text_tokenize(captions[i:i + 512]))
                                   for i in range(0, len(captions), 512)])
    recall = image_to_text_recall(image_features, held_out, text_features)
    report = {
        "command": "dcap pretrain-clip " + shlex.join(sys.argv[2:]) if len(sys.argv) > 1 else "",
        "dataset": dataset or {"type": "shapes"},
        "steps": steps, "batch_size": batch_size, "lr": lr, "weight_decay": weight_decay,
        "warmup": warmup, "seed": seed,
        "parameters": sum(p.numel() for p in clip.parameters()),
        "held_out": {"split": eval_split, "images": len(held_out), "captions": len(captions),
                     **recall},
        "train_seconds": round(time.time() - started, 1),
        "torch": torch.__version__, "open_clip": open_clip.__version__,
    }
    (out / "pretrain.json").write_text(json.dumps(report, indent=2))
    logger.info("pretrain-clip: image->text %s on %d held-out images", recall, len(held_out))
    return report
