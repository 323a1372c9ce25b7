"""Frozen CLIP encoders: every open_clip model, a local checkpoint, or the embedded shapes CLIP."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import torch
from PIL import Image

from diffusion_captioner.hub import open_clip_access
from registry import ComponentError, ImageEncoder

logger = logging.getLogger(__name__)

ASSETS = Path(__file__).resolve().parent / "assets"
EMBEDDED_PREFIX = "embedded:"
DEFAULT_ENCODER = "embedded:shapes_clip"
Precision = Literal["fp32", "fp16", "bf16"]
_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def embedded_asset(name: str) -> Path:
    """The packaged asset folder ``diffusion_captioner/assets/<name>``."""
    path = ASSETS / name
    if not path.is_dir():
        known = sorted(p.name for p in ASSETS.iterdir() if p.is_dir()) if ASSETS.is_dir() else []
        raise ComponentError(
            f"embedded asset {name!r} not found in {ASSETS}; packaged: {', '.join(known) or '(none)'}"
        )
    return path


def encoder_config(spec: str | dict | None) -> dict:
    """Normalise the CLI's ``--encoder`` into a config dict.

    ``None``/"embedded" -> the embedded shapes CLIP; ``"ViT-B-32:openai"`` -> open_clip model
    ``ViT-B-32`` with pretrained tag ``openai``; ``"ViT-B-32:/path/ckpt.pt"`` -> a local checkpoint;
    ``"local-dir:/path"`` or ``"hf-hub:org/repo"`` -> open_clip schemas; a dict passes through.
    """
    if isinstance(spec, dict):
        return {"type": "open_clip", **spec}
    if spec is None or spec in ("embedded", DEFAULT_ENCODER):
        return {"type": "open_clip", "model": DEFAULT_ENCODER}
    if spec.startswith(("local-dir:", "hf-hub:", EMBEDDED_PREFIX)):
        return {"type": "open_clip", "model": spec}
    model, _, pretrained = spec.partition(":")
    return {"type": "open_clip", "model": model, "pretrained": pretrained or None}


def file_digest(path: Path, chunk: int = 1 << 20) -> str:
    """sha256 of a file's bytes (16 hex digits)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()[:16]


@ImageEncoder.register("open_clip")
class OpenClipEncoder(ImageEncoder):
    """Frozen open_clip CLIP: any architecture + pretrained tag, a local checkpoint, or the embedded shapes CLIP.

    ``model`` is an open_clip architecture (``ViT-B-32``), ``local-dir:PATH``, ``hf-hub:REPO`` or
    ``embedded:NAME``; ``pretrained`` is an open_clip tag (``openai``) or a checkpoint file.
    An architecture without ``pretrained`` gets random weights drawn from ``seed`` (the global
    RNG is left as it was), and the seed is part of the fingerprint: the same seed gives the same
    network in every process, another seed another cache entry.
    """

    def __init__(
        self,
        model: str = DEFAULT_ENCODER,
        pretrained: str | None = None,
        device: str = "cpu",
        precision: Precision = "fp32",
        seed: int = 0,
    ) -> None:
        import open_clip

        self.model_name = model
        self.pretrained = pretrained
        self.seed = int(seed)
        self.device = torch.device(device)
        self.precision: Precision = precision
        source = model
        if model.startswith(EMBEDDED_PREFIX):
            source = f"local-dir:{embedded_asset(model[len(EMBEDDED_PREFIX):])}"
        self.random_init = pretrained is None and not source.startswith(("local-dir:", "hf-hub:"))
        try:
            with open_clip_access(source, pretrained), torch.random.fork_rng(devices=[]):
                if self.random_init:  # seeded: the same random network in every process
                    torch.manual_seed(self.seed)
                clip, _, preprocess = open_clip.create_model_and_transforms(
                    source, pretrained=pretrained, device=self.device
                )
                tokenizer = open_clip.get_tokenizer(source)
        except ComponentError:
            raise
        except Exception as error:  # noqa: BLE001 - open_clip raises many kinds; one line out
            first_line = " ".join(str(error).split())  # one line, never cut
            raise ComponentError(
                f"open_clip model {model!r} (pretrained={pretrained!r}) could not be loaded: "
                f"{type(error).__name__}: {first_line}. Check the name with "
                "open_clip.list_pretrained(), or pass a local checkpoint file / local-dir:PATH"
            ) from error
        clip.eval().requires_grad_(False)
        if precision != "fp32":
            clip = clip.to(_DTYPES[precision])
        self.clip = clip
        self._preprocess = preprocess
        self.tokenizer = tokenizer
        self.dim = int(self.encode_images(torch.zeros(1, 3, *self._image_size())).shape[-1])
        self.fingerprint = self._fingerprint(source)

    def _image_size(self) -> tuple[int, int]:
        size = getattr(self.clip.visual, "image_size", 224)
        return (size, size) if isinstance(size, int) else tuple(size)

    def _fingerprint(self, source: str) -> str:
        """Hash of architecture, weights identity and preprocessing (keys the feature cache)."""
        weights = self.pretrained or ""
        if self.random_init:
            weights = f"random-init:seed={self.seed}"
        elif source.startswith("local-dir:"):
            folder = Path(source[len("local-dir:"):])
            weights = ",".join(file_digest(p) for p in sorted(folder.glob("*.safetensors")))
        elif self.pretrained and Path(self.pretrained).is_file():
            weights = file_digest(Path(self.pretrained))
        parts = {
            "model": self.model_name if not source.startswith("local-dir:") else "local",
            "weights": weights,
            "preprocess": repr(self._preprocess),
            "precision": self.precision,
        }
        digest = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:12]
        name = self.model_name.split("/")[-1].replace(":", "-")
        return f"{name}-{digest}"

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        return self._preprocess(image)  # (3, H, W)

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        pixels = pixels.to(self.device, _DTYPES[self.precision])  # (B, 3, H, W)
        return self.clip.encode_image(pixels).float()  # (B, D)

    @torch.no_grad()
    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        tokens = self.tokenizer(list(texts)).to(self.device)  # (B, context)
        return self.clip.encode_text(tokens).float()  # (B, D)

    @property
    def logit_scale(self) -> float:
        return float(self.clip.logit_scale.exp())
