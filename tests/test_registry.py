"""The AgeEstimator pyfunc, the champion/challenger registry and the `register` stage.

One sqlite tracking store per module (logging a model takes seconds); each test registers under
its own model name so the tests do not see each other's versions. conftest.py forbids pickle
(MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false), so every load here also checks that. A test that
takes a by-reference model's checkpoint away puts it back, so every logged model still loads.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from PIL import Image

from agecascade import tracking
from agecascade.candidates import read_candidate
from agecascade.errors import UserError
from agecascade.nets.checkpoint import load_checkpoint
from agecascade.pipelines import register as register_stage
from agecascade.registry import (aliases, checkpoint_reference, promote, register,
                                 run_estimator)
from agecascade.serving import (AgeEstimator, CheckpointRef, dvc_cache_object,
                                log_age_estimator, model_digest)
from agecascade.train.compute import Compute
from agecascade.train.data import make_loader
from agecascade.train.engine import predict
from conftest import AGES, write_checkpoint


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory):
    """A tracking store in a temporary folder (the working directory, so mlruns/ lands there)
    with two checkpoints, each logged as an AgeEstimator in its own run."""
    root = tmp_path_factory.mktemp("registry")
    previous_uri = mlflow.get_tracking_uri()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
        patch.chdir(root)
        checkpoints = [write_checkpoint(root / f"model{i}.pt", seed=i) for i in range(2)]
        runs, uris = [], []
        for checkpoint in checkpoints:
            with mlflow.start_run(experiment_id=tracking.experiment_id("test")) as run:
                uris.append(log_age_estimator(checkpoint).model_uri)
            runs.append(run.info.run_id)
        yield SimpleNamespace(root=root, checkpoints=checkpoints, runs=runs, uris=uris)
    mlflow.set_tracking_uri(previous_uri)


@pytest.fixture(scope="module")
def estimator(store) -> AgeEstimator:
    """The pyfunc's Python model loaded straight from a checkpoint, without MLflow in between."""
    model = AgeEstimator()
    model.load_context(SimpleNamespace(artifacts={"checkpoint": str(store.checkpoints[0])},
                                       model_config=None))
    return model


def faces(n: int, size: tuple[int, int], seed: int) -> np.ndarray:
    """uint8 (n, H, W, 3) with a different brightness per image, so predictions differ."""
    rng = np.random.default_rng(seed)
    noise = rng.integers(0, 60, (n, *size, 3))
    return (noise + np.linspace(0, 190, n).reshape(n, 1, 1, 1)).astype(np.uint8)


def checkpoint_ages(checkpoint: Path, images: np.ndarray, flip: bool = True) -> np.ndarray:
    """The DEX ages the training code itself computes for a uint8 batch; with ``flip``, of each
    image's distribution averaged with its mirror image's, as the AgeEstimator serves them."""
    model, meta = load_checkpoint(checkpoint)
    ages = torch.tensor(meta["ages"])
    probs = []
    views = (images, np.ascontiguousarray(images[:, :, ::-1])) if flip else (images, images)
    for view in views:
        loader = make_loader(view, np.zeros(len(view), dtype=np.int64), np.arange(len(view)),
                             8, False, 0, 0, False)
        logits, _, _ = predict(model, loader, Compute(torch.device("cpu")), meta["input_size"], ages)
        probs.append(logits.softmax(dim=1))
    return ((probs[0] + probs[1]) / 2 @ ages).numpy()


def png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def test_champion_pyfunc_takes_encoded_photos_and_matches_the_checkpoint(store):
    assert register(store.uris[0], "t-serve") == 1
    model = mlflow.pyfunc.load_model("models:/t-serve@champion")
    batch = faces(5, (32, 32), seed=1)  # at the input size: the crop is the image itself
    request = pd.DataFrame({"image": [png(image) for image in batch] + [b"not an image"]})
    answer = model.predict(request, params={"detector": "none", "probs": True})
    assert list(answer["index"]) == [0, 1, 2, 3, 4, 5] and list(answer["face"][:5]) == [0] * 5
    ages = answer["age"][:5].to_numpy(dtype=np.float32)
    assert np.ptp(ages) > 1.0  # the images are told apart: a constant output would hide bugs
    np.testing.assert_allclose(ages, checkpoint_ages(store.checkpoints[0], batch), atol=2e-3)
    assert all(min(AGES) <= low <= high <= max(AGES)
               for low, high in zip(answer["age_low"][:5], answer["age_high"][:5]))
    assert all(len(p) == len(AGES) and abs(sum(p) - 1) < 1e-3 for p in answer["probs"][:5])
    assert answer["box"][0] == [0.0, 0.0, 32.0, 32.0] and answer["detector"][0] == "none"
    bad = answer.iloc[5]  # a broken file is a row with its error, and no invented age
    assert (bad["face"], bad["error"], bad["age"]) == (None, "not_an_image", None)


def test_predict_crops_takes_arrays_and_pil_images_of_any_size(store, estimator):
    batch = faces(5, (32, 32), seed=1)
    ages = estimator.predict_crops(batch)
    assert ages.shape == (5,) and ages.dtype == np.float32
    assert np.all((ages >= min(AGES)) & (ages <= max(AGES)))
    np.testing.assert_allclose(ages, checkpoint_ages(store.checkpoints[0], batch), atol=1e-4)
    images = [Image.fromarray(faces(1, size, seed=2 + i)[0])
              for i, size in enumerate([(20, 30), (64, 64), (48, 80), (64, 64)])]
    mixed = estimator.predict_crops(images)
    one_by_one = [estimator.predict_crops(image)[0] for image in images]  # order is kept
    np.testing.assert_allclose(mixed, one_by_one, atol=1e-4)
    # the same pixels as uint8 array, PIL image, or float in [0, 1] give the same age
    as_pil = estimator.predict_crops([Image.fromarray(image) for image in batch])
    np.testing.assert_allclose(as_pil, ages, atol=1e-5)
    np.testing.assert_allclose(estimator.predict_crops(batch / 255.0), ages, atol=1e-5)


def test_every_image_reaches_the_network_at_input_size(estimator):
    """Non-square crops are stretched to 32 x 32, including one as wide as the input size."""
    seen = []
    engine = estimator.predictor.engine
    hook = engine.model.register_forward_pre_hook(lambda _, args: seen.append(args[0].shape))
    try:
        ages = estimator.predict_crops([faces(1, size, seed=0)[0]
                                        for size in [(40, 32), (20, 30), (32, 32), (40, 32)]])
    finally:
        hook.remove()
    assert ages.shape == (4,)
    # one batch per size, run twice: the crops, then their mirror images (flip TTA)
    assert sorted(tuple(shape) for shape in seen) == [(1, 3, 32, 32)] * 4 + [(2, 3, 32, 32)] * 2


@pytest.mark.parametrize("bad, message", [
    ("face.jpg", "input of type str"),
    (np.zeros((8, 8), np.uint8), r"input array of shape \(8, 8\)"),
    (np.zeros((2, 8, 8, 4), np.uint8), r"image 0: shape \(8, 8, 4\)"),
    ([np.zeros((8, 8, 3), np.uint8), np.zeros((0, 8, 3), np.uint8)], r"image 1: shape \(0, 8, 3\)"),
    (np.full((1, 8, 8, 3), 200.0), r"float pixels must lie in \[0, 1\], found 200"),
    (np.full((1, 8, 8, 3), np.nan), "float pixels must lie in"),
    (np.full((8, 8, 3), -1, np.int64), r"integer pixels must lie in 0..255, found -1..-1"),
    (np.zeros((1, 8, 8, 3), bool), "neither integer nor float"),
    ([Image.new("RGB", (8, 8)), {"pixels": 1}], "image 1: got dict"),
])
def test_bad_crops_are_a_clear_error(estimator, bad, message):
    with pytest.raises(ValueError, match=message):
        estimator.predict_crops(bad)


def test_a_request_without_an_image_column_is_a_clear_error(estimator):
    with pytest.raises(ValueError, match="binary column 'image'"):
        estimator.predict(None, pd.DataFrame({"photo": [b""]}))


def test_registering_twice_rotates_and_promote_moves_the_aliases(store):
    assert register(store.uris[0], "t-rotate") == 1
    assert aliases("t-rotate") == {"champion": 1}  # first registration: no challenger
    assert register(store.uris[1], "t-rotate") == 2
    assert aliases("t-rotate") == {"champion": 2, "challenger": 1}
    assert mlflow.models.get_model_info("models:/t-rotate@champion").run_id == store.runs[1]

    assert promote("t-rotate", version=1) == 1
    assert aliases("t-rotate") == {"champion": 1, "challenger": 2}
    assert promote("t-rotate", version=1) == 1  # already champion: nothing moves
    assert aliases("t-rotate") == {"champion": 1, "challenger": 2}
    assert promote("t-rotate", run_id=store.runs[1]) == 2  # already a version: not re-registered
    assert aliases("t-rotate") == {"champion": 2, "challenger": 1}
    assert len(mlflow.MlflowClient().search_model_versions("name = 't-rotate'")) == 2

    assert promote("t-fresh", run_id=store.runs[0]) == 1  # a run's model, registered on the way
    assert aliases("t-fresh") == {"champion": 1}


def test_promote_names_what_is_missing(store):
    register(store.uris[0], "t-errors")
    with pytest.raises(ValueError, match="'t-errors' has no version 7; versions: 1"):
        promote("t-errors", version=7)
    with pytest.raises(ValueError, match="no registered model 'nobody'"):
        promote("nobody", version=1)
    with pytest.raises(ValueError, match="no MLflow run with id '0+'"):
        promote("t-errors", run_id="0" * 32)
    with pytest.raises(ValueError, match="exactly one of"):
        promote("t-errors")
    with mlflow.start_run(experiment_id=tracking.experiment_id("test")) as empty:
        pass
    with pytest.raises(ValueError, match="logged 0 AgeEstimator models"):
        promote("t-errors", run_id=empty.info.run_id)
    assert aliases("t-errors") == {"champion": 1}


def stage_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    register_stage.add_arguments(parser)
    return parser.parse_args(argv)


def write_candidate(path: Path, **summary) -> Path:
    path.write_text(json.dumps(summary))
    return path


def logged_models(root: Path) -> list[Path]:
    """The MLmodel file of every model stored under ``root``'s mlruns/."""
    return sorted(root.glob("mlruns/*/models/*/artifacts/MLmodel"))


def test_register_stage_crowns_the_lowest_mae_and_stores_each_model_once(store):
    root, (first, second) = store.root, store.checkpoints
    third = write_checkpoint(root / "model2.pt", seed=2)  # no run has logged this one yet
    files = [write_candidate(root / "a.json", mae=6.1, model=str(first), backbone="vgg16",
                             mode="b", n=82),
             write_candidate(root / "b.json", mae=4.2, model=str(third), backbone="resnet50",
                             mode="c", n=82),
             write_candidate(root / "c.json", mae=5.0, model=str(second), backbone="senet50",
                             mode="a", n=82)]
    out = root / "reports" / "registry.json"
    argv = [a for f in files for a in ("--candidate", str(f))]
    before = logged_models(root)
    assert register_stage.main(stage_args(argv + ["--name", "t-stage", "--out", str(out)])) == 0

    report = json.loads(out.read_text())
    assert report["chosen"]["candidate"] == str(files[1]) and report["chosen"]["mae"] == 4.2
    assert (report["version"], report["alias"], report["challenger"]) == (1, "champion", None)
    assert report["model_uri"] == "models:/t-stage/1"
    assert [c["mae"] for c in report["candidates"]] == [6.1, 4.2, 5.0]
    assert report["logged_by_run"] == report["run_id"]  # a new checkpoint: logged by this run
    assert len(logged_models(root)) == len(before) + 1
    run = mlflow.get_run(report["run_id"])
    assert run.data.tags["backbone"] == "resnet50" and run.data.tags["mode"] == "c"
    assert run.data.tags["source_model"] == str(third) and "git_commit" in run.data.tags
    assert run.data.metrics["fgnet_mae"] == 4.2
    table = mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/candidates.csv").splitlines()
    assert table[0].startswith("mae,model,backbone,mode") and len(table) == 4
    champion = mlflow.MlflowClient().get_model_version_by_alias("t-stage", "champion")
    assert champion.run_id == report["run_id"] and champion.tags["fgnet_mae"] == "4.2000"

    # the same winner again (DVC reruns the stage when another candidate changes): a new
    # version and run, but the model the first run logged, not a second copy of it
    files[0] = write_candidate(root / "a.json", mae=6.3, model=str(first), backbone="vgg16",
                               mode="b", n=82)
    assert register_stage.main(stage_args(argv + ["--name", "t-stage", "--out", str(out)])) == 0
    again = json.loads(out.read_text())
    assert (again["version"], again["challenger"]) == (2, 1)
    assert again["run_id"] != report["run_id"]
    assert (again["logged_model"], again["logged_by_run"]) == (report["logged_model"],
                                                               report["run_id"])
    assert len(logged_models(root)) == len(before) + 1
    assert promote("t-stage", run_id=again["run_id"]) == 2  # the linked model is the run's


@pytest.mark.parametrize("summary, error, message", [
    ({"mae": 3.0, "backbone": "vgg16", "mode": "b"}, ValueError, "'model' must be a string"),
    ({"mae": "3.0", "model": "m.pt", "backbone": "vgg16", "mode": "b"}, ValueError,
     "'mae' must be a number"),
    ({"mae": float("nan"), "model": "m.pt", "backbone": "vgg16", "mode": "b"}, ValueError,
     "mae is nan"),
    ({"mae": 3.0, "model": "gone.pt", "backbone": "vgg16", "mode": "b"}, FileNotFoundError,
     "model gone.pt does not exist"),
])
def test_register_stage_refuses_a_bad_candidate(tmp_path, monkeypatch, summary, error, message):
    (tmp_path / "m.pt").write_bytes(b"")
    candidate = write_candidate(tmp_path / "bad.json", **summary)
    monkeypatch.chdir(tmp_path)  # model paths in summaries are relative to the working directory
    with pytest.raises(error, match=f"candidate {candidate}: .*{message}"):
        read_candidate(candidate)


def test_logged_model_loads_without_the_repository(store):
    """code_paths carries the package: a fresh interpreter that cannot import agecascade from
    the editable install still loads the model and predicts what the test process does."""
    register(store.uris[1], "t-outside")
    batch = faces(3, (40, 40), seed=9)
    np.save(store.root / "batch.npy", batch)
    script = textwrap.dedent("""
        import sys
        sys.meta_path = [f for f in sys.meta_path if "editable" not in getattr(f, "__module__", "")]
        try:
            import agecascade
        except ImportError:
            pass
        else:
            sys.exit("agecascade is still importable from " + agecascade.__file__)
        import mlflow, numpy as np
        model = mlflow.pyfunc.load_model("models:/t-outside@champion")
        print(model.unwrap_python_model().predict_crops(np.load("batch.npy")).tolist())
        """)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-c", script], cwd=store.root, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    outside = json.loads(done.stdout.strip().splitlines()[-1])
    np.testing.assert_allclose(outside, checkpoint_ages(store.checkpoints[1], batch), atol=1e-4)


def test_model_digest_covers_checkpoint_code_and_requirements(store, tmp_path, monkeypatch):
    import agecascade
    from agecascade import serving

    checkpoint = store.checkpoints[0]
    digest = model_digest(checkpoint)
    assert model_digest(shutil.copy(checkpoint, tmp_path / "copy.pt")) == digest  # bytes only
    assert model_digest(store.checkpoints[1]) != digest

    package = Path(shutil.copytree(Path(agecascade.__file__).parent, tmp_path / "agecascade"))
    monkeypatch.setattr(agecascade, "__file__", str(package / "__init__.py"))
    assert model_digest(checkpoint) == digest
    with (package / "serving.py").open("a") as code:
        code.write("# a change to the code the model carries\n")
    assert model_digest(checkpoint) != digest
    monkeypatch.setattr(agecascade, "__file__", str(Path(serving.__file__).parent / "__init__.py"))
    monkeypatch.setattr(serving, "requirements", lambda: ["torch==0.0.1"])
    assert model_digest(checkpoint) != digest


def test_every_logged_model_is_code_only_and_loads_without_pickle(store):
    """No MLmodel names pickle, and each is MLflow's models-from-code pyfunc: its loader runs
    the logged code, and the checkpoint is read with torch.load(weights_only=True)."""
    assert os.environ["MLFLOW_ALLOW_PICKLE_DESERIALIZATION"] == "false"
    found = logged_models(store.root)
    assert len(found) >= len(store.uris)
    batch = faces(2, (32, 32), seed=4)
    for mlmodel in found:
        text = mlmodel.read_text()
        assert "pickle" not in text, mlmodel
        flavors = yaml.safe_load(text)["flavors"]
        assert list(flavors) == ["python_function"], mlmodel
        pyfunc = flavors["python_function"]
        assert pyfunc["loader_module"] == "mlflow.pyfunc.loaders.code_model"
        assert "model_code_path" in pyfunc and "python_model" not in pyfunc
        model_id = mlmodel.parent.parent.name
        ages = mlflow.pyfunc.load_model(f"models:/{model_id}").unwrap_python_model().predict_crops(batch)
        assert ages.shape == (2,) and np.isfinite(ages).all()


def test_a_moved_checkout_still_opens_its_runs_and_models(tmp_path):
    """A project folder copied elsewhere, the original deleted: a fresh interpreter in the copy
    lists and reads a run's files and loads the champion (a self-contained copy) and the run's
    own model (by reference to the checkout's model.pt, by a path relative to the checkout)."""
    first = tmp_path / "first"
    first.mkdir()
    previous_uri = mlflow.get_tracking_uri()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{first / 'mlflow.db'}")
        patch.chdir(first)
        checkpoint = write_checkpoint(first / "model.pt", seed=5)
        with mlflow.start_run(experiment_id=tracking.experiment_id("moved")) as run:
            mlflow.log_text("kept", "notes.txt")
            log_age_estimator(Path("model.pt"), by_reference=True)  # as a DVC stage logs it
        promote("t-moved", run_id=run.info.run_id)
    mlflow.set_tracking_uri(previous_uri)
    moved = Path(shutil.copytree(first, tmp_path / "moved"))
    shutil.rmtree(first)
    with sqlite3.connect(moved / "mlflow.db") as db:
        assert str(first) not in "\n".join(db.iterdump())  # no path pins the old folder

    batch = faces(3, (40, 40), seed=6)
    np.save(moved / "batch.npy", batch)
    script = textwrap.dedent(f"""
        import json, mlflow, numpy as np
        mlflow.set_tracking_uri("sqlite:///mlflow.db")
        batch, run = np.load("batch.npy"), "{run.info.run_id}"
        ages = lambda uri: mlflow.pyfunc.load_model(uri).unwrap_python_model().predict_crops(batch).tolist()
        print(json.dumps({{
            "files": [f.path for f in mlflow.MlflowClient().list_artifacts(run)],
            "notes": mlflow.artifacts.load_text(f"runs:/{{run}}/notes.txt"),
            "champion": ages("models:/t-moved@champion"), "run": ages(f"runs:/{{run}}/model"),
        }}))
        """)
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    done = subprocess.run([sys.executable, "-c", script], cwd=moved, env=env,
                          capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen["files"] == ["notes.txt"] and seen["notes"] == "kept"
    expected = checkpoint_ages(moved / checkpoint.name, batch)
    np.testing.assert_allclose(seen["champion"], expected, atol=1e-4)
    np.testing.assert_allclose(seen["run"], expected, atol=1e-4)


def dvc(cwd: Path, *args: str) -> None:
    """Run DVC's own command line, so the tests check its cache layout, not our idea of it."""
    done = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.fixture(scope="module")
def dvc_repo(store) -> Path:
    """The store's folder as a DVC repository (no git), its cache in the default .dvc/cache."""
    dvc(store.root, "init", "--no-scm", "-q")
    return store.root


def log_by_reference(store, relative: str, seed: int):
    """A checkpoint written at ``relative`` in the working directory and logged by reference
    by a run of its own, as a training stage under DVC does; (run id, model, checkpoint)."""
    checkpoint = store.root / relative
    checkpoint.parent.mkdir(parents=True, exist_ok=True)
    write_checkpoint(checkpoint, seed)
    with mlflow.start_run(experiment_id=tracking.experiment_id("by-reference")) as run:
        model = log_age_estimator(Path(relative), by_reference=True)
    return run.info.run_id, model, checkpoint


def stored_files(root: Path, model_id: str) -> dict[str, int]:
    """Bytes of each file a logged model keeps in mlruns/, by path inside its folder."""
    (folder,) = root.glob(f"mlruns/*/models/{model_id}/artifacts")
    return {p.relative_to(folder).as_posix(): p.stat().st_size
            for p in folder.rglob("*") if p.is_file()}


def md5_of(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


@contextmanager
def set_aside(*paths: Path) -> Iterator[None]:
    """Move ``paths`` away for the block and put them back after it, so the models of other
    tests still load."""
    kept = {path: path.with_name(path.name + ".aside") for path in paths if path.exists()}
    for path, aside in kept.items():
        os.replace(path, aside)
    try:
        yield
    finally:
        for path, aside in kept.items():
            if path.is_dir():
                shutil.rmtree(path)
            os.replace(aside, path)


def test_a_reference_names_the_workspace_path_even_through_a_symlink(tmp_path):
    """With DVC's cache.type symlink a workspace file links into the cache: the reference
    keeps the path a checkout has, not the cache object it happens to point at."""
    cached = tmp_path / ".dvc" / "cache" / "files" / "md5" / "ab" / "cdef"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"weights")
    workspace = tmp_path / "models" / "x" / "model.pt"
    workspace.parent.mkdir(parents=True)
    workspace.symlink_to(cached)
    assert CheckpointRef.of(workspace, tmp_path) == CheckpointRef(
        "models/x/model.pt", hashlib.md5(b"weights").hexdigest(), 7)
    with pytest.raises(UserError, match="outside the checkout"):
        CheckpointRef.of(cached, tmp_path / "models")


def test_a_by_reference_model_stores_no_weights_and_loads_from_the_workspace(store):
    relative = "models/workspace/model.pt"
    run_id, model, checkpoint = log_by_reference(store, relative, seed=3)
    files = stored_files(store.root, model.model_id)
    assert checkpoint.stat().st_size > 10 << 20  # a copy of it would show
    assert max(files.values()) < 1 << 20, files  # the package's code and a small example
    assert not any(name.endswith(".pt") for name in files)
    (mlmodel,) = store.root.glob(f"mlruns/*/models/{model.model_id}/artifacts/MLmodel")
    assert "pickle" not in mlmodel.read_text()
    assert checkpoint_reference(model.model_uri) == {
        "path": relative, "md5": md5_of(checkpoint), "size": checkpoint.stat().st_size}
    batch = faces(3, (40, 40), seed=10)
    ages = mlflow.pyfunc.load_model(f"runs:/{run_id}/model").unwrap_python_model().predict_crops(batch)
    np.testing.assert_allclose(ages, checkpoint_ages(checkpoint, batch), atol=1e-4)
    with pytest.raises(UserError, match="cannot be a registered version"):
        register(model.model_uri, "t-by-reference")  # the registry holds self-contained models


@pytest.mark.parametrize("cache", ["default", "configured"])
def test_a_by_reference_model_falls_back_to_the_dvc_cache(store, dvc_repo, cache):
    """The workspace file is retrained (other weights): the model loads the bytes it was
    logged with from DVC's cache, put there by `dvc add` into .dvc/cache or into the cache
    directory that `dvc cache dir --local` configured."""
    relative = f"models/cache-{cache}/model.pt"
    _, model, checkpoint = log_by_reference(store, relative, seed=4)
    batch = faces(3, (40, 40), seed=11)
    logged_ages, md5 = checkpoint_ages(checkpoint, batch), md5_of(checkpoint)
    folder = dvc_repo / (".dvc/cache" if cache == "default" else "cache-elsewhere")
    try:
        if cache == "configured":
            dvc(dvc_repo, "cache", "dir", "--local", "cache-elsewhere")
        dvc(dvc_repo, "add", "-q", relative)
        cached = folder / "files" / "md5" / md5[:2] / md5[2:]
        assert cached.is_file() and dvc_cache_object(dvc_repo, md5).resolve() == cached
        with set_aside(checkpoint):
            write_checkpoint(checkpoint, seed=5)
            ages = mlflow.pyfunc.load_model(model.model_uri).unwrap_python_model().predict_crops(batch)
            np.testing.assert_allclose(ages, logged_ages, atol=1e-4)
            assert not np.allclose(ages, checkpoint_ages(checkpoint, batch), atol=1e-2)
    finally:
        (dvc_repo / ".dvc" / "config.local").unlink(missing_ok=True)


def test_a_by_reference_model_without_its_bytes_fails_saying_how_to_get_them(store):
    relative = "models/gone/model.pt"
    run_id, model, checkpoint = log_by_reference(store, relative, seed=6)
    md5 = md5_of(checkpoint)
    cached = dvc_cache_object(store.root, md5)
    with set_aside(checkpoint):
        write_checkpoint(checkpoint, seed=7)  # the workspace file holds other weights
        message = (rf"checkpoint {relative} \(md5 {md5}, \d+ bytes\).*workspace file holds other "
                   rf"bytes.*cache object .*{md5[2:]} is missing.*`dvc checkout {relative}`.*"
                   rf"`dvc pull {relative}`")
        with pytest.raises(UserError, match=message):
            mlflow.pyfunc.load_model(model.model_uri)
        with pytest.raises(UserError, match=message):  # nothing is registered on the way
            promote("t-gone", run_id=run_id)
        assert not mlflow.MlflowClient().search_registered_models("name = 't-gone'")
        cached.parent.mkdir(parents=True, exist_ok=True)
        cached.write_bytes(b"not the checkpoint")  # a damaged cache is refused too
        try:
            with pytest.raises(UserError, match=r"holds other bytes \(corrupt cache\)"):
                mlflow.pyfunc.load_model(model.model_uri)
        finally:
            cached.unlink()


def test_promoting_a_by_reference_run_registers_a_self_contained_copy(store):
    """The copy is logged by a new run of experiment `registry` that names the training run,
    serves with neither the workspace file nor DVC's cache, and is reused when the same run
    is promoted again."""
    relative = "models/promoted/model.pt"
    run_id, model, checkpoint = log_by_reference(store, relative, seed=8)
    batch = faces(3, (40, 40), seed=12)
    expected, md5 = checkpoint_ages(checkpoint, batch), md5_of(checkpoint)
    cached = dvc_cache_object(store.root, md5)  # what `dvc commit` leaves after the stage
    cached.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(checkpoint, cached)

    assert promote("t-copy", run_id=run_id) == 1
    version = mlflow.MlflowClient().get_model_version("t-copy", "1")
    copy = mlflow.get_logged_model(mlflow.models.get_model_info(version.source).model_id)
    assert checkpoint_reference(version.source) is None
    size = checkpoint.stat().st_size
    assert stored_files(store.root, copy.model_id)["artifacts/model.pt"] == size
    assert copy.tags["agecascade_digest"] == model_digest(checkpoint)
    copier = mlflow.get_run(copy.source_run_id)
    assert copier.info.run_id != run_id
    assert mlflow.get_experiment(copier.info.experiment_id).name == "registry"
    assert (copier.data.tags["source_run_id"], copier.data.tags["source_model_id"],
            copier.data.tags["source_model"], copier.data.tags["checkpoint_md5"]) == (
                run_id, model.model_id, relative, md5)

    models = logged_models(store.root)
    assert promote("t-copy", run_id=run_id) == 1  # the copy is found, not stored again
    assert logged_models(store.root) == models
    assert aliases("t-copy") == {"champion": 1}

    with set_aside(checkpoint, store.root / ".dvc" / "cache"):
        with pytest.raises(UserError, match=f"md5 {md5}"):
            mlflow.pyfunc.load_model(model.model_uri)
        ages = mlflow.pyfunc.load_model("models:/t-copy@champion").unwrap_python_model().predict_crops(batch)
    np.testing.assert_allclose(ages, expected, atol=1e-4)


@pytest.mark.parametrize("under_dvc", [True, False])
def test_log_final_refers_to_a_dvc_out_and_carries_anything_else(store, monkeypatch, tmp_path,
                                                                  under_dvc):
    """A stage's model.pt under `dvc repro` (DVC_STAGE set) is kept by DVC: referred to. Run by
    hand, or outside the checkout, the checkpoint is the only copy: carried."""
    out = store.root / "models" / f"final-{under_dvc}"
    out.mkdir(parents=True)
    write_checkpoint(out / "model.pt", seed=9)
    (out / "metrics.json").write_text("{}")
    (out / "history.csv").write_text("epoch,val_mae\n1,5.0\n")
    if under_dvc:
        monkeypatch.setenv("DVC_STAGE", "finetune_test")
        assert not tracking.dvc_keeps(tmp_path / "model.pt")  # outside the working directory
    else:
        monkeypatch.delenv("DVC_STAGE", raising=False)
    with mlflow.start_run(experiment_id=tracking.experiment_id("final")) as run:
        tracking.log_final({"val_mae": 5.0}, out)
    model = run_estimator(mlflow.MlflowClient(), run.info.run_id)
    reference = checkpoint_reference(model.model_uri)
    if under_dvc:
        assert reference["path"] == f"models/final-{under_dvc}/model.pt"
    else:
        assert reference is None
        assert "artifacts/model.pt" in stored_files(store.root, model.model_id)


def test_register_stage_can_also_register_the_onnx_model(store):
    pytest.importorskip("onnxruntime")
    candidate = write_candidate(store.root / "onnx.json", mae=3.0, model=str(store.checkpoints[0]),
                                backbone="resnet18", mode="b")
    out = store.root / "reports" / "registry-onnx.json"
    argv = ["--candidate", str(candidate), "--name", "t-both", "--out", str(out), "--onnx"]
    assert register_stage.main(stage_args(argv)) == 0
    report = json.loads(out.read_text())
    assert report["onnx"]["name"] == "t-both-onnx" and report["onnx"]["version"] == 1
    assert aliases("t-both-onnx") == {"champion": 1}
    crops = faces(4, (32, 32), seed=5)
    served = mlflow.pyfunc.load_model("models:/t-both-onnx@champion").predict(crops)
    # the ONNX flavour serves the network's own output for each crop: no flip TTA
    np.testing.assert_allclose(served["age"],
                               checkpoint_ages(store.checkpoints[0], crops, flip=False), atol=0.05)
    mlmodel = next(store.root.glob(f"mlruns/*/models/{report['onnx']['model_uri'].split('/')[-1]}"
                                   "/artifacts/MLmodel")).read_text()
    assert "pickle" not in mlmodel and "onnx" in mlmodel
