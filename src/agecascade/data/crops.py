"""Crop geometry: a square around the face box, grown by the margin on every side.

The thesis crops "around a face location with a 40% margin": 40% of the box side is added
on the left, right, top and bottom. Making the box square first keeps faces undistorted when
the crop is resized to ``size x size``. Parts of the crop outside the image are black.
"""
from __future__ import annotations

import numpy as np
from PIL import Image

Box = tuple[float, float, float, float]


def margin_box(box: Box, margin: float) -> tuple[int, int, int, int]:
    """Square crop window (x0, y0, x1, y1) in pixels; may extend past the image edges."""
    x0, y0, x1, y1 = box
    side = max(x1 - x0, y1 - y0) * (1.0 + 2.0 * margin)
    cx, cy = (x0 + x1) / 2.0, (y0 + y1) / 2.0
    left, top = round(cx - side / 2.0), round(cy - side / 2.0)
    side = max(1, round(side))
    return left, top, left + side, top + side


def crop_face(image: Image.Image, box: Box, margin: float, size: int) -> np.ndarray:
    """RGB image + face box -> (size, size, 3) uint8 crop; off-image pixels are zero."""
    window = margin_box(box, margin)
    crop = image.crop(window)  # Pillow pads outside the image with zeros
    crop = crop.resize((size, size), Image.BILINEAR, reducing_gap=3.0)
    return np.asarray(crop, dtype=np.uint8)


def whole_image_box(image: Image.Image) -> Box:
    return 0.0, 0.0, float(image.width), float(image.height)
