"""Image loading that survives real folders: EXIF orientation, any mode converted to RGB."""

from __future__ import annotations

import logging
from pathlib import Path

from PIL import Image, ImageOps

logger = logging.getLogger(__name__)


class BadImageError(ValueError):
    """An image that cannot be read; the message names the file and the reason in one line."""


def load_rgb(path: str | Path) -> Image.Image:
    """Open ``path`` fully (so truncation is caught here), apply EXIF orientation, return RGB.

    Grayscale, CMYK, palette and RGBA (composited on white) all come back as RGB. Raises
    :class:`BadImageError` for a missing, truncated or corrupt file.
    """
    path = Path(path)
    try:
        with Image.open(path) as image:
            image.load()
            try:
                image = ImageOps.exif_transpose(image)
            except Exception as error:  # noqa: BLE001 - a broken EXIF block must not lose the pixels
                logger.warning("image %s: EXIF orientation ignored (%s: %s)", path,
                               type(error).__name__, error)
            return to_rgb(image)
    except FileNotFoundError as error:
        raise BadImageError(f"image {path}: file not found") from error
    except IsADirectoryError as error:
        raise BadImageError(f"image {path}: is a directory") from error
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        message = " ".join(str(error).split()) or type(error).__name__
        raise BadImageError(f"image {path}: cannot be read ({message})") from error


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB; transparency is composited on a white background."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):  # 16/32-bit grey: rescale to 8 bits
        import numpy as np

        values = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or values.max(initial=0) > 255 else 255.0
        grey = np.clip(values * (255.0 / top), 0, 255).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")  # (H, W) uint8 -> "L"
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")
