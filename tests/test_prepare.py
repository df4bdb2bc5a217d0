"""`agecascade prepare` end to end: bad files are counted and named, the store matches the manifest."""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

import agecascade.data.cropper as cropper
from agecascade import config as cli_config
from agecascade.cli import build_parser, main
from agecascade.data.cropper import CropJob, crop_file
from agecascade.data.prepare import PrepareConfig, run
from agecascade.data.store import create_store, load_prepared, shrink_store
from agecascade.errors import UserError
from conftest import REPO, write_image
from imdb_files import datenum, write_imdb
from prepare_hooks import DIE_MARK

TESTS = Path(__file__).resolve().parent
SETTINGS = PrepareConfig(dataset="agedb", root=Path("in"), out=Path("out")).crop_settings


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


# --- one bad file never stops the run; a dead worker stops it at once, with a clear error ---

def test_any_exception_while_cropping_becomes_a_named_drop(tmp_path, monkeypatch):
    def out_of_memory(*_args):
        raise MemoryError("cannot allocate 9 GiB")

    monkeypatch.setattr(cropper, "crop_face", out_of_memory)
    result = crop_file(CropJob(str(write_image(tmp_path / "a.jpg")), None, None), SETTINGS)
    assert result.reason == "processing_error" and result.crop is None
    assert "MemoryError: cannot allocate 9 GiB" in result.detail and "test_prepare.py" in result.detail


def test_one_file_failing_in_a_library_is_dropped_and_the_run_goes_on(tmp_path, monkeypatch):
    root = tmp_path / "agedb"
    for i, side in enumerate([60, 50, 70]):
        write_image(root / f"{i}_Ann_{20 + i}_f.jpg", (side, side))
    real_detect = cropper.detect_face

    def detect(image):  # a detector bug that only one image triggers
        if image.width == 50:
            raise RuntimeError("dlib: unexpected image layout")
        return real_detect(image)

    monkeypatch.setattr(cropper, "detect_face", detect)
    assert run_prepare("agedb", root, tmp_path / "out", "--workers", "1") == 0
    counts = json.loads((tmp_path / "out" / "counts.json").read_text())
    assert counts["kept"] == 2 and counts["dropped.processing_error"] == 1
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["dropped_files"][0]["path"] == "1_Ann_21_f.jpg"
    assert "RuntimeError: dlib: unexpected image layout" in report["dropped_files"][0]["detail"]


def test_a_fifo_named_like_an_image_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "face.jpg"
    os.mkfifo(fifo)  # opening it for reading would wait for a writer forever
    result = crop_file(CropJob(str(fifo), None, None), SETTINGS)
    assert result.reason == "not_a_regular_file"


def test_files_over_the_size_cap_are_dropped_unread(tmp_path):
    root = tmp_path / "agedb"
    big = write_image(root / "0_Ann_20_f.jpg", (200, 200), quality=100)   # noise: ~ 40 KB
    small = root / "1_Ann_30_f.jpg"
    Image.new("RGB", (32, 32), "grey").save(small)                        # ~ 0.6 KB
    assert big.stat().st_size > 10_000 > small.stat().st_size
    out = tmp_path / "out"
    assert run_prepare("agedb", root, out, "--workers", "1", "--box", "image",
                       "--max-file-mb", str(10_000 / 2**20)) == 0
    report = json.loads((out / "report.json").read_text())
    assert [(d["path"], d["reason"]) for d in report["dropped_files"]] == [(big.name, "file_too_large")]
    assert report["kept"] == 1 and report["crops"]["max_file_bytes"] == 10_000


@pytest.fixture
def trap_folder(tmp_path: Path) -> Path:
    """IMDB layout holding the issue's three traps beside four good rows: a face box of 1e5 px
    on a 96 px image, a full_path climbing out of the root with ``../``, and a file whose name
    makes the test hook's worker kill itself."""
    root = tmp_path / "imdb"
    write_image(tmp_path / "outside.jpg")  # the ``../`` row points here
    ok = {"dob": datenum(1970, 1, 1), "taken": 2000}
    rows = [{**ok, "path": f"01/good{i}.jpg"} for i in range(4)]
    rows += [{**ok, "path": "02/absurd_box.jpg", "box": (1.0, 1.0, 1e5, 1e5)},
             {**ok, "path": "../../outside.jpg", "write": False},
             {**ok, "path": f"03/{DIE_MARK}.jpg"}]
    write_imdb(root, rows)
    return root


def test_trap_folder_completes_with_every_trap_named(trap_folder, tmp_path):
    """Before: the absurd box raised DecompressionBombError in a worker and killed the run."""
    out = tmp_path / "out"
    assert run_prepare("imdb", trap_folder, out, "--workers", "2") == 0
    report = json.loads((out / "report.json").read_text())
    assert report["dropped"] == {"path_outside_root": 1}
    assert report["dropped_files"][0]["path"] == "imdb_crop/../../outside.jpg"
    unusable = [d["path"] for d in report["warning_files"] if d["reason"] == "dataset_box_unusable"]
    assert unusable == ["imdb_crop/02/absurd_box.jpg"]
    manifest, crops = load_prepared(out)
    assert len(manifest) == len(crops) == 6
    absurd = manifest.set_index("path").loc["imdb_crop/02/absurd_box.jpg"]
    assert absurd["box_source"] != "metadata" and absurd["x1"] <= 96


def run_with_dying_worker(*argv: str) -> subprocess.CompletedProcess:
    """The CLI with the test hook's crop function; a hang fails the test by timing out."""
    code = "import prepare_hooks; prepare_hooks.run()"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True,
                          env=env, timeout=180)


def test_a_worker_killed_by_a_signal_ends_the_run_with_a_clear_error(trap_folder, tmp_path):
    """Before: the spawn pool's imap waited forever for the dead worker's results."""
    out = tmp_path / "out"
    proc = run_with_dying_worker("prepare", "imdb", "--root", str(trap_folder), "--out", str(out),
                                 "--size", "32", "--workers", "2")
    assert proc.returncode == 2, proc.stderr
    assert "worker process died" in proc.stderr and "SIGKILL" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert list(out.iterdir()) == []  # not even the half-filled crop store


def test_a_failed_rerun_leaves_the_previous_outputs_as_they_were(trap_folder, tmp_path):
    """Before: the rerun opened crops.npy in place, so the old manifest described new crops."""
    out = tmp_path / "out"
    run(PrepareConfig(dataset="imdb", root=trap_folder, out=out, size=32, workers=1))
    before = {f.name: f.read_bytes() for f in out.iterdir()}
    assert set(before) == {"manifest.parquet", "crops.npy", "report.json", "counts.json"}
    proc = run_with_dying_worker("prepare", "imdb", "--root", str(trap_folder), "--out", str(out),
                                 "--size", "48", "--workers", "2")
    assert proc.returncode == 2 and "worker process died" in proc.stderr
    assert {f.name: f.read_bytes() for f in out.iterdir()} == before


# --- settings: one frozen dataclass holds them; the command line is built from it -------------

def parse(argv: list[str]) -> tuple[argparse.Namespace, PrepareConfig]:
    args = build_parser("prepare").parse_args(argv)
    return args, cli_config.from_args(PrepareConfig, args)


def test_parser_defaults_are_the_config_defaults():
    args, config = parse(["prepare", "fgnet", "--root", "r", "--out", "o"])
    fields = dataclasses.fields(PrepareConfig)
    assert {f.name for f in fields} <= set(vars(args))  # every setting has its option
    defaults = {f.name: f.default for f in fields if f.default is not dataclasses.MISSING}
    assert {name: getattr(config, name) for name in defaults} == defaults
    assert (config.dataset, config.root, config.out) == ("fgnet", Path("r"), Path("o"))


def test_dvc_command_for_fgnet_parses_into_the_params():
    """The command as DVC resolves it, against params.yaml: a setting that dvc.yaml forgets to
    pass, or passes under another name, fails here."""
    from dvc.repo import Repo

    with Repo(str(REPO)) as repo:
        commands = {stage.addressing: stage.cmd for stage in repo.index.stages}
    argv = shlex.split(commands["prepare@fgnet"])
    assert argv[0] == "agecascade"
    _, config = parse(argv[1:])
    params = yaml.safe_load((REPO / "params.yaml").read_text())["prepare"]
    shared = {name: value for name, value in params.items() if name != "datasets"}
    assert {name: getattr(config, name) for name in shared} == shared
    item = params["datasets"]["fgnet"]
    assert config.root == Path("data", item["root"])
    assert {name: getattr(config, name) for name in item if name != "root"} == \
        {name: value for name, value in item.items() if name != "root"}
    assert (config.dataset, config.out) == ("fgnet", Path("prepared/fgnet"))


@pytest.mark.parametrize("flag, value, named", [
    ("--size", "4", "--size 4"), ("--margin", "3", "--margin 3.0"),
    ("--margin", "nan", "--margin nan"), ("--workers", "0", "--workers 0"),
    ("--max-pixels", "0", "--max-pixels 0"), ("--max-file-mb", "0", "--max-file-mb 0.0"),
    ("--max-file-mb", "inf", "--max-file-mb inf"),
])
def test_a_bad_value_is_one_line_naming_it_and_exit_2(tmp_path, capsys, flag, value, named):
    root = tmp_path / "agedb"
    write_image(root / "0_Ann_20_f.jpg")
    assert run_prepare("agedb", root, tmp_path / "out", flag, value) == 2
    err = capsys.readouterr().err
    assert err.startswith("agecascade prepare: error: ") and err.count("\n") == 1
    assert named in err
    assert not (tmp_path / "out").exists()  # refused before any work


def test_config_names_every_bad_setting_at_once():
    with pytest.raises(UserError) as caught:
        PrepareConfig(dataset="celeba", root=Path("r"), out=Path("o"), size=4, box="face")
    text = str(caught.value)
    assert "dataset 'celeba'" in text and "--size 4" in text and "--box 'face'" in text
    assert "--margin" not in text and "\n" not in text



def test_whole_chip_crops_record_how_they_frame_the_face(tmp_path):
    """`--box image` keeps the whole chip, and measures where the detector finds the face in it,
    so that `predict` can frame a detected face in a photo as the chips frame theirs."""
    pytest.importorskip("dlib")
    from conftest import shared_dataset

    from agecascade.data.store import crop_recipe

    chips = sorted(shared_dataset("utkface-dev").rglob("*.chip.jpg"))[:12]
    (tmp_path / "utk").mkdir()
    for chip in chips:
        (tmp_path / "utk" / chip.name).symlink_to(chip)
    assert main(["prepare", "utkface", "--root", str(tmp_path / "utk"), "--out",
                 str(tmp_path / "out"), "--size", "64", "--box", "image", "--workers", "1"]) == 0
    framing = json.loads((tmp_path / "out" / "report.json").read_text())["crops"]["framing"]
    assert framing["detector"] == "dlib" and framing["measured"] >= 10
    assert 1.0 < framing["window"] < 1.4  # UTKFace chips: the face fills most of the chip
    recipe = crop_recipe(tmp_path / "out")
    assert (recipe.box_policy, recipe.box_source, recipe.window) == ("image", "dlib",
                                                                     framing["window"])
    # where dlib's five landmarks sit in the chips: eye corners level, above the nose base
    pytest.importorskip("face_recognition_models")
    template = np.array(framing["template"])
    assert framing["template_measured"] == framing["measured"] and template.shape == (5, 2)
    assert ((0.1 < template) & (template < 0.9)).all() and np.ptp(template[:4, 1]) < 0.05
    assert template[4, 1] > template[:4, 1].max() + 0.1
    assert recipe.template == tuple(map(tuple, template))


def test_aligned_chips_put_every_face_s_landmarks_on_the_template(tmp_path):
    """`--box aligned` warps each chip so that its landmarks sit on the chips' median place, as
    `predict` warps a real face: found again in the stored crops, the landmarks lie closer to the
    template than in the raw chips, a chip without a face is counted, and the recipe says so."""
    pytest.importorskip("face_recognition_models")
    from conftest import shared_dataset

    from agecascade.data.cropper import face_framing
    from agecascade.data.landmarks import scale_and_shift
    from agecascade.data.store import crop_recipe

    chips = sorted(shared_dataset("utkface-dev").rglob("*.chip.jpg"))[:12]
    (tmp_path / "utk").mkdir()
    for chip in chips:
        (tmp_path / "utk" / chip.name).symlink_to(chip)
    Image.new("RGB", (200, 200), (90, 120, 150)).save(tmp_path / "utk" / "30_0_0_1.jpg.chip.jpg")

    def spread(box: str) -> float:
        out = tmp_path / box
        assert main(["prepare", "utkface", "--root", str(tmp_path / "utk"), "--out", str(out),
                     "--size", "128", "--box", box, "--workers", "1"]) == 0
        template = np.array(crop_recipe(out).template)
        found = [face_framing(Image.fromarray(crop)) for crop in np.load(out / "crops.npy")]
        # how far each crop's face is from the template in zoom (log scale) and place
        fits = [scale_and_shift(np.array(f.landmarks), template) for f in found if f is not None]
        return float(np.median([abs(np.log(zoom)) + np.hypot(*shift) for zoom, shift in fits]))

    raw, aligned = spread("image"), spread("aligned")
    assert aligned < 0.5 * raw, (raw, aligned)
    report = json.loads((tmp_path / "aligned" / "report.json").read_text())
    not_aligned = {Path(f["path"]).name for f in report["warning_files"]
                   if f["reason"] == "not_aligned"}
    assert report["kept"] == 13 and "30_0_0_1.jpg.chip.jpg" in not_aligned
    assert report["warnings"]["not_aligned"] == len(not_aligned) <= 2
    assert crop_recipe(tmp_path / "aligned").box_policy == "aligned"


def test_aligned_chips_need_the_shape_predictor(tmp_path, monkeypatch, capsys):
    import agecascade.data.prepare as prepare

    monkeypatch.setattr(prepare, "landmarks_available", lambda: False)
    root = tmp_path / "utk"
    root.mkdir()
    write_image(root / "30_0_0_1.jpg.chip.jpg", (64, 64))
    assert run_prepare("utkface", root, tmp_path / "out", "--box", "aligned") == 2
    assert "5-point shape predictor" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def _checkpoint_with_recipe(path: Path, **recipe) -> Path:
    import torch

    from agecascade.data.recipe import CropRecipe

    torch.save({"model": {}, "meta": {"crop": dataclasses.asdict(CropRecipe(**recipe))}}, path)
    return path


UTK_TEMPLATE = ((0.7675, 0.3025), (0.6125, 0.3125), (0.2175, 0.3025), (0.3725, 0.3125),
                (0.4925, 0.5925))


@pytest.mark.parametrize("template", [(), UTK_TEMPLATE], ids=["box window", "landmarks"])
def test_like_cuts_the_crops_predict_cuts_and_records_their_framing(tmp_path, template):
    """`prepare --like MODEL` frames each face as MODEL's training crops framed theirs (by the
    box window, or by aligning the landmarks on MODEL's template), so a fine-tune of MODEL on
    this store starts from the view it knows: the very crops `predict` cuts for MODEL, and for
    the fine-tuned model. A photo without a face falls back to the box policy, counted."""
    pytest.importorskip("dlib")
    if template:
        pytest.importorskip("face_recognition_models")
    import torch

    from agecascade.data.landmarks import zoomed
    from agecascade.data.recipe import CropRecipe
    from conftest import shared_dataset

    from agecascade.data.store import crop_recipe
    from agecascade.inference.faces import FaceSettings, analyse_file

    chips = sorted(shared_dataset("utkface-dev").rglob("*.chip.jpg"))[:6]
    root = tmp_path / "utk"
    root.mkdir()
    for chip in chips:
        (root / chip.name).symlink_to(chip)
    Image.new("RGB", (200, 200), (128, 128, 128)).save(root / "30_0_0_20170101000000000.jpg.chip.jpg")
    model = _checkpoint_with_recipe(tmp_path / "model.pt", box_policy="image", size=64,
                                    box_source="dlib", window=1.2, offset=(0.0, 0.05), zoom=0.9,
                                    template=template)
    assert main(["prepare", "utkface", "--root", str(root), "--out", str(tmp_path / "out"),
                 "--size", "64", "--like", str(model), "--workers", "1"]) == 0
    manifest, crops = load_prepared(tmp_path / "out")
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    framing = report["crops"]["framing"]
    assert framing["window"] == pytest.approx(1.2 * 0.9) and framing["offset"] == [0.0, 0.05]
    detected = (manifest["box_source"] == "dlib").to_numpy()
    assert framing["measured"] == detected.sum() >= 5
    assert report["warnings"]["no_face_found"] == (~detected).sum() >= 1
    recipe = crop_recipe(tmp_path / "out")
    settings = FaceSettings(recipe, detector="dlib")
    assert (recipe.box_source, recipe.framing()) == ("dlib", (1.2 * 0.9, 0.0, 0.05))
    assert np.allclose(recipe.template, zoomed(template, 0.9) if template else ())
    for row in np.flatnonzero(detected):
        model_view = analyse_file(str(root / manifest["path"][row]),
                                  FaceSettings(CropRecipe(**torch.load(model)["meta"]["crop"]),
                                               detector="dlib")).crops[0]
        served = analyse_file(str(root / manifest["path"][row]), settings).crops[0]
        assert np.array_equal(model_view, crops[row]) and np.array_equal(served, crops[row])


def test_like_refuses_to_align_without_the_shape_predictor(tmp_path, capsys, monkeypatch):
    """A --like model that aligns faces by landmarks cannot be imitated by box windows: the
    store would record an alignment its crops do not have."""
    import agecascade.data.prepare as prepare_module

    monkeypatch.setattr(prepare_module, "landmarks_available", lambda: False)
    model = _checkpoint_with_recipe(tmp_path / "model.pt", box_policy="image", box_source="dlib",
                                    window=1.1, template=UTK_TEMPLATE)
    assert main(["prepare", "utkface", "--root", str(tmp_path), "--out", str(tmp_path / "out"),
                 "--like", str(model)]) == 2
    assert "shape predictor is not installed" in capsys.readouterr().err


def test_like_refuses_a_model_trained_on_margin_crops(tmp_path, capsys):
    model = _checkpoint_with_recipe(tmp_path / "model.pt", margin=0.3)
    assert main(["prepare", "utkface", "--root", str(tmp_path), "--out", str(tmp_path / "out"),
                 "--like", str(model)]) == 2
    assert "--margin 0.3 instead" in capsys.readouterr().err
