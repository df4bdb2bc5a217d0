"""Landmark alignment: the similarity fit, the warp that puts landmarks on the template, and
dlib's 5-point predictor on real faces."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from agecascade.data.landmarks import aligned_crop, five_points, realigned, similarity, zoomed

# UTKFace chips' template as `prepare --box image` measures it (crop sides)
TEMPLATE = np.array([[0.7675, 0.3025], [0.6125, 0.3125], [0.2175, 0.3025], [0.3725, 0.3125],
                     [0.4925, 0.5925]])


def _placed(scale: float, degrees: float, shift: tuple[float, float]) -> np.ndarray:
    theta = np.deg2rad(degrees)
    rotation = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    return TEMPLATE * scale @ rotation.T + shift


def test_similarity_recovers_rotation_scale_and_shift_exactly():
    source = _placed(300.0, 25.0, (40.0, 70.0))
    matrix = similarity(source, TEMPLATE)
    assert np.allclose(matrix[:, :2] @ source.T + matrix[:, 2:], TEMPLATE.T, atol=1e-12)
    assert np.hypot(*matrix[:, 0]) == pytest.approx(1 / 300.0)


def _dots(points: np.ndarray, size: tuple[int, int], radius: float) -> Image.Image:
    """Gaussian blobs centred exactly on ``points`` (continuous coordinates: pixel i's centre
    is at i + 0.5)."""
    ys, xs = np.mgrid[0:size[1], 0:size[0]] + 0.5
    blobs = sum(np.exp(-((xs - x) ** 2 + (ys - y) ** 2) / (2 * radius ** 2)) for x, y in points)
    return Image.fromarray(np.repeat((255 * blobs)[..., None], 3, axis=2).astype(np.uint8))


@pytest.mark.parametrize("scale, degrees", [(900.0, 20.0), (100.0, -15.0)],
                         ids=["big face: reduced first", "small face: enlarged"])
def test_the_warp_puts_each_landmark_on_the_template(scale, degrees):
    """Five bright dots drawn at a rotated, scaled template come out of ``aligned_crop`` where
    the template (at the training zoom) says, to a fraction of a pixel."""
    points = _placed(scale, degrees, (scale * 0.6, scale * 0.3))
    image = _dots(points, (int(scale * 2), int(scale * 1.6)), radius=scale / 40)
    crop = aligned_crop(image, points, TEMPLATE, 0.925, 128).mean(axis=2)
    labels, count = ndimage.label(crop > 40)
    found = np.array(ndimage.center_of_mass(crop, labels, range(1, count + 1)))[:, ::-1] + 0.5
    want = zoomed(TEMPLATE, 0.925) * 128
    assert count == 5
    nearest = np.linalg.norm(found[:, None] - want[None], axis=2).min(axis=0)
    assert nearest.max() < 0.2, nearest


def test_off_image_parts_are_black():
    points = _placed(100.0, 0.0, (-30.0, -10.0))   # the face hangs off the top-left corner
    image = Image.new("RGB", (200, 200), (200, 200, 200))
    crop = aligned_crop(image, points, TEMPLATE, 1.0, 64)
    assert (crop[:5, :5] == 0).all() and (crop[-5:, -5:] == 200).all()


def test_realigned_moves_a_chips_landmarks_onto_the_template_without_black_corners():
    """A chip whose face is 8 % larger and 4 px off centre (as UTKFace frames babies and old
    people differently) comes out with its landmarks on the template, and the widened view's
    corners are the chip's own mirrored background, not black."""
    size = 128
    points = (TEMPLATE - 0.5) * 1.08 + 0.5 + 4 / size        # crop sides
    chip = np.asarray(_dots(points * size, (size, size), radius=2.5)).copy()
    chip[..., 2] = np.maximum(chip[..., 2], 90)             # a blue background, no black
    out = realigned(chip, points, TEMPLATE)
    light = out.mean(axis=2) - out[..., 2] / 3
    labels, count = ndimage.label(light > 40)
    found = np.array(ndimage.center_of_mass(light, labels, range(1, count + 1)))[:, ::-1] + 0.5
    assert out.shape == chip.shape and count == 5
    nearest = np.linalg.norm(found[:, None] - TEMPLATE[None] * size, axis=2).min(axis=0)
    assert nearest.max() < 0.3, nearest
    assert (out[..., 2] >= 80).all()                          # no black fill anywhere


def test_dlib_finds_eyes_above_the_nose_inside_the_face_box():
    pytest.importorskip("face_recognition_models")
    from conftest import shared_dataset

    from agecascade.data.detect import detect_faces

    photo = sorted((shared_dataset("fgnet-dev") / "images").glob("*.JPG"))[0]
    image = Image.open(photo).convert("RGB")
    box = detect_faces(image, "dlib")[0].box
    points = five_points(image, box)
    x0, y0, x1, y1 = box
    assert points.shape == (5, 2)
    assert ((points[:, 0] > x0) & (points[:, 0] < x1) & (points[:, 1] > y0)
            & (points[:, 1] < y1)).all()
    assert points[:4, 1].max() < points[4, 1]   # four eye corners above the nose base
