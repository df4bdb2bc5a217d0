"""Offline face detection for datasets that ship no box: dlib's HOG, then OpenCV's Haar cascade.

Both come with the ``faces`` extra. Detection runs on a copy scaled to at most
``DETECT_MAX_SIDE`` pixels, since HOG cost grows with area and faces here are large.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np
from PIL import Image

DETECT_MAX_SIDE = 640
Box = tuple[float, float, float, float]


@lru_cache(maxsize=1)
def _dlib_detector():
    try:
        import dlib
    except ImportError:
        return None
    return dlib.get_frontal_face_detector()


@lru_cache(maxsize=1)
def _haar_detector():
    try:
        import cv2
    except ImportError:
        return None
    cascade = cv2.CascadeClassifier(cv2.data.haarcascades + "haarcascade_frontalface_default.xml")
    return None if cascade.empty() else cascade


def available_detectors() -> list[str]:
    return [name for name, get in (("dlib", _dlib_detector), ("haar", _haar_detector)) if get()]


def _dlib(grey: np.ndarray) -> Box | None:
    detector = _dlib_detector()
    if detector is None:
        return None
    upsample = 1 if max(grey.shape) < 160 else 0  # HOG finds faces >= 80 px; tiny images need it
    rects, scores, _ = detector.run(grey, upsample, 0.0)
    if not rects:
        return None
    best = rects[int(np.argmax(scores))]
    return float(best.left()), float(best.top()), float(best.right()), float(best.bottom())


def _haar(grey: np.ndarray) -> Box | None:
    cascade = _haar_detector()
    if cascade is None:
        return None
    min_side = max(24, min(grey.shape) // 8)
    faces = cascade.detectMultiScale(grey, scaleFactor=1.1, minNeighbors=5, minSize=(min_side, min_side))
    if len(faces) == 0:
        return None
    x, y, w, h = max(faces, key=lambda f: f[2] * f[3])
    return float(x), float(y), float(x + w), float(y + h)


def detect_face(image: Image.Image) -> tuple[Box, str] | None:
    """Largest/most confident face in an RGB image as (box, detector name), or None."""
    scale = min(1.0, DETECT_MAX_SIDE / max(image.size))
    small = image if scale == 1.0 else image.resize(
        (max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.BILINEAR)
    grey = np.asarray(small.convert("L"))
    for name, find in (("dlib", _dlib), ("haar", _haar)):
        box = find(grey)
        if box is not None:
            return tuple(v / scale for v in box), name
    return None
