"""A photo -> its faces -> their crops, with the decode, box and crop code of ``prepare``.

Every face is cut as the model's training crops were (its :class:`CropRecipe`): a square window
around the detector's box, grown by the recipe's margin, resized to the recipe's size; or, for a
model trained on aligned chips, the face warped so that its five landmarks sit where the chips
had theirs (``cutting`` falls back to the box window, with a warning, where dlib's shape predictor
is not installed). With the
detector ``none`` the whole image is the face, for users who bring their own crops. Nothing here
raises for a bad file: it becomes a named ``error``, so one file cannot stop a run.
"""
from __future__ import annotations

import traceback
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from PIL import Image

from agecascade.data.cropper import frame_face, read_bytes
from agecascade.data.crops import crop_face, whole_image_box
from agecascade.data.recipe import CropRecipe
from agecascade.data.detect import (AUTO_ORDER, Detection, detect_faces, framed_as,
                                   resolve_detector)
from agecascade.data.imaging import BadImage, decode
from agecascade.data.landmarks import landmarks_available
from agecascade.errors import UserError

NO_DETECTOR = "none"
FALLBACK = "mtcnn"  # what ``auto`` looks again with (fallback_for)


@dataclass(frozen=True)
class FaceSettings:
    """What a worker process needs to turn a file into crops (picklable)."""
    recipe: CropRecipe
    detector: str = "auto"
    min_face: int = 0
    max_pixels: int = 50_000_000
    max_file_bytes: int = 128 * 2**20
    fallback: str = ""                   # the detector for images where ``detector`` finds none


@dataclass
class ImageFaces:
    """One image's (or video frame's) faces and crops, before the model runs."""
    faces: list[Detection] = field(default_factory=list)
    crops: np.ndarray | None = None      # uint8 (F, size, size, 3), row f = faces[f]
    width: int = 0
    height: int = 0
    error: str = ""                      # a named reason; "" when the image was read
    detail: str = ""
    time: float | None = None            # seconds into a video; None for a photo


def detector_for(requested: str, recipe: CropRecipe) -> str:
    """``auto`` means the detector that framed the training crops when it is installed (its
    boxes frame faces as the training boxes did), else ``detect_faces``'s own choice."""
    if requested == "auto" and recipe.box_source in AUTO_ORDER:
        try:
            return resolve_detector(recipe.box_source)
        except UserError:
            return requested
    return requested


def fallback_for(name: str, detector: str) -> str:
    """The detector that looks again where ``detector`` (resolved) finds no face. ``auto``:
    MTCNN, when installed and ``detector`` is another one (it finds the turned, blurred and
    small faces dlib's HOG misses, docs/detectors.md); a named one must be installed
    (UserError); "" for ``none``, for whole-image crops, or when it is ``detector`` itself."""
    if name == NO_DETECTOR or detector == NO_DETECTOR:
        return ""
    if name == "auto":
        try:
            chosen = resolve_detector(FALLBACK)
        except UserError:
            return ""
    else:
        chosen = resolve_detector(name)
    return "" if chosen == resolve_detector(detector) else chosen


def cutting(recipe: CropRecipe, detector: str) -> tuple[CropRecipe, str]:
    """The recipe faces will be cut by, and how: "landmarks", "box" or "whole image". A model of
    aligned chips falls back to its box window, with a warning, where the shape predictor is
    not installed."""
    if detector == NO_DETECTOR:
        return recipe, "whole image"
    if not recipe.template:
        return recipe, "box"
    if landmarks_available():
        return recipe, "landmarks"
    warnings.warn("this model was trained on aligned chips, but dlib's 5-point shape predictor is "
                  "not installed (pip install 'agecascade[faces]'): faces are framed by their "
                  "box instead, which is less accurate (docs/zero-shot.md)", stacklevel=2)
    return replace(recipe, template=()), "box"


def find_faces(image: Image.Image, settings: FaceSettings) -> list[Detection]:
    if settings.detector == NO_DETECTOR:
        return [Detection(whole_image_box(image), 1.0, NO_DETECTOR)]
    detector = detector_for(settings.detector, settings.recipe)
    faces = detect_faces(image, detector, settings.min_face)
    if faces or not settings.fallback:
        return faces
    # boxes as the model's own detector frames faces: the crop is cut from them
    return [framed_as(face, detector) for face in
            detect_faces(image, settings.fallback, settings.min_face)]


def cut(image: Image.Image, faces: list[Detection], recipe: CropRecipe) -> np.ndarray:
    """uint8 (F, size, size, 3): each face framed as the training crops were. A whole-image
    "face" (detector none) is the crop itself, as ``prepare`` crops an image without a box."""
    crops = np.zeros((len(faces), recipe.size, recipe.size, 3), np.uint8)
    for i, face in enumerate(faces):
        crops[i] = (crop_face(image, face.box, 0.0, recipe.size) if face.detector == NO_DETECTOR
                    else frame_face(image, face.box, recipe, recipe.size))
    return crops


def analyse_image(image: Image.Image, settings: FaceSettings) -> ImageFaces:
    """An upright RGB image -> its faces and crops."""
    faces = find_faces(image, settings)
    return ImageFaces(faces, cut(image, faces, settings.recipe), image.width, image.height)


def analyse_bytes(data: bytes, name: str, settings: FaceSettings) -> ImageFaces:
    """Encoded image bytes -> faces and crops, or a named error; never raises."""
    try:
        decoded = decode(data, name, settings.max_pixels)
        return analyse_image(decoded.image, settings)
    except BadImage as bad:
        return ImageFaces(error=bad.reason, detail=bad.detail)
    except Exception as err:  # a library failure on one image must not stop the others
        return ImageFaces(error="processing_error", detail=_where(err))


def analyse_file(path: str, settings: FaceSettings) -> ImageFaces:
    try:
        data = read_bytes(path, settings.max_file_bytes)
    except BadImage as bad:
        return ImageFaces(error=bad.reason, detail=bad.detail)
    return analyse_bytes(data, path, settings)


def _where(err: Exception) -> str:
    where = traceback.extract_tb(err.__traceback__)[-1]
    return f"{type(err).__name__}: {err} (in {Path(where.filename).name}:{where.lineno})"


def rows(found: ImageFaces, estimates: dict[str, np.ndarray] | None, probs: np.ndarray | None,
         **fields: object) -> list[dict]:
    """Output rows of one image: one per face, or one with ``face: null`` and the error (or
    ``no_face_found``); ``estimates`` / ``probs`` hold this image's faces in order. ``fields``
    (file, time, index, ...) lead every row."""
    if found.error or not found.faces:
        return [{**fields, "face": None, "box": None, "detector": None, "score": None,
                 "error": found.error or "no_face_found", "detail": found.detail or None}]
    out = []
    for f, face in enumerate(found.faces):
        row = {**fields, "face": f, "box": [round(v, 1) for v in face.box],
               "detector": face.detector, "score": round(float(face.score), 4)}
        row |= {k: round(float(v[f]), 3) for k, v in (estimates or {}).items()}
        if probs is not None:
            row["probs"] = [round(float(p), 5) for p in probs[f]]
        out.append(row | {"error": None, "detail": None})
    return out
