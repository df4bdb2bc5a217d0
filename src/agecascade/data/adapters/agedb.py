"""AgeDB: a flat folder of ``<id>_<Name>_<age>_<gender>.jpg``."""
from __future__ import annotations

import re
from pathlib import Path

import pandas as pd

from ..manifest import (DatasetLayoutError, list_files, make_row, require_dir, rows_from_names,
                        to_frame)
from ..report import DropReport

EXPECTED = "ROOT/<id>_<Name>_<age>_<m|f>.jpg, e.g. 0_MariaCallas_35_f.jpg (or ROOT/AgeDB/...)"
NAME = re.compile(r"^(\d+)_(.+)_(\d{1,3})_([mf])\.jpe?g$", re.IGNORECASE)


def read_agedb(root: Path) -> tuple[pd.DataFrame, DropReport]:
    root = require_dir(root, EXPECTED)
    folder = root / "AgeDB" if (root / "AgeDB").is_dir() else root
    report = DropReport("agedb", str(root))

    def to_row(rel: str, match: re.Match) -> dict:
        _id, name, age, gender = match.groups()
        return make_row(rel, "agedb", age=float(age), subject=name, gender=gender.lower())

    rows = rows_from_names(list_files(folder), root, report, NAME, "id_Name_age_gender.jpg", to_row)
    if not rows:
        raise DatasetLayoutError(root, EXPECTED + " — no file name matched")
    return to_frame(rows), report
