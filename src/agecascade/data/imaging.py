"""Decode any image a dataset throws at us into 8-bit RGB, or say precisely why not.

Real face datasets contain greyscale scans, CMYK JPEGs, PNGs with alpha, 16-bit PNGs,
rotated phone photos, truncated downloads, empty files and the odd text file. Each either
decodes to an upright RGB image or raises ``BadImage`` with a reason the drop report counts.

``upright_rgb`` is the one pixel conversion of the project: ``prepare`` (and so ``evaluate``,
which reads prepare's crops) and the serving model both use it, so a deployed model sees the
same pixels it was trained on.
"""
from __future__ import annotations

import io
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

DEFAULT_MAX_PIXELS = 89_478_485  # Pillow's own default bomb threshold (~ 0.25 GiB of RGBA)
EXIF_ORIENTATION = 0x0112
FORMATS_BY_SUFFIX = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".bmp": "BMP",
                     ".tif": "TIFF", ".tiff": "TIFF", ".webp": "WEBP", ".gif": "GIF"}
BACKGROUND = (128, 128, 128)  # neutral grey behind transparent pixels


class BadImage(Exception):
    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


@dataclass
class Decoded:
    image: Image.Image            # RGB, EXIF orientation applied
    orientation: int              # the EXIF orientation that was applied (1 = none)
    raw_size: tuple[int, int]     # (width, height) as stored, before orientation
    notes: list[tuple[str, str]] = field(default_factory=list)  # (warning reason, detail)


def _looks_like_text(data: bytes) -> bool:
    head = data[:512]
    return all(b in b"\t\n\r\f" or 32 <= b < 127 or b >= 128 for b in head) and b"\0" not in head


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB from any Pillow mode: scale 16-bit, composite alpha on grey, convert the rest."""
    if image.mode.startswith("I;16") or image.mode in ("I", "F"):
        values = np.asarray(image, dtype=np.float64)
        if image.mode.startswith("I;16") or values.max(initial=0) > 255:
            values = values / 257.0  # 0..65535 -> 0..255
        elif image.mode == "F" and values.max(initial=0) <= 1.0:
            values = values * 255.0
        grey = np.clip(np.rint(values), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info
    if has_alpha:
        rgba = image.convert("RGBA")
        backdrop = Image.new("RGBA", rgba.size, BACKGROUND + (255,))
        return Image.alpha_composite(backdrop, rgba).convert("RGB")
    return image.convert("RGB")


def exif_orientation(image: Image.Image) -> int:
    """The EXIF orientation (1..8) a viewer would apply; 1 where absent or invalid."""
    try:
        value = int(image.getexif().get(EXIF_ORIENTATION, 1) or 1)
    except (TypeError, ValueError):  # a malformed tag: viewers show such photos as stored
        return 1
    return value if 1 <= value <= 8 else 1


def upright_rgb(image: Image.Image) -> Image.Image:
    """Any opened Pillow image -> upright 8-bit RGB: EXIF rotation applied, then ``to_rgb``."""
    upright = ImageOps.exif_transpose(image) if exif_orientation(image) != 1 else image
    return to_rgb(upright)


def decode(data: bytes, name: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> Decoded:
    """Bytes of one file -> upright RGB image. ``name`` is only used to check the extension."""
    if not data:
        raise BadImage("empty_file", "0 bytes")
    Image.MAX_IMAGE_PIXELS = max_pixels
    notes: list[tuple[str, str]] = []
    try:
        with warnings.catch_warnings():
            # Pillow only warns between max_pixels and 2x max_pixels; we refuse both.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            size = image.size
            if size[0] * size[1] > max_pixels:
                raise Image.DecompressionBombError(f"{size[0]}x{size[1]} pixels")
            image.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise BadImage("decompression_bomb", f"{err} (limit {max_pixels} pixels)") from None
    except UnidentifiedImageError:
        reason = "not_an_image" if _looks_like_text(data) else "corrupt_image"
        raise BadImage(reason, "no image format recognised") from None
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        reason = "truncated_image" if "truncated" in str(err) else "corrupt_image"
        raise BadImage(reason, str(err)) from None

    expected = FORMATS_BY_SUFFIX.get(Path(name).suffix.lower())
    if expected and image.format and image.format != expected:
        notes.append(("extension_mismatch", f"{image.format} data in a {Path(name).suffix} file"))
    if image.mode.startswith("I;16") or image.mode in ("I", "F"):
        notes.append(("high_bit_depth", f"mode {image.mode} scaled to 8 bits"))
    try:
        orientation = exif_orientation(image)
        rgb = upright_rgb(image)
    except (OSError, ValueError, SyntaxError) as err:  # a damaged EXIF block or pixel mode
        raise BadImage("corrupt_image", str(err)) from None
    return Decoded(rgb, orientation, image.size, notes)


def orient_box(box: tuple[float, float, float, float], orientation: int,
               raw_size: tuple[int, int]) -> tuple[float, float, float, float]:
    """Map a box given in stored pixel order into the EXIF-upright image.

    Dataset boxes and landmarks are measured on the stored pixels (MATLAB and OpenCV ignore
    EXIF), while we crop the upright image, so the box must follow the same transpose.
    """
    w, h = raw_size
    x0, y0, x1, y1 = box

    def move(x: float, y: float) -> tuple[float, float]:
        return {
            1: (x, y), 2: (w - x, y), 3: (w - x, h - y), 4: (x, h - y),
            5: (y, x), 6: (h - y, x), 7: (h - y, w - x), 8: (y, w - x),
        }[orientation]

    (ax, ay), (bx, by) = move(x0, y0), move(x1, y1)
    return min(ax, bx), min(ay, by), max(ax, bx), max(ay, by)
