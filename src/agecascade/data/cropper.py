"""One file -> one face crop, choosing the box by preference: dataset box, detector, whole image.

Runs inside worker processes, so it takes and returns plain picklable values.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .crops import crop_face, whole_image_box
from .detect import available_detectors, detect_face
from .imaging import DEFAULT_MAX_PIXELS, BadImage, decode, orient_box

BOX_POLICIES = ("auto", "image")


@dataclass(frozen=True)
class CropSettings:
    size: int = 224
    margin: float = 0.4
    max_pixels: int = DEFAULT_MAX_PIXELS
    box_policy: str = "auto"  # auto: dataset box > detector > whole image; image: whole image


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


def _usable(box: tuple[float, float, float, float], width: int, height: int) -> bool:
    """A box with area that overlaps the image; anything else is a broken annotation."""
    x0, y0, x1, y1 = box
    return (all(map(math.isfinite, box)) and x1 > x0 and y1 > y0
            and x1 > 0 and y1 > 0 and x0 < width and y0 < height)


def crop_file(job: CropJob, settings: CropSettings) -> CropResult:
    try:
        data = Path(job.file).read_bytes()
    except OSError as err:
        return CropResult(reason="unreadable_file", detail=str(err))
    try:
        decoded = decode(data, job.file, settings.max_pixels)
    except BadImage as bad:
        return CropResult(reason=bad.reason, detail=bad.detail)
    image, notes = decoded.image, list(decoded.notes)

    box, source, margin = None, "", settings.margin
    if settings.box_policy == "auto" and job.box is not None:
        oriented = orient_box(job.box, decoded.orientation, decoded.raw_size)
        if _usable(oriented, image.width, image.height):
            box, source = oriented, job.box_source or "metadata"
        else:
            notes.append(("dataset_box_unusable", f"box {tuple(round(v, 1) for v in job.box)}"))
    if box is None and settings.box_policy == "auto":
        found = detect_face(image)
        if found is not None:
            box, source = found
        elif available_detectors():
            notes.append(("no_face_found", "whole image used"))
        else:
            notes.append(("no_detector", "install the 'faces' extra; whole image used"))
    if box is None:  # the whole picture is the crop: no margin beyond its edges
        box, source, margin = whole_image_box(image), "image", 0.0

    return CropResult(
        crop=crop_face(image, box, margin, settings.size), notes=notes,
        box=tuple(float(v) for v in box), box_source=source,
        width=image.width, height=image.height, sha1=hashlib.sha1(data).hexdigest(),
    )
