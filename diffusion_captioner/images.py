"""Image loading that survives real folders: EXIF orientation, any mode converted to RGB."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageOps


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
            image = ImageOps.exif_transpose(image)
            return to_rgb(image)
    except FileNotFoundError as error:
        raise BadImageError(f"image {path}: file not found") from error
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise BadImageError(f"image {path}: cannot be read ({error})") from error


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB; transparency is composited on a white background."""
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")
