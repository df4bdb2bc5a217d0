"""`agecascade tune --storage`: workers that share one Optuna study split its grid, train each
point once, and train again the points of workers that failed or are gone."""
from __future__ import annotations

import json
import os
import re
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from agecascade.cli import main
from agecascade.train import tune
from test_train import Killed, fake_trials, parse, toy, tune_args, write_prepared  # noqa: F401

AGECASCADE = Path(sys.executable).parent / "agecascade"
GRID = [(0.001, 16), (0.001, 32), (0.01, 16), (0.01, 32)]  # tune_args's, in grid order


def opened(argv: list[str]):
    """The study `agecascade tune` with ``argv`` works in (created if need be), and its storage."""
    import optuna

    from agecascade.pipelines.tune import config_from

    config = config_from(parse(argv))
    storage = tune.open_storage(config)
    return optuna.create_study(study_name=tune.study_name(config), direction="minimize",
                               storage=storage, load_if_exists=True), storage


def study_of(argv: list[str]):
    return opened(argv)[0]


def states(study) -> dict[tuple[float, int], list[str]]:
    """(lr, batch) -> the states of its trials, in trial order."""
    found: dict[tuple[float, int], list[str]] = {}
    for t in study.trials:
        found.setdefault(tune.point_of(t), []).append(t.state.name)
    return found


def set_worker(argv: list[str], point: tuple[float, int], host: str, pid: int) -> None:
    """Make the RUNNING trial of ``point`` look as if ``host``'s process ``pid`` trained it."""
    study, storage = opened(argv)
    (running,) = [t for t in study.trials
                  if t.state.name == "RUNNING" and tune.point_of(t) == point]
    storage.set_trial_user_attr(tune.trial_id(study, storage, running.number), tune.WORKER,
                                {"host": host, "pid": pid})


def in_thread(argv: list[str]) -> threading.Thread:
    """``main(argv)`` in a daemon thread: a worker that never stops fails a test, not hangs it."""
    worker = threading.Thread(target=main, args=(argv,), daemon=True)
    worker.start()
    return worker


def test_two_workers_started_at_once_train_each_point_once(tmp_path):
    store = write_prepared(tmp_path / "prepared", n=40)
    argv = [str(AGECASCADE), *tune_args(store, tmp_path / "tune", ("0.01", "0.001"), ("8", "16"),
                                        "--max-train-batches", "1"),
            "--storage", f"journal:{tmp_path / 'study.journal'}"]
    # tracked, into a new MLflow store that both workers create at once (tracking's lock)
    tracked = [a for a in argv if a != "--no-track"]
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    workers = [subprocess.Popen(tracked, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, cwd=tmp_path, env=env) for _ in range(2)]
    outputs = [w.communicate(timeout=300)[0] for w in workers]
    assert [w.returncode for w in workers] == [0, 0], outputs
    with sqlite3.connect(tmp_path / "mlflow.db") as db:   # one store, a grid run per worker
        assert db.execute("select count(*) from runs").fetchone()[0] >= 2
    # each trained point prints its one epoch: four in all, whoever trained them
    assert sum(len(re.findall(r"^epoch 1/1 ", out, re.M)) for out in outputs) == 4
    study = study_of(argv[1:])
    complete = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert sorted(tune.point_of(t) for t in complete) == [(0.001, 8), (0.001, 16), (0.01, 8),
                                                          (0.01, 16)]
    assert {t.user_attrs[tune.WORKER]["pid"] for t in complete} <= {w.pid for w in workers}
    # the rest can only be copies of a point both workers queued at once, left untrained
    assert all(t.state.name == "PRUNED" and "duplicate_of" in t.user_attrs
               for t in study.trials if t.state.name != "COMPLETE")
    best = json.loads((tmp_path / "tune" / "best.json").read_text())
    winner = min(complete, key=lambda t: t.value)
    assert best == {**winner.params, "val_loss": winner.value}


def test_a_failed_point_is_trained_again_by_the_next_worker(toy, tmp_path, fake_trials):
    calls, plan = fake_trials
    storage = ["--storage", f"journal:{tmp_path / 'study.journal'}"]
    plan[(0.001, 32)] = RuntimeError("out of memory")
    with pytest.raises(RuntimeError):
        main([*tune_args(toy, tmp_path / "first"), *storage])
    assert calls == GRID[:2]
    calls.clear()
    second = [*tune_args(toy, tmp_path / "second"), *storage]  # another machine's worker
    assert main(second) == 0
    assert calls == [*GRID[2:], (0.001, 32)]  # the queued points, then the failed one again
    assert states(study_of(second)) == {(0.001, 16): ["COMPLETE"],
                                        (0.001, 32): ["FAIL", "COMPLETE"],
                                        (0.01, 16): ["COMPLETE"], (0.01, 32): ["COMPLETE"]}
    assert json.loads((tmp_path / "second" / "best.json").read_text()) == {
        "lr": 0.001, "batch": 16, "val_loss": 0.1 + 0.016}
    calls.clear()
    assert main(second) == 0
    assert calls == []  # a complete grid: nothing left to train


def test_a_point_killed_in_this_process_is_trained_again_at_once(toy, tmp_path, fake_trials):
    calls, plan = fake_trials
    argv = [*tune_args(toy, tmp_path / "tune"), "--storage", f"journal:{tmp_path / 'j'}"]
    plan[(0.001, 16)] = Killed()
    with pytest.raises(Killed):
        main(argv)
    assert states(study_of(argv))[(0.001, 16)] == ["RUNNING"]
    calls.clear()
    assert main(argv) == 0
    assert calls == [*GRID[1:], (0.001, 16)]
    assert states(study_of(argv))[(0.001, 16)] == ["FAIL", "COMPLETE"]


@pytest.mark.parametrize("storage", ["journal:{tmp}/study.journal", "sqlite:///{tmp}/study.db"])
def test_a_live_workers_point_is_waited_for_and_trained_again_once_it_dies(
        toy, tmp_path, fake_trials, monkeypatch, capsys, storage):
    calls, plan = fake_trials
    argv = [*tune_args(toy, tmp_path / "tune"), "--storage", storage.format(tmp=tmp_path)]
    plan[(0.001, 16)] = Killed()
    with pytest.raises(Killed):
        main(argv)
    other = subprocess.Popen(["sleep", "60"])  # another worker on this machine, training
    set_worker(argv, (0.001, 16), socket.gethostname(), other.pid)
    calls.clear()
    monkeypatch.setattr(tune, "POLL_S", 0.05)
    capsys.readouterr()
    worker = in_thread(argv)
    try:
        deadline = time.monotonic() + 20
        while len(calls) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)
        assert calls == GRID[1:]  # its own share done, it waits for the other worker's point
        assert worker.is_alive()
    finally:
        other.kill()
        other.wait()
    worker.join(timeout=20)
    assert not worker.is_alive()
    assert calls == [*GRID[1:], (0.001, 16)]
    assert states(study_of(argv))[(0.001, 16)] == ["FAIL", "COMPLETE"]
    assert (f"waiting for 1 grid points other workers are training: lr 0.001 batch 16 "
            f"({socket.gethostname()} pid {other.pid})") in capsys.readouterr().out


def test_an_rdb_trial_whose_heartbeat_stopped_is_trained_again(toy, tmp_path, fake_trials,
                                                                monkeypatch):
    """A worker on another machine, killed: only its heartbeat, gone stale, tells."""
    calls, plan = fake_trials
    monkeypatch.setattr(tune, "HEARTBEAT_S", 1)  # stale 2 s after the last beat
    monkeypatch.setattr(tune, "POLL_S", 0.2)
    argv = [*tune_args(toy, tmp_path / "tune"), "--storage", f"sqlite:///{tmp_path}/study.db"]
    plan[(0.001, 16)] = Killed()
    with pytest.raises(Killed):
        main(argv)
    set_worker(argv, (0.001, 16), "elsewhere", 1)
    calls.clear()
    in_thread(argv).join(timeout=30)
    assert calls == [*GRID[1:], (0.001, 16)]
    assert states(study_of(argv))[(0.001, 16)] == ["FAIL", "COMPLETE"]


def test_a_point_queued_twice_is_trained_once(toy, tmp_path, fake_trials):
    """Two workers that enqueue the grid at the same moment both queue its points."""
    calls, _ = fake_trials
    argv = [*tune_args(toy, tmp_path / "tune"), "--storage", f"journal:{tmp_path / 'j'}"]
    study = study_of(argv)
    study.enqueue_trial({"lr": 0.001, "batch": 16})
    study.enqueue_trial({"lr": 0.001, "batch": 16})
    assert main(argv) == 0
    assert calls == GRID
    assert states(study)[(0.001, 16)] == ["COMPLETE", "PRUNED"]
    assert study_of(argv).trials[1].user_attrs["duplicate_of"] == 0


def test_which_running_trials_have_lost_their_worker(tmp_path):
    from optuna.trial import TrialState, create_trial

    def running(worker: dict | None, started_s_ago: float = 0):
        t = create_trial(state=TrialState.RUNNING,
                         user_attrs={tune.WORKER: worker} if worker else None)
        t.datetime_start = datetime.now() - timedelta(seconds=started_s_ago)
        return t

    here = socket.gethostname()
    ended = subprocess.Popen(["true"])
    ended.wait()
    assert tune.worker_gone(running({"host": here, "pid": ended.pid}))
    assert tune.worker_gone(running({"host": here, "pid": os.getpid()}))  # none in flight here
    assert not tune.worker_gone(running({"host": here, "pid": os.getppid()}))
    assert not tune.worker_gone(running({"host": "elsewhere", "pid": ended.pid}))
    assert not tune.worker_gone(running(None))  # just asked: its worker is not recorded yet
    assert tune.worker_gone(running(None, started_s_ago=3 * tune.HEARTBEAT_S))


def test_storage_option_is_documented_and_checked(toy, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["tune", "--help"])
    assert "--storage URL" in capsys.readouterr().out
    for storage, message in [("db.sqlite", "expected journal:PATH or a database URL"),
                             ("journal:", "expected journal:PATH or a database URL"),
                             ("postgres://u@h/db", "cannot open the study's database")]:
        assert main([*tune_args(toy, tmp_path / "tune"), "--storage", storage]) == 2
        assert message in capsys.readouterr().err
