"""tracking.tracked_run after a failed or killed attempt: one run per set of params, never two
attempts' params in one run. One sqlite store for the module; each test its own experiment."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import mlflow
import pytest
from mlflow import MlflowClient

from agecascade import tracking

PARAMS = {"lr": 0.001, "epochs": 3, "out": Path("models/x")}


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("tracking")
    previous_uri = mlflow.get_tracking_uri()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
        patch.chdir(root)
        tracking.tracking_uri()
        yield SimpleNamespace(root=root, client=MlflowClient())
    mlflow.set_tracking_uri(previous_uri)


def leftover(store, experiment: str, out: Path, params: dict, status: str) -> str:
    """What an attempt leaves behind: its run (RUNNING if the process was killed) with its
    params logged, and the run's id in ``out``."""
    run = store.client.create_run(tracking.experiment_id(experiment))
    for key, value in params.items():
        store.client.log_param(run.info.run_id, key, value)
    if status != "RUNNING":
        store.client.set_terminated(run.info.run_id, status)
    out.mkdir(parents=True)
    (out / tracking.RUN_ID_FILE).write_text(run.info.run_id)
    return run.info.run_id


def test_a_failed_attempt_ends_failed_and_a_retry_with_its_params_continues_it(store):
    out = store.root / "failed"
    with pytest.raises(RuntimeError, match="out of memory"):
        with tracking.tracked_run("fails", "r", out, {"stage": "s"}, PARAMS) as first:
            tracking.log_epoch(1, {"val_mae": 9.0})
            raise RuntimeError("out of memory")
    assert store.client.get_run(first.info.run_id).info.status == "FAILED"
    assert (out / tracking.RUN_ID_FILE).read_text() == first.info.run_id

    with tracking.tracked_run("fails", "r", out, {"stage": "s"}, dict(PARAMS)) as again:
        tracking.log_epoch(2, {"val_mae": 8.0})
    assert again.info.run_id == first.info.run_id
    run = store.client.get_run(first.info.run_id)
    assert run.info.status == "FINISHED"
    assert [m.step for m in store.client.get_metric_history(run.info.run_id, "val_mae")] == [1, 2]
    assert not (out / tracking.RUN_ID_FILE).exists()


@pytest.mark.parametrize("status, ends_as", [("RUNNING", "KILLED"), ("FAILED", "FAILED")])
def test_a_retry_with_other_params_gets_a_fresh_run(store, status, ends_as):
    experiment, out = f"other-{status}", store.root / f"other-{status}"
    old = leftover(store, experiment, out, PARAMS, status)
    changed = {**PARAMS, "lr": 0.01}
    with tracking.tracked_run(experiment, "r", out, {"stage": "s"}, changed) as run:
        tracking.log_epoch(1, {"val_mae": 7.0})
    assert run.info.run_id != old
    fresh, stale = store.client.get_run(run.info.run_id), store.client.get_run(old)
    assert fresh.data.params["lr"] == "0.01" and fresh.info.status == "FINISHED"
    assert stale.data.params["lr"] == "0.001"  # each attempt keeps its own params
    assert stale.info.status == ends_as  # a killed attempt no longer shows as running
    assert "val_mae" not in stale.data.metrics


def test_a_killed_attempt_is_resumed_by_a_retry_with_the_same_params(store):
    out = store.root / "killed"
    old = leftover(store, "killed", out, PARAMS, "RUNNING")
    with tracking.tracked_run("killed", "r", out, {"stage": "s"}, PARAMS) as run:
        pass
    assert run.info.run_id == old
    assert store.client.get_run(old).info.status == "FINISHED"


@pytest.mark.parametrize("case", ["finished", "other experiment", "unknown id", "not an id"])
def test_a_run_id_that_cannot_be_continued_starts_a_fresh_run(store, case):
    out = store.root / f"fresh-{case.replace(' ', '-')}"
    if case == "finished":
        old = leftover(store, "fresh", out, PARAMS, "FINISHED")
    elif case == "other experiment":
        old = leftover(store, "elsewhere", out, PARAMS, "RUNNING")
    else:
        out.mkdir()
        old = "0" * 32 if case == "unknown id" else "not a run id\n"
        (out / tracking.RUN_ID_FILE).write_text(old)
    with tracking.tracked_run("fresh", "r", out, {"stage": "s"}, PARAMS) as run:
        pass
    assert run.info.run_id != old.strip()
    assert run.info.experiment_id == tracking.experiment_id("fresh")
    assert store.client.get_run(run.info.run_id).data.params["epochs"] == "3"


def test_a_nested_run_is_continued_only_under_its_own_parent(store):
    """An Adience fold's run left by a killed attempt: the same parent continues it; a retry
    under another parent run (other settings) gets a fresh one, and the old one ends KILLED."""
    experiment = tracking.experiment_id("nested")
    parent, other = (store.client.create_run(experiment).info.run_id for _ in range(2))
    fold = store.client.create_run(experiment, tags={"mlflow.parentRunId": parent})
    id_file = store.root / "fold" / tracking.RUN_ID_FILE
    id_file.parent.mkdir()
    id_file.write_text(fold.info.run_id)
    assert tracking.resumable_run(id_file, experiment, {}, parent=parent) == fold.info.run_id
    assert tracking.resumable_run(id_file, experiment, {}, parent=other) is None
    assert store.client.get_run(fold.info.run_id).info.status == "KILLED"


def test_a_queued_dvc_experiment_logs_to_the_users_store_not_its_temporary_copy(tmp_path,
                                                                                monkeypatch):
    """`dvc exp run --queue` runs each experiment in <checkout>/.dvc/tmp/exps/<tmp>/ and then
    deletes that copy: its runs and artifacts must land in the checkout's mlflow.db and mlruns/."""
    checkout = tmp_path / "checkout"
    copy = checkout / ".dvc" / "tmp" / "exps" / "tmpq1x2"
    (copy / "mlruns").mkdir(parents=True)
    (copy / "mlruns" / ".gitkeep").touch()   # git's, as in the project's checkout
    assert tracking.user_checkout(copy) == checkout
    assert tracking.user_checkout(checkout) is None
    previous_uri = mlflow.get_tracking_uri()
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(copy)
    try:
        with tracking.tracked_run("queued", "run", copy / "out", {"stage": "q"}, {"seed": 1}):
            (copy / "note.txt").write_text("an artifact")
            mlflow.log_artifact(str(copy / "note.txt"))
            run_id = mlflow.active_run().info.run_id
    finally:
        mlflow.set_tracking_uri(previous_uri)
    assert not (copy / "mlflow.db").exists()
    client = MlflowClient(f"sqlite:///{checkout / 'mlflow.db'}")
    assert client.get_run(run_id).data.params == {"seed": "1"}
    (artifact,) = (checkout / "mlruns").rglob("note.txt")
    assert artifact.read_text() == "an artifact" and run_id in artifact.parts
    # in the copy, only links inside mlruns/ (git ignores its content): nothing to commit
    assert all(p.is_symlink() for p in (copy / "mlruns").iterdir() if p.name != ".gitkeep")
