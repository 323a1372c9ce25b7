"""Image loading that survives real folders: EXIF orientation, every mode to RGB, bad files named."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from diffusion_captioner.images import BadImageError, load_rgb


def jpeg_bytes(image: Image.Image, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=95, **options)
    return buffer.getvalue()


def test_exif_orientation_is_applied(tmp_path):
    image = Image.new("RGB", (40, 20), (255, 255, 255))
    image.paste((255, 0, 0), (0, 0, 10, 20))  # red band on the left of the stored pixels
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    path = tmp_path / "rotated.jpg"
    path.write_bytes(jpeg_bytes(image, exif=exif.tobytes()))
    loaded = load_rgb(path)
    assert loaded.size == (20, 40)  # displayed upright: portrait
    top = np.asarray(loaded)[:5].reshape(-1, 3).mean(0)
    assert top[0] > 200 and top[1] < 80  # the left band is now at the top


@pytest.mark.parametrize("mode, color, expected", [
    ("L", 128, (128, 128, 128)),
    ("CMYK", (0, 255, 255, 0), (255, 0, 0)),
    ("RGBA", (0, 0, 255, 0), (255, 255, 255)),  # fully transparent -> white background
    ("RGBA", (0, 0, 255, 255), (0, 0, 255)),
    ("LA", (0, 0), (255, 255, 255)),
    ("I;16", 65535, (255, 255, 255)),
    ("1", 1, (255, 255, 255)),
])
def test_every_mode_becomes_rgb(tmp_path, mode, color, expected):
    path = tmp_path / ("x.tif" if mode in ("CMYK", "I;16") else "x.png")
    Image.new(mode, (6, 4), color).save(path)
    loaded = load_rgb(path)
    assert loaded.mode == "RGB" and loaded.size == (6, 4)
    assert np.abs(np.asarray(loaded, dtype=int)[0, 0] - expected).max() <= 2


def test_palette_with_transparency_composited_on_white(tmp_path):
    image = Image.new("P", (4, 4), 0)
    image.putpalette([0, 255, 0] * 256)
    image.info["transparency"] = 0
    path = tmp_path / "p.png"
    image.save(path, transparency=0)
    assert load_rgb(path).getpixel((0, 0)) == (255, 255, 255)


def test_truncated_corrupt_missing_and_directory_are_named(tmp_path):
    whole = jpeg_bytes(Image.effect_noise((64, 64), 60).convert("RGB"))
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(whole[: len(whole) // 2])
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n not a png at all")
    for path, reason in [(truncated, "cannot be read"), (corrupt, "cannot be read"),
                         (tmp_path / "missing.jpg", "file not found"), (tmp_path, "directory")]:
        with pytest.raises(BadImageError) as error:
            load_rgb(path)
        assert str(path) in str(error.value) and reason in str(error.value)
        assert "\n" not in str(error.value)


def test_real_photos_load(shared_dir):
    photos = sorted((shared_dir / "data" / "coco-sample").glob("*.jpg"))
    assert photos
    for path in photos:
        image = load_rgb(path)
        assert image.mode == "RGB" and min(image.size) > 100
