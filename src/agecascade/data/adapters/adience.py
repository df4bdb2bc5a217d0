"""Adience: ``fold_k_data.txt`` label files plus ``faces/<user_id>/coarse_tilt_aligned_face.*``.

Only the 8 canonical groups are kept; ``None``, single-number ages and off-grid ranges are
dropped with a reason each, which is how the thesis arrived at 17,417 usable images.
"""
from __future__ import annotations

import csv
import re
from pathlib import Path

import pandas as pd

from ..manifest import DatasetLayoutError, make_row, path_below_root, require_dir, to_frame
from ..report import DropReport

EXPECTED = ("ROOT/fold_0_data.txt ... fold_4_data.txt (tab-separated) and "
            "ROOT/faces/<user_id>/coarse_tilt_aligned_face.<face_id>.<original_image>")
GROUPS = ["0-2", "4-6", "8-12", "15-20", "25-32", "38-43", "48-53", "60-100"]
GROUPS3 = ["0-12", "15-20", "25-100"]
TO_GROUP3 = {"0-2": "0-12", "4-6": "0-12", "8-12": "0-12", "15-20": "15-20",
             "25-32": "25-100", "38-43": "25-100", "48-53": "25-100", "60-100": "25-100"}
N_FOLDS = 5
RANGE = re.compile(r"^\(\s*(\d+)\s*,\s*(\d+)\s*\)$")


def parse_age_field(text: str) -> tuple[str | None, str]:
    """Return (canonical group or None, drop reason or "")."""
    text = text.strip()
    if not text:
        return None, "age_missing"
    if text == "None":
        return None, "age_none"
    if text.isdigit():
        return None, "age_single_number"
    match = RANGE.match(text)
    if match is None:
        return None, "age_malformed"
    group = f"{int(match[1])}-{int(match[2])}"
    return (group, "") if group in GROUPS else (None, "age_off_grid")


def read_adience(root: Path) -> tuple[pd.DataFrame, DropReport]:
    root = require_dir(root, EXPECTED)
    fold_files = {k: root / f"fold_{k}_data.txt" for k in range(N_FOLDS)}
    if not any(f.is_file() for f in fold_files.values()):
        raise DatasetLayoutError(root, EXPECTED + " — no fold_k_data.txt found")
    report = DropReport("adience", str(root))
    for fold, path in fold_files.items():
        if not path.is_file():
            report.warn(path.name, "fold_file_missing")
    rows = []
    for fold, path in fold_files.items():
        if not path.is_file():
            continue
        with path.open(newline="", encoding="utf-8", errors="replace") as handle:
            for line_no, fields in enumerate(csv.reader(handle, delimiter="\t"), start=1):
                if not fields or not "".join(fields).strip() or fields[0] == "user_id":
                    continue  # blank line or header: not a label row
                report.input_rows += 1
                where = f"{path.name}:{line_no}"
                if len(fields) < 5:
                    report.drop(where, "row_malformed", f"{len(fields)} fields")
                    continue
                user_id, original, face_id, age_text, gender = fields[:5]
                name = f"coarse_tilt_aligned_face.{face_id}.{original}"
                safe = path_below_root("faces", user_id, name)
                rel = safe or f"faces/{user_id}/{name}"  # the report names what the row said
                group, reason = parse_age_field(age_text)
                if reason:
                    report.drop(rel, reason, f"{where} age={age_text!r}")
                    continue
                if safe is None:  # checked just before the disk is touched, after the age rules
                    report.drop(rel, "path_outside_root", where)
                    continue
                if not (root / rel).is_file():
                    report.drop(rel, "image_missing", where)
                    continue
                rows.append(make_row(rel, "adience", age_group=group, age_group3=TO_GROUP3[group],
                                     subject=f"{user_id}/{face_id}", fold=fold,
                                     gender=gender if gender in ("m", "f") else None))
    return to_frame(rows), report
