"""IMDB-WIKI: ``imdb.mat`` / ``wiki.mat`` metadata plus ``imdb_crop/NN/*.jpg``.

Cleaning follows the thesis (section 3): age in 0..100, face_score >= 1.0, no second face,
gender present. Each row is counted under the first rule it fails, in that order. A path that
would leave the dataset root is checked last, just before the file is looked for, so the
thesis's counts per rule stay comparable.
"""
from __future__ import annotations

import math
from datetime import date
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.io

from ..manifest import DatasetLayoutError, make_row, path_below_root, require_dir, to_frame
from ..report import DropReport

MIN_AGE, MAX_AGE, MIN_FACE_SCORE = 0, 100, 1.0


def _expected(name: str) -> str:
    return f"ROOT/{name}_crop/{name}.mat and ROOT/{name}_crop/NN/*.jpg (the official {name}_crop.tar)"


def birth_year_month(datenum: float) -> tuple[int, int] | None:
    """MATLAB datenum -> (year, month); None where the value is not a real date."""
    if not math.isfinite(datenum) or datenum < 367:
        return None
    try:
        born = date.fromordinal(int(datenum) - 366)
    except (ValueError, OverflowError):
        return None
    return born.year, born.month


def age_at_photo(datenum: float, photo_taken: float) -> float | None:
    """Age with the IMDB-WIKI convention: the photo is assumed taken in the middle of the year."""
    born = birth_year_month(datenum)
    if born is None or not math.isfinite(photo_taken):
        return None
    year, month = born
    return float(photo_taken - year - (0 if month < 7 else 1))


def _cell_str(cell: np.ndarray) -> str:
    return str(cell[0]) if cell.size else ""


def read_imdb_wiki(root: Path, name: str = "imdb") -> tuple[pd.DataFrame, DropReport]:
    root = require_dir(root, _expected(name))
    candidates = [root / f"{name}_crop" / f"{name}.mat", root / f"{name}.mat"]
    mat_path = next((p for p in candidates if p.is_file()), None)
    if mat_path is None:
        raise DatasetLayoutError(root, _expected(name) + f" — no {name}.mat found")
    image_dir = root / f"{name}_crop"
    try:
        meta = scipy.io.loadmat(mat_path)[name][0, 0]
    except (KeyError, ValueError, OSError, IndexError) as err:
        raise DatasetLayoutError(root, _expected(name) + f" — cannot read {mat_path.name}: {err}")

    def field(key: str) -> np.ndarray:
        return meta[key].reshape(-1)

    dob, taken, paths = field("dob"), field("photo_taken"), field("full_path")
    gender, face_loc = field("gender"), field("face_location")
    score, second = field("face_score"), field("second_face_score")
    names = field("name")
    celeb = field("celeb_id") if "celeb_id" in meta.dtype.names else None

    report = DropReport(name, str(root))
    rows = []
    for i in range(len(paths)):
        report.input_rows += 1
        given = _cell_str(paths[i])
        safe = path_below_root(image_dir.name, given)
        rel = safe or f"{image_dir.name}/{given}"  # the report names what the metadata said
        age = age_at_photo(float(dob[i]), float(taken[i]))
        if age is None:
            report.drop(rel, "dob_invalid", f"dob={dob[i]!r}")
        elif not MIN_AGE <= age <= MAX_AGE:
            report.drop(rel, "age_out_of_range", f"age={age:g}")
        elif not score[i] >= MIN_FACE_SCORE:
            report.drop(rel, "face_score_below_1", f"face_score={score[i]:g}")
        elif not np.isnan(second[i]):
            report.drop(rel, "second_face", f"second_face_score={second[i]:g}")
        elif np.isnan(gender[i]):
            report.drop(rel, "gender_missing")
        elif safe is None:
            report.drop(rel, "path_outside_root", f"full_path={given!r}")
        elif not (root / rel).is_file():
            report.drop(rel, "image_missing")
        else:
            x1, y1, x2, y2 = np.asarray(face_loc[i], dtype=float).reshape(-1)[:4] - 1.0  # 1-based
            subject = str(int(celeb[i])) if celeb is not None else _cell_str(names[i])
            rows.append(make_row(rel, name, age=age, subject=subject,
                                 gender="m" if gender[i] == 1 else "f",
                                 box=(x1, y1, x2, y2), box_source="metadata"))
    return to_frame(rows), report
