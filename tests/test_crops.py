"""Crop geometry: the 40% margin, squaring, and black padding past the image edge."""
from __future__ import annotations

import numpy as np
from PIL import Image

from agecascade.data.crops import crop_face, margin_box


def test_margin_adds_forty_percent_of_the_side_on_each_side():
    assert margin_box((100, 100, 200, 200), 0.4) == (60, 60, 240, 240)


def test_non_square_box_is_squared_around_its_centre():
    x0, y0, x1, y1 = margin_box((0, 0, 50, 100), 0.0)
    assert (x1 - x0, y1 - y0) == (100, 100) and ((x0 + x1) / 2, (y0 + y1) / 2) == (25, 50)


def test_zero_margin_crop_is_exactly_the_box():
    pixels = np.zeros((100, 100, 3), np.uint8)
    pixels[20:60, 30:70] = 200
    crop = crop_face(Image.fromarray(pixels), (30, 20, 70, 60), 0.0, 40)
    assert crop.shape == (40, 40, 3) and (crop == 200).all()


def test_face_at_the_edge_is_padded_black_and_stays_centred():
    pixels = np.full((100, 100, 3), 255, np.uint8)
    box = (0, 0, 40, 40)  # face in the top-left corner
    crop = crop_face(Image.fromarray(pixels), box, 0.4, 72)  # window 72 px: 16 px off each edge
    assert crop.shape == (72, 72, 3)
    assert (crop[:16] == 0).all() and (crop[:, :16] == 0).all()   # outside the picture
    assert (crop[16:, 16:] == 255).all()                          # inside the picture


def test_box_fully_outside_gives_an_all_black_crop_not_an_error():
    crop = crop_face(Image.new("RGB", (50, 50), "white"), (200, 200, 240, 240), 0.4, 32)
    assert crop.shape == (32, 32, 3) and crop.max() == 0
