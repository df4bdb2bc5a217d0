"""The manifest table every adapter returns: one row per usable face.

Adapters fill the label columns and, where the dataset ships one, the face box. The crop step
fills the remaining columns (detected boxes, image size, content hash) for the rows it keeps.
"""
from __future__ import annotations

import math
import posixpath
import re
from pathlib import Path
from typing import Callable

import pandas as pd

from agecascade.errors import UserError

from .report import DropReport

# Column -> pandas dtype. Nullable dtypes, because not every dataset has every label.
COLUMNS: dict[str, str] = {
    "path": "string",          # image path relative to the dataset root, POSIX separators
    "dataset": "string",
    "age": "Float64",          # years; missing for group-labelled datasets (Adience)
    "age_group": "string",     # Adience 8-group label, e.g. "25-32"
    "age_group3": "string",    # Adience child/teen/adult variant: "0-12", "15-20", "25-100"
    "subject": "string",       # person id where the dataset has one (LOPO, leakage-free splits)
    "fold": "Int64",           # dataset-defined CV fold (Adience)
    "gender": "string",        # "f" / "m"
    "x0": "Float64",           # face box in pixels of the EXIF-oriented image, half-open
    "y0": "Float64",
    "x1": "Float64",
    "y1": "Float64",
    "box_source": "string",    # metadata | landmarks | dlib | haar | image
    "width": "Int64",          # EXIF-oriented image size
    "height": "Int64",
    "sha1": "string",          # content hash: byte-identical duplicates share it
}

NO_BOX = (math.nan, math.nan, math.nan, math.nan)


class DatasetLayoutError(UserError):
    """The root is missing or does not look like the dataset: a user error, not a crash."""

    def __init__(self, root: Path, expected: str):
        super().__init__(f"{root}: not a valid dataset root. Expected layout: {expected}")


def make_row(path: str, dataset: str, *, age: float | None = None, age_group: str | None = None,
             age_group3: str | None = None, subject: str | None = None, fold: int | None = None,
             gender: str | None = None, box: tuple[float, float, float, float] = NO_BOX,
             box_source: str | None = None) -> dict:
    x0, y0, x1, y1 = box
    return {"path": path, "dataset": dataset, "age": age, "age_group": age_group,
            "age_group3": age_group3, "subject": subject, "fold": fold, "gender": gender,
            "x0": x0, "y0": y0, "x1": x1, "y1": y1, "box_source": box_source,
            "width": None, "height": None, "sha1": None}


def to_frame(rows: list[dict]) -> pd.DataFrame:
    """Build a manifest with the canonical columns and dtypes, even when empty."""
    frame = pd.DataFrame(rows, columns=list(COLUMNS))
    return frame.astype(COLUMNS)


def path_below_root(*parts: str) -> str | None:
    """Metadata path parts joined into a POSIX path relative to the dataset root, or None where
    the result would leave the root: an absolute part, or ``..`` climbing out.

    Label files come from the internet; a row naming ``../../home/you/.ssh/id_rsa`` must not
    make ``prepare`` read it. The check is on the text, not the disk, so symlinks inside a
    dataset (a DVC cache, a shared mount) keep working.
    """
    if any(posixpath.isabs(part) for part in parts):
        return None
    path = posixpath.normpath(posixpath.join(*parts))
    return None if path == ".." or path.startswith("../") else path


def list_files(folder: Path) -> list[Path]:
    """Regular files in a folder, sorted, so row order (and the crop store) is reproducible."""
    return sorted(p for p in folder.iterdir() if p.is_file())


def require_dir(root: Path, expected: str) -> Path:
    if not root.is_dir():
        raise DatasetLayoutError(root, expected)
    return root


def rows_from_names(files: list[Path], root: Path, report: DropReport, pattern: re.Pattern,
                    hint: str, to_row: Callable[[str, re.Match], dict]) -> list[dict]:
    """Rows for datasets whose labels live in file names; other names are dropped, with ``hint``."""
    rows = []
    for file in files:
        report.input_rows += 1
        rel = file.relative_to(root).as_posix()
        match = pattern.match(file.name)
        if match is None:
            report.drop(rel, "malformed_name", f"expected {hint}")
            continue
        rows.append(to_row(rel, match))
    return rows
