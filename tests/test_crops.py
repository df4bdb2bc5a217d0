"""Crop geometry: the 40% margin, squaring, and black padding past the image edge."""
from __future__ import annotations

import time

import numpy as np
import pytest
from PIL import Image

from agecascade.data.crops import REDUCING_GAP, _block_means, crop_face, margin_box


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


def padded_reference(image: Image.Image, box, margin: float, size: int) -> np.ndarray:
    """What crop_face promises: the zero-padded window, resized by Pillow. Builds the whole
    window, so only for small windows."""
    window = image.crop(margin_box(box, margin))
    return np.asarray(window.resize((size, size), Image.BILINEAR, reducing_gap=REDUCING_GAP))


def test_clipped_crop_equals_resizing_the_padded_window():
    """Over random boxes inside, across and off the image edge, with and without block
    reduction, the clipped crop matches the padded window up to Pillow's float round-off."""
    rng = np.random.default_rng(0)
    reduced, differing, total = 0, 0, 0
    for _ in range(300):
        w, h = rng.integers(5, 200, 2)
        image = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        bw, bh = rng.uniform(1, 2.5 * max(w, h), 2)
        x0, y0 = rng.uniform(-w, 1.5 * w), rng.uniform(-h, 1.5 * h)
        box, size, margin = (x0, y0, x0 + bw, y0 + bh), int(rng.integers(8, 80)), rng.uniform(0, 1)
        got, want = crop_face(image, box, margin, size), padded_reference(image, box, margin, size)
        assert got.shape == want.shape and np.abs(got.astype(int) - want).max() <= 2
        differing, total = differing + np.count_nonzero(got != want), total + got.size
        left, _, right, _ = margin_box(box, margin)
        reduced += (right - left) / size >= 2 * REDUCING_GAP
    assert reduced > 100 and differing / total < 0.005  # both paths ran; round-off stays rare


def test_absurd_box_is_cropped_without_building_its_window():
    """A 1e5 px box on a 100 px image: the padded window would be 1.8e5 px square (Pillow
    refuses it as a decompression bomb); the clipped crop only touches the image."""
    image = Image.new("RGB", (100, 100), "white")
    with pytest.raises(Image.DecompressionBombError):
        image.crop(margin_box((0, 0, 1e5, 1e5), 0.4))
    start = time.perf_counter()
    for box in [(0, 0, 1e5, 1e5), (-5e9, -5e9, 5e9, 5e9)]:
        crop = crop_face(image, box, 0.4, 224)
        assert crop.shape == (224, 224, 3) and crop.dtype == np.uint8
    assert time.perf_counter() - start < 1.0


def test_image_smaller_than_a_block_averages_like_pillows_reduce():
    """A 40 px image in a 2400 px window (blocks of 100 px) is summed per block instead of being
    padded to whole blocks; the block means must still be those of the padded window."""
    image = Image.fromarray(np.random.default_rng(1).integers(128, 256, (40, 40, 3), dtype=np.uint8))
    for left, top in [(-1180, -1180), (-1130, -1190), (-40, -30), (-2380, -2370)]:
        got = _block_means(image, left, top, 2400, 100, (0, 24), (0, 24))
        want = np.asarray(image.crop((left, top, left + 2400, top + 2400)).reduce(100))
        assert np.abs(got.astype(int) - want).max() <= 1 and want.max() > 4


def test_image_lands_where_the_window_puts_it():
    """A white 100 px image in a 1000 px window (block-reduced by 3) fills the middle tenth."""
    image = Image.new("RGB", (100, 100), "white")
    crop = crop_face(image, (-450, -450, 550, 550), 0.0, 100)
    assert (crop[46:54, 46:54] == 255).all()
    assert crop[:44].max() == 0 and crop[56:].max() == 0 and crop[:, :44].max() == 0
