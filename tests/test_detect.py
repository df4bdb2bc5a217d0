"""Face detection for predict (detect_faces) and prepare (detect_face).

The synthetic checks replace a detector's model with a stub that answers in the working copy's
pixels, so they check the scaling and filtering around any model, installed or not; the real
photo checks run each installed detector on FG-NET photos beside ../shared.
"""
from __future__ import annotations

import functools
import importlib.util
import threading

import numpy as np
import pytest
from PIL import Image

from agecascade.data import detect
from agecascade.data.adapters.fgnet import read_pts
from agecascade.data.detect import (AUTO_ORDER, DETECTORS, Detection, detect_face, detect_faces,
                                    use_threads)
from agecascade.errors import UserError
from conftest import shared_dataset

PACKAGES = {"dlib": "dlib", "haar": "cv2", "mtcnn": "facenet_pytorch"}
PHOTOS = ("004A19.JPG", "013A00.JPG", "029A04.JPG")  # aged 19, 0 and 4
HOG_MISSES = ("023A03.JPG", "025A00.JPG")  # prepare falls back to Haar; to the whole image


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """As in predict's workers: on a busy machine, MTCNN on two torch threads is several times
    slower than on one (docs/detectors.md)."""
    import torch
    restore = [functools.partial(torch.set_num_threads, torch.get_num_threads())]
    if importlib.util.find_spec("cv2"):
        import cv2
        restore.append(functools.partial(cv2.setNumThreads, cv2.getNumThreads()))
    use_threads(1)
    yield
    for undo in restore:
        undo()


def test_use_threads_caps_torch_and_opencv():
    import torch
    assert torch.get_num_threads() == 1  # set by one_thread
    if importlib.util.find_spec("cv2"):
        import cv2
        assert cv2.getNumThreads() == 1


def installed(name: str):
    return pytest.param(name, marks=pytest.mark.skipif(
        importlib.util.find_spec(PACKAGES[name]) is None, reason=f"{PACKAGES[name]} not installed"))


INSTALLED = [installed(name) for name in AUTO_ORDER]


@pytest.fixture
def stub_dlib(monkeypatch):
    """"dlib" answers with fixed boxes, as fractions of whatever copy it is given."""
    calls = []

    def run(copy, min_side):
        calls.append((copy.size, min_side))
        w, h = copy.size
        return [((0.1 * w, 0.1 * h, 0.3 * w, 0.3 * h), 2.0, None),           # small face
                ((0.4 * w, 0.2 * h, 0.9 * w, 0.8 * h), 1.0, ((0.5 * w, 0.4 * h),))]  # large face
    monkeypatch.setitem(detect._LOADERS, "dlib", lambda: object())
    monkeypatch.setitem(detect._RUNNERS, "dlib", run)
    return calls


def photo(name: str) -> tuple[Image.Image, np.ndarray]:
    root = shared_dataset("fgnet-dev")
    image = Image.open(root / "images" / name).convert("RGB")
    return image, read_pts(root / "points" / f"{name.rsplit('.', 1)[0].lower()}.pts").mean(axis=0)


def contains(box, point) -> bool:
    return box[0] <= point[0] <= box[2] and box[1] <= point[1] <= box[3]


@pytest.mark.parametrize("size", [(3000, 2000), (90, 120)])
def test_boxes_and_landmarks_come_back_in_the_images_pixels(stub_dlib, size):
    """Phone photos are shrunk and tiny ones enlarged for HOG; the caller never sees the copy."""
    faces = detect_faces(Image.new("RGB", size), "dlib")
    (copy_size, _), = stub_dlib
    hog = detect._SPECS["dlib"]
    assert max(copy_size) == hog.native_min * hog.fraction  # faces of 1/8 of the long side: 80 px
    w, h = size
    assert faces[0].box == pytest.approx((0.4 * w, 0.2 * h, 0.9 * w, 0.8 * h), rel=0.01)
    assert faces[0].landmarks[0] == pytest.approx((0.5 * w, 0.4 * h), rel=0.01)
    assert faces[0].detector == "dlib" and faces[0].score == 1.0


def test_largest_face_comes_first_and_min_face_drops_smaller_ones(stub_dlib):
    image = Image.new("RGB", (1000, 1000))
    assert [f.score for f in detect_faces(image, "dlib")] == [1.0, 2.0]  # largest, not best scored
    assert [f.score for f in detect_faces(image, "dlib", min_face=201)] == [1.0]  # small: 200 px
    assert detect_faces(image, "dlib", min_face=501) == []  # large one is 500 x 600


def test_a_larger_min_face_searches_a_smaller_copy(stub_dlib):
    """What makes min_face worth passing: the detector's cost falls with the copy's area."""
    image = Image.new("RGB", (2000, 1500))
    detect_faces(image, "dlib")
    detect_faces(image, "dlib", min_face=500)
    (default_copy, _), (bigger_faces_copy, _) = stub_dlib
    assert bigger_faces_copy[0] < default_copy[0]


def test_unknown_detector_and_negative_min_face_are_user_errors():
    with pytest.raises(UserError, match="choose one of auto, "):
        detect_faces(Image.new("RGB", (64, 64)), "retinaface")
    with pytest.raises(UserError, match="min_face"):
        detect_faces(Image.new("RGB", (64, 64)), min_face=-1)


def test_a_missing_package_is_named(monkeypatch):
    monkeypatch.setitem(detect._LOADERS, "mtcnn", lambda: None)
    with pytest.raises(UserError, match="pip install --no-deps facenet-pytorch==2.6.0"):
        detect_faces(Image.new("RGB", (64, 64)), "mtcnn")
    for name in AUTO_ORDER:
        monkeypatch.setitem(detect._LOADERS, name, lambda: None)
    with pytest.raises(UserError, match=r"agecascade\[faces\]"):
        detect_faces(Image.new("RGB", (64, 64)))


def test_auto_takes_the_first_installed_of_the_measured_order(monkeypatch):
    assert DETECTORS == ("auto", *AUTO_ORDER)
    monkeypatch.setitem(detect._LOADERS, AUTO_ORDER[0], lambda: None)
    for name in AUTO_ORDER[1:]:
        monkeypatch.setitem(detect._LOADERS, name, lambda: object())
    assert detect.resolve_detector("auto") == AUTO_ORDER[1]


def test_each_thread_loads_its_own_detector():
    """dlib's and OpenCV's detector objects must not be shared by threads."""
    @detect.per_thread
    def load():
        return object()
    here = load()
    there = []
    worker = threading.Thread(target=lambda: there.append(load()))
    worker.start()
    worker.join()
    assert load() is here and there[0] is not here


@pytest.mark.parametrize("name", INSTALLED)
def test_a_blank_or_tiny_image_has_no_face(name):
    assert detect_faces(Image.new("RGB", (640, 480), (128, 128, 128)), name) == []
    assert detect_faces(Image.new("RGB", (8, 8)), name) == []


@pytest.mark.parametrize("name", INSTALLED)
@pytest.mark.parametrize("file", PHOTOS)
def test_finds_the_annotated_face_and_boxes_scale_with_the_image(name, file):
    image, centre = photo(file)
    faces = detect_faces(image, name)
    assert contains(faces[0].box, centre)
    assert all(isinstance(f, Detection) and f.detector == name for f in faces)
    double = detect_faces(image.resize((2 * image.width, 2 * image.height), Image.BICUBIC), name)
    side = faces[0].box[2] - faces[0].box[0]
    assert np.allclose(double[0].box, [2 * v for v in faces[0].box], atol=0.05 * 2 * side)


@pytest.mark.parametrize("name", INSTALLED)
def test_min_face_keeps_a_face_just_under_its_size_and_drops_it_just_over(name):
    image, _ = photo(PHOTOS[0])
    face = detect_faces(image, name)[0]
    side = min(face.box[2] - face.box[0], face.box[3] - face.box[1])
    assert detect_faces(image, name, min_face=int(side * 0.8))
    assert detect_faces(image, name, min_face=int(side * 1.3)) == []


def test_mtcnn_imports_and_finds_a_face_with_five_landmarks_inside_it():
    pytest.importorskip("facenet_pytorch")
    image, centre = photo(PHOTOS[1])
    faces = detect_faces(image, "mtcnn")
    assert contains(faces[0].box, centre) and 0.7 <= faces[0].score <= 1.0
    assert len(faces[0].landmarks) == 5 and all(contains(faces[0].box, p) for p in faces[0].landmarks)


def direct_old_detect_face(image: Image.Image):
    """prepare's detect_face as first written, calling dlib and OpenCV directly."""
    dlib, cv2 = pytest.importorskip("dlib"), pytest.importorskip("cv2")
    scale = min(1.0, 640 / max(image.size))
    small = image if scale == 1.0 else image.resize(
        (max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.BILINEAR)
    grey = np.asarray(small.convert("L"))
    rects, scores, _ = dlib.get_frontal_face_detector().run(grey, 1 if max(grey.shape) < 160 else 0, 0.0)
    if rects:
        best = rects[int(np.argmax(scores))]
        box = (best.left(), best.top(), best.right(), best.bottom())
        return tuple(float(v) / scale for v in box), "dlib"
    cascade = cv2.CascadeClassifier(cv2.data.haarcascades + "haarcascade_frontalface_default.xml")
    side = max(24, min(grey.shape) // 8)
    faces = cascade.detectMultiScale(grey, scaleFactor=1.1, minNeighbors=5, minSize=(side, side))
    if len(faces) == 0:
        return None
    x, y, w, h = max(faces, key=lambda f: f[2] * f[3])
    return tuple(float(v) / scale for v in (x, y, x + w, y + h)), "haar"


@pytest.mark.parametrize("file", PHOTOS + HOG_MISSES)
def test_detect_face_gives_prepares_boxes_unchanged(file):
    """prepare's crops (and so the DVC outputs) hang on these boxes: they must stay what direct
    calls of dlib and OpenCV on prepare's input give, on each of its three outcomes."""
    image, _ = photo(file)
    assert detect_face(image) == direct_old_detect_face(image)


def test_the_unchanged_check_covers_all_three_outcomes():
    outcomes = {None if found is None else found[1]
                for found in (direct_old_detect_face(photo(f)[0]) for f in PHOTOS + HOG_MISSES)}
    assert outcomes == {"dlib", "haar", None}


def test_a_box_is_framed_as_the_other_detector_frames_it():
    from agecascade.data.detect import BOX_MAPS, Detection, framed_as

    side, right, down = BOX_MAPS["mtcnn", "dlib"]
    face = Detection((100.0, 50.0, 200.0, 170.0), 0.99, "mtcnn")
    x0, y0, x1, y1 = framed_as(face, "dlib").box
    assert (x1 - x0, y1 - y0) == pytest.approx((100 * side, 100 * side))
    assert ((x0 + x1) / 2, (y0 + y1) / 2) == pytest.approx((150 + 100 * right, 110 + 100 * down))
    assert framed_as(face, "haar") == face  # no map measured: unchanged
