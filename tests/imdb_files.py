"""An ``imdb.mat`` plus images, laid out like the official ``imdb_crop.tar``, for adapter and
prepare tests."""
from __future__ import annotations

from datetime import date
from pathlib import Path

import numpy as np
import scipy.io

from conftest import write_image

BOX = (11.0, 21.0, 61.0, 71.0)  # MATLAB 1-based face_location of every row unless it says


def datenum(year: int, month: int, day: int) -> float:
    return float(date(year, month, day).toordinal() + 366)


def write_imdb(root: Path, rows: list[dict]) -> None:
    """imdb.mat the way the official file is laid out: one 1x1 struct of 1xN fields.

    A row's "path" is written as given into ``full_path``; the image is written below
    ``imdb_crop`` unless "write" is False. "box" overrides the face location.
    """
    crop = root / "imdb_crop"
    n = len(rows)

    def cells(values):
        out = np.empty((1, n), dtype=object)
        for i, v in enumerate(values):
            out[0, i] = v
        return out

    for row in rows:
        if row.get("write", True):
            write_image(crop / row["path"])
    crop.mkdir(parents=True, exist_ok=True)
    struct = {
        "dob": np.array([[r["dob"] for r in rows]]),
        "photo_taken": np.array([[r["taken"] for r in rows]], dtype=float),
        "full_path": cells([r["path"] for r in rows]),
        "gender": np.array([[r.get("gender", 1.0) for r in rows]]),
        "name": cells([r.get("name", "Some Body") for r in rows]),
        "face_location": cells([np.array([r.get("box", BOX)], dtype=float) for r in rows]),
        "face_score": np.array([[r.get("score", 3.0) for r in rows]]),
        "second_face_score": np.array([[r.get("second", np.nan) for r in rows]]),
        "celeb_names": cells(["Some Body"] * n),
        "celeb_id": np.array([[float(i % 3) for i in range(n)]]),
    }
    scipy.io.savemat(crop / "imdb.mat", {"imdb": struct}, format="5")
