"""benchmarks/zero_shot.py scores hand-made rows as worked out by hand: the largest box is the
face, a miss is counted (never dropped), the baseline is the other subjects' median age."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from conftest import REPO


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


zero_shot = _load("zero_shot")

# Subjects 001 (ages 5, 10), 002 (20), 003 (40). Baseline guesses: 001 -> median(20, 40) = 30,
# 002 -> median(5, 10, 40) = 10, 003 -> median(5, 10, 20) = 10.
ROWS = [
    {"file": "x/001A05.JPG", "face": 0, "box": [0, 0, 50, 50], "age": 7.0, "age_low": 3.0,
     "age_high": 10.0, "error": None},
    # two faces: the small one (age 50) must lose to the large one (age 8, interval misses 10)
    {"file": "x/001A10.JPG", "face": 0, "box": [0, 0, 10, 10], "age": 50.0, "age_low": 40.0,
     "age_high": 60.0, "error": None},
    {"file": "x/001A10.JPG", "face": 1, "box": [0, 0, 100, 100], "age": 8.0, "age_low": 11.0,
     "age_high": 14.0, "error": None},
    {"file": "x/002A20.JPG", "face": None, "box": None, "age": None, "error": "no_face_found"},
    {"file": "x/003A40.JPG", "face": 0, "box": [5, 5, 80, 90], "age": 46.0, "age_low": 30.0,
     "age_high": 50.0, "error": None},
]


@pytest.fixture
def scored(tmp_path: Path) -> tuple[Path, Path, dict]:
    folder = tmp_path / "images"
    folder.mkdir()
    for name in ("001A05.JPG", "001A10.JPG", "002A20.JPG", "003A40.JPG", "notes.txt"):
        (folder / name).write_bytes(b"")
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    truth = zero_shot.read_truth(folder)
    result = zero_shot.score(truth, zero_shot.read_rows(rows), zero_shot.loso_median(truth))
    return folder, rows, result


def test_baseline_is_the_median_of_the_other_subjects():
    truth = {"001A05.JPG": zero_shot.Truth("001", 5), "001A10.JPG": zero_shot.Truth("001", 10),
             "002A20.JPG": zero_shot.Truth("002", 20), "003A40.JPG": zero_shot.Truth("003", 40)}
    assert zero_shot.loso_median(truth) == {"001A05.JPG": 30, "001A10.JPG": 30,
                                            "002A20.JPG": 10, "003A40.JPG": 10}


def test_scores_match_the_hand_computation(scored):
    _, _, s = scored
    assert (s["images"], s["detected"], s["missed"]) == (4, 3, 1)  # notes.txt is not an image
    assert s["miss_reasons"] == {"no_face_found": 1} and s["detection_rate"] == 0.75
    assert s["multi_face_images"] == 1
    assert s["mae"] == pytest.approx(10 / 3, abs=1e-3)        # |+2|, |-2|, |+6|
    assert s["signed"] == pytest.approx(2.0)
    assert s["baseline_mae"] == pytest.approx(25.0)           # 25, 20, 30
    assert s["mae_misses_as_median"] == pytest.approx(5.0)    # the miss scores |10 - 20|
    assert s["baseline_mae_all"] == pytest.approx(21.25)
    assert s["coverage"] == pytest.approx(2 / 3, abs=1e-3) and s["coverage_images"] == 3
    assert s["bands"]["0-12"] == {"images": 2, "detected": 2, "mae": 2.0, "signed": 0.0,
                                  "exact_share": 0.0, "baseline_mae": 22.5}
    assert s["bands"]["20-39"]["detected"] == 0 and s["bands"]["20-39"]["mae"] is None
    assert s["bands"]["40+"] == {"images": 1, "detected": 1, "mae": 6.0, "signed": 6.0,
                                 "exact_share": 0.0, "baseline_mae": 30.0}


def test_rows_without_an_interval_have_no_coverage(scored, tmp_path: Path):
    folder, _, _ = scored
    peer = tmp_path / "peer.jsonl"
    peer.write_text("".join(json.dumps({k: r[k] for k in ("file", "face", "box", "age")}) + "\n"
                            for r in ROWS))
    truth = zero_shot.read_truth(folder)
    s = zero_shot.score(truth, zero_shot.read_rows(peer), zero_shot.loso_median(truth))
    assert s["coverage"] is None and s["mae"] == pytest.approx(10 / 3, abs=1e-3)


def test_utkface_chips_are_read_each_as_its_own_subject(tmp_path: Path):
    """UTKFace names no person: two chips of age 30 are two subjects, and an unreadable name
    is no photo to score."""
    for name in ("30_0_1_20170117.jpg.chip.jpg", "30_1_2_20170118.jpg.chip.jpg",
                 "4_0_0_20170110.jpg.chip.jpg", "30_0_1.jpg.chip.jpg"):
        (tmp_path / name).write_bytes(b"")
    truth = zero_shot.read_truth(tmp_path)
    assert sorted((t.subject[:2], t.age) for t in truth.values()) == [
        ("30", 30.0), ("30", 30.0), ("4_", 4.0)]
    assert len({t.subject for t in truth.values()}) == 3
    (tmp_path / "empty").mkdir()
    with pytest.raises(zero_shot.UserError, match="no FG-NET .* or UTKFace"):
        zero_shot.read_truth(tmp_path / "empty")


def test_ages_right_to_the_year_are_counted_apart(scored):
    """ROWS miss by +2, -2 and +6: none within half a year. Made exact, 003's photo leaves
    +2 and -2 for the MAE of the others."""
    _, _, s = scored
    assert s["exact_share"] == 0.0 and s["mae_not_exact"] == pytest.approx(10 / 3, abs=1e-3)
    truth = {"001A05.JPG": zero_shot.Truth("001", 5), "001A10.JPG": zero_shot.Truth("001", 10),
             "003A40.JPG": zero_shot.Truth("003", 40)}
    rows = {"001A05.JPG": [ROWS[0]], "001A10.JPG": ROWS[1:3],
            "003A40.JPG": [{**ROWS[4], "age": 40.4}]}
    exact = zero_shot.score(truth, rows, zero_shot.loso_median(truth))
    assert exact["exact_share"] == pytest.approx(1 / 3, abs=1e-4)
    assert exact["bands"]["40+"]["exact_share"] == 1.0 and exact["bands"]["0-12"]["exact_share"] == 0
    assert exact["mae_not_exact"] == 2.0


def test_command_prints_one_json_object_and_readable_text(scored, capsys):
    folder, rows, s = scored
    assert zero_shot.main([str(folder), "--rows", str(rows), "--peer-rows", str(rows),
                           "--json", "--bootstrap", "0"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == {"ours": s, "peer": s}
    zero_shot.main([str(folder), "--rows", str(rows)])
    text = capsys.readouterr().out
    assert "1 missed (no_face_found 1)" in text and "largest box" in text
    assert "on 2 subjects drawn again (2000 draws" in text  # 002's one photo has no face


def test_subjects_drawn_again_span_the_subjects_own_errors():
    """Subject 001's photos are all 2 years too old, 002's all 6: any draw of two subjects
    scores 2, 4 or 6 (a quarter of draws each end), so 90 % of draws lie between 2 and 6. A
    subject's photos are drawn together: drawn photo by photo, six photos would all be one
    subject's in 1 draw of 32, inside the 90 %."""
    ages = {"001A05.JPG": 5, "001A08.JPG": 8, "001A11.JPG": 11,
            "002A30.JPG": 30, "002A09.JPG": 9, "002A07.JPG": 7}
    truth = {name: zero_shot.Truth(name[:3], age) for name, age in ages.items()}
    errors = {name: 2.0 if name.startswith("001") else 6.0 for name in ages}
    drawn = zero_shot.subjects_resampled(truth, errors, draws=400)
    assert drawn == {"draws": 400, "subjects": 2, "mae_90": [2.0, 6.0],
                     "signed_children_90": [2.0, 6.0]}
    assert zero_shot.subjects_resampled(truth, {"002A30.JPG": -3.0}, draws=50) == {
        "draws": 50, "subjects": 1, "mae_90": [3.0, 3.0], "signed_children_90": None}


def test_the_appearance_probe_scores_each_effect_on_the_split(tmp_path: Path, capsys):
    """Every effect gets a row; 'none' is the model's own test MAE on the split's crops, so an
    effect that moves the ages shows as a different signed error."""
    from conftest import write_checkpoint
    from test_train import write_prepared

    probe = _load("appearance_probe")
    store = write_prepared(tmp_path / "store", n=60)
    model = write_checkpoint(tmp_path / "model.pt", seed=0)
    assert probe.main(["--model", str(model), "--manifest", str(store), "--val-fraction", "0.2",
                       "--test-fraction", "0.3", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out["effects"]) == set(probe.effects(0)) and out["images"] > 5
    none, grain = out["effects"]["none"], out["effects"]["noise std 0.05"]
    assert none["mae"] > 0 and none["signed"] != grain["signed"]


def test_chip_alignment_sees_a_chip_framed_smaller(tmp_path):
    """benchmarks/chip_alignment.py's chips and landmarks.scale_and_shift: a copy of each chip
    with the face shrunk to 90 % (padded by its edge colours) needs about 1 / 0.9 the zoom of
    its original to reach the template."""
    pytest.importorskip("face_recognition_models")
    import numpy as np
    from PIL import Image

    from agecascade.data.landmarks import scale_and_shift
    from conftest import shared_dataset

    chip_alignment = _load("chip_alignment")
    for number, chip in enumerate(sorted(shared_dataset("utkface-dev").rglob("*.chip.jpg"))[:8]):
        image = np.asarray(Image.open(chip).convert("RGB"))
        small = np.asarray(Image.fromarray(image).resize((180, 180), Image.BILINEAR))
        (tmp_path / chip.name).symlink_to(chip)
        Image.fromarray(np.pad(small, ((10, 10), (10, 10), (0, 0)), mode="edge")).save(
            tmp_path / f"150_{number}.jpg.chip.jpg")        # the copies: "aged" 150
    ages, framings, missed = chip_alignment.chip_framings(tmp_path, 100, seed=0)
    points = [np.array(f.landmarks) for f in framings]
    template = np.median(points, axis=0)
    scale = np.array([scale_and_shift(p, template)[0] for p in points])
    assert len(ages) + missed == 16 and len(ages) >= 12
    ratio = np.median(scale[ages == 150]) / np.median(scale[ages != 150])
    assert ratio == pytest.approx(1 / 0.9, abs=0.04)


def test_adience_faces_scores_groups_by_the_nearest_range_and_counts_misses(tmp_path, capsys):
    """Ages between two Adience groups go to the closer one; a face without a row is wrong."""
    _load("zero_shot")
    adience = _load("adience_faces")
    assert [adience.nearest_group(a) for a in (1, 3.4, 13, 22.6, 70)] == [0, 1, 2, 4, 7]
    root = tmp_path / "adience"
    (root / "faces" / "u").mkdir(parents=True)
    labels = {"a.jpg": "(0, 2)", "b.jpg": "(25, 32)", "c.jpg": "(25, 32)", "d.jpg": "(60, 100)"}
    lines = ["user_id\toriginal_image\tface_id\tage\tgender"]
    for name, age in labels.items():
        (root / "faces" / "u" / f"coarse_tilt_aligned_face.1.{name}").write_bytes(b"")
        lines.append(f"u\t{name}\t1\t{age}\tf")
    (root / "fold_0_data.txt").write_text("\n".join(lines) + "\n")
    rows = tmp_path / "rows.jsonl"
    predicted = {"a.jpg": 4.0, "b.jpg": 36.0, "c.jpg": 44.0}            # d.jpg: no face
    rows.write_text("".join(json.dumps({"file": f"x/coarse_tilt_aligned_face.1.{n}", "face": 0,
                                        "box": [0, 0, 10, 10], "age": a}) + "\n"
                            for n, a in predicted.items()))
    groups = {"(0, 2)": 0, "(25, 32)": 4, "(60, 100)": 7}
    truth = {f"coarse_tilt_aligned_face.1.{n}": groups[g] for n, g in labels.items()}
    s = adience.score(truth, adience.read_rows(rows))
    # a: 4 -> 4-6 (1-off); b: 36 -> 38-43 (1-off); c: 44 -> 38-43 (1-off); d: missed
    assert (s["found"], s["exact"], s["one_off"]) == (3, 0.0, 0.75)
    assert adience.main([str(root), "--rows", str(rows)]) == 0
    assert "majority class 25-32: exact 50.0%" in capsys.readouterr().out


age_groups = _load("age_groups")


def test_decade_groups_count_a_miss_wrong_and_close_at_80(tmp_path: Path):
    """Five photos worked by hand: 3 -> 9 (group 0, right), 15 -> 27 (1 vs 2: one off),
    85 -> 95 (both 80+: right), 45 -> no face (wrong, and not one off), and a 7-year-old whose
    largest face says 25 (two groups off) while a small face says 7."""
    names = {"3_0_0_20170101.jpg.chip.jpg": 3, "15_1_0_20170101.jpg.chip.jpg": 15,
             "85_0_1_20170101.jpg.chip.jpg": 85, "045A45.JPG": 45, "007A07.JPG": 7}
    assert {n: age_groups.true_age(n) for n in names} == {n: float(a) for n, a in names.items()}
    assert age_groups.true_age("3_0_20170101.jpg.chip.jpg") is None  # UTKFace's malformed names
    rows = [{"file": "x/3_0_0_20170101.jpg.chip.jpg", "face": 0, "box": [0, 0, 9, 9], "age": 9},
            {"file": "x/15_1_0_20170101.jpg.chip.jpg", "face": 0, "box": [0, 0, 9, 9], "age": 27},
            {"file": "x/85_0_1_20170101.jpg.chip.jpg", "face": 0, "box": [0, 0, 9, 9], "age": 95},
            {"file": "x/045A45.JPG", "face": None, "box": None, "age": None,
             "error": "no_face_found"},
            {"file": "x/007A07.JPG", "face": 0, "box": [0, 0, 50, 50], "age": 25},
            {"file": "x/007A07.JPG", "face": 1, "box": [0, 0, 5, 5], "age": 7}]
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    truth = {n: float(a) for n, a in names.items()}
    s = age_groups.score(truth, age_groups.read_ages(path))
    assert (s["images"], s["faces_found"]) == (5, 4)
    assert s["exact"] == pytest.approx(2 / 5) and s["one_off"] == pytest.approx(3 / 5)
    assert (s["exact_0_9"], s["n_0_9"]) == (0.5, 2)
    majority = age_groups.majority(truth)  # group 0 holds two of five
    assert majority["exact"] == pytest.approx(2 / 5) and majority["exact_0_9"] == 1.0
