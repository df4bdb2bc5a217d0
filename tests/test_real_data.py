"""The issue's checks on the real datasets in ../shared; each skips cleanly where it is absent."""
from __future__ import annotations

import json
import re

from agecascade.cli import main
from agecascade.data.adapters import read_adience, read_fgnet, read_utkface
from agecascade.data.store import load_prepared
from conftest import shared_dataset

UTK_NAME = re.compile(r"^\d+_[01]_[0-4]_\d+\.jpg\.chip\.jpg$")


def test_fgnet_dev_keeps_all_486_images_of_41_subjects():
    root = shared_dataset("fgnet-dev")
    manifest, report = read_fgnet(root)
    assert len(manifest) == 486 and manifest["subject"].nunique() == 41
    assert report.n_dropped == 0
    names = manifest.set_index("path")["age"]
    assert names["images/035A23a.JPG"] == names["images/035A23b.JPG"] == 23.0
    assert names["images/004A19.JPG"] == 19.0
    for path, age in names.items():  # every age is the two digits after the 'A'
        assert age == float(re.search(r"A(\d\d)", path, re.IGNORECASE)[1])
    assert manifest["age"].min() == 0 and manifest["age"].max() <= 69
    assert (manifest["box_source"] == "landmarks").all()


def test_fgnet_dev_prepare_crops_every_image(tmp_path):
    root = shared_dataset("fgnet-dev")
    assert main(["prepare", "fgnet", "--root", str(root), "--out", str(tmp_path), "--size", "32"]) == 0
    manifest, crops = load_prepared(tmp_path)
    assert len(manifest) == len(crops) == 486
    assert manifest["width"].min() > 0


def test_utkface_dev_keeps_every_well_formed_name():
    root = shared_dataset("utkface-dev")
    files = [p.name for p in root.iterdir() if p.is_file()]
    well_formed = [n for n in files if UTK_NAME.match(n)]
    manifest, report = read_utkface(root)
    assert len(manifest) == len(well_formed)
    malformed = {d["path"] for d in report.dropped_files}
    assert malformed == set(files) - set(well_formed) and malformed
    assert dict(report.dropped) == {"malformed_name": len(malformed)}


def test_adience_sample_drop_counts_add_up_and_19_faces_kept():
    root = shared_dataset("adience-sample")
    label_rows = sum(
        1 for k in range(5) for line in (root / f"fold_{k}_data.txt").read_text().splitlines()
        if line.strip() and not line.startswith("user_id"))
    manifest, report = read_adience(root)
    assert report.input_rows == label_rows
    assert len(manifest) + sum(report.dropped.values()) == label_rows
    assert len(manifest) == 19
    assert set(manifest["age_group"]) == {"25-32"} and set(manifest["fold"]) == {0}
    for reason in ("age_none", "age_single_number", "age_off_grid", "image_missing"):
        assert report.dropped[reason] > 0


def test_adience_sample_prepare_writes_a_balanced_report(tmp_path):
    root = shared_dataset("adience-sample")
    assert main(["prepare", "adience", "--root", str(root), "--out", str(tmp_path), "--size", "32"]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["kept"] == 19
    assert report["kept"] + sum(report["dropped"].values()) == report["input_rows"]
    assert len(report["dropped_files"]) == sum(report["dropped"].values())
