"""MLflow as a thin layer around training: the trainer only ever sees an ``on_epoch`` callback.

Backend: ``sqlite:///mlflow.db`` (MLflow 3 refuses a bare ./mlruns file store) with artifacts in
``mlruns/``, both relative to the working directory (the checkout's root, where DVC runs every
stage), so a checkout moved or copied elsewhere still opens its runs and models. Open the UI
from there with
``mlflow ui --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1 --port 5000``.
"""
from __future__ import annotations

import os
import subprocess
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from agecascade.atomic import write_text_atomic

DEFAULT_URI = "sqlite:///mlflow.db"
ARTIFACTS = Path("mlruns")
RUN_ID_FILE = "mlflow_run_id"


def git_commit() -> str:
    """HEAD's hash, with '-dirty' when the working tree differs: a run must name its code."""
    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], capture_output=True, text=True)
        return done.stdout.strip() if done.returncode == 0 else ""
    head = git("rev-parse", "HEAD") or "unknown"
    return head + ("-dirty" if git("status", "--porcelain", "--untracked-files=no") else "")


# Where DVC runs a queued (`dvc exp run --queue`) or `--temp` experiment: a copy of the checkout
# at <checkout>/.dvc/tmp/exps/<tmp>/, deleted when the experiment ends.
EXPERIMENT_COPIES = (".dvc", "tmp", "exps")


def user_checkout(cwd: Path) -> Path | None:
    """The checkout whose DVC experiment runs in the temporary copy ``cwd``, else None."""
    parts = cwd.resolve().parts
    n = len(EXPERIMENT_COPIES)
    for i in range(len(parts) - n, 0, -1):
        if parts[i:i + n] == EXPERIMENT_COPIES and len(parts) > i + n:
            return Path(*parts[:i])
    return None


def checkout_store(checkout: Path) -> str:
    """The SQLite store of ``checkout``, by absolute path: what a DVC experiment's copy logs to."""
    return f"sqlite:///{checkout / 'mlflow.db'}"


def tracking_uri() -> str:
    """MLFLOW_TRACKING_URI, else the checkout's SQLite store; points MLflow's module API at it.

    In the temporary copy of a queued DVC experiment the checkout's store is the user's, by
    absolute path, not the copy's (which DVC deletes with the copy); see also
    :func:`experiment_id`, which links the artifacts."""
    import mlflow

    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri is None:
        checkout = user_checkout(Path.cwd())
        uri = DEFAULT_URI if checkout is None else checkout_store(checkout)
    mlflow.set_tracking_uri(uri)
    return uri


def _link_artifacts(uri: str, experiment: str) -> None:
    """In a queued DVC experiment's copy, make ``mlruns/<experiment>`` a link to the checkout's:
    the store's artifact locations are relative (``mlruns/<id>``), so MLflow writes them under
    the working directory. The link sits inside ``mlruns/``, whose content git ignores, so the
    experiment's commit does not carry it."""
    checkout = user_checkout(Path.cwd())
    link = ARTIFACTS / experiment
    if checkout is None or uri != checkout_store(checkout) or link.is_symlink():
        return  # not in a copy, or another store (MLFLOW_TRACKING_URI), or linked already
    if link.exists():
        raise RuntimeError(f"{link.resolve()} is a folder; in a DVC experiment's copy it must "
                           f"link to {checkout / link}")
    (checkout / link).mkdir(parents=True, exist_ok=True)
    ARTIFACTS.mkdir(exist_ok=True)
    link.symlink_to(checkout / link, target_is_directory=True)


def experiment_id(name: str) -> str:
    """The id of experiment ``name``, created on first use with its artifacts under a relative
    ``mlruns/<id>`` when the store is a database of ours (linked to the checkout's from a queued
    DVC experiment's copy)."""
    import mlflow

    uri = tracking_uri()
    with _first_use_lock(uri):
        found = mlflow.get_experiment_by_name(name)
        if found is not None:
            _link_artifacts(uri, found.experiment_id)
            return found.experiment_id
        created = mlflow.create_experiment(name)
        _relative_artifact_location(uri, created)
        _link_artifacts(uri, created)
        return created


@contextmanager
def _first_use_lock(uri: str) -> Iterator[None]:
    """Serialise the first touch of a local SQLite store between processes. Two processes that
    open a new store at once both run MLflow's schema migrations, and one fails (``table
    _alembic_tmp_tags already exists``); two that create one experiment at once make it twice.
    Parallel `tune` workers and `dvc queue start -j N` do both. A lock file beside the database
    (``mlflow.db.lock``) holds each process here for the few milliseconds it takes."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    import fcntl

    lock = Path(uri[len("sqlite:///"):] + ".lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _relative_artifact_location(uri: str, experiment: str) -> None:
    """Store ``mlruns/<id>`` as the artifact location of ``experiment`` and of MLflow's Default
    experiment (0, made with the database).

    MLflow resolves any local artifact location to an absolute path when it creates an
    experiment, and every run and logged model copies that prefix into its own artifact URI (a
    model version into its storage location), so a moved checkout would look for its artifacts
    in the old folder. They all derive theirs from the experiment's, so rewriting it before the
    first run keeps every one relative. Only the location MLflow itself chose is rewritten, and
    a tracking server (http) owns its artifact root and is left alone.
    """
    from mlflow.store.db.db_types import DATABASE_ENGINES

    if uri.split(":", 1)[0].split("+", 1)[0] not in DATABASE_ENGINES:
        return
    import sqlalchemy

    update = "UPDATE experiments SET artifact_location = :relative WHERE experiment_id = :id"
    engine = sqlalchemy.create_engine(uri)
    try:
        with engine.begin() as connection:
            connection.execute(sqlalchemy.text(update), {
                "id": int(experiment), "relative": (ARTIFACTS / experiment).as_posix()})
            connection.execute(sqlalchemy.text(update + " AND artifact_location = :chosen"), {
                "id": 0, "relative": (ARTIFACTS / "0").as_posix(),
                "chosen": (ARTIFACTS.resolve() / "0").as_posix()})
    finally:
        engine.dispose()


@contextmanager
def tracked_run(experiment: str, run_name: str, out: Path, tags: dict[str, str],
                params: dict) -> Iterator[object]:
    """Start a run, or resume the one an interrupted attempt with the same params left its id
    for in ``out``, so a resumed training continues the same curves instead of starting a
    second, partial run. An exception ends the run as FAILED (MLflow's ``start_run`` does)."""
    import mlflow

    exp = experiment_id(experiment)
    run_id_path = out / RUN_ID_FILE
    resume = resumable_run(run_id_path, exp, {k: str(v) for k, v in params.items()})
    with mlflow.start_run(run_id=resume, experiment_id=None if resume else exp,
                          run_name=None if resume else run_name) as run:
        out.mkdir(parents=True, exist_ok=True)
        write_text_atomic(run_id_path, run.info.run_id)  # a torn id would orphan the run
        mlflow.set_tags({**tags, "git_commit": git_commit()})
        if not resume:
            mlflow.log_params(params)
        yield run
    run_id_path.unlink(missing_ok=True)


def resumable_run(run_id_path: Path, experiment: str, params: dict[str, str],
                  parent: str | None = None) -> str | None:
    """The run id left in ``run_id_path`` if that run may be continued: unfinished, in
    ``experiment``, logged with exactly ``params`` (a retry with other settings must not add its
    curves to the old attempt's params) and, for a nested run, under ``parent``. A left-over run
    that is still marked RUNNING but will not be continued is ended as KILLED: its process is
    gone."""
    from mlflow import MlflowClient
    from mlflow.entities import LifecycleStage, RunStatus
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import (INVALID_PARAMETER_VALUE, RESOURCE_DOES_NOT_EXIST,
                                              ErrorCode)

    if not run_id_path.exists():
        return None
    run_id = run_id_path.read_text().strip()
    client = MlflowClient()
    try:
        old = client.get_run(run_id)
    except MlflowException as err:  # another store's run, or a file that is not an id
        if err.error_code in (ErrorCode.Name(RESOURCE_DOES_NOT_EXIST),
                              ErrorCode.Name(INVALID_PARAMETER_VALUE)):
            return None
        raise
    if old.info.lifecycle_stage == LifecycleStage.DELETED:
        return None
    status = old.info.status
    if (status != RunStatus.to_string(RunStatus.FINISHED)
            and old.info.experiment_id == experiment and old.data.params == params
            and old.data.tags.get("mlflow.parentRunId") == parent):
        return run_id
    if status == RunStatus.to_string(RunStatus.RUNNING):
        client.set_terminated(run_id, RunStatus.to_string(RunStatus.KILLED))
    return None


def log_epoch(epoch: int, metrics: dict[str, float]) -> None:
    import mlflow

    mlflow.log_metrics(metrics, step=epoch)


def log_child_run(name: str, metrics: dict[str, float], tags: dict[str, str] | None = None,
                  artifacts: tuple[Path, ...] = ()) -> None:
    """One nested run under the active run: a fold of a protocol, say."""
    import mlflow

    parent = mlflow.active_run()  # a nested run would otherwise land in the default experiment
    with mlflow.start_run(run_name=name, nested=True, experiment_id=parent.info.experiment_id):
        mlflow.set_tags(tags or {})
        mlflow.log_metrics(metrics)
        for path in artifacts:
            mlflow.log_artifact(str(path))


def log_final(summary: dict[str, float], out: Path) -> None:
    """Final scores, the files DVC also tracks, and ``out/model.pt`` as the run's model: the
    registry's AgeEstimator pyfunc (models from code, no pickle), so a training run's model
    loads, serves and is promoted (``agecascade promote --run-id``) like the champion.

    Under ``dvc repro`` the model refers to ``model.pt`` by path and md5 instead of holding a
    copy: the file is the stage's out, so DVC keeps its bytes (workspace and cache) and a second
    copy in mlruns/ would only double the disk a checkpoint takes. Run by hand, nothing else
    keeps the file (a rerun overwrites it), so the model carries it.
    """
    from agecascade.serving import log_age_estimator

    log_summary({f"final_{k}": v for k, v in summary.items()}, out, ("metrics.json", "history.csv"))
    checkpoint = out / "model.pt"
    log_age_estimator(checkpoint, by_reference=dvc_keeps(checkpoint))


def dvc_keeps(path: Path) -> bool:
    """Whether DVC will cache ``path`` once this command ends: it runs as a DVC stage (DVC sets
    DVC_STAGE for each stage's command) and the file lies in the working directory, the
    checkout, where a stage's outs are."""
    return "DVC_STAGE" in os.environ and Path(os.path.abspath(path)).is_relative_to(Path.cwd())


def log_summary(summary: dict, out: Path, files: tuple[str, ...]) -> None:
    """The numbers of a summary as metrics (text values as tags) and the named files of ``out``."""
    import mlflow

    mlflow.log_metrics({k: float(v) for k, v in summary.items() if isinstance(v, (int, float))})
    mlflow.set_tags({k: v for k, v in summary.items() if isinstance(v, str)})
    for name in files:
        mlflow.log_artifact(str(out / name))
