"""`torchrun` data parallelism on the CPU (gloo): the data each process reads, who writes, and a
real two-process run against a one-process run of the same effective batch."""
from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from agecascade.cli import main
from agecascade.errors import UserError
from agecascade.train.data import BatchOrder, make_loader
from agecascade.train import tune
from agecascade.train.distributed import World, gpu_index
from test_adience import write_adience
from test_adience import write_init as write_adience_init
from test_lopo import lopo_args, write_fgnet_like, write_init
from test_train import train_args, tune_args, write_prepared

BIN = Path(sys.executable).parent


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("size", [2, 3])
def test_the_processes_of_a_step_read_the_rows_one_process_reads_with_the_effective_batch(
        weighted, size):
    rows = np.arange(100, 200)
    weights = np.linspace(1, 3, len(rows)) if weighted else None
    one = BatchOrder(rows, 8 * size, True, seed=4, drop_last=True, weights=weights)
    many = [BatchOrder(rows, 8, True, seed=4, drop_last=True, weights=weights,
                       world=World(rank, size)) for rank in range(size)]
    for epoch in (0, 1):
        for order in (one, *many):
            order.set_epoch(epoch)
        steps = list(zip(*many))
        assert [len(m) for m in many] == [len(steps)] * size
        assert len(steps) == len(one) == len(list(one)) == 100 // (8 * size)
        for batch, parts in zip(one, steps):
            assert [row for part in parts for row in part] == batch


def test_validation_rows_are_split_between_processes_without_loss_or_overlap():
    rows = np.arange(53)                      # an uneven tail: 53 = 3 x 16 + 5
    orders = [BatchOrder(rows, 8, False, world=World(rank, 2)) for rank in range(2)]
    seen = [row for order in orders for batch in order for row in batch]
    assert sorted(seen) == rows.tolist()
    assert [len(order) for order in orders] == [len(list(order)) for order in orders] == [4, 3]


def test_a_training_set_smaller_than_one_global_batch_is_refused():
    with pytest.raises(UserError, match="fewer than one global batch"):
        make_loader(np.zeros((10, 4, 4, 3), np.uint8), np.zeros(10, np.int64), np.arange(10),
                    8, True, 0, 0, False, world=World(0, 2))


def test_a_rank_other_than_0_writes_nothing(tmp_path, monkeypatch):
    """What keeps rank 1 of a torchrun from writing: it trains its share (alone here, without
    a process group) but leaves no checkpoint, resume point, metrics or history."""
    from agecascade.train import distributed

    store = write_prepared(tmp_path / "toy", n=120)
    rank1 = World(1, 2, 1)
    monkeypatch.setattr(distributed, "from_env", lambda: rank1)
    monkeypatch.setattr(distributed, "join", lambda device: (rank1, device))
    # no other process to average gradients or sum scores with
    monkeypatch.setattr(distributed, "wrap", lambda model, device, world: model)
    monkeypatch.setattr(distributed, "all_sum", lambda values, world: values)
    out = tmp_path / "rank1"
    assert main(train_args(store, out, "--epochs", "1")) == 0
    assert not out.exists() or not any(out.iterdir())


def test_a_rank_outside_the_world_is_refused(monkeypatch):
    from agecascade.train import distributed

    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UserError, match="RANK 2 is outside WORLD_SIZE 2"):
        distributed.from_env()


def test_processes_that_train_alone_go_round_the_gpus_and_ddp_takes_one_each():
    node = [World(rank, 6, local_rank=rank) for rank in range(6)]
    assert [gpu_index(w, 2, shared=True) for w in node] == [0, 1, 0, 1, 0, 1]  # 3 folds a GPU
    assert [gpu_index(w, 8, shared=False) for w in node] == [0, 1, 2, 3, 4, 5]
    with pytest.raises(UserError, match="--nproc-per-node 2 at most"):
        gpu_index(node[2], 2, shared=False)  # NCCL: one DDP process per GPU


def test_commands_that_are_not_data_parallel_refuse_under_torchrun(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["evaluate", "--model", "m.pt", "--manifest", "x"]) == 2
    err = capsys.readouterr().err
    assert "only train, lopo, tune, adience share their work between processes" in err


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return write_prepared(tmp_path_factory.mktemp("ddp") / "prepared", n=400)


def run_train(argv: list[str], cwd: Path, launcher: str) -> subprocess.CompletedProcess:
    """``launcher ARGV`` (ARGV: train ...), as a DVC stage runs it (params.yaml's ``launcher``)."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{cwd / 'mlflow.db'}",
           "OMP_NUM_THREADS": "1", "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    done = subprocess.run([*shlex.split(launcher), *argv], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    return done


# Both runs below take the same optimiser steps on the same images; they differ in the random
# augmentation of each image (drawn per process) and in BatchNorm statistics (per process batch
# of 16 against 32). On this toy set that moved the validation MAE by 0.78, 1.12 and 0.23 years
# at seeds 0, 1 and 2, against a median baseline of about 15.
TOLERANCE = 3.0


def test_torchrun_two_processes_train_like_one_and_rank_0_alone_writes(store, tmp_path):
    # a test split: rank 0 scores it alone after training, with no other process to sum with
    argv = [a for a in train_args(store, tmp_path / "ddp", "--epochs", "3", "--batch", "16",
                                  "--lr", "0.0005", "--scale-lr", "--test-fraction", "0.2")
            if a != "--no-track"]
    two = run_train(argv, tmp_path, "torchrun --standalone --nproc-per-node 2 -m agecascade")
    log = two.stdout + two.stderr
    assert "world size 2: effective batch 32 (2 processes x 16), lr 0.001 (--scale-lr)" in log
    assert log.count("epoch 1/3") == 1          # rank 0 alone reports
    one_out = tmp_path / "one"
    single = [a for a in train_args(store, one_out, "--epochs", "3", "--test-fraction", "0.2")
              if a != "--no-track"]
    run_train(single, tmp_path, "agecascade")   # batch 32, lr 0.001: the same effective run

    ddp, one = (json.loads((p / "metrics.json").read_text()) for p in (tmp_path / "ddp", one_out))
    assert ddp["val_mae"] < 0.6 * ddp["val_mae_median_baseline"]  # it learns
    assert abs(ddp["val_mae"] - one["val_mae"]) < TOLERANCE, (ddp, one)
    assert ddp["n_test"] == one["n_test"] > 0  # every test row, scored once
    assert abs(ddp["test_mae"] - one["test_mae"]) < TOLERANCE, (ddp, one)
    meta = torch.load(tmp_path / "ddp" / "model.pt", weights_only=True)["meta"]
    assert meta["world_size"] == 2
    assert not (tmp_path / "ddp" / "last.pt").exists()
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["train"], output_format="list")
    assert sorted(r.data.params["world_size"] for r in runs) == ["1", "2"]  # one run each


def test_torchrun_shares_the_lopo_folds_and_predicts_as_one_process(tmp_path):
    """Mode b under torchrun: each process trains its share of the folds, rank 0 the final
    model and every output, and the predictions are those of one process (each fold starts
    from the same weights with its own seed), up to float summation order."""
    fgnet = write_fgnet_like(tmp_path / "prepared")
    init = write_init(tmp_path / "init.pt", tuple(float(a) for a in range(100)))
    argv = [a for a in lopo_args(fgnet, init, tmp_path / "two", "b", "--epochs", "1")
            if a != "--no-track"]
    two = run_train(argv, tmp_path, "torchrun --standalone --nproc-per-node 2 -m agecascade")
    log = two.stdout + two.stderr
    assert "2 processes share the folds" in log
    assert len(re.findall(r"fold \d+/8 ", log)) == 8 and log.count('"mae"') == 1  # each once
    run_train(lopo_args(fgnet, init, tmp_path / "one", "b", "--epochs", "1"), tmp_path,
              "agecascade")
    two_p, one_p = (pd.read_csv(tmp_path / d / "predictions.csv").sort_values("path")
                    for d in ("two", "one"))
    np.testing.assert_allclose(two_p["predicted"], one_p["predicted"], atol=0.05)
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == \
        sorted(p.name for p in (tmp_path / "one").iterdir())        # no folds/ left behind
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["fgnet_lopo"], output_format="list")
    assert sum(r.data.tags.get("mlflow.parentRunId") is None for r in runs) == 1
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") is not None]
    assert len(children) == 8  # a child run per fold, the other process's folds included


def test_mode_a_refuses_torchrun(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    fgnet = write_fgnet_like(tmp_path / "prepared")
    init = write_init(tmp_path / "init.pt", tuple(float(a) for a in range(100)))
    assert main(lopo_args(fgnet, init, tmp_path / "a", "a")) == 2
    assert "mode a trains every fold's head at once in one process" in capsys.readouterr().err


def test_torchrun_processes_share_the_tune_grid_and_rank_0_logs_every_point(tmp_path):
    """Under torchrun each process is a worker of the grid's study: every point is trained
    once by one of them, alone; rank 0 writes best.json and logs all four points."""
    from test_tune_shared import study_of

    store = write_prepared(tmp_path / "prepared", n=40)
    argv = [a for a in tune_args(store, tmp_path / "tune", ("0.01", "0.001"), ("8", "16"),
                                 "--max-train-batches", "1") if a != "--no-track"]
    done = run_train(argv, tmp_path, "torchrun --standalone --nproc-per-node 2 -m agecascade")
    log = done.stdout + done.stderr
    assert len(re.findall(r"^epoch 1/1 ", log, re.M)) == 4 and log.count("best of 4") == 1
    study = study_of(argv)
    complete = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert sorted(tune.point_of(t) for t in complete) == [(0.001, 8), (0.001, 16), (0.01, 8),
                                                          (0.01, 16)]
    best = json.loads((tmp_path / "tune" / "best.json").read_text())
    winner = min(complete, key=lambda t: t.value)
    assert best == {**winner.params, "val_loss": winner.value}
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["tune"], output_format="list")
    points = [r for r in runs if r.data.tags.get("mlflow.parentRunId") is not None]
    assert len(runs) - len(points) == 1  # one grid run, rank 0's
    assert sorted((float(r.data.params["lr"]), int(r.data.params["batch"]),
                   r.data.metrics["val_loss"]) for r in points) == \
        sorted((*tune.point_of(t), t.value) for t in complete)


def test_torchrun_shares_the_adience_folds_and_scores_as_one_process(tmp_path):
    """Each process trains every second fold untracked; rank 0 reuses them all, logging each
    under its grid run, and writes the summary that one process writes."""
    store = write_adience(tmp_path / "prepared")
    init = write_adience_init(tmp_path / "init.pt")

    def argv(out: str) -> list[str]:
        return ["adience", "--manifest", str(store), "--init", str(init), "--out",
                str(tmp_path / out), "--epochs", "2", "--lr", "0.001", "--batch", "16",
                "--device", "cpu"]

    two = run_train(argv("two"), tmp_path, "torchrun --standalone --nproc-per-node 2 -m agecascade")
    log = two.stdout + two.stderr
    run_train([*argv("one"), "--no-track"], tmp_path, "agecascade")
    folds = pd.read_csv(tmp_path / "two" / "folds.csv")
    assert len(folds) == 10 and len(re.findall(r"training on \d+", log)) == 10  # each once
    metrics = {d: json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("two", "one")}
    for key, value in metrics["one"].items():
        assert metrics["two"][key] == pytest.approx(value, abs=0.02), key
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["adience"], output_format="list")
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") is not None]
    assert len(runs) - len(children) == 1 and len(children) == 10  # a run per fold, under rank 0's
