"""FG-NET: ``images/NNNAxx[a|b].JPG`` (subject NNN, age xx) with optional 68-point landmarks."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd

from ..manifest import (DatasetLayoutError, list_files, make_row, require_dir, rows_from_names,
                        to_frame)
from ..report import DropReport

EXPECTED = "ROOT/images/NNNAxx[a|b].JPG and optionally ROOT/points/nnnaxx[a|b].pts (or ROOT/FGNET/...)"
NAME = re.compile(r"^(\d{3})a(\d{2})([ab]?)\.jpe?g$", re.IGNORECASE)


def _child(folder: Path, name: str) -> Path | None:
    """FG-NET copies differ in case (images/Images, points/Points)."""
    for child in folder.iterdir():
        if child.is_dir() and child.name.lower() == name:
            return child
    return None


def read_pts(path: Path) -> np.ndarray:
    """Parse an IBUG ``.pts`` file into an (n_points, 2) array; raises ValueError if malformed."""
    text = path.read_text(errors="replace")
    body = text[text.index("{") + 1: text.index("}")]
    points = np.array([[float(v) for v in line.split()] for line in body.splitlines() if line.strip()])
    declared = re.search(r"n_points:\s*(\d+)", text)
    if points.ndim != 2 or points.shape[1] != 2 or (declared and int(declared[1]) != len(points)):
        raise ValueError(f"expected n_points x 2 coordinates, got shape {points.shape}")
    return points


def read_fgnet(root: Path) -> tuple[pd.DataFrame, DropReport]:
    root = require_dir(root, EXPECTED)
    base = _child(root, "fgnet") or root
    images = _child(base, "images")
    if images is None:
        raise DatasetLayoutError(root, EXPECTED + " — no images/ folder")
    points_dir = _child(base, "points")
    points = {p.stem.lower(): p for p in list_files(points_dir)} if points_dir else {}
    report = DropReport("fgnet", str(root))

    def to_row(rel: str, match: re.Match) -> dict:
        subject, age, _variant = match.groups()
        box, source = (np.nan,) * 4, None
        pts = points.get(Path(rel).stem.lower())
        if pts is not None:
            try:
                xy = read_pts(pts)
                box, source = (*xy.min(axis=0), *xy.max(axis=0)), "landmarks"
            except (ValueError, OSError) as err:
                report.warn(rel, "landmarks_unreadable", f"{pts.name}: {err}")
        return make_row(rel, "fgnet", age=float(age), subject=subject, box=box, box_source=source)

    rows = rows_from_names(list_files(images), root, report, NAME, "NNNAxx[a|b].JPG", to_row)
    if not rows:
        raise DatasetLayoutError(root, EXPECTED + " — no file name matched")
    return to_frame(rows), report
