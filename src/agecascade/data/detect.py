"""Offline face detection: one face per dataset image for ``prepare``, every face of a user's photo
for ``predict``.

``detect_face`` (prepare) tries dlib's HOG, then OpenCV's Haar cascade, on a copy scaled to at
most ``DETECT_MAX_SIDE`` pixels; its boxes decide the prepared crops, so it stays as it is.

``detect_faces`` (predict) runs one named detector and returns all faces. Each detector works on
a copy scaled so that the smallest face it looks for, ``max(min_face, long side / fraction)``,
is the smallest its model sees (``_Spec``): big photos cost no more than small ones, and small
photos are not searched below what the model can find. docs/detectors.md has the measurements
behind the fractions and behind the order "auto" prefers.

dlib and OpenCV come with the ``faces`` extra; MTCNN with facenet-pytorch, whose weights ship in
its wheel. Nothing is downloaded at run time. The detector objects of dlib and OpenCV must not be
used by two threads at once, so every thread (and so every worker process) loads its own.
"""
from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TypeVar

import numpy as np
from PIL import Image

from ..errors import UserError

DETECT_MAX_SIDE = 640
Box = tuple[float, float, float, float]
T = TypeVar("T")


@dataclass(frozen=True)
class Detection:
    box: Box                       # x0, y0, x1, y1 in the given image's pixels; not clipped to it
    score: float                   # the detector's own confidence, see SCORES
    detector: str                  # "dlib", "haar" or "mtcnn"
    landmarks: tuple[tuple[float, float], ...] | None = None  # (x, y) in the image's pixels


@dataclass(frozen=True)
class _Spec:
    package: str      # what to install when the detector's import fails
    native_min: int   # smallest face side, in working pixels, the detector finds
    fraction: int     # with min_face 0, faces down to long side / fraction are looked for
    upscale: bool     # whether small photos are enlarged to reach native_min


# dlib's HOG window is 80 px and its cost grows with the copy's area, so it stops at 1/8 of the
# long side (a 640 px copy); MTCNN and Haar afford 1/12, which keeps children beside adults in a
# group photo. 20 px is facenet-pytorch's own default smallest face.
_SPECS = {
    "mtcnn": _Spec("facenet-pytorch (pip install --no-deps facenet-pytorch==2.6.0)", 20, 12, False),
    "dlib": _Spec("dlib (pip install 'agecascade[faces]')", 80, 8, True),
    "haar": _Spec("opencv-python-headless (pip install 'agecascade[faces]')", 24, 12, False),
}
# One detector's box of a face as another frames it: (side over the first box's width, centre
# shift right and down in that width); medians over 398 padded UTKFace chips where both found
# the face (benchmarks/box_mapping.py). dlib's shape predictor places its landmarks relative
# to the box, so a face MTCNN finds for a dlib-framed model is given dlib's framing.
BOX_MAPS = {("mtcnn", "dlib"): (1.0717, 0.0109, 0.1075)}
AUTO_ORDER = ("mtcnn", "dlib", "haar")  # first installed wins; docs/detectors.md says why
DETECTORS: tuple[str, ...] = ("auto", *AUTO_ORDER)
SCORES = {
    "dlib": "HOG SVM margin: faces are kept from 0 up, higher is surer, no upper bound",
    "haar": "number of overlapping cascade windows merged into the box, 5 or more",
    "mtcnn": "O-Net face probability, 0.7 to 1",
}


def per_thread(load: Callable[[], T]) -> Callable[[], T]:
    """``load()`` once per thread, and so once per worker process: dlib's and OpenCV's detector
    objects are not thread-safe."""
    local = threading.local()

    @functools.wraps(load)
    def get() -> T:
        if not hasattr(local, "value"):
            local.value = load()
        return local.value
    return get


@per_thread
def _dlib_detector():
    try:
        import dlib
    except ImportError:
        return None
    return dlib.get_frontal_face_detector()


@per_thread
def _haar_detector():
    try:
        import cv2
    except ImportError:
        return None
    cascade = cv2.CascadeClassifier(cv2.data.haarcascades + "haarcascade_frontalface_default.xml")
    return None if cascade.empty() else cascade


@per_thread
def _mtcnn_detector():
    try:
        from facenet_pytorch import MTCNN
    except ImportError:
        return None
    return MTCNN(keep_all=True, device="cpu")


_LOADERS = {"dlib": _dlib_detector, "haar": _haar_detector, "mtcnn": _mtcnn_detector}


def use_threads(count: int) -> None:
    """Cap the threads detection uses in this process (torch runs MTCNN, OpenCV runs Haar).

    Call it with 1 in each worker process's initializer when several workers share the cores;
    it changes process-wide settings, which is why ``detect_faces`` never calls it itself.
    """
    import torch
    torch.set_num_threads(count)
    try:
        import cv2
    except ImportError:
        return
    cv2.setNumThreads(count)


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


def resolve_detector(name: str) -> str:
    """The installed detector ``name`` stands for ("auto": the first of AUTO_ORDER); UserError
    for an unknown name or a missing package. Call it before starting workers to fail early."""
    if name not in DETECTORS:
        raise UserError(f"unknown face detector {name!r}: choose one of {', '.join(DETECTORS)}")
    if name == "auto":
        for candidate in AUTO_ORDER:
            if _LOADERS[candidate]() is not None:
                return candidate
        raise UserError("no face detector is installed: pip install 'agecascade[faces]'")
    if _LOADERS[name]() is None:
        raise UserError(f"face detector {name!r} needs {_SPECS[name].package}")
    return name


def _working_copy(image: Image.Image, spec: _Spec,
                  min_face: int) -> tuple[Image.Image, float, float, int]:
    """The copy a detector runs on, its x and y scale from the image, and the smallest face
    side to look for in the copy's pixels."""
    smallest = max(float(min_face), max(image.size) / spec.fraction)
    scale = spec.native_min / smallest
    if not spec.upscale:
        scale = min(1.0, scale)
    if scale == 1.0:
        copy = image
    else:
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        # reducing_gap: an integer box-filter pass first, which makes shrinking big photos cheap
        copy = image.resize(size, Image.BILINEAR, reducing_gap=2.0)
    min_side = max(spec.native_min, round(smallest * scale))
    return copy, copy.width / image.width, copy.height / image.height, min_side


def _run_dlib(copy: Image.Image, min_side: int) -> list[tuple[Box, float, tuple | None]]:
    rects, scores, _ = _dlib_detector().run(np.asarray(copy.convert("L")), 0, 0.0)
    return [((r.left(), r.top(), r.right(), r.bottom()), score, None) for r, score in zip(rects, scores)]


def _run_haar(copy: Image.Image, min_side: int) -> list[tuple[Box, float, tuple | None]]:
    faces, neighbours = _haar_detector().detectMultiScale2(
        np.asarray(copy.convert("L")), scaleFactor=1.1, minNeighbors=5, minSize=(min_side, min_side))
    return [((x, y, x + w, y + h), n, None) for (x, y, w, h), n in zip(faces, neighbours)]


def _run_mtcnn(copy: Image.Image, min_side: int) -> list[tuple[Box, float, tuple | None]]:
    mtcnn = _mtcnn_detector()
    mtcnn.min_face_size = min_side  # this thread's own instance (per_thread)
    boxes, probs, points = mtcnn.detect(copy.convert("RGB"), landmarks=True)
    if boxes is None:
        return []
    return [(tuple(box), prob, tuple(map(tuple, marks)))
            for box, prob, marks in zip(boxes, probs, points)]


_RUNNERS = {"dlib": _run_dlib, "haar": _run_haar, "mtcnn": _run_mtcnn}


def framed_as(face: Detection, detector: str) -> Detection:
    """``face`` with the square box ``detector`` would give it (BOX_MAPS); unchanged when no
    map is measured between the two."""
    if (face.detector, detector) not in BOX_MAPS:
        return face
    side_ratio, shift_x, shift_y = BOX_MAPS[face.detector, detector]
    x0, y0, x1, y1 = face.box
    width = x1 - x0
    cx, cy = (x0 + x1) / 2 + shift_x * width, (y0 + y1) / 2 + shift_y * width
    half = side_ratio * width / 2
    return replace(face, box=(cx - half, cy - half, cx + half, cy + half))


def detect_faces(image: Image.Image, detector: str = "auto", min_face: int = 0) -> list[Detection]:
    """All faces in an RGB image, largest box first (ties: higher score first), boxes and landmarks
    in the image's own pixels; faces whose shorter box side is under min_face pixels are dropped.

    "auto" is the first installed of AUTO_ORDER (MTCNN finds the most children's faces at a usable
    speed, docs/detectors.md). An unknown name, or a detector whose package is not installed,
    raises UserError naming the package.
    """
    if min_face < 0:
        raise UserError(f"min_face must be 0 or more pixels, got {min_face}")
    name = resolve_detector(detector)
    copy, sx, sy, min_side = _working_copy(image, _SPECS[name], min_face)
    if min(copy.size) < min_side:  # no face the detector can find fits in the copy
        return []
    found = []
    for (x0, y0, x1, y1), score, marks in _RUNNERS[name](copy, min_side):
        box = (float(x0) / sx, float(y0) / sy, float(x1) / sx, float(y1) / sy)
        if min(box[2] - box[0], box[3] - box[1]) < min_face:
            continue
        landmarks = None if marks is None else tuple((float(x) / sx, float(y) / sy) for x, y in marks)
        found.append(Detection(box, float(score), name, landmarks))
    return sorted(found, key=lambda d: (-(d.box[2] - d.box[0]) * (d.box[3] - d.box[1]), -d.score))
