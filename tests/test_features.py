"""Regression on CNN features: extraction, folds, the three engines, the config, the stage,
auto-sklearn's env."""
from __future__ import annotations

import argparse
import ast
import json
import shlex
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from agecascade import cli
from agecascade.config import from_args
from agecascade.data.manifest import make_row, to_frame
from agecascade.data.store import CROPS, MANIFEST, create_store
from agecascade.errors import UserError
from agecascade.features import automl_env
from agecascade.features.engines import ENGINES, EngineConfig, make_folds, run_engines, score
from agecascade.features.extract import extract_features, first_conv
from agecascade.features.protocol import FeaturesConfig, extractors, parse_plan, write_outputs
from agecascade.nets import create_model
from agecascade.pipelines import features as stage
from agecascade.train.data import IMAGENET

SIZE = 32
REPO = Path(__file__).resolve().parents[1]
ENV = REPO / automl_env.DEFAULT_PATH


def write_store(folder: Path, subjects: int = 12, per_subject: int = 5, seed: int = 0) -> Path:
    """A prepared FG-NET stand-in: brightness encodes age, several images per subject."""
    rng = np.random.default_rng(seed)
    n = subjects * per_subject
    ages = rng.integers(0, 60, n)
    folder.mkdir(parents=True)
    store = create_store(folder / CROPS, n, SIZE)
    for i, age in enumerate(ages):
        store[i] = np.clip(rng.normal(40 + 3 * age, 12, (SIZE, SIZE, 3)), 0, 255).astype(np.uint8)
    store.flush()
    rows = [make_row(f"img{i}.jpg", "fgnet", age=float(a), subject=f"p{i // per_subject}")
            for i, a in enumerate(ages)]
    frame = to_frame(rows)
    frame["sha1"] = [f"{i:040x}" for i in range(n)]
    frame.to_parquet(folder / MANIFEST, index=False)
    return folder


def write_checkpoint(path: Path, backbone: str = "resnet18", seed: int = 1) -> Path:
    """A stage checkpoint as `agecascade train` writes it (untrained: only the format matters)."""
    torch.manual_seed(seed)
    ages = [float(a) for a in range(60)]
    model = create_model(backbone, len(ages))
    meta = {"backbone": backbone, "arch": model.arch, "ages": ages, "input_spec": asdict(IMAGENET),
            "input_size": SIZE, "dataset": "agedb", "mode": "c"}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": model.state_dict(), "meta": meta, "epoch": 0, "metrics": {}}, path)
    return path


@pytest.fixture(scope="module")
def stage_inputs(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("features")
    return write_store(root / "fgnet"), write_checkpoint(root / "agedb" / "model.pt")


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    stage.add_arguments(parser)
    return parser.parse_args(argv)


def stage_args(manifest: Path, model: Path, out: Path, *extra: str) -> argparse.Namespace:
    return parse("--manifest", str(manifest), "--model", str(model), "--out", str(out),
                 "--folds", "3", "--budget", "1", "--device", "cpu", *extra)


def synthetic(n_subjects: int = 20, per_subject: int = 6, seed: int = 0):
    """(X, y, groups): age linear in two of 16 features, plus noise."""
    rng = np.random.default_rng(seed)
    n = n_subjects * per_subject
    X = rng.normal(size=(n, 16)).astype(np.float32)
    y = 35 + 12 * X[:, 0] + 6 * X[:, 1] + rng.normal(size=n)
    return X, y, np.repeat([f"s{i}" for i in range(n_subjects)], per_subject)


# --- extraction -----------------------------------------------------------------------------

@pytest.mark.parametrize("backbone, channels, first, size", [
    ("vgg16", 512, "features.conv.0", 64),          # thesis backbone, last block 2x2
    ("resnet18", 512, "features.conv1", 64),        # torchvision ResNet, last block 2x2
    ("mobilenet_v2", 1280, "features.features.0.0", 32),  # first conv inside a Sequential, 1x1
])
def test_feature_sets_have_the_documented_shapes(backbone, channels, first, size):
    torch.manual_seed(0)
    model = create_model(backbone, 3).eval()
    crops = np.random.default_rng(0).integers(0, 255, (5, size, size, 3), dtype=np.uint8)
    found = extract_features(model, crops, np.arange(5), size, IMAGENET, torch.device("cpu"), batch=2)
    cells = (size // 32) ** 2  # spatial positions of the last block: all three downsample by 32
    assert found["last_conv_max"].shape == (5, channels)
    assert found["first_conv"].shape == (5, model.get_submodule(first).out_channels)
    assert found["last_conv_flat"].shape == (5, channels * cells)
    assert all(x.dtype == np.float32 for x in found.values())
    flat = found["last_conv_flat"].reshape(5, channels, cells)
    np.testing.assert_allclose(found["last_conv_max"], flat.max(axis=2), rtol=1e-6)
    assert first_conv(model, torch.zeros(1, 3, size, size)) is model.get_submodule(first)


def test_features_follow_the_callers_row_order():
    torch.manual_seed(0)
    model = create_model("resnet18", 3).eval()
    crops = np.random.default_rng(1).integers(0, 255, (6, SIZE, SIZE, 3), dtype=np.uint8)
    rows = np.array([4, 0, 5, 2])
    found = extract_features(model, crops, rows, SIZE, IMAGENET, torch.device("cpu"),
                             sets=["last_conv_max"], batch=3)["last_conv_max"]
    one_by_one = np.concatenate([
        extract_features(model, crops, np.array([r]), SIZE, IMAGENET, torch.device("cpu"),
                         sets=["last_conv_max"])["last_conv_max"] for r in rows])
    np.testing.assert_allclose(found, one_by_one, atol=1e-4)  # batching changes the last bits


def test_unknown_feature_set_is_refused():
    with pytest.raises(ValueError, match="feature sets must be among"):
        extract_features(create_model("resnet18", 3), np.zeros((1, SIZE, SIZE, 3), np.uint8),
                         np.arange(1), SIZE, IMAGENET, torch.device("cpu"), sets=["fc7"])


# --- folds, plans, engines ------------------------------------------------------------------

def test_folds_never_split_a_subject():
    groups = np.repeat(["a", "b", "c", "d", "e"], [3, 1, 2, 4, 2])
    loso = make_folds(groups, 0)
    assert len(np.unique(loso)) == 5
    assert all(len(np.unique(loso[groups == g])) == 1 for g in np.unique(groups))
    k2 = make_folds(groups, 2)
    assert sorted(np.unique(k2)) == [0, 1]
    assert all(len(np.unique(k2[groups == g])) == 1 for g in np.unique(groups))
    with pytest.raises(ValueError, match="between 2 and the number of subjects"):
        make_folds(groups, 6)


def test_plan_expands_sets_to_both_extractors_and_names_bad_entries():
    plan = parse_plan(["hgb", "flaml=last_conv_max", "autosklearn=cascade.first_conv"])
    assert len(plan["hgb"]) == 6
    assert plan["flaml"] == ["base.last_conv_max", "cascade.last_conv_max"]
    assert plan["autosklearn"] == ["cascade.first_conv"]
    with pytest.raises(UserError, match="unknown engine 'xgb'"):
        parse_plan(["xgb"])
    with pytest.raises(UserError, match="unknown feature set 'fc7'"):
        parse_plan(["hgb=fc7"])
    with pytest.raises(UserError, match="names 'hgb' twice"):
        parse_plan(["hgb", "hgb=first_conv"])


def test_hgb_and_flaml_learn_a_synthetic_age(tmp_path, monkeypatch):
    from flaml import AutoML

    seen: list[dict] = []
    original = AutoML.fit

    def spy(self, *args, **kwargs):
        seen.append(kwargs)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(AutoML, "fit", spy)
    X, y, groups = synthetic()
    fold = make_folds(groups, 3)
    outcomes = run_engines({"hgb": ["t"], "flaml": ["t"]}, {"t": X}, y, groups, fold,
                           EngineConfig(budget=1.0), tmp_path)
    baseline = np.abs(y - np.median(y)).mean()  # about 9 years
    for outcome in outcomes:
        assert outcome.status == "ok", outcome.reason
        scores = score(y, outcome.pred, fold)
        assert scores["mae"] < 0.6 * baseline, (outcome.engine, scores["mae"], baseline)
        assert scores["r2"] > 0.5
        assert sorted(outcome.fold_models) == [0, 1, 2]
    assert "inner MAE" in outcomes[1].listing  # FLAML's chosen model, per fold
    # FLAML's inner validation splits by subject (for regression it ignores groups otherwise)
    assert len(seen) == 3 and all(k["split_type"] == "group" for k in seen)
    for kwargs, k in zip(seen, range(3)):
        np.testing.assert_array_equal(kwargs["groups"], groups[fold != k])


# --- auto-sklearn's environment ------------------------------------------------------------

def test_env_var_pointing_nowhere_is_reported_not_replaced(monkeypatch, tmp_path):
    monkeypatch.setenv(automl_env.ENV_VAR, str(tmp_path / "python3.9"))
    found = automl_env.find_interpreter()
    assert isinstance(found, str) and automl_env.ENV_VAR in found and "does not run" in found
    reason = automl_env.locate(tmp_path / "env")
    assert isinstance(reason, str) and str(tmp_path / "env") in reason and "cannot be built" in reason


def test_wrong_python_version_is_named(monkeypatch):
    monkeypatch.setenv(automl_env.ENV_VAR, sys.executable)  # the project's own Python 3.11
    found = automl_env.find_interpreter()
    assert isinstance(found, str) and "is Python 3.11" in found and "3.8 or 3.9" in found


def test_setup_does_not_fail_without_an_interpreter(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv(automl_env.ENV_VAR, str(tmp_path / "missing"))
    assert automl_env.main(argparse.Namespace(path=tmp_path / "env")) == 0
    assert "auto-sklearn not installed" in capsys.readouterr().out
    assert not (tmp_path / "env").exists()
    (tmp_path / "notes").mkdir()
    with pytest.raises(ValueError, match="is not a virtual environment"):
        automl_env.create_env(tmp_path / "notes")


def test_worker_imports_nothing_of_agecascade():
    tree = ast.parse((REPO / "src/agecascade/features/autosklearn_worker.py").read_text())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree)
                if isinstance(node, (ast.Import, ast.ImportFrom))
                for alias in (node.names if isinstance(node, ast.Import) else [ast.alias(node.module)])}
    assert imported <= {"json", "os", "platform", "pprint", "sys", "time", "traceback", "numpy",
                        "autosklearn", "sklearn"}, imported


# --- the config -----------------------------------------------------------------------------

REQUIRED = {"manifest": Path("fgnet"), "model": Path("agedb/model.pt"), "out": Path("out")}


def test_parser_defaults_are_the_configs():
    """A default set in argparse alone, or a list or path lost in conversion, would differ."""
    args = parse(*(word for name, value in REQUIRED.items() for word in (f"--{name}", str(value))))
    assert from_args(FeaturesConfig, args) == FeaturesConfig(**REQUIRED)
    assert FeaturesConfig(**REQUIRED).engines == ENGINES


def test_dvc_yaml_command_parses_into_the_params():
    """The stage's command as DVC resolves it from params.yaml: every option still exists, and
    the list-valued --engines arrives whole."""
    import yaml
    from dvc.repo import Repo

    (cmd,) = [s.cmd for s in Repo(str(REPO)).index.stages if s.addressing == "features"]
    argv = shlex.split(cmd)
    assert argv[:2] == ["agecascade", "features"], cmd
    config = from_args(FeaturesConfig, cli.build_parser("features").parse_args(argv[1:]))
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    wanted = params["features"]
    assert config.engines == tuple(wanted["engines"].split())
    assert (config.folds, config.budget, config.autosklearn_budget, config.jobs, config.threads) \
        == (wanted["folds"], wanted["budget"], wanted["autosklearn_budget"], wanted["jobs"],
            wanted["threads"])
    assert (config.seed, config.base_weights) == (params["train"]["seed"], wanted["weights"])
    assert config.model == Path(f"models/{wanted['backbone']}/agedb/model.pt")


@pytest.mark.parametrize("change, message", [
    ({"budget": 0.0, "engines": ("hgb",)}, "--budget must be > 0"),
    ({"jobs": 0}, "--jobs and --threads >= 1"),
    ({"engines": ("autosklearn",), "budget": 10.0}, "auto-sklearn needs at least 30 s per fold"),
    ({"engines": ("hgb=fc7",)}, "unknown feature set 'fc7'"),
    ({"folds": 1}, "--folds 1"),
    ({"batch": 0}, "--batch and --memory-mb >= 1"),
    ({"base_pretrained": "faces"}, "--base-pretrained 'faces'"),
])
def test_bad_settings_are_refused_when_the_config_is_built(change, message):
    with pytest.raises(UserError, match=message):
        FeaturesConfig(**REQUIRED, **change)


def test_autosklearns_budget_floor_binds_only_a_plan_with_autosklearn():
    assert FeaturesConfig(**REQUIRED, engines=("hgb", "flaml"), budget=10.0).budget == 10.0


def test_cli_reports_a_bad_setting_in_one_line(capsys):
    code = cli.main(["features", "--manifest", "m", "--model", "x.pt", "--out", "o",
                     "--engines", "xgb"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.splitlines()) == 1 and "unknown engine 'xgb'" in err, err


# --- the stage ------------------------------------------------------------------------------

def test_stage_without_autosklearn_reports_it_unavailable_and_runs_the_rest(
        stage_inputs, tmp_path, monkeypatch, capsys):
    manifest, model = stage_inputs
    monkeypatch.chdir(tmp_path)  # --no-track: no mlflow.db or mlruns may appear here
    monkeypatch.setenv(automl_env.ENV_VAR, str(tmp_path / "no-python"))
    out = tmp_path / "out"
    args = stage_args(manifest, model, out, "--no-track", "--autosklearn-budget", "30",
                      "--autosklearn-env", str(tmp_path / "no-env"), "--engines",
                      "hgb=last_conv_max,cascade.first_conv", "flaml=cascade.last_conv_max",
                      "autosklearn=cascade.last_conv_max")
    assert stage.main(args) == 0
    results = json.loads((out / "results.json").read_text())
    rows = {(r["extractor"], r["feature_set"], r["engine"]): r for r in results["rows"]}
    assert set(rows) == {("base", "last_conv_max", "hgb"), ("cascade", "last_conv_max", "hgb"),
                         ("cascade", "first_conv", "hgb"), ("cascade", "last_conv_max", "flaml"),
                         ("cascade", "last_conv_max", "autosklearn")}
    askl = rows["cascade", "last_conv_max", "autosklearn"]
    assert askl["status"] == "unavailable" and askl["mae"] is None and askl["r2"] is None
    assert str(tmp_path / "no-env") in askl["reason"] and automl_env.ENV_VAR in askl["reason"]
    for key, row in rows.items():
        if key[2] != "autosklearn":
            assert row["status"] == "ok" and row["mae"] > 0 and row["r2"] is not None, row
    assert results["folds"] == {"scheme": "GroupKFold(3)", "n_folds": 3}
    assert results["feature_dims"] == {"base.last_conv_max": 512, "cascade.last_conv_max": 512,
                                       "cascade.first_conv": 64}
    folds = pd.read_csv(out / "folds.csv")
    assert len(folds) == 4 * 3 and set(folds["engine"]) == {"hgb", "flaml"}
    assert folds.groupby(["extractor", "feature_set", "engine"])["n_test"].sum().eq(60).all()
    metrics = json.loads((out / "metrics.json").read_text())
    assert "autosklearn" not in metrics["cascade.last_conv_max"]  # nothing faked
    listing = (out / "listings" / "autosklearn" / "cascade.last_conv_max.txt").read_text()
    assert "unavailable" in listing
    printed = capsys.readouterr().out
    assert "autosklearn on cascade.last_conv_max: unavailable" in printed
    assert not (tmp_path / "mlruns").exists() and not (tmp_path / "mlflow.db").exists()


def test_base_extractor_rebuilds_the_training_seeds_initial_weights(stage_inputs, tmp_path):
    manifest, model = stage_inputs
    config = from_args(FeaturesConfig, stage_args(manifest, model, tmp_path, "--seed", "7",
                                                  "--engines", "hgb"))
    nets, _ = extractors(config, torch.device("cpu"), {"base", "cascade"})
    torch.manual_seed(7)
    fresh = create_model("resnet18", 60)
    base = nets["base"][0].state_dict()
    assert all(torch.equal(base[k], v) for k, v in fresh.state_dict().items())
    wrong = from_args(FeaturesConfig, stage_args(manifest, model, tmp_path, "--engines", "hgb",
                                                 "--base-backbone", "resnet34"))
    with pytest.raises(UserError, match="cascade's own architecture"):
        extractors(wrong, torch.device("cpu"), {"base"})


def test_tracked_stage_logs_scores_and_files_to_mlflow(stage_inputs, tmp_path, monkeypatch):
    import mlflow

    manifest, model = stage_inputs
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    out = tmp_path / "out"
    assert stage.main(stage_args(manifest, model, out, "--engines", "hgb=cascade.last_conv_max")) == 0
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = mlflow.search_runs(experiment_names=["features"], output_format="list")
    assert run.data.tags["backbone"] == "resnet18" and run.info.run_name == "resnet18-features"
    expected = json.loads((out / "results.json").read_text())["rows"][0]["mae"]
    assert run.data.metrics["cascade.last_conv_max.hgb.mae"] == pytest.approx(expected)
    files = {f.path for f in mlflow.MlflowClient().list_artifacts(run.info.run_id)}
    assert {"results.json", "metrics.json", "folds.csv", "listings"} <= files


def test_a_killed_write_leaves_the_old_results_whole(tmp_path, monkeypatch):
    """DVC and the report take results.json and folds.csv as finished work: a kill while they
    are written must leave the old files, never a half-written new one."""
    import os

    for name in ("results.json", "folds.csv"):
        (tmp_path / name).write_text("old\n")

    def killed(src, dst):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        write_outputs(tmp_path, {"rows": []}, [], np.zeros(0), np.zeros(0, dtype=np.int64))
    monkeypatch.undo()
    assert [(tmp_path / n).read_text() for n in ("results.json", "folds.csv")] == ["old\n"] * 2
    assert not list(tmp_path.glob("*.tmp"))  # nothing half-written left beside them


@pytest.mark.skipif(not isinstance(automl_env.locate(ENV), Path),
                    reason=f"no auto-sklearn env at {ENV} (`agecascade automl-env` builds it)")
def test_autosklearn_really_fits_every_fold(stage_inputs, tmp_path):
    """Slow: two folds at auto-sklearn's minimum budget of 30 s, run in parallel."""
    manifest, model = stage_inputs
    out = tmp_path / "out"
    args = stage_args(manifest, model, out, "--no-track", "--folds", "2", "--jobs", "2",
                      "--autosklearn-budget", "30", "--autosklearn-env", str(ENV),
                      "--engines", "autosklearn=cascade.last_conv_max")
    assert stage.main(args) == 0
    (row,) = json.loads((out / "results.json").read_text())["rows"]
    assert row["status"] == "ok", row["reason"]
    assert row["version"].startswith("auto-sklearn 0.15.0 (scikit-learn 0.24")
    ages = pd.read_parquet(manifest / MANIFEST)["age"].to_numpy(dtype=float)
    assert row["mae"] < np.abs(ages - ages.mean()).mean()  # brightness encodes age
    listing = (out / "listings" / "autosklearn" / "cascade.last_conv_max.txt").read_text()
    for k in (0, 1):
        assert f"== fold {k}" in listing
    assert listing.count("Number of successful target algorithm runs") == 2
    assert listing.count("leaderboard():") == 2 and "weight " in listing
    assert sorted(pd.read_csv(out / "folds.csv")["fold"]) == [0, 1]


def test_env_creation_is_idempotent():
    if not isinstance(automl_env.locate(ENV), Path):
        pytest.skip(f"no auto-sklearn env at {ENV}")
    said: list[str] = []
    assert automl_env.create_env(ENV, log=said.append) == automl_env.env_python(ENV)
    assert said == [f"auto-sklearn environment at {ENV} is up to date (0.15.0)"]
