"""Training on a tiny prepared dataset on the CPU: learning, resume after kill -9, grid, tracking."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from agecascade.cli import main
from agecascade.data.manifest import make_row, to_frame
from agecascade.data.store import CROPS, MANIFEST, create_store
from agecascade.train.data import LabelSpace, assign_split

SIZE = 32


def write_prepared(folder: Path, n: int = 400, seed: int = 0) -> Path:
    """A prepared dataset whose images encode age as brightness: learnable in an epoch or two."""
    rng = np.random.default_rng(seed)
    ages = rng.integers(0, 60, n)
    folder.mkdir(parents=True)
    store = create_store(folder / CROPS, n, SIZE)
    for i, age in enumerate(ages):
        level = 40 + 3 * age
        store[i] = np.clip(rng.normal(level, 12, (SIZE, SIZE, 3)), 0, 255).astype(np.uint8)
    store.flush()
    rows = [make_row(f"img{i}.jpg", "toy", age=float(a), subject=f"s{i // 2}") for i, a in enumerate(ages)]
    frame = to_frame(rows)
    frame["sha1"] = [f"{i:040x}" for i in range(n)]
    frame.to_parquet(folder / MANIFEST, index=False)
    return folder


def train_args(manifest: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--manifest", str(manifest), "--backbone", "resnet18", "--input-size", str(SIZE),
            "--batch", "32", "--lr", "0.001", "--device", "cpu", "--no-track", "--out", str(out), *extra]


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> Path:
    return write_prepared(tmp_path_factory.mktemp("toy") / "prepared")


def test_split_is_by_subject_and_stable(toy):
    import pandas as pd

    manifest = pd.read_parquet(toy / MANIFEST)
    split = assign_split(manifest, 0.2, 0.1, seed=0)
    assert (split == assign_split(manifest.iloc[::-1], 0.2, 0.1, 0)[::-1]).all()  # order-free
    by_subject = pd.Series(split).groupby(manifest["subject"].to_numpy()).nunique()
    assert (by_subject == 1).all()  # a person never straddles two parts
    share = {p: (split == p).mean() for p in ("train", "val", "test")}
    assert 0.6 < share["train"] < 0.8 and 0.1 < share["val"] < 0.3 and 0.03 < share["test"] < 0.2


def test_label_space_covers_the_data_range():
    import pandas as pd

    space = LabelSpace.from_ages(pd.Series([3.0, 7.0, 5.0]))
    assert space.values == (3.0, 4.0, 5.0, 6.0, 7.0)
    assert space.encode(np.array([3.0, 7.0, 9.0])).tolist() == [0, 4, 4]


def test_training_learns_and_writes_its_outputs(toy, tmp_path):
    out = tmp_path / "run"
    assert main(train_args(toy, out, "--epochs", "3", "--test-fraction", "0.1")) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["val_mae"] < 0.6 * metrics["val_mae_median_baseline"]
    assert "test_mae" in metrics and metrics["n_test"] > 0
    history = (out / "history.csv").read_text().splitlines()
    assert history[0].startswith("epoch,train_loss") and len(history) == 4
    assert not (out / "last.pt").exists()  # a finished run leaves no resume point
    state = torch.load(out / "model.pt", weights_only=True)
    assert state["meta"]["backbone"] == "resnet18" and len(state["meta"]["ages"]) == 60


def test_evaluate_scores_a_model_file(toy, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(train_args(toy, out, "--epochs", "1", "--test-fraction", "0.1")) == 0
    capsys.readouterr()
    assert main(["evaluate", "--model", str(out / "model.pt"), "--manifest", str(toy),
                 "--split", "test", "--device", "cpu"]) == 0
    scored = json.loads(capsys.readouterr().out)
    metrics = json.loads((out / "metrics.json").read_text())
    assert scored["n"] == metrics["n_test"] and abs(scored["mae"] - metrics["test_mae"]) < 1e-4


def test_kill_9_then_rerun_ends_exactly_like_an_uninterrupted_run(toy, tmp_path):
    epochs = ["--epochs", "4"]
    assert main(train_args(toy, tmp_path / "straight", *epochs)) == 0
    killed = tmp_path / "killed"
    cmd = [sys.executable, "-m", "agecascade.cli", *train_args(toy, killed, *epochs)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (killed / "last.pt").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    resumed_from = torch.load(killed / "last.pt", weights_only=True)["epoch"] + 1
    assert resumed_from < 4 and not (killed / "metrics.json").exists()
    assert subprocess.run(cmd, capture_output=True).returncode == 0
    straight = json.loads((tmp_path / "straight" / "metrics.json").read_text())
    again = json.loads((killed / "metrics.json").read_text())
    assert again == straight
    a = torch.load(tmp_path / "straight" / "model.pt", weights_only=True)["model"]
    b = torch.load(killed / "model.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_grid_runs_every_point_once_and_feeds_the_stage(toy, tmp_path):
    out = tmp_path / "tune"
    assert main(["tune", *train_args(toy, out, "--max-train-batches", "2")[1:],
                 "--lrs", "0.01", "0.001", "--batches", "16", "32"]) == 0
    best = json.loads((out / "best.json").read_text())
    assert best["lr"] in (0.01, 0.001) and best["batch"] in (16, 32)
    import optuna

    study = optuna.load_study(study_name="resnet18-prepared", storage=f"sqlite:///{out / 'optuna.db'}")
    points = {(t.params["lr"], t.params["batch"]) for t in study.trials}
    assert len(study.trials) == 4 and len(points) == 4
    assert best["val_loss"] == min(t.value for t in study.trials)
    run = tmp_path / "run"
    assert main(train_args(toy, run, "--hparams", str(out / "best.json"))) == 0


def test_cascade_stage_inherits_arch_and_carries_output_units_by_age(toy, tmp_path, capsys):
    first = tmp_path / "first"
    assert main(train_args(toy, first, "--epochs", "1")) == 0
    older = write_prepared(tmp_path / "older", n=200, seed=1)
    import pandas as pd

    manifest = pd.read_parquet(older / MANIFEST)
    manifest["age"] = manifest["age"] + 10  # another label range: 10..69
    manifest.to_parquet(older / MANIFEST, index=False)
    second = tmp_path / "second"
    capsys.readouterr()
    assert main(train_args(older, second, "--epochs", "1", "--init", str(first / "model.pt"),
                           "--mode", "c")) == 0
    # ages 0..59 then 10..69: one class per year over both, the 10 new ages start fresh
    assert "head.0.weight (rows of 10 new labels)" in capsys.readouterr().out
    before = torch.load(first / "model.pt", weights_only=True)
    after = torch.load(second / "model.pt", weights_only=True)
    assert after["meta"]["arch"] == before["meta"]["arch"] == "resnet18"
    assert after["meta"]["ages"] == [float(a) for a in range(70)]
    assert after["model"]["head.0.weight"].shape[0] == 70


def test_output_units_are_matched_by_the_age_they_stand_for():
    from agecascade.nets import create_model
    from agecascade.train.cascade import load_init

    torch.manual_seed(0)
    old = create_model("resnet18", 5)           # ages 20..24
    new = create_model("resnet18", 4)           # ages 22..25
    fresh = load_init(new, old.state_dict(), (20.0, 21.0, 22.0, 23.0, 24.0), (22.0, 23.0, 24.0, 25.0))
    assert torch.equal(new.output_layer.weight[:3], old.output_layer.weight[2:])  # 22, 23, 24
    assert not torch.equal(new.output_layer.weight[3], old.output_layer.weight[4])
    assert torch.equal(new.features.conv1.weight, old.features.conv1.weight)
    assert sorted(fresh) == ["head.0.bias (rows of 1 new labels)",
                             "head.0.weight (rows of 1 new labels)"]
    # no label in common: the output layer keeps its own initialisation
    unrelated = create_model("resnet18", 4)
    kept = unrelated.output_layer.weight.clone()
    fresh = load_init(unrelated, old.state_dict(), (20.0, 21.0, 22.0, 23.0, 24.0), (1.0, 2.0, 3.0, 4.0))
    assert torch.equal(unrelated.output_layer.weight, kept)
    assert sorted(fresh) == ["head.0.bias", "head.0.weight"]


def test_mode_a_trains_only_the_head(toy, tmp_path):
    out = tmp_path / "a"
    assert main(train_args(toy, out, "--epochs", "1", "--mode", "a")) == 0
    torch.manual_seed(0)
    from agecascade.nets import create_model

    untouched = create_model("resnet18", 60).state_dict()
    trained = torch.load(out / "model.pt", weights_only=True)["model"]
    changed = {k for k in trained if not torch.equal(trained[k], untouched[k])}
    assert changed == {"head.0.weight", "head.0.bias"}


def test_tracked_run_lands_in_sqlite_mlflow_with_tags_curves_and_model(toy, tmp_path, monkeypatch):
    import mlflow

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    args = [a for a in train_args(toy, tmp_path / "run", "--epochs", "2") if a != "--no-track"]
    assert main([*args, "--stage", "finetune_toy"]) == 0
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["finetune_toy"], output_format="list")
    assert len(runs) == 1
    run = runs[0]
    assert {k: run.data.tags[k] for k in ("backbone", "stage", "mode", "dataset")} == {
        "backbone": "resnet18", "stage": "finetune_toy", "mode": "b", "dataset": "toy"}
    assert run.data.tags["git_commit"]
    client = mlflow.MlflowClient()
    for key in ("train_loss", "val_loss", "val_mae", "lr"):
        assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == [1, 2]
    assert run.info.artifact_uri.startswith((tmp_path / "mlruns").as_uri())
    model = mlflow.pytorch.load_model(f"runs:/{run.info.run_id}/model")
    assert model(torch.zeros(1, 3, SIZE, SIZE)).shape == (1, 60)
