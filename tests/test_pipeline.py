"""The demo pipeline as `make run` drives it: demo data, `dvc repro`, and a no-op second repro."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO
from test_adience import assert_beats_majority

DATASETS = ["imdb", "agedb", "fgnet", "adience", "utkface"]
BACKBONES = ["vgg16", "resnet50", "senet50"]


def project_files() -> list[str]:
    """What a clone would hold: tracked plus not-ignored files (so uncommitted work is tested too)."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO,
                            capture_output=True, text=True)
    if listed.returncode != 0:
        pytest.skip("not a git checkout")
    return [f for f in listed.stdout.splitlines() if (REPO / f).is_file()]


def run(cmd: list[str], cwd: Path) -> str:
    """``cmd`` in ``cwd`` as a user's fresh shell runs it: with the venv on PATH, and without the
    MLFLOW_TRACKING_URI that MLflow's set_tracking_uri leaves in this process's environment (the
    pipeline must log to the clone's own store)."""
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def repro_once(tmp_path_factory) -> tuple[Path, str]:
    clone = tmp_path_factory.mktemp("clone")
    for name in project_files():
        (clone / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, clone / name)
    run(["git", "init", "-q"], clone)
    run(["git", "add", "-A"], clone)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "clone"], clone)
    run(["agecascade", "demo-data", "--out", "data"], clone)
    # as `make demo-data` does: refuses (no --force) unless the demo data hashes to data.dvc
    run(["dvc", "commit", "data.dvc"], clone)
    return clone, run(["dvc", "repro"], clone)


def test_repro_prepares_every_demo_dataset(repro_once):
    clone, log = repro_once
    for name in DATASETS:
        assert f"Running stage 'prepare@{name}'" in log
        counts = json.loads((clone / "prepared" / name / "counts.json").read_text())
        assert counts["kept"] > 0 and counts["kept"] + counts["dropped"] == counts["input_rows"]
    imdb = json.loads((clone / "prepared" / "imdb" / "counts.json").read_text())
    for rule in ("age_out_of_range", "face_score_below_1", "second_face", "gender_missing"):
        assert imdb[f"dropped.{rule}"] > 0  # the demo's planted label noise reaches the report


def test_second_repro_is_a_no_op(repro_once):
    clone, _ = repro_once
    log = run(["dvc", "repro"], clone)
    assert "Running stage" not in log and "Data and pipelines are up to date." in log


def test_status_is_clean_whatever_the_bytecode(repro_once):
    """Bytecode is ignored (.dvcignore): written by pytest, deleted, or another Python's."""
    clone, _ = repro_once
    assert json.loads(run(["dvc", "status", "--json"], clone)) == {}
    for folder in ("src/agecascade", "src/agecascade/nets", "pipelines"):
        cache = clone / folder / "__pycache__"
        cache.mkdir(exist_ok=True)
        (cache / "stray.cpython-311.pyc").write_bytes(b"\x00" * 16)
    (clone / "src" / "agecascade" / "loose.pyc").write_bytes(b"\x00" * 16)
    assert json.loads(run(["dvc", "status", "--json"], clone)) == {}
    for cache in [*clone.glob("src/**/__pycache__"), *clone.glob("pipelines/**/__pycache__")]:
        shutil.rmtree(cache)
    (clone / "src" / "agecascade" / "loose.pyc").unlink()
    assert json.loads(run(["dvc", "status", "--json"], clone)) == {}


def lock_inputs(lock: Path) -> dict[str, dict]:
    """stage -> {path: md5} of its data and code deps, and its params, from a dvc.lock."""
    import yaml

    stages = yaml.safe_load(lock.read_text())["stages"]
    return {name: {"deps": {d["path"]: d["md5"] for d in stage.get("deps", [])
                            if d["path"].startswith(("data/", "src/", "pipelines/"))},
                   "params": stage.get("params", {})}
            for name, stage in stages.items()}


def test_committed_lock_matches_a_fresh_run(repro_once):
    """The committed dvc.lock records the code, data and params a fresh clone runs with, so a
    user's `dvc status` on a checkout says what really changed."""
    clone, _ = repro_once
    committed, fresh = lock_inputs(REPO / "dvc.lock"), lock_inputs(clone / "dvc.lock")
    stale = {name: sorted(path for path, md5 in inputs["deps"].items()
                          if committed.get(name, {}).get("deps", {}).get(path) != md5)
             for name, inputs in fresh.items()}
    stale = {name: paths for name, paths in stale.items() if paths}
    assert not stale, f"dvc.lock is stale (commit a fresh run's dvc.lock): {stale}"
    assert {n: i["params"] for n, i in committed.items()} == {n: i["params"] for n, i in fresh.items()}


def test_metrics_show_lists_the_drop_counts(repro_once):
    clone, _ = repro_once
    shown = json.loads(run(["dvc", "metrics", "show", "--json"], clone))
    files = next(iter(shown.values()))["data"]
    assert {f"prepared/{name}/counts.json" for name in DATASETS} <= set(files)


def test_cascade_stages_run_for_every_backbone_and_are_tracked(repro_once):
    import mlflow

    clone, log = repro_once
    for name in BACKBONES:
        for stage in ("tune", "finetune_imdb", "finetune_agedb"):
            assert f"Running stage '{stage}@{name}'" in log
        best = json.loads((clone / "models" / name / "tune" / "best.json").read_text())
        assert {"lr", "batch", "val_loss"} <= set(best)
        assert (clone / "models" / name / "agedb" / "model.pt").is_file()
    mlflow.set_tracking_uri(f"sqlite:///{clone / 'mlflow.db'}")
    for stage in ("tune", "finetune_imdb", "finetune_agedb"):
        runs = mlflow.search_runs(experiment_names=[stage], output_format="list")
        parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
        assert sorted(r.data.tags["backbone"] for r in parents) == sorted(BACKBONES)
    trials = mlflow.search_runs(experiment_names=["tune"], output_format="list")
    assert len(trials) > len(BACKBONES)  # grid points are nested runs


@pytest.mark.parametrize("backbone", BACKBONES)
def test_demo_cascade_learns(repro_once, backbone):
    """After IMDB -> AgeDB every network beats predicting the median age by a clear margin
    (a network that learnt nothing sits at the baseline or above it: VGG-16 with dropout in its
    head, or at an AgeDB lr of 0.001, ended at 18.2 and 17.9 against the median's 17.8)."""
    clone, _ = repro_once
    metrics = json.loads((clone / "models" / backbone / "agedb" / "metrics.json").read_text())
    assert metrics["val_mae"] < 0.9 * metrics["val_mae_median_baseline"]


@pytest.mark.parametrize("backbone", BACKBONES)
def test_demo_protocols_beat_their_trivial_baselines(repro_once, backbone):
    """FG-NET modes b and c against the median predictor (per held-out subject, the median age
    of the others), Adience 8 and 3 groups against the training folds' majority class: a demo
    whose numbers sit at the baseline cannot tell a user whether the code works."""
    clone, _ = repro_once
    for mode in "bc":
        metrics = json.loads((clone / "models" / backbone / f"fgnet_{mode}" / "metrics.json").read_text())
        assert metrics["mae"] < 0.95 * metrics["mae_median_baseline"], (mode, metrics)
    adience = json.loads((clone / "models" / backbone / "adience" / "metrics.json").read_text())
    assert_beats_majority(adience, margin=0.05)
    summary = (clone / "reports" / "summary.md").read_text()
    assert "median predictor" in summary.lower() and "majority" in summary.lower()


def test_target_protocols_report_and_registry(repro_once):
    """The rest of figure 8: LOPO in every mode, Adience, features, CAM, report, registry."""
    import mlflow
    import numpy as np
    import pandas as pd

    clone, log = repro_once
    for name in BACKBONES:
        for mode in "abc":
            assert f"Running stage 'lopo_{mode}@{name}'" in log
            metrics = json.loads((clone / "models" / name / f"fgnet_{mode}" / "metrics.json").read_text())
            assert metrics["n_folds"] == 12 and metrics["mode"] == mode  # every demo subject
        adience = json.loads((clone / "models" / name / "adience" / "metrics.json").read_text())
        assert adience["n_folds"] == 5 and 0 <= adience["minors_recall"] <= 1
        assert (clone / "reports" / "cam" / f"{name}.png").stat().st_size > 10_000
    features = json.loads((clone / "models" / "vgg16" / "features" / "results.json").read_text())
    assert {r["engine"] for r in features["rows"] if r["status"] == "ok"} >= {"hgb", "flaml"}
    summary = (clone / "reports" / "summary.md").read_text()
    for heading in ("Table 4", "Table 5", "Adience", "3 groups", "Error analysis", "Registry"):
        assert heading in summary, heading
    registry = json.loads((clone / "reports" / "registry.json").read_text())
    mlflow.set_tracking_uri(f"sqlite:///{clone / 'mlflow.db'}")
    version = mlflow.MlflowClient().get_model_version_by_alias("age-estimator", "champion")
    assert int(version.version) == registry["version"]
    lopo_runs = mlflow.search_runs(experiment_names=["fgnet_lopo"], output_format="list")
    assert len(lopo_runs) == 9 * 13  # 9 parents, 12 nested fold runs each
    cwd = os.getcwd()
    os.chdir(clone)  # the registry's artifacts live under the clone's mlruns/
    try:
        model = mlflow.pyfunc.load_model("models:/age-estimator@champion")
    finally:
        os.chdir(cwd)
    crops = np.random.default_rng(0).integers(0, 255, (4, 64, 64, 3), dtype=np.uint8)
    ages = model.unwrap_python_model().predict_crops(crops)
    assert ages.shape == (4,) and np.all((ages >= 0) & (ages <= 101))
    photo = next((clone / "data" / "fgnet").rglob("*.[jJ][pP][gG]"))
    rows = model.predict(pd.DataFrame({"image": [photo.read_bytes()]}), params={"detector": "none"})
    assert rows["error"][0] is None and 0 <= rows["age"][0] <= 101
    onnx = mlflow.MlflowClient().get_model_version_by_alias("age-estimator-onnx", "champion")
    assert int(onnx.version) == registry["onnx"]["version"]
    mlmodels = list(clone.glob("mlruns/*/models/*/artifacts/MLmodel"))
    assert mlmodels and not [m for m in mlmodels if "pickle" in m.read_text()]


def test_kill_9_under_dvc_resumes_and_ends_like_the_uninterrupted_run(repro_once):
    """The issue's scenario: `dvc repro -s -f` killed after epoch 2 (DVC had already deleted
    model.pt), then `dvc repro -s` resumes from last.pt and ends with the same metrics. Last in
    this file: it adds MLflow runs that the tests above count."""
    clone, _ = repro_once
    stage, out = "finetune_imdb@resnet50", clone / "models" / "resnet50" / "imdb"
    uninterrupted = json.loads((out / "metrics.json").read_text())
    env = {**os.environ, "PYTHONUNBUFFERED": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.Popen(["dvc", "repro", "-s", "-f", stage], cwd=clone, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if line.startswith("epoch 2/"):
            break
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert seen and seen[-1].startswith("epoch 2/"), "".join(seen)
    log = run(["dvc", "repro", "-s", stage], clone)
    assert "resuming from epoch 2" in log, log
    retrained = [l for l in log.splitlines() if l.startswith(("epoch 1/", "epoch 2/"))]
    assert not retrained  # finished epochs are not trained again
    assert json.loads((out / "metrics.json").read_text()) == uninterrupted
    assert not (out / "last.pt").exists()
