"""The AgeEstimator pyfunc, the champion/challenger registry and the `register` stage.

One sqlite tracking store per module (logging a model takes seconds); each test registers under
its own model name so the tests do not see each other's versions.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace

import mlflow
import numpy as np
import pytest
import torch
from PIL import Image

from agecascade import tracking
from agecascade.nets import create_model
from agecascade.nets.checkpoint import load_checkpoint
from agecascade.pipelines import register as register_stage
from agecascade.registry import aliases, promote, register
from agecascade.serving import AgeEstimator, as_batch, log_age_estimator
from agecascade.train.data import IMAGENET, make_loader
from agecascade.train.engine import predict

AGES = [10.0, 20.0, 30.0, 40.0, 50.0, 60.0, 70.0]


def write_checkpoint(path: Path, seed: int) -> Path:
    """An untrained resnet18 in the stage format, with a sharpened output layer so the softmax
    is far from flat and different images get clearly different ages."""
    torch.manual_seed(seed)
    model = create_model("resnet18", len(AGES))
    model.output_layer.weight.data.mul_(3)
    meta = {"arch": model.arch, "ages": AGES, "input_spec": asdict(IMAGENET), "input_size": 32,
            "backbone": "resnet18", "mode": "b", "dataset": "agedb"}
    torch.save({"model": model.state_dict(), "meta": meta, "epoch": 0, "metrics": {}}, path)
    return path


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
    model.load_context(SimpleNamespace(artifacts={"checkpoint": str(store.checkpoints[0])}))
    return model


def faces(n: int, size: tuple[int, int], seed: int) -> np.ndarray:
    """uint8 (n, H, W, 3) with a different brightness per image, so predictions differ."""
    rng = np.random.default_rng(seed)
    noise = rng.integers(0, 60, (n, *size, 3))
    return (noise + np.linspace(0, 190, n).reshape(n, 1, 1, 1)).astype(np.uint8)


def checkpoint_ages(checkpoint: Path, images: np.ndarray) -> np.ndarray:
    """The DEX ages the training code itself computes for a uint8 batch."""
    model, meta = load_checkpoint(checkpoint)
    loader = make_loader(images, np.zeros(len(images), dtype=np.int64), np.arange(len(images)),
                         8, False, 0, 0, False)
    _, _, ages = predict(model, loader, torch.device("cpu"), meta["input_size"],
                         torch.tensor(meta["ages"]))
    return ages.numpy()


def test_champion_pyfunc_matches_the_checkpoint(store):
    assert register(store.uris[0], "t-serve") == 1
    model = mlflow.pyfunc.load_model("models:/t-serve@champion")
    batch = faces(5, (48, 48), seed=1)
    ages = model.predict(batch)
    assert ages.shape == (5,) and ages.dtype == np.float32
    assert np.all((ages >= min(AGES)) & (ages <= max(AGES)))
    assert np.ptp(ages) > 1.0  # the images are told apart: a constant output would hide bugs
    np.testing.assert_allclose(ages, checkpoint_ages(store.checkpoints[0], batch), atol=1e-4)

    direct = model.unwrap_python_model()
    images = [Image.fromarray(faces(1, size, seed=2 + i)[0])
              for i, size in enumerate([(20, 30), (64, 64), (48, 80), (64, 64)])]
    mixed = model.predict(as_batch(images))  # mixed sizes travel as a 1-D object array
    assert mixed.shape == (4,)
    assert np.all((mixed >= min(AGES)) & (mixed <= max(AGES)))
    np.testing.assert_allclose(mixed, direct.predict(None, images), atol=1e-5)
    one_by_one = [direct.predict(None, image)[0] for image in images]  # order is kept
    np.testing.assert_allclose(mixed, one_by_one, atol=1e-4)
    # the same pixels as uint8 array, PIL image, or float in [0, 1] give the same age
    as_pil = direct.predict(None, [Image.fromarray(image) for image in batch])
    np.testing.assert_allclose(as_pil, ages, atol=1e-5)
    np.testing.assert_allclose(direct.predict(None, batch / 255.0), ages, atol=1e-5)


def test_every_image_reaches_the_network_at_input_size(estimator):
    """Non-square crops are stretched to 32 x 32, including one as wide as the input size,
    which to_input alone leaves at 40 x 32 (the network would then run on it silently)."""
    seen = []
    hook = estimator.model.register_forward_pre_hook(lambda _, args: seen.append(args[0].shape))
    try:
        ages = estimator.predict(None, [faces(1, size, seed=0)[0]
                                        for size in [(40, 32), (20, 30), (32, 32), (40, 32)]])
    finally:
        hook.remove()
    assert ages.shape == (4,)
    assert sorted(tuple(shape) for shape in seen) == [(1, 3, 32, 32), (1, 3, 32, 32),
                                                     (2, 3, 32, 32)]  # one batch per size


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
def test_bad_input_is_a_clear_error(estimator, bad, message):
    with pytest.raises(ValueError, match=message):
        estimator.predict(None, bad)


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


def test_register_stage_crowns_the_lowest_mae(store):
    root, (first, second) = store.root, store.checkpoints
    files = [write_candidate(root / "a.json", mae=6.1, model=str(first), backbone="vgg16",
                             mode="b", n=82),
             write_candidate(root / "b.json", mae=4.2, model=str(second), backbone="resnet50",
                             mode="c", n=82),
             write_candidate(root / "c.json", mae=5.0, model=str(first), backbone="senet50",
                             mode="a", n=82)]
    out = root / "reports" / "registry.json"
    argv = [a for f in files for a in ("--candidate", str(f))]
    assert register_stage.main(stage_args(argv + ["--name", "t-stage", "--out", str(out)])) == 0

    report = json.loads(out.read_text())
    assert report["chosen"]["candidate"] == str(files[1]) and report["chosen"]["mae"] == 4.2
    assert (report["version"], report["alias"], report["challenger"]) == (1, "champion", None)
    assert report["model_uri"] == "models:/t-stage/1"
    assert [c["mae"] for c in report["candidates"]] == [6.1, 4.2, 5.0]
    run = mlflow.get_run(report["run_id"])
    assert run.data.tags["backbone"] == "resnet50" and run.data.tags["mode"] == "c"
    assert run.data.tags["source_model"] == str(second) and "git_commit" in run.data.tags
    assert run.data.metrics["fgnet_mae"] == 4.2
    table = mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/candidates.csv").splitlines()
    assert table[0].startswith("mae,model,backbone,mode") and len(table) == 4
    champion = mlflow.MlflowClient().get_model_version_by_alias("t-stage", "champion")
    assert champion.run_id == report["run_id"] and champion.tags["fgnet_mae"] == "4.2000"


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
        register_stage.read_candidate(candidate)


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
        print(model.predict(np.load("batch.npy")).tolist())
        """)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-c", script], cwd=store.root, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    outside = json.loads(done.stdout.strip().splitlines()[-1])
    np.testing.assert_allclose(outside, checkpoint_ages(store.checkpoints[1], batch), atol=1e-4)
