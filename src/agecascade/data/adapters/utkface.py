"""UTKFace: aligned & cropped chips named ``age_gender_race_datetime.jpg.chip.jpg``."""
from __future__ import annotations

import re
from pathlib import Path

import pandas as pd

from ..manifest import (DatasetLayoutError, list_files, make_row, require_dir, rows_from_names,
                        to_frame)
from ..report import DropReport

EXPECTED = "ROOT/<age>_<gender 0|1>_<race 0-4>_<datetime>.jpg.chip.jpg (or ROOT/UTKFace/...)"
NAME = re.compile(r"^(\d{1,3})_([01])_([0-4])_(\d+)\.jpg\.chip\.jpg$")
GENDER = {"0": "m", "1": "f"}


def read_utkface(root: Path) -> tuple[pd.DataFrame, DropReport]:
    root = require_dir(root, EXPECTED)
    folder = root / "UTKFace" if (root / "UTKFace").is_dir() else root
    report = DropReport("utkface", str(root))

    def to_row(rel: str, match: re.Match) -> dict:
        age, gender, _race, _when = match.groups()
        return make_row(rel, "utkface", age=float(age), gender=GENDER[gender])

    rows = rows_from_names(list_files(folder), root, report, NAME,
                           "age_gender_race_datetime.jpg.chip.jpg", to_row)
    if not rows:
        raise DatasetLayoutError(root, EXPECTED + " — no file name matched")
    return to_frame(rows), report
