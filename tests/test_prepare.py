"""`agecascade prepare` end to end: bad files are counted and named, the store matches the manifest."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from agecascade.cli import main
from agecascade.data.store import create_store, load_prepared, shrink_store
from conftest import write_image


def run_prepare(dataset: str, root: Path, out: Path, *extra: str) -> int:
    return main(["prepare", dataset, "--root", str(root), "--out", str(out), "--size", "32", *extra])


@pytest.mark.parametrize("workers", ["1", "2"])
def test_broken_folder_completes_and_names_every_bad_file(broken_images, tmp_path, capsys, workers):
    root = broken_images["good"].parent
    out = tmp_path / "out"
    assert run_prepare("utkface", root, out, "--workers", workers) == 0
    report = json.loads((out / "report.json").read_text())
    reasons = {Path(d["path"]).name: d["reason"] for d in report["dropped_files"]}
    name = lambda key: broken_images[key].name  # noqa: E731
    assert reasons == {
        name("truncated"): "truncated_image", name("empty"): "empty_file",
        name("text"): "malformed_name", name("text_named_jpg"): "not_an_image",
        name("bomb"): "decompression_bomb", name("corrupt"): "corrupt_image",
    }
    flagged = {Path(d["path"]).name: d["reason"] for d in report["warning_files"]
               if d["reason"] == "extension_mismatch"}
    assert flagged == {name("png_as_jpg"): "extension_mismatch"}
    assert report["kept"] == 3 and report["input_rows"] == 9
    manifest, crops = load_prepared(out)
    assert sorted(Path(p).name for p in manifest["path"]) == sorted(
        name(k) for k in ("good", "good_grey", "png_as_jpg"))
    assert crops.shape == (3, 32, 32, 3) and crops.dtype == np.uint8
    assert "3 kept, 6 dropped" in capsys.readouterr().out


def test_store_rows_follow_manifest_rows(tmp_path):
    """Row i of crops.npy must be the face of manifest row i, also after a drop in the middle."""
    root = tmp_path / "agedb"
    shades = {"0_Ann_20_f.jpg": 40, "1_Ann_30_f.jpg": 120, "3_Bob_50_m.jpg": 220}
    root.mkdir()
    for name, shade in shades.items():
        Image.new("RGB", (50, 50), (shade,) * 3).save(root / name, quality=100)
    (root / "2_Bob_40_m.jpg").write_bytes(b"")  # dropped between kept rows
    assert run_prepare("agedb", root, tmp_path / "out", "--box", "image", "--workers", "1") == 0
    manifest, crops = load_prepared(tmp_path / "out")
    assert manifest["age"].tolist() == [20.0, 30.0, 50.0]
    for i, name in enumerate(manifest["path"]):
        assert abs(float(crops[i].mean()) - shades[name]) < 3
    assert set(manifest["box_source"]) == {"image"}
    assert manifest["sha1"].str.len().eq(40).all()


def test_shrink_store_keeps_leading_rows(tmp_path):
    path = tmp_path / "crops.npy"
    store = create_store(path, 1000, 4)
    store[:] = np.arange(1000, dtype=np.uint8)[:, None, None, None]
    store.flush()
    del store
    shrink_store(path, 7)
    shrunk = np.load(path)
    assert shrunk.shape == (7, 4, 4, 3) and shrunk[:, 0, 0, 0].tolist() == list(range(7))
    assert path.stat().st_size == 128 + 7 * 48


def test_missing_root_exits_2_with_one_line_and_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "agecascade.cli", "prepare", "fgnet",
                           "--root", str(tmp_path / "nope"), "--out", str(tmp_path / "o")],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert str(tmp_path / "nope") in proc.stderr and "images/NNNAxx" in proc.stderr


def test_wrong_layout_exits_2(tmp_path):
    write_image(tmp_path / "holiday.jpg")
    assert run_prepare("utkface", tmp_path, tmp_path / "o") == 2


def test_unknown_dataset_is_refused_by_argparse(tmp_path):
    with pytest.raises(SystemExit) as caught:
        main(["prepare", "celeba", "--root", str(tmp_path), "--out", str(tmp_path)])
    assert caught.value.code == 2


def test_detector_or_fallback_is_reported_for_boxless_rows(tmp_path):
    root = tmp_path / "agedb"
    write_image(root / "0_Noise_33_m.jpg", (120, 120))  # random noise: no face anywhere
    assert run_prepare("agedb", root, tmp_path / "out", "--workers", "1") == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert set(report["warnings"]) <= {"no_face_found", "no_detector"} and report["warnings"]
    manifest = pd.read_parquet(tmp_path / "out" / "manifest.parquet")
    assert manifest.loc[0, ["x0", "y0", "x1", "y1"]].tolist() == [0, 0, 120, 120]


def test_every_image_broken_still_completes_with_an_empty_store(tmp_path, capsys):
    root = tmp_path / "utk"
    root.mkdir()
    (root / "20_0_0_20170101000000000.jpg.chip.jpg").write_bytes(b"")
    assert run_prepare("utkface", root, tmp_path / "out", "--workers", "1") == 0
    manifest, crops = load_prepared(tmp_path / "out")
    assert len(manifest) == 0 and crops.shape == (0, 32, 32, 3)
    assert "no usable face" in capsys.readouterr().err


def test_unwritable_output_is_one_error_line(tmp_path, capsys):
    root = tmp_path / "agedb"
    write_image(root / "0_Ann_20_f.jpg")
    blocker = tmp_path / "file"
    blocker.write_text("a file where the output folder should go")
    assert run_prepare("agedb", root, blocker / "out") == 2
    assert "error:" in capsys.readouterr().err
