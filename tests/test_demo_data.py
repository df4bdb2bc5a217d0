"""The synthetic demo datasets: reproducible, in the native layouts, and learnable.

Generation takes ~15 s, so it runs once per module; the determinism check writes the
second copy in a subprocess (in parallel, with a different PYTHONHASHSEED) so that any
dependence on set/dict hash order or on process state shows up as differing bytes.
"""
from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
from datetime import date
from pathlib import Path

import numpy as np
import pytest
import scipy.io
from PIL import Image
from sklearn.linear_model import Ridge

from agecascade.demo import write_demo_datasets
from agecascade.demo.faces import Identity, render_face

DATASETS = ("imdb", "agedb", "fgnet", "adience", "utkface")
IMDB_FIELDS = ("dob", "photo_taken", "full_path", "gender", "name", "face_location",
               "face_score", "second_face_score", "celeb_names", "celeb_id")
ADIENCE_HEADER = ("user_id\toriginal_image\tface_id\tage\tgender\tx\ty\tdx\tdy\ttilt_ang\t"
                  "fiducial_yaw_angle\tfiducial_score")
CANONICAL = {"(0, 2)", "(4, 6)", "(8, 12)", "(15, 20)", "(25, 32)", "(38, 43)", "(48, 53)", "(60, 100)"}


def _digests(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def twin_runs(tmp_path_factory) -> tuple[Path, dict[str, int], Path]:
    """Two generations with seed 0: one here, one in a subprocess running concurrently."""
    first, second = tmp_path_factory.mktemp("first"), tmp_path_factory.mktemp("second")
    code = ("import sys; from pathlib import Path; from agecascade.demo import write_demo_datasets; "
            "write_demo_datasets(Path(sys.argv[1]), seed=0)")
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    child = subprocess.Popen([sys.executable, "-c", code, str(second)], env=env)
    counts = write_demo_datasets(first, seed=0)
    assert child.wait(timeout=300) == 0, "second generation failed"
    return first, counts, second


@pytest.fixture(scope="module")
def out(twin_runs) -> Path:
    return twin_runs[0]


def test_same_seed_gives_identical_bytes(twin_runs):
    first, _, second = twin_runs
    a, b = _digests(first), _digests(second)
    assert sorted(a) == sorted(b), "file lists differ between two runs with the same seed"
    changed = [name for name in a if a[name] != b[name]]
    assert not changed, f"{len(changed)} files differ between runs, e.g. {changed[:3]}"


def test_counts_match_files_on_disk(twin_runs):
    first, counts, _ = twin_runs
    assert set(counts) == set(DATASETS)
    for name in DATASETS:
        assert counts[name] == sum(1 for p in (first / name).rglob("*") if p.is_file()), name


def test_refuses_to_overwrite(out):
    with pytest.raises(FileExistsError, match="not empty"):
        write_demo_datasets(out, seed=1)


def test_imdb_mat_has_real_fields_and_planted_noise(out):
    crop = out / "imdb" / "imdb_crop"
    meta = scipy.io.loadmat(crop / "imdb.mat")["imdb"]
    assert meta.shape == (1, 1) and meta.dtype.names == IMDB_FIELDS
    meta = meta[0, 0]
    n = meta["dob"].shape[1]
    for field in IMDB_FIELDS:
        assert meta[field].shape[0] == 1, f"{field} is not a row vector"
        assert field == "celeb_names" or meta[field].shape == (1, n), f"{field} is not 1xN"
    boxes = np.stack([np.asarray(c, dtype=float).reshape(-1) for c in meta["face_location"][0]])
    assert boxes.shape == (n, 4) and (boxes >= 1).all(), "face_location must be 1-based 1x4"

    born = [_date(d) for d in meta["dob"][0]]
    taken = meta["photo_taken"][0]
    age = np.array([t - b.year - (b.month >= 7) for b, t in zip(born, taken)])
    score, second, gender = meta["face_score"][0], meta["second_face_score"][0], meta["gender"][0]
    planted = {"no face": np.isneginf(score), "low score": (score >= 0) & (score < 1),
               "second face": ~np.isnan(second), "no gender": np.isnan(gender),
               "age out of range": (age < 0) | (age > 100)}
    for rule, mask in planted.items():
        assert 0.03 <= mask.mean() <= 0.06, f"{rule}: {mask.mean():.1%} of rows"

    paths = [str(c[0]) for c in meta["full_path"][0]]
    assert all(re.fullmatch(r"\d\d/nm\d{7}_rm\d+_\d{4}-\d{1,2}-\d{1,2}_\d{4}\.jpg", p) for p in paths)
    missing = [p for p in paths if not (crop / p).is_file()]
    assert len(missing) == 2, f"expected 2 missing images, found {len(missing)}"
    truncated = [p for p in paths if p not in missing and not _decodes(crop / p)]
    assert len(truncated) == 1, f"expected 1 truncated JPEG, found {len(truncated)}"


def test_agedb_bad_files(out):
    root = out / "agedb"
    names = sorted(p.name for p in root.iterdir())
    valid = [n for n in names if re.fullmatch(r"\d+_[A-Za-z]+_\d{1,3}_[mf]\.jpg", n)]
    assert (root / "notes.txt").read_text().strip()
    assert [n for n in names if "_NoAgeGiven_" in n], "malformed name missing"
    empty = [n for n in valid if (root / n).stat().st_size == 0]
    assert len(empty) == 1
    bombs = []
    for name in valid:
        try:
            Image.open(root / name)
        except Image.DecompressionBombError:
            bombs.append(name)
        except OSError:
            pass  # the empty file
    assert len(bombs) == 1 and (root / bombs[0]).stat().st_size < 1000
    assert len(valid) >= 380 and len({n.split("_")[1] for n in valid}) >= 40


def test_fgnet_layout(out):
    images, points = out / "fgnet" / "images", out / "fgnet" / "points"
    names = sorted(p.name for p in images.iterdir())
    assert "Thumbs.db" in names
    faces = [n for n in names if n != "Thumbs.db"]
    assert all(re.fullmatch(r"\d{3}[Aa]\d{2}[ab]?\.(JPG|jpg)", n) for n in faces)
    assert sum(n.endswith("a.JPG") for n in faces) == 3 and sum(n.endswith("b.JPG") for n in faces) == 3
    assert sum(n.endswith(".jpg") for n in faces) == 2, "two lowercase names"
    assert len({n[:3] for n in faces}) == 12
    stems = {Path(n).stem.lower() for n in faces}
    pts = {p.stem for p in points.iterdir()}
    assert pts <= stems and len(stems - pts) == 1, "exactly one image without landmarks"
    text = sorted(points.iterdir())[0].read_text()
    assert text.startswith("version: 1\nn_points: 68\n{\n") and text.endswith("}\n")
    assert len(re.findall(r"^-?\d+\.\d{3} -?\d+\.\d{3}$", text, re.M)) == 68
    formats = [(im.format, im.mode) for im in (Image.open(images / n) for n in faces)]
    assert sum(f == "PNG" for f, _ in formats) == 1, "one PNG disguised as .JPG"
    grey = sum(mode == "L" for _, mode in formats) / len(faces)
    assert 0.08 <= grey <= 0.3, f"{grey:.0%} greyscale scans"


def test_adience_layout(out):
    root = out / "adience"
    users_in_fold: dict[str, set[int]] = {}
    labels, missing = [], []
    for fold in range(5):
        lines = (root / f"fold_{fold}_data.txt").read_text().splitlines()
        assert lines[0] == ADIENCE_HEADER
        for line in lines[1:]:
            user, original, face_id, age, gender, *rest = line.split("\t")
            assert len(rest) == 7 and gender in ("m", "f", "u")
            users_in_fold.setdefault(user, set()).add(fold)
            labels.append(age)
            image = root / "faces" / user / f"coarse_tilt_aligned_face.{face_id}.{original}"
            if age in CANONICAL and not image.is_file():
                missing.append(image)
    assert all(len(folds) == 1 for folds in users_in_fold.values()), "a user spans folds"
    assert len(missing) == 3, "three well-labelled rows without an image"
    for messy in ("None", "35", "13", "22", "(38, 42)", "(27, 32)", "(8, 23)", ""):
        assert messy in labels, f"messy label {messy!r} not planted"
    assert len(labels) == 5 * 4 * 10  # folds x users per fold x rows per user


def test_utkface_layout(out):
    root = out / "utkface"
    names = sorted(p.name for p in root.iterdir())
    for bad in ("61_1_20170109142408075.jpg.chip.jpg", "39_1_20170116174525125.jpg.chip.jpg", "README.txt"):
        assert bad in names
    valid = [n for n in names if re.fullmatch(r"\d{1,3}_[01]_[0-4]_\d{17}\.jpg\.chip\.jpg", n)]
    corrupt = [n for n in valid if not _decodes(root / n)]
    assert len(corrupt) == 1, "one file of random bytes with a valid name"
    assert Image.open(root / valid[0]).size == (200, 200)


def test_appearance_predicts_age():
    """A linear model on 32x32 grey pixels must beat the median by a wide margin.

    If this fails, the age cues (proportions, grey hair, wrinkles) have become too weak
    relative to the nuisance (background, pose, lighting), and the demo CNN will not learn.
    """
    rng = np.random.default_rng(0)
    ages = rng.uniform(0, 90, 400)
    pixels = np.stack([
        np.asarray(render_face(a, Identity.random(rng), rng, (128, 128)).image
                   .convert("L").resize((32, 32), Image.BILINEAR), dtype=np.float64).ravel() / 255
        for a in ages])
    model = Ridge(alpha=1.0).fit(pixels[:300], ages[:300])
    mae = np.abs(model.predict(pixels[300:]) - ages[300:]).mean()
    baseline = np.abs(np.median(ages[:300]) - ages[300:]).mean()
    assert mae < 0.6 * baseline, f"ridge MAE {mae:.1f} vs median baseline {baseline:.1f}"


def test_render_face_box_and_landmarks():
    rng = np.random.default_rng(1)
    face = render_face(40, Identity.random(rng), rng, (160, 140))
    assert face.image.size == (160, 140) and face.image.mode == "RGB"
    assert face.landmarks.shape == (68, 2)
    x0, y0, x1, y1 = face.box
    lo, hi = face.landmarks.min(axis=0), face.landmarks.max(axis=0)
    assert abs(x0 - lo[0]) <= 1 and abs(y0 - lo[1]) <= 1 and abs(x1 - hi[0]) <= 1 and abs(y1 - hi[1]) <= 1
    assert 0.35 <= (y1 - y0) / 140 <= 0.7, "face should fill the central part of the image"


def _date(datenum: float) -> date:
    return date.fromordinal(int(datenum) - 366)  # MATLAB datenum -> date


def _decodes(path: Path) -> bool:
    try:
        with Image.open(path) as image:
            image.load()
        return True
    except (OSError, SyntaxError, Image.DecompressionBombError):
        return False
