"""One file -> one face crop, choosing the box by preference: dataset box, detector, whole image.

Runs inside worker processes, so it takes and returns plain picklable values. It never raises:
whatever goes wrong with one file becomes that file's drop reason, so one bad file cannot stop
a run over half a million.
"""
from __future__ import annotations

import hashlib
import math
import stat
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .crops import crop_face, framed_box, margin_box, whole_image_box
from .detect import available_detectors, detect_face, detect_faces
from .imaging import BadImage, decode, orient_box
from .landmarks import aligned_crop, five_points, landmarks_available
from .recipe import CropRecipe

# A face box may stick out of a tight crop, but not by this much: beyond it the annotation is
# broken (a dataset box 1e5 px wide on a 100 px image), not a face.
MAX_BOX_TO_IMAGE = 2.0


@dataclass(frozen=True)
class Like:
    """A model to imitate (``prepare --like``): the detector that finds its faces, and the
    recipe that frames them (``frame_face``)."""
    detector: str
    recipe: CropRecipe


@dataclass(frozen=True, kw_only=True)
class CropSettings:
    """What a worker needs of ``PrepareConfig`` (agecascade.data.prepare), which holds the
    defaults: no defaults here, so none can drift from the command line's."""
    size: int
    margin: float
    max_pixels: int
    box_policy: str  # auto: dataset box > detector > whole image; image, aligned: whole image
    max_file_bytes: int
    like: Like | None  # frame each face as a model's training crops did (prepare --like)


@dataclass(frozen=True)
class CropJob:
    file: str                                       # absolute path
    box: tuple[float, float, float, float] | None   # dataset box in stored pixels, if any
    box_source: str | None


@dataclass
class CropResult:
    crop: np.ndarray | None = None                  # (size, size, 3) uint8
    reason: str = ""                                # drop reason; "" when kept
    detail: str = ""
    notes: list[tuple[str, str]] = field(default_factory=list)
    box: tuple[float, float, float, float] = (math.nan,) * 4
    box_source: str = ""
    width: int = 0
    height: int = 0
    sha1: str = ""
    # whole-image crops only: where the detector finds the face in the crop window (see
    # face_framing); None when it finds none
    framing: Framing | None = None


def _usable(box: tuple[float, float, float, float], width: int, height: int) -> bool:
    """A box with area that overlaps the image and is not absurdly larger than it; anything
    else is a broken annotation."""
    x0, y0, x1, y1 = box
    limit = MAX_BOX_TO_IMAGE * max(width, height)
    return (all(map(math.isfinite, box)) and x1 > x0 and y1 > y0
            and x1 > 0 and y1 > 0 and x0 < width and y0 < height
            and x1 - x0 <= limit and y1 - y0 <= limit)


def read_bytes(file: str, max_bytes: int) -> bytes:
    """The file's bytes; BadImage for what is not a regular file or is over the size cap.

    Checking the type first keeps a FIFO or a device named like an image from blocking the
    worker forever; reading at most one byte past the cap bounds memory if the file grows.
    """
    try:
        info = Path(file).stat()
        if not stat.S_ISREG(info.st_mode):
            raise BadImage("not_a_regular_file", stat.filemode(info.st_mode))
        if info.st_size > max_bytes:
            raise BadImage("file_too_large", f"{info.st_size} bytes (limit {max_bytes})")
        with open(file, "rb") as handle:
            data = handle.read(max_bytes + 1)
    except OSError as err:
        raise BadImage("unreadable_file", str(err)) from None
    if len(data) > max_bytes:
        raise BadImage("file_too_large", f"over {max_bytes} bytes while reading")
    return data


def crop_file(job: CropJob, settings: CropSettings) -> CropResult:
    """Crop one file, or give the reason it is dropped; never raises."""
    try:
        return _crop(job, settings)
    except BadImage as bad:
        return CropResult(reason=bad.reason, detail=bad.detail)
    except Exception as err:  # a bug or a library failure on one file must not stop the run
        where = traceback.extract_tb(err.__traceback__)[-1]
        return CropResult(reason="processing_error", detail=(
            f"{type(err).__name__}: {err} (in {Path(where.filename).name}:{where.lineno})"))


def _crop(job: CropJob, settings: CropSettings) -> CropResult:
    data = read_bytes(job.file, settings.max_file_bytes)
    decoded = decode(data, job.file, settings.max_pixels)
    image, notes = decoded.image, list(decoded.notes)
    meta = dict(width=image.width, height=image.height, sha1=hashlib.sha1(data).hexdigest())

    if settings.like is not None:
        faces = detect_faces(image, settings.like.detector)
        if faces:  # the largest face, framed as the model's training crops framed theirs
            return CropResult(crop=frame_face(image, faces[0].box, settings.like.recipe,
                                              settings.size), notes=notes,
                              box=tuple(float(v) for v in faces[0].box),
                              box_source=settings.like.detector, **meta)
        notes.append(("no_face_found", f"{settings.like.detector} found none: the dataset box "
                                       f"(else the whole image) with the margin used"))

    box, source, margin = None, "", settings.margin
    if settings.box_policy == "auto" and job.box is not None:
        oriented = orient_box(job.box, decoded.orientation, decoded.raw_size)
        if _usable(oriented, image.width, image.height):
            box, source = oriented, job.box_source or "metadata"
        else:
            notes.append(("dataset_box_unusable", f"box {tuple(round(v, 1) for v in job.box)}"))
    if box is None and settings.box_policy == "auto" and settings.like is None:
        found = detect_face(image)
        if found is not None:
            box, source = found
        elif available_detectors():
            notes.append(("no_face_found", "whole image used"))
        else:
            notes.append(("no_detector", "install the 'faces' extra; whole image used"))
    framing = None
    if box is None:  # the whole picture is the crop: no margin beyond its edges
        box, source, margin = whole_image_box(image), "image", 0.0
        if settings.box_policy in ("image", "aligned"):
            framing = face_framing(image)

    return CropResult(
        crop=crop_face(image, box, margin, settings.size), notes=notes,
        box=tuple(float(v) for v in box), box_source=source, framing=framing, **meta,
    )


def frame_face(image, box: tuple[float, float, float, float], recipe: CropRecipe,
               size: int) -> np.ndarray:
    """(size, size, 3) uint8: a detected face cut as ``recipe``'s training crops framed theirs:
    its landmarks warped onto the recipe's template when it has one, else the recipe's window
    around the box. ``predict`` and ``prepare --like`` both cut faces here."""
    if recipe.template:
        return aligned_crop(image, five_points(image, box), np.array(recipe.template),
                            recipe.zoom, size)
    window, offset_x, offset_y = recipe.framing()
    return crop_face(image, framed_box(box, window, (offset_x, offset_y)), 0.0, size)


@dataclass(frozen=True)
class Framing:
    """How a whole-image crop frames its face: the crop window's side over the detector box's
    side, the window centre's offset from the box centre in box sides, the detector, and the
    five landmarks in crop sides (None without the shape predictor)."""
    window: float
    offset: tuple[float, float]
    detector: str
    landmarks: tuple[tuple[float, float], ...] | None


def face_framing(image) -> Framing | None:
    """How a whole-image crop frames its face. ``predict`` frames a detected face the same way
    (by the landmarks where measured, else by the box), so a model trained on whole chips sees
    chip-like crops."""
    found = detect_face(image)
    if found is None:
        return None
    box, detector = found
    x0, y0, x1, y1 = box
    left, top, right, _ = margin_box(whole_image_box(image), 0.0)
    side, face = right - left, max(x1 - x0, y1 - y0)
    points = five_points(image, box) if landmarks_available() else None
    return Framing(side / face, ((left + side / 2 - (x0 + x1) / 2) / face,
                                 (top + side / 2 - (y0 + y1) / 2) / face), detector,
                   None if points is None else tuple((float(x - left) / side, float(y - top) / side)
                                                     for x, y in points))
