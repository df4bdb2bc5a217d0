"""`agecascade predict`: photos, folders and videos in, one row per face out, errors named.

A tiny untrained checkpoint (32 px) stands in for a model: these tests check the plumbing (rows,
errors, boxes, parity between paths), not accuracy, which the real-data checks and the README's
zero-shot figures measure.
"""
from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from agecascade.cli import main
from agecascade.data.recipe import CropRecipe
from agecascade.data.detect import Detection
from agecascade.inference.faces import FaceSettings, analyse_image, cut
from agecascade.inference.predictor import Predictor, TorchEngine, summarise
from conftest import AGES, shared_dataset, write_checkpoint, write_image

RECIPE = {"margin": 0.4, "box_policy": "auto", "size": 32}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("predict") / "model.pt", seed=0, crop=RECIPE)


def predict(*argv: str) -> int:
    return main(["predict", *map(str, argv)])


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_every_file_gets_a_row_and_broken_ones_a_named_error(tmp_path, checkpoint, broken_images,
                                                             capsys):
    out = tmp_path / "rows.jsonl"
    assert predict(broken_images["good"].parent, "--model", checkpoint, "--detector", "none",
                   "--out", out, "--workers", "1") == 0
    rows = {Path(r["file"]).name: r for r in read_rows(out)}
    assert len(rows) == len(broken_images)  # one row per file: nothing is lost
    errors = {name: rows[path.name]["error"] for name, path in broken_images.items()}
    assert errors == {"good": None, "good_grey": None, "png_as_jpg": None,
                      "truncated": "truncated_image", "empty": "empty_file",
                      "text": "not_an_image", "text_named_jpg": "not_an_image",
                      "bomb": "decompression_bomb", "corrupt": "corrupt_image"}
    for name, row in rows.items():
        if row["error"]:  # never an invented age
            assert row["face"] is None and "age" not in row
        else:
            assert row["face"] == 0 and row["detector"] == "none"
            assert row["box"] == [0.0, 0.0, 96.0, 96.0]
            assert min(AGES) <= row["age_low"] <= row["age_high"] <= max(AGES)
            assert min(AGES) <= row["age"] <= max(AGES)
            assert 0.0 <= row["p_under_18"] <= 1.0 and row["age_std"] > 0
    summary = capsys.readouterr().err
    assert "9 files, 9 images, 3 faces" in summary and "not_an_image 2" in summary


def test_ages_agree_with_the_checkpoint_on_crops(tmp_path, checkpoint):
    """--detector none on crops at the recipe's size: the ages are the network's own."""
    crops = np.random.default_rng(1).integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    for i, crop in enumerate(crops):
        Image.fromarray(crop).save(tmp_path / f"crop{i}.png")
    out = tmp_path / "rows.csv"
    assert predict(*sorted(tmp_path.glob("crop*.png")), "--model", checkpoint, "--detector",
                   "none", "--out", out, "--workers", "1", "--no-flip") == 0
    with out.open() as handle:
        rows = list(csv.DictReader(handle))
    engine = TorchEngine(checkpoint, "cpu")
    expected = summarise(engine.probs(crops), engine.ages)["age"]
    np.testing.assert_allclose([float(r["age"]) for r in rows], expected, atol=2e-3)
    assert json.loads(rows[0]["box"]) == [0.0, 0.0, 32.0, 32.0]


def test_an_image_without_a_face_gets_no_age(tmp_path, checkpoint):
    pytest.importorskip("dlib")
    blank = tmp_path / "wall.png"
    Image.new("RGB", (200, 160), (90, 120, 150)).save(blank)
    out = tmp_path / "rows.jsonl"
    assert predict(blank, "--model", checkpoint, "--out", out, "--workers", "1") == 0
    (row,) = read_rows(out)
    assert (row["face"], row["error"]) == (None, "no_face_found") and "age" not in row


def test_faces_on_a_real_photo_are_boxed_in_its_own_pixels(tmp_path, checkpoint):
    pytest.importorskip("dlib")
    photo = next(iter(sorted((shared_dataset("fgnet-dev") / "images").glob("*A2[0-9]*.JPG"))))
    width, height = Image.open(photo).size
    out = tmp_path / "rows.jsonl"
    annotated = tmp_path / "drawn"
    assert predict(photo, "--model", checkpoint, "--out", out, "--annotate", annotated,
                   "--probs", "--workers", "1") == 0
    rows = read_rows(out)
    assert rows[0]["face"] == 0 and rows[0]["error"] is None
    x0, y0, x1, y1 = rows[0]["box"]
    assert 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height
    assert len(rows[0]["probs"]) == len(AGES)
    (drawn,) = annotated.glob("*.jpg")
    assert Image.open(drawn).size[0] == min(width, 1600)


def test_a_video_gives_one_row_per_sampled_frame_with_its_time(tmp_path, checkpoint):
    cv2 = pytest.importorskip("cv2")
    video = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 10.0, (64, 48))
    rng = np.random.default_rng(0)
    for _ in range(25):  # 2.5 s at 10 fps
        writer.write(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8))
    writer.release()
    fake = tmp_path / "fake.mp4"
    fake.write_text("not a video\n")
    out = tmp_path / "rows.jsonl"
    assert predict(video, fake, "--model", checkpoint, "--detector", "none", "--video-fps", "2",
                   "--out", out, "--workers", "1") == 0
    rows = read_rows(out)
    assert [r["time"] for r in rows if r["file"] == str(video)] == [0.0, 0.5, 1.0, 1.5, 2.0]
    assert [r["error"] for r in rows if r["file"] == str(fake)] == ["unsupported_video"]


def test_worker_processes_keep_the_input_order(tmp_path, checkpoint):
    for i in range(6):
        write_image(tmp_path / "in" / f"{i}.png", (40 + 8 * i, 40), fmt="PNG", seed=i)
    one, two = tmp_path / "one.jsonl", tmp_path / "two.jsonl"
    for out, workers in ((one, 1), (two, 2)):
        assert predict(tmp_path / "in", "--model", checkpoint, "--detector", "none", "--out", out,
                       "--workers", workers) == 0
    assert read_rows(one) == read_rows(two)
    assert [Path(r["file"]).name for r in read_rows(two)] == [f"{i}.png" for i in range(6)]


@pytest.mark.parametrize("argv, message", [
    (["--model", "missing.pt"], "--model missing.pt: no such file"),
    (["--detector", "none"], "INPUT nowhere: no such file or folder"),
    (["--out", "rows.txt"], "use a .jsonl or .csv file name"),
    (["--out", "rows.csv", "--probs"], "--probs needs JSON output"),
])
def test_usage_errors_are_one_line_and_exit_2(tmp_path, checkpoint, capsys, argv, message):
    photo = write_image(tmp_path / "a.png", fmt="PNG")
    inputs = ["nowhere"] if "INPUT" in message else [photo]
    argv = argv if "--model" in argv else [*argv, "--model", checkpoint]
    assert predict(*inputs, *argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_a_checkpoint_without_a_recipe_warns_and_uses_the_defaults(tmp_path):
    old = write_checkpoint(tmp_path / "old.pt", seed=0)
    with pytest.warns(UserWarning, match="records no crop recipe"):
        engine = TorchEngine(old, "cpu")
    assert engine.recipe == CropRecipe(size=32)


def test_each_face_is_framed_by_the_recipe():
    """A detector box is grown by the recipe's margin into a square window of the photo (real
    background around the face); the whole-image "face" of --detector none gets no margin."""
    pixels = np.random.default_rng(0).integers(0, 256, (100, 100, 3), np.uint8)
    image = Image.fromarray(pixels)
    box = Detection((40.0, 40.0, 60.0, 60.0), 1.0, "dlib")  # margin 0.5: window 30..70
    (crop,) = cut(image, [box], CropRecipe(margin=0.5, size=40))
    np.testing.assert_array_equal(crop, pixels[30:70, 30:70])
    whole = analyse_image(image, FaceSettings(CropRecipe(margin=0.5, size=100), detector="none"))
    np.testing.assert_array_equal(whole.crops[0], pixels)
    # a model trained on whole chips: the chip's measured size and offset around the face box
    chip = CropRecipe(box_policy="image", size=40, window=2.0, offset=(0.0, -0.1))
    (crop,) = cut(image, [box], chip)  # side 2 x 20, centre (50, 48)
    np.testing.assert_array_equal(crop, pixels[28:68, 30:70])


def test_the_interval_holds_the_distribution_and_the_minor_mass_is_below_18():
    ages = np.array([5.0, 15.0, 25.0, 35.0])
    probs = np.array([[0.0, 0.0, 1.0, 0.0], [0.25, 0.25, 0.25, 0.25]])
    out = summarise(probs, ages)
    np.testing.assert_allclose(out["age"], [25.0, 20.0])
    np.testing.assert_allclose(out["age_std"], [0.0, np.sqrt(125.0)])
    assert list(out["age_low"]) == [25.0, 5.0] and list(out["age_high"]) == [25.0, 35.0]
    np.testing.assert_allclose(out["p_under_18"], [0.0, 0.5])


def test_the_temperature_widens_the_interval_and_leaves_the_age():
    ages = np.array([10.0, 20.0, 30.0, 40.0, 50.0])
    probs = np.array([[0.005, 0.03, 0.93, 0.03, 0.005]])
    cold, warm = summarise(probs, ages), summarise(probs, ages, temperature=1.5)
    assert warm["age"] == pytest.approx(cold["age"])  # the network's own expected value
    assert (cold["age_low"][0], cold["age_high"][0]) == (30.0, 30.0)
    # tempered, 10 holds 2.4 % and 20 holds 8.0 %: the 5 % quantiles move out to 20 and 40
    assert (warm["age_low"][0], warm["age_high"][0]) == (20.0, 40.0)
    assert warm["age_std"][0] > cold["age_std"][0]
    two = summarise(np.array([[0.8, 0.2]]), np.array([10.0, 30.0]), temperature=2.0)
    # sqrt(0.8) / (sqrt(0.8) + sqrt(0.2)) = 2/3 of the mass is under 18; the age stays 14
    np.testing.assert_allclose([two["p_under_18"][0], two["age"][0]], [2 / 3, 14.0])


def test_predict_calibrates_with_the_checkpoints_temperature(tmp_path):
    plain = TorchEngine(write_checkpoint(tmp_path / "plain.pt", seed=4), "cpu")
    tempered = TorchEngine(write_checkpoint(tmp_path / "warm.pt", seed=4, temperature=3.0), "cpu")
    assert (plain.temperature, tempered.temperature) == (1.0, 3.0)  # 1: no temperature stored
    crops = np.random.default_rng(5).integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    cold, _ = Predictor(plain).estimate(crops)
    warm, probs = Predictor(tempered).estimate(crops)
    np.testing.assert_allclose(warm["age"], cold["age"], atol=1e-6)
    expected = summarise(probs, tempered.ages, temperature=3.0)
    for key in ("age_std", "age_low", "age_high", "p_under_18"):
        np.testing.assert_allclose(warm[key], expected[key], err_msg=key)
    assert not np.allclose(warm["age_std"], cold["age_std"])


def test_predict_reads_the_ages_through_the_checkpoints_bias_line(tmp_path):
    plain = TorchEngine(write_checkpoint(tmp_path / "plain.pt", seed=4), "cpu")
    lined = TorchEngine(write_checkpoint(tmp_path / "line.pt", seed=4, bias_line=[0.8, 6.0]), "cpu")
    assert (plain.bias_line, lined.bias_line) == ((1.0, 0.0), (0.8, 6.0))  # none stored: none
    crops = np.random.default_rng(5).integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    raw, _ = Predictor(plain).estimate(crops)
    read, probs = Predictor(lined).estimate(crops)
    np.testing.assert_allclose(read["age"], (raw["age"] - 6.0) / 0.8, rtol=1e-6)  # classes 10..70: none clipped
    np.testing.assert_allclose(read["age_std"], raw["age_std"] / 0.8, rtol=1e-6)
    # the interval's ends are class ages read through the line: 10 -> 5, 20 -> 17.5, ...
    np.testing.assert_allclose(read["age_low"], (raw["age_low"] - 6.0) / 0.8)
    # under 18 now also takes the class of 20 (17.5 as read)
    np.testing.assert_allclose(read["p_under_18"], probs[:, :2].sum(axis=1), rtol=1e-5)


def test_bias_line_ages_are_never_below_zero():
    from agecascade.train.calibration import corrected_ages

    np.testing.assert_allclose(corrected_ages(np.array([1.0, 3.0, 12.0]), (0.9, 2.0)),
                               [0.0, 1 / 0.9, 10 / 0.9])


def test_the_predictor_batches_any_number_of_crops(checkpoint):
    predictor = Predictor(TorchEngine(checkpoint, "cpu"), batch=4)
    crops = np.random.default_rng(2).integers(0, 256, (10, 48, 48, 3), dtype=np.uint8)
    estimates, probs = predictor.estimate(crops)
    assert probs.shape == (10, len(AGES)) and estimates["age"].shape == (10,)
    one = Predictor(TorchEngine(checkpoint, "cpu"), batch=64).estimate(crops)[0]["age"]
    np.testing.assert_allclose(estimates["age"], one, atol=1e-4)


def test_auto_uses_the_detector_that_framed_the_training_crops(tmp_path, capsys):
    """Detectors differ in how much of a face their box takes: a model trained on Haar-framed
    crops is served Haar boxes under --detector auto, whatever auto would pick otherwise."""
    pytest.importorskip("cv2")
    model = write_checkpoint(tmp_path / "haar.pt", seed=0, crop={**RECIPE, "box_source": "haar"})
    photo = write_image(tmp_path / "a.png", fmt="PNG")
    assert predict(photo, "--model", model, "--workers", "1", "--out", tmp_path / "r.jsonl") == 0
    assert re.search(r"detector haar(, else mtcnn)?, framing box\)", capsys.readouterr().err)


def test_a_model_of_aligned_chips_gets_aligned_faces_or_a_warning(tmp_path, capsys, monkeypatch):
    """A recipe with a landmark template frames faces by their landmarks; without dlib's shape
    predictor, predict says so and falls back to the box window instead of failing."""
    pytest.importorskip("face_recognition_models")
    import agecascade.inference.faces as faces_module

    photo = sorted((shared_dataset("fgnet-dev") / "images").glob("*.JPG"))[0]
    template = [[0.77, 0.3], [0.61, 0.31], [0.22, 0.3], [0.37, 0.31], [0.49, 0.59]]
    crop = {**RECIPE, "box_policy": "image", "box_source": "dlib", "window": 1.1,
            "template": template}
    model = write_checkpoint(tmp_path / "chips.pt", seed=0, crop=crop)
    argv = (photo, "--model", model, "--workers", "1", "--out", tmp_path / "r.jsonl")
    assert predict(*argv) == 0
    assert re.search(r"detector dlib(, else mtcnn)?, framing landmarks\)", capsys.readouterr().err)
    monkeypatch.setattr(faces_module, "landmarks_available", lambda: False)
    with pytest.warns(UserWarning, match="shape predictor is not installed"):
        assert predict(*argv) == 0
    assert "framing box)" in capsys.readouterr().err


def test_flip_averages_a_face_with_its_mirror_image(checkpoint):
    """Flip TTA: the estimate of a crop is the mean distribution of the crop and its mirror, so
    a crop and its mirror get the same age, and without flip they (generally) do not."""
    engine = TorchEngine(checkpoint, "cpu")
    crops = np.random.default_rng(3).integers(0, 256, (3, 48, 48, 3), dtype=np.uint8)
    mirrored = np.ascontiguousarray(crops[:, :, ::-1])
    flipped = Predictor(engine, flip=True)
    np.testing.assert_allclose(flipped.probs(crops), flipped.probs(mirrored), atol=1e-6)
    plain = Predictor(engine, flip=False)
    np.testing.assert_allclose(flipped.probs(crops),
                               (plain.probs(crops) + plain.probs(mirrored)) / 2, atol=1e-6)
    assert not np.allclose(plain.probs(crops), plain.probs(mirrored), atol=1e-4)


def test_a_fallback_detector_looks_again_where_the_first_finds_no_face(tmp_path, capsys):
    """dlib's HOG misses this turned baby (FG-NET 025A00). By default (--fallback auto) MTCNN
    looks again, finds it, and its box is given dlib's framing (the model's crops were aligned
    from dlib boxes); with --fallback none the photo has no face."""
    pytest.importorskip("dlib")
    pytest.importorskip("facenet_pytorch")
    photo = shared_dataset("fgnet-dev") / "images" / "025A00.JPG"
    model = write_checkpoint(tmp_path / "model.pt", seed=0, crop={**RECIPE, "box_source": "dlib"})
    found, alone = tmp_path / "fallback.jsonl", tmp_path / "alone.jsonl"
    assert predict(photo, "--model", model, "--out", found, "--workers", "1") == 0
    assert "detector dlib, else mtcnn," in capsys.readouterr().err
    assert predict(photo, "--model", model, "--fallback", "none", "--out", alone,
                   "--workers", "1") == 0
    (row,) = read_rows(found)
    assert row["detector"] == "mtcnn" and row["error"] is None and "age" in row
    x0, y0, x1, y1 = row["box"]
    assert abs((x1 - x0) - (y1 - y0)) < 0.2  # dlib's square box, not MTCNN's tall one
    assert [r["error"] for r in read_rows(alone)] == ["no_face_found"]
