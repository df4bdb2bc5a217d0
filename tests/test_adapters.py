"""Each adapter on generated fixtures in its native layout: labels, boxes, and drop counts."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from agecascade.data.adapters import read_adience, read_agedb, read_fgnet, read_imdb_wiki, read_utkface
from agecascade.data.adapters.imdb import age_at_photo
from agecascade.data.manifest import DatasetLayoutError, path_below_root
from conftest import write_image
from imdb_files import datenum, write_imdb


# --- IMDB-WIKI ----------------------------------------------------------------------------

def test_imdb_age_uses_the_mid_year_convention():
    assert age_at_photo(datenum(1970, 3, 1), 2000) == 30.0   # born before July: full year
    assert age_at_photo(datenum(1970, 9, 1), 2000) == 29.0   # born after July: not yet
    assert age_at_photo(0.0, 2000) is None


def test_imdb_cleaning_rules_each_count_their_drops(tmp_path):
    ok = {"dob": datenum(1970, 1, 1), "taken": 2000}
    rows = [
        {**ok, "path": "01/a.jpg"},
        {**ok, "path": "01/b.jpg", "gender": 0.0},
        {**ok, "path": "02/old.jpg", "dob": datenum(1880, 1, 1)},        # age 120
        {**ok, "path": "02/unborn.jpg", "dob": datenum(2005, 1, 1)},     # age -5
        {**ok, "path": "03/noface.jpg", "score": -np.inf},
        {**ok, "path": "03/weak.jpg", "score": 0.7},
        {**ok, "path": "04/two.jpg", "second": 2.5},
        {**ok, "path": "04/nogender.jpg", "gender": np.nan},
        {**ok, "path": "05/missing.jpg", "write": False},
        {**ok, "path": "05/baddob.jpg", "dob": 0.0},
    ]
    write_imdb(tmp_path, rows)
    manifest, report = read_imdb_wiki(tmp_path, "imdb")
    assert manifest["path"].tolist() == ["imdb_crop/01/a.jpg", "imdb_crop/01/b.jpg"]
    assert manifest["age"].tolist() == [30.0, 30.0]
    assert manifest["gender"].tolist() == ["m", "f"]
    assert dict(report.dropped) == {"age_out_of_range": 2, "face_score_below_1": 2, "second_face": 1,
                                    "gender_missing": 1, "image_missing": 1, "dob_invalid": 1}
    assert report.input_rows == 10
    # face_location is MATLAB 1-based: [11 21 61 71] -> 0-based (10, 20, 60, 70)
    assert manifest.loc[0, ["x0", "y0", "x1", "y1"]].tolist() == [10.0, 20.0, 60.0, 70.0]
    assert set(manifest["box_source"]) == {"metadata"}


def test_imdb_paths_leaving_the_root_are_dropped_unread(tmp_path):
    root = tmp_path / "imdb"
    write_image(tmp_path / "secret.jpg")  # outside the dataset root: must never be read
    ok = {"dob": datenum(1970, 1, 1), "taken": 2000}
    rows = [{**ok, "path": "01/a.jpg"},
            {**ok, "path": "../../secret.jpg", "write": False},
            {**ok, "path": str(tmp_path / "secret.jpg"), "write": False},
            {**ok, "path": "01/../01/a.jpg", "write": False}]  # climbs back in: allowed
    write_imdb(root, rows)
    manifest, report = read_imdb_wiki(root, "imdb")
    assert manifest["path"].tolist() == ["imdb_crop/01/a.jpg", "imdb_crop/01/a.jpg"]
    assert dict(report.dropped) == {"path_outside_root": 2}
    assert [d["path"] for d in report.dropped_files] == [
        "imdb_crop/../../secret.jpg", f"imdb_crop/{tmp_path / 'secret.jpg'}"]


def test_imdb_without_mat_is_a_layout_error(tmp_path):
    (tmp_path / "imdb_crop").mkdir()
    with pytest.raises(DatasetLayoutError, match="imdb.mat"):
        read_imdb_wiki(tmp_path, "imdb")


# --- AgeDB --------------------------------------------------------------------------------

def test_agedb_parses_names_and_reports_malformed(tmp_path):
    for name in ["0_MariaCallas_35_f.jpg", "1_MariaCallas_52_f.jpg", "2_Jean_Paul_Sartre_60_m.jpg"]:
        write_image(tmp_path / name)
    (tmp_path / "17_NoAgeGiven_f.jpg").write_bytes(b"x")
    manifest, report = read_agedb(tmp_path)
    assert manifest["age"].tolist() == [35.0, 52.0, 60.0]
    assert manifest["subject"].tolist() == ["MariaCallas", "MariaCallas", "Jean_Paul_Sartre"]
    assert manifest["gender"].tolist() == ["f", "f", "m"]
    assert dict(report.dropped) == {"malformed_name": 1} and report.input_rows == 4


# --- FG-NET -------------------------------------------------------------------------------

def write_pts(path: Path, points: np.ndarray) -> None:
    body = "\n".join(f"{x:.3f} {y:.3f}" for x, y in points)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"version: 1\nn_points: {len(points)}\n{{\n{body}\n}}\n")


def test_fgnet_names_case_and_ab_variants(tmp_path):
    for name in ["001A02.JPG", "001A10.JPG", "035A23a.JPG", "035A23b.JPG", "007a18.jpg", "082A69.JPG"]:
        write_image(tmp_path / "images" / name)
    (tmp_path / "images" / "Thumbs.db").write_bytes(b"junk")
    points = np.column_stack([np.linspace(20, 80, 68), np.linspace(30, 90, 68)])
    write_pts(tmp_path / "points" / "035a23b.pts", points)
    (tmp_path / "points" / "001a10.pts").write_text("version: 1\nn_points: 68\n{\n1 2\n}\n")
    manifest, report = read_fgnet(tmp_path)
    by_path = manifest.set_index("path")
    assert by_path["age"].to_dict() == {
        "images/001A02.JPG": 2.0, "images/001A10.JPG": 10.0, "images/007a18.jpg": 18.0,
        "images/035A23a.JPG": 23.0, "images/035A23b.JPG": 23.0, "images/082A69.JPG": 69.0}
    assert by_path.loc["images/035A23a.JPG", "subject"] == "035"
    assert by_path.loc["images/035A23b.JPG", ["x0", "y0", "x1", "y1"]].tolist() == [20, 30, 80, 90]
    assert by_path.loc["images/035A23b.JPG", "box_source"] == "landmarks"
    assert by_path["box_source"].isna().sum() == 5   # no (usable) landmarks -> detector later
    assert dict(report.dropped) == {"malformed_name": 1}
    assert dict(report.warnings) == {"landmarks_unreadable": 1}


def test_fgnet_without_images_folder_is_a_layout_error(tmp_path):
    with pytest.raises(DatasetLayoutError, match="images"):
        read_fgnet(tmp_path)


# --- Adience ------------------------------------------------------------------------------

HEADER = "user_id\toriginal_image\tface_id\tage\tgender\tx\ty\tdx\tdy\ttilt_ang\tfiducial_yaw_angle\tfiducial_score"


def adience_row(user: str, image: str, face: int, age: str, gender: str = "f") -> str:
    return "\t".join([user, image, str(face), age, gender, "0", "0", "10", "10", "0", "0", "50"])


def test_adience_keeps_canonical_groups_and_counts_every_other_row(tmp_path):
    rows = {
        0: [adience_row("u1@N0", "a.jpg", 1, "(25, 32)"), adience_row("u1@N0", "b.jpg", 2, "(0, 2)", "m"),
            adience_row("u1@N0", "c.jpg", 3, "None"), adience_row("u1@N0", "d.jpg", 4, "35"),
            adience_row("u1@N0", "e.jpg", 5, "(38, 42)"), adience_row("u1@N0", "f.jpg", 6, "(27, 32)"),
            adience_row("u1@N0", "g.jpg", 7, ""), "u1@N0\ttruncated"],
        3: [adience_row("u2@N0", "h.jpg", 1, "(60, 100)", "u"), adience_row("u2@N0", "gone.jpg", 2, "(8, 12)")],
    }
    for fold, lines in rows.items():
        (tmp_path / f"fold_{fold}_data.txt").write_text("\n".join([HEADER, *lines]) + "\n\n")
    for user, face, image in [("u1@N0", 1, "a.jpg"), ("u1@N0", 2, "b.jpg"), ("u2@N0", 1, "h.jpg")]:
        write_image(tmp_path / "faces" / user / f"coarse_tilt_aligned_face.{face}.{image}")
    manifest, report = read_adience(tmp_path)
    assert manifest["age_group"].tolist() == ["25-32", "0-2", "60-100"]
    assert manifest["age_group3"].tolist() == ["25-100", "0-12", "25-100"]
    assert manifest["fold"].tolist() == [0, 0, 3]
    assert manifest["subject"].tolist() == ["u1@N0/1", "u1@N0/2", "u2@N0/1"]
    assert manifest["gender"].tolist()[:2] == ["f", "m"] and manifest["gender"].isna().tolist()[2]
    assert dict(report.dropped) == {"age_none": 1, "age_single_number": 1, "age_off_grid": 2,
                                    "age_missing": 1, "row_malformed": 1, "image_missing": 1}
    assert report.input_rows == len(manifest) + report.n_dropped == 10
    assert report.warnings["fold_file_missing"] == 3


def test_adience_user_id_climbing_out_of_the_root_is_dropped(tmp_path):
    root = tmp_path / "adience"
    lines = [adience_row("u1@N0", "a.jpg", 1, "(25, 32)"),
             adience_row("../..", "secret.jpg", 2, "(25, 32)"),
             adience_row("/etc", "passwd", 3, "(25, 32)")]
    root.mkdir()
    (root / "fold_0_data.txt").write_text("\n".join([HEADER, *lines]) + "\n")
    write_image(root / "faces" / "u1@N0" / "coarse_tilt_aligned_face.1.a.jpg")
    write_image(tmp_path / "coarse_tilt_aligned_face.2.secret.jpg")  # where ../.. points
    manifest, report = read_adience(root)
    assert manifest["path"].tolist() == ["faces/u1@N0/coarse_tilt_aligned_face.1.a.jpg"]
    assert dict(report.dropped) == {"path_outside_root": 2}


@pytest.mark.parametrize("parts, expected", [
    (("faces", "u1", "x.jpg"), "faces/u1/x.jpg"),
    (("imdb_crop", "01/./x.jpg"), "imdb_crop/01/x.jpg"),
    (("imdb_crop", "../x.jpg"), "x.jpg"),            # still below the root
    (("imdb_crop", "../../x.jpg"), None),
    (("faces", "..", "..", "x.jpg"), None),
    (("imdb_crop", "/etc/passwd"), None),
    (("faces", "u1", "a/../../../../x"), None),
])
def test_path_below_root(parts, expected):
    assert path_below_root(*parts) == expected


# --- UTKFace ------------------------------------------------------------------------------

def test_utkface_parses_names_and_reports_malformed(tmp_path):
    good = ["1_0_0_20170109150557335.jpg.chip.jpg", "116_1_4_20170110183726390.jpg.chip.jpg",
            "14_0_0_2017011022340900.jpg.chip.jpg"]
    bad = ["61_1_20170109142408075.jpg.chip.jpg", "39_1_20170116174525125.jpg.chip.jpg", "README.txt"]
    for name in good + bad:
        write_image(tmp_path / name, fmt="JPEG")
    manifest, report = read_utkface(tmp_path)
    assert sorted(manifest["age"].tolist()) == [1.0, 14.0, 116.0]
    assert report.dropped["malformed_name"] == 3
    assert sorted(d["path"] for d in report.dropped_files) == sorted(bad)


@pytest.mark.parametrize("reader", [read_utkface, read_agedb, read_fgnet, read_adience,
                                    lambda root: read_imdb_wiki(root, "imdb")])
def test_missing_root_is_a_layout_error_naming_the_path(tmp_path, reader):
    missing = tmp_path / "nowhere"
    with pytest.raises(DatasetLayoutError, match=str(missing)):
        reader(missing)
