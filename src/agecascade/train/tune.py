"""The thesis's lr x batch-size grid: one `train` run of one epoch per point, lowest val loss wins.

The study lives in ``out/optuna.db`` (SQLite), or in the storage ``--storage`` names: a journal
file for workers on one machine, a database server for workers on many. Its name carries a
fingerprint of the grid and of everything a trial depends on (data, starting weights, code,
settings), so a changed grid or changed data starts a study of its own.

Any number of workers (processes started with the same grid and settings) share a study and
split its points through Optuna's queue. Each worker, in rounds:

1. fails the RUNNING trials whose worker is gone (see below), so their points are trained again;
2. enqueues, in grid order, every point that has no trial finished, queued or running;
3. pops queued trials with ``study.ask()`` (atomic in RDB and journal storages: a trial goes to
   one worker), trains each and ``study.tell()``\\s its val loss, or FAIL if training raised
   (then re-raises). Two workers that enqueue the same point at once leave it queued twice:
   the worker that pops the later copy finds the earlier one and tells its own PRUNED, with a
   ``duplicate_of`` user attr, so the point is still trained once;
4. once the queue is empty, the grid is either complete, or other workers are still training
   points: the worker then waits for them (printing which points, by which workers, each time
   that set changes), polling every :data:`POLL_S` seconds, and goes back to 1. A point another
   worker failed is thus trained by a worker still running.

Under ``torchrun`` each process is such a worker, on its own GPU (LOCAL_RANK) on CUDA, training
its points alone (no DDP: the grid's points are independent runs). Rank 0 alone writes
``best.json`` and reports every process's points to ``on_trial`` (the others' from the metrics
each worker stores on its trials).

So every worker ends with the grid complete and writes the same ``out/best.json`` (the best
COMPLETE trial), which `agecascade train --hparams` reads
(:func:`agecascade.train.finetune.read_hparams`); none writes it from a partial grid. A rerun
of a complete grid trains nothing, and one of an interrupted grid trains only what is missing.

A worker is gone when (a) it ran on this machine and its process has ended, or the process is
this one (between two trials a worker holds no trial of its own; a kill -9 ends the process,
so a rerun on the same machine retrains the point at once), or (b) in an RDB storage, Optuna's
heartbeat says so: each trial's worker records a heartbeat every :data:`HEARTBEAT_S` seconds,
and ``optuna.storages.fail_stale_trials`` fails a trial whose heartbeat is older than twice
that (Optuna's default grace), whichever machine ran it. Optuna's journal storage has no
heartbeat, so on a journal, a trial of a killed worker on another machine is waited for
forever: the journal file is for one machine. A RUNNING trial with no worker recorded (a kill
in the instant between ``ask()`` and recording the worker, or another program) counts as gone
once it started more than the same grace ago.

Nothing here logs to an experiment tracker: :func:`run` reports each trial it trains to the
caller's ``on_trial``.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import socket
import threading
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from agecascade.atomic import write_text_atomic
from agecascade.cache import fingerprint
from agecascade.config import option
from agecascade.errors import UserError
from agecascade.train import distributed, finetune
from agecascade.train.finetune import FinetuneConfig

if TYPE_CHECKING:
    import optuna
    from optuna.storages import BaseStorage
    from optuna.trial import FrozenTrial

# The `train` settings a grid point sets: the two searched, and the one epoch each point gets.
POINT_SETTINGS = ("lr", "batch", "epochs")
TRIAL_EPOCHS = 1

JOURNAL = "journal:"  # --storage journal:PATH, an Optuna journal file
HEARTBEAT_S = 60      # RDB storages: a trial's heartbeat period; 2x this is the grace period
POLL_S = 5.0          # how often a worker waiting for the others' points looks again
WORKER = "worker"     # the user attr that names a trial's worker: {"host", "pid"}
METRICS = "metrics"   # the user attr holding a finished trial's summary (its float values)

Point = tuple[float, int]


@dataclass(frozen=True, kw_only=True)
class TuneConfig:
    """The grid (its defaults are the thesis's), where its study lives, and the `train` settings
    every point runs with: ``trial`` holds them, so they and their defaults live in
    ``FinetuneConfig`` only. Its lr, batch and epochs are replaced by each point's
    (:data:`POINT_SETTINGS`)."""
    lrs: tuple[float, ...] = option((0.1, 0.01, 0.001, 0.0001), help="learning rates to try")
    batches: tuple[int, ...] = option((12, 32, 48, 64), help="batch sizes to try")
    storage: str = option(
        "", metavar="URL",
        help="the Optuna study's storage, which workers started with the same grid and "
             "settings share, splitting the grid between them: empty (the default) is "
             "OUT/optuna.db; journal:PATH an Optuna journal file, for workers on one machine; "
             "or a database URL (postgresql://USER:PASSWORD@HOST/DB, mysql://..., "
             "sqlite:///PATH) for workers on many machines (its driver, e.g. psycopg2, is "
             "yours to install)")
    trial: FinetuneConfig

    def __post_init__(self) -> None:
        if not self.lrs or not self.batches:
            raise UserError("--lrs and --batches each need at least one value")
        if min(self.lrs) <= 0 or min(self.batches) < 1:
            raise UserError(f"--lrs must be > 0 and --batches >= 1 (got {self.lrs}, "
                            f"{self.batches})")
        journal = self.storage.startswith(JOURNAL)
        if self.storage and not (journal and self.storage[len(JOURNAL):]) \
                and "://" not in self.storage:
            raise UserError(f"--storage {self.storage!r}: expected journal:PATH or a database "
                            "URL such as postgresql://USER:PASSWORD@HOST/DB")
        # a set, in order: the same grid written twice or in another order is the same study
        object.__setattr__(self, "lrs", tuple(sorted(set(self.lrs))))
        object.__setattr__(self, "batches", tuple(sorted(set(self.batches))))

    @property
    def out(self) -> Path:
        return self.trial.out

    def grid(self) -> list[Point]:
        """(lr, batch) points, by lr, then batch."""
        return [(lr, batch) for lr in self.lrs for batch in self.batches]

    def point(self, lr: float, batch: int) -> FinetuneConfig:
        """One grid point as a `train` run of one epoch, in its own folder under out/trials."""
        return replace(self.trial, lr=lr, batch=batch, epochs=TRIAL_EPOCHS,
                       out=self.out / "trials" / f"lr{lr:g}-batch{batch}")


def study_name(config: TuneConfig) -> str:
    """``backbone-dataset-fingerprint``: the grid, plus what a trial's resume key covers. The
    first point's key stands for every point's: they differ by the grid's values alone."""
    first = config.point(*config.grid()[0])
    key = fingerprint(grid={"lr": list(config.lrs), "batch": list(config.batches)},
                      trial=finetune.starting_point(first, alone=True).key)
    return f"{config.trial.backbone}-{config.trial.manifest.name}-{key[:16]}"


def open_storage(config: TuneConfig) -> BaseStorage:
    """The study's storage: a journal file, or a database with Optuna's heartbeat on."""
    import optuna
    import sqlalchemy.exc
    from optuna.exceptions import ExperimentalWarning
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    if config.storage.startswith(JOURNAL):
        path = Path(config.storage[len(JOURNAL):]).expanduser()
        path.parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(str(path)))
    url = config.storage or f"sqlite:///{(config.out / 'optuna.db').resolve()}"
    try:
        with warnings.catch_warnings():  # the heartbeat is experimental, and has been since 2.9
            warnings.simplefilter("ignore", ExperimentalWarning)
            return optuna.storages.RDBStorage(url, heartbeat_interval=HEARTBEAT_S)
    except (ImportError, sqlalchemy.exc.SQLAlchemyError) as error:
        raise UserError(f"--storage: cannot open the study's database "
                        f"({type(error).__name__}: {error})") from error


def run(config: TuneConfig,
        on_trial: Callable[[float, int, dict], None] | None = None) -> dict:
    """Train, with the study's other workers, every grid point that has no finished trial;
    write and return best.json's content ({"lr", "batch", "val_loss"}) once the grid is
    complete. ``on_trial(lr, batch, summary)`` sees each point this worker trains."""
    import optuna
    from optuna.trial import TrialState

    world = distributed.from_env()
    config.out.mkdir(parents=True, exist_ok=True)
    storage = open_storage(config)
    study = optuna.create_study(study_name=study_name(config), direction="minimize",
                                storage=storage, load_if_exists=True)
    grid = config.grid()
    if done := len(completed(study)):
        print(f"resuming study {study.study_name}: {done} of {len(grid)} grid points already "
              "trained")
    waiting_for: list[str] = []
    while True:
        fail_gone_workers(study, storage)
        enqueue_missing(study, grid)
        work(config, study, storage, on_trial)
        if not set(grid) - completed(study):
            break
        running = [f"lr {lr:g} batch {batch} ({worker})" for (lr, batch), worker
                   in sorted(running_points(study).items())]
        if running and running != waiting_for:
            print(f"waiting for {len(running)} grid points other workers are training: "
                  + ", ".join(running))
        waiting_for = running
        if running:
            time.sleep(POLL_S)
    best = study.best_trial
    shutil.rmtree(config.out / "trials", ignore_errors=True)
    content = {"lr": best.params["lr"], "batch": best.params["batch"], "val_loss": best.value}
    if world.size > 1 and not world.main:
        return content
    if world.size > 1 and on_trial is not None:  # the other processes' points, as rank 0's
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            if t.user_attrs.get(WORKER) != this_worker():
                on_trial(t.params["lr"], t.params["batch"], t.user_attrs.get(METRICS, {}))
    write_text_atomic(config.out / "best.json", json.dumps(content, indent=2) + "\n")
    return content


def this_worker() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid()}


def work(config: TuneConfig, study: optuna.Study, storage: BaseStorage,
         on_trial: Callable[[float, int, dict], None] | None) -> None:
    """Train queued points until the queue is empty: FAIL, then re-raise, if training raises."""
    from optuna.trial import TrialState

    while (asked := pop(config, study)) is not None:
        lr, batch = asked.params["lr"], asked.params["batch"]
        if (first := duplicate_of(study, asked.number, (lr, batch))) is not None:
            asked.set_user_attr("duplicate_of", first)
            study.tell(asked, state=TrialState.PRUNED)
            continue
        try:
            with heartbeat(storage, trial_id(study, storage, asked.number)):
                summary = trial(config, lr, batch)
        except (Exception, KeyboardInterrupt):  # as study.optimize: Ctrl-C fails the trial too
            study.tell(asked, state=TrialState.FAIL, skip_if_finished=True)
            raise
        asked.set_user_attr(METRICS, {k: v for k, v in summary.items() if isinstance(v, float)})
        loss = summary["val_loss"]
        # skip_if_finished: a worker whose heartbeat stalled past the grace period finds its
        # trial failed by another, which trains the point again: drop this result, go on
        study.tell(asked, loss if math.isfinite(loss) else math.inf, skip_if_finished=True)
        if on_trial is not None:
            on_trial(lr, batch, summary)


def pop(config: TuneConfig, study: optuna.Study) -> optuna.trial.Trial | None:
    """The next queued trial, now this worker's; None when the queue is empty. A worker that
    loses the race for the last queued trial gets a new one, a sampled point, which
    :func:`duplicate_of` prunes unless its point is left to train."""
    from optuna.distributions import CategoricalDistribution
    from optuna.trial import TrialState

    if not study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
        return None
    with warnings.catch_warnings():  # the heartbeat is kept by :func:`heartbeat` instead
        warnings.filterwarnings("ignore", message="Heartbeat of storage")
        asked = study.ask({"lr": CategoricalDistribution(config.lrs),
                           "batch": CategoricalDistribution(config.batches)})
    asked.set_user_attr(WORKER, this_worker())
    return asked


def duplicate_of(study: optuna.Study, number: int, point: Point) -> int | None:
    """The trial that trains ``point`` instead of trial ``number``, if any: a COMPLETE one, or
    an earlier one queued or running (the point was enqueued twice)."""
    from optuna.trial import TrialState

    first = [t.number for t in live_trials(study) if t.number != number and point_of(t) == point
             and (t.state == TrialState.COMPLETE or t.number < number)]
    return min(first, default=None)


def enqueue_missing(study: optuna.Study, grid: list[Point]) -> None:
    """Queue, in grid order, each point with no trial finished, queued or running."""
    taken = {point_of(t) for t in live_trials(study)}
    for lr, batch in grid:
        if (lr, batch) not in taken:
            study.enqueue_trial({"lr": lr, "batch": batch})


def live_trials(study: optuna.Study) -> list[FrozenTrial]:
    """The trials that hold their point: COMPLETE, queued (WAITING) or RUNNING."""
    from optuna.trial import TrialState

    return study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.WAITING,
                                                    TrialState.RUNNING))


def fail_gone_workers(study: optuna.Study, storage: BaseStorage) -> None:
    """FAIL the RUNNING trials whose worker is gone (see the module's docstring)."""
    import optuna
    from optuna.exceptions import ExperimentalWarning, UpdateFinishedTrialError
    from optuna.trial import TrialState

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)  # a no-op without a heartbeat (journal)
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if worker_gone(t):
            with contextlib.suppress(UpdateFinishedTrialError):  # another worker was first
                storage.set_trial_state_values(trial_id(study, storage, t.number),
                                               TrialState.FAIL)


def worker_gone(running: FrozenTrial) -> bool:
    """Whether the worker of a RUNNING trial is known to have stopped (module docstring)."""
    worker = running.user_attrs.get(WORKER)
    if worker is None:
        return datetime.now() - running.datetime_start > timedelta(seconds=2 * HEARTBEAT_S)
    me = this_worker()
    if worker["host"] != me["host"]:
        return False
    if worker == me:
        return True
    try:
        os.kill(worker["pid"], 0)  # signal 0: only the check that the process exists
    except ProcessLookupError:
        return True
    except PermissionError:  # it exists, as another user's process
        pass
    return False


def point_of(t: FrozenTrial) -> Point | None:
    """A trial's (lr, batch), queued or asked; None for a trial asked but not yet suggested."""
    params = t.system_attrs.get("fixed_params", t.params)
    return (params["lr"], params["batch"]) if params else None


def completed(study: optuna.Study) -> set[Point]:
    from optuna.trial import TrialState

    return {point_of(t) for t in study.get_trials(deepcopy=False,
                                                   states=(TrialState.COMPLETE,))}


def running_points(study: optuna.Study) -> dict[Point, str]:
    """The points trained right now, each with its worker as ``host pid N``."""
    from optuna.trial import TrialState

    running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    return {point_of(t): worker_name(t) for t in running if point_of(t) is not None}


def worker_name(t: FrozenTrial) -> str:
    worker = t.user_attrs.get(WORKER)
    return f"{worker['host']} pid {worker['pid']}" if worker else "no worker recorded"


def trial_id(study: optuna.Study, storage: BaseStorage, number: int) -> int:
    """A trial's storage id, which the storage's own calls (state, heartbeat) take."""
    return storage.get_trial_id_from_study_id_trial_number(
        storage.get_study_id_from_name(study.study_name), number)


@contextlib.contextmanager
def heartbeat(storage: BaseStorage, storage_id: int) -> Iterator[None]:
    """Optuna's heartbeat for the trial ``storage_id`` while it trains (RDB storages only), as
    ``study.optimize`` keeps one: a thread records it every :data:`HEARTBEAT_S` seconds, and
    stops with the process, so a killed worker's trial goes stale."""
    from optuna.storages import RDBStorage

    if not isinstance(storage, RDBStorage):
        yield
        return
    stop = threading.Event()

    def beat() -> None:
        while True:
            storage.record_heartbeat(storage_id)
            if stop.wait(HEARTBEAT_S):
                return

    thread = threading.Thread(target=beat, name="optuna-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def trial(config: TuneConfig, lr: float, batch: int) -> dict:
    """One point trained by this process alone: its summary (the objective is its val_loss)."""
    point = config.point(lr, batch)
    summary, _ = finetune.run(point, start=finetune.starting_point(point, alone=True))
    shutil.rmtree(point.out)  # a trial's weights are not worth keeping
    return summary
